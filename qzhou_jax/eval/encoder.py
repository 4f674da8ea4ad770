"""Encoding many texts: length-sorted, bucketed, sharded over the local devices, input order kept."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model.embedder import embed
from qzhou_jax.tokenizer import Tokenizer, format_prompt


class Encoder:
    """Embeds texts with a model's parameters.

    Texts are tokenized once, sorted by length, cut into batches of `batch_size`, each
    padded to its bucket length (and the last one to the full batch size), so only a few
    shapes are ever compiled. With a mesh, batches are sharded over its data axes and
    the parameters keep whatever sharding they have.
    """

    def __init__(self, params: Mapping[str, Any], cfg: ModelConfig, tokenizer: Tokenizer,
                 batch_size: int = 32, mesh: Mesh | None = None):
        if mesh is None:  # parameters placed on a mesh imply it
            leaf = jax.tree.leaves(params)[0]
            mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
            mesh = mesh if isinstance(mesh, Mesh) and mesh.size > 1 else None
        self.params, self.cfg, self.tokenizer, self.mesh = params, cfg, tokenizer, mesh
        dp = sharding.data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = int(math.ceil(batch_size / dp) * dp)
        self._embed = jax.jit(lambda p, ids, mask: embed(p, cfg, ids, mask))
        self.stats = {"tokens": 0, "padded_tokens": 0, "batches": 0}

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.mesh is None:
            return np.asarray(self._embed(self.params, ids, mask))
        shard = sharding.batch_sharding(self.mesh, 2)
        ids_g = jax.make_array_from_callback(ids.shape, shard, lambda i: ids[i])
        mask_g = jax.make_array_from_callback(mask.shape, shard, lambda i: mask[i])
        with sharding.use_mesh(self.mesh):
            out = self._embed(self.params, ids_g, mask_g)
        return np.asarray(jax.device_get(out))

    def encode(self, texts: Sequence[str], instruction: str | None = None, progress: bool = False,
               sort_by_length: bool = True) -> np.ndarray:
        """float32 embeddings [len(texts), dim] in the order of `texts`."""
        seqs = self.tokenizer.encode([format_prompt(t, instruction) for t in texts])
        order = np.argsort([-len(s) for s in seqs], kind="stable") if sort_by_length else np.arange(len(seqs))
        out = np.zeros((len(seqs), self.cfg.output_dim), np.float32)
        starts = range(0, len(seqs), self.batch_size)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), unit="text", file=sys.stderr, desc="encode")
        for start in starts:
            idx = order[start:start + self.batch_size]
            batch = [seqs[i] for i in idx]
            ids, mask = self.tokenizer.pad(batch, rows=self.batch_size)
            out[idx] = self._run(ids, mask)[: len(idx)]
            self.stats["tokens"] += int(mask.sum())
            self.stats["padded_tokens"] += int(mask.size)
            self.stats["batches"] += 1
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    @property
    def padding_fraction(self) -> float:
        total = self.stats["padded_tokens"]
        return 0.0 if total == 0 else 1.0 - self.stats["tokens"] / total
