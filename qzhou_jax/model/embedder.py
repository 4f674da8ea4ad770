"""Embedding head: pooling over the attention mask, optional Matryoshka truncation, L2 norm."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qzhou_jax.config import ModelConfig
from qzhou_jax.model import qwen2


def pool(hidden: jax.Array, attention_mask: jax.Array, kind: str) -> jax.Array:
    """[B,S,E] -> [B,E] in float32.

    mean: average over every non-pad token (instruction tokens included);
    last: the last non-pad token, found from the mask, so either padding side works.
    Pad positions are selected out with `where`, never multiplied, so garbage there
    (e.g. NaN rows from a fused kernel) cannot leak in.
    """
    valid = attention_mask.astype(bool)
    h = hidden.astype(jnp.float32)
    if kind == "mean":
        total = jnp.sum(jnp.where(valid[..., None], h, 0.0), axis=1)
        count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(jnp.float32)
        return total / count
    if kind == "last":
        idx = jnp.argmax(jnp.where(valid, jnp.arange(valid.shape[1]), -1), axis=1)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling: expected 'mean' or 'last', got {kind!r}")


def finish(pooled: jax.Array, cfg: ModelConfig, dim: int | None = None) -> jax.Array:
    """Matryoshka truncation (to `dim` or cfg.embedding_dim) then L2 normalization."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                            or not 1 <= dim <= pooled.shape[-1]):
        raise ValueError(f"dim: expected an integer from 1 to the hidden size {pooled.shape[-1]}, got {dim!r}")
    dim = dim or cfg.embedding_dim
    if dim is not None:
        pooled = pooled[..., :dim]
    if cfg.normalize:
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


def embed(params: Mapping[str, Any], cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
          dim: int | None = None) -> jax.Array:
    """Pure function: encoder params + token batch -> float32 embeddings [B, dim].

    input_ids: integer [B, L]; attention_mask: [B, L], 1 for tokens (either padding side)."""
    _check_inputs(input_ids, attention_mask)
    hidden = qwen2.forward(params, cfg, input_ids, attention_mask)
    return finish(pool(hidden, attention_mask, cfg.pooling), cfg, dim)


def _check_inputs(input_ids: Any, attention_mask: Any) -> None:
    """Shapes and dtypes, at trace time (values are not read)."""
    ids, mask = jnp.shape(input_ids), jnp.shape(attention_mask)
    if len(ids) != 2:
        raise ValueError(f"input_ids: expected a [batch, length] array, got shape {ids}")
    if mask != ids:
        raise ValueError(f"attention_mask: shape {mask} differs from input_ids' {ids}")
    if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {jnp.result_type(input_ids)}")


def embed_many(params: Mapping[str, Any], cfg: ModelConfig, inputs, dim: int | None = None) -> list[jax.Array]:
    """`embed` for several token batches [(input_ids, attention_mask), ...] in one pass over
    the layers (`qwen2.forward_many`): the train step embeds queries and passages this way."""
    return _head(cfg, inputs, dim)(qwen2.forward_many(params, cfg, inputs))


def _head(cfg: ModelConfig, inputs, dim: int | None):
    return lambda hidden: [finish(pool(h, inp[1], cfg.pooling), cfg, dim) for h, inp in zip(hidden, inputs)]


def embed_many_saving(params: Mapping[str, Any], cfg: ModelConfig, inputs) -> tuple[list[jax.Array], Any]:
    """`embed_many` that also returns each layer's input (`qwen2.forward_saving`), for
    `embed_many_backward`: GradCache's first pass for the chunks it keeps."""
    return qwen2.forward_saving(params, cfg, inputs, _head(cfg, inputs, None))


def embed_many_backward(params: Mapping[str, Any], cfg: ModelConfig, inputs, saved: Any,
                        d_emb: list[jax.Array]) -> dict[str, Any]:
    """d params of `embed_many(params, cfg, inputs)` pulled back from the embeddings'
    cotangents `d_emb`, from `saved` (`embed_many_saving`) instead of a new forward pass."""
    return qwen2.backward_saved(params, cfg, inputs, _head(cfg, inputs, None), saved, list(d_emb))


class EmbeddingModel(nnx.Module):
    """Qwen2 encoder + pooling + normalization: the trained object."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = qwen2.Qwen2Encoder(cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, dim: int | None = None) -> jax.Array:
        return embed(self.encoder.params(), self.cfg, input_ids, attention_mask, dim)
