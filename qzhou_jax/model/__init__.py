"""Qwen2.5 encoder and embedding head (Flax NNX)."""

from qzhou_jax.model.embedder import EmbeddingModel, embed, finish, pool
from qzhou_jax.model.init import abstract_model, create_model, param_count
from qzhou_jax.model.qwen2 import ParamSpec, Qwen2Encoder, forward, param_specs

__all__ = [
    "EmbeddingModel", "embed", "finish", "pool", "abstract_model", "create_model", "param_count",
    "ParamSpec", "Qwen2Encoder", "forward", "param_specs",
]
