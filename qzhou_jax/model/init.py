"""Creating models: abstract (shapes only), on one device, or directly sharded on a mesh."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model.embedder import EmbeddingModel
from qzhou_jax.model.qwen2 import check_param_split


def abstract_model(cfg: ModelConfig, seed: int = 0) -> EmbeddingModel:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(seed)))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, from abstract shapes."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def create_model(cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None,
                 rules: Mapping[str, Any] | None = None) -> EmbeddingModel:
    """A randomly initialized model; with `mesh`, every parameter is created in its sharding.

    Sharded creation runs the initializer under `jax.jit` with `out_shardings`, so no
    device ever holds a full copy of a large model.
    """
    if mesh is None:
        return EmbeddingModel(cfg, rngs=nnx.Rngs(seed))
    check_param_split(cfg, mesh, rules)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, seed))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.split(EmbeddingModel(cfg, rngs=nnx.Rngs(seed)))[1]

    init = jax.jit(init.__wrapped__, out_shardings=shardings)
    return nnx.merge(graphdef, init())
