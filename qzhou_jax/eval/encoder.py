"""Encoding many texts: length-sorted, bucketed, sharded over the local devices, input order kept."""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model.embedder import embed
from qzhou_jax.tokenizer import Tokenizer, format_prompt

log = logging.getLogger(__name__)


def length_buckets(max_length: int, per_doubling: int = 4, smallest: int = 16, multiple: int = 8) -> tuple[int, ...]:
    """Bucket lengths growing geometrically: `per_doubling` steps from each power of two to the next.

    Rounded up to `multiple` (friendly to matmul tiling) and capped by `max_length`, which
    is always the last bucket. `per_doubling=1` gives the powers of two; 4 wastes at most
    about 19% of a row to padding (about 8% on average over a length-sorted corpus), at the
    price of more compiled shapes (only the buckets that occur are ever compiled).
    """
    if per_doubling < 1:
        raise ValueError(f"per_doubling: expected a positive integer, got {per_doubling}")
    out, i = set(), 0
    while True:
        b = int(math.ceil(smallest * 2 ** (i / per_doubling) / multiple) * multiple)
        if b >= max_length:
            break
        out.add(b)
        i += 1
    out.add(int(max_length))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=32)
def _embed_fn(cfg: ModelConfig, mesh: Mesh | None):
    """One jitted embed per (config, mesh), shared by every Encoder: a new Encoder over new
    parameters (e.g. after more training steps) reuses the compiled programs."""
    if mesh is None:
        return jax.jit(lambda p, ids, mask: embed(p, cfg, ids, mask))
    # replicated output: every process can read all rows of its batch
    return jax.jit(lambda p, ids, mask: embed(p, cfg, ids, mask), out_shardings=NamedSharding(mesh, PartitionSpec()))


class Encoder:
    """Embeds texts with a model's parameters.

    Texts are tokenized once, sorted by length, cut into batches of `batch_size`, each
    padded to its bucket length (and the last one to the full batch size), so only a few
    shapes are ever compiled. With a mesh, batches are sharded over its data axes (across
    hosts too: every process passes the same texts and gets all embeddings back) and the
    parameters keep whatever sharding they have.

    `buckets` overrides the tokenizer's bucket lengths (see `length_buckets`); a single
    bucket equal to the tokenizer's max_length turns bucketing off.
    """

    def __init__(self, params: Mapping[str, Any], cfg: ModelConfig, tokenizer: Tokenizer,
                 batch_size: int = 32, mesh: Mesh | None = None, *, buckets: Sequence[int] | None = None):
        if mesh is None:  # parameters placed on a mesh imply it
            leaf = jax.tree.leaves(params)[0]
            mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
            mesh = mesh if isinstance(mesh, Mesh) and mesh.size > 1 else None
        tokenizer.check_fits(cfg.vocab_size, "tokenizer")
        self.params, self.cfg, self.tokenizer, self.mesh = params, cfg, tokenizer, mesh
        dp = sharding.data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = int(math.ceil(batch_size / dp) * dp)
        self.buckets = tuple(sorted(set(int(b) for b in buckets))) if buckets else tuple(tokenizer.buckets)
        if self.buckets[-1] < tokenizer.max_length:
            raise ValueError(f"buckets: the largest bucket {self.buckets[-1]} is below the tokenizer's "
                             f"max_length {tokenizer.max_length}")
        if tokenizer.max_length > cfg.max_position_embeddings:
            log.warning("max length %d exceeds the model's max_position_embeddings (%d): longer texts are "
                        "positions it was not trained on", tokenizer.max_length, cfg.max_position_embeddings)
        self._embed = _embed_fn(cfg, mesh)
        self.stats = {"tokens": 0, "padded_tokens": 0, "batches": 0, "texts": 0, "seconds": 0.0}

    def _bucket(self, length: int) -> int:
        for b in self.buckets:
            if b >= length:
                return b
        return self.buckets[-1]

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.mesh is None:
            return np.asarray(self._embed(self.params, ids, mask))
        shard = sharding.batch_sharding(self.mesh, 2)
        ids_g = jax.make_array_from_callback(ids.shape, shard, lambda i: ids[i])
        mask_g = jax.make_array_from_callback(mask.shape, shard, lambda i: mask[i])
        with sharding.use_mesh(self.mesh):
            out = self._embed(self.params, ids_g, mask_g)
        return np.asarray(out.addressable_data(0))

    def encode(self, texts: Sequence[str], instruction: str | None = None, progress: bool = False,
               sort_by_length: bool = True) -> np.ndarray:
        """float32 embeddings [len(texts), dim] in the order of `texts`.

        `instruction` is wrapped around every text with QZhou's template
        ("Instruct: {instruction}\\nQuery: {text}"); None leaves the texts as they are.
        """
        t0 = time.perf_counter()
        out = np.zeros((len(texts), self.cfg.output_dim), np.float32)
        if not len(texts):
            return out
        seqs = self.tokenizer.encode([format_prompt(t, instruction) for t in texts])
        order = np.argsort([-len(s) for s in seqs], kind="stable") if sort_by_length else np.arange(len(seqs))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), unit="text", file=sys.stderr, desc="encode")
        for start in range(0, len(seqs), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [seqs[i] for i in idx]
            length = self._bucket(max(len(s) for s in batch))
            ids, mask = self.tokenizer.pad(batch, rows=self.batch_size, length=length)
            out[idx] = self._run(ids, mask)[: len(idx)]
            self.stats["tokens"] += int(mask.sum())
            self.stats["padded_tokens"] += int(mask.size)
            self.stats["batches"] += 1
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        self.stats["texts"] += len(seqs)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    @property
    def padding_fraction(self) -> float:
        total = self.stats["padded_tokens"]
        return 0.0 if total == 0 else 1.0 - self.stats["tokens"] / total

    def describe(self) -> dict[str, Any]:
        """What a results file needs to say about how texts were encoded."""
        return {
            "max_length": int(self.tokenizer.max_length),
            "tokenizer": getattr(self.tokenizer, "path", None),
            "batch_size": self.batch_size,
            "buckets": list(self.buckets),
            "compute_dtype": self.cfg.compute_dtype,
            "param_dtype": self.cfg.param_dtype,
            "pooling": self.cfg.pooling,
            "normalize": self.cfg.normalize,
            "attention": self.cfg.attention,
            "embedding_dim": self.cfg.output_dim,
            "devices": int(self.mesh.size) if self.mesh is not None else 1,
        }
