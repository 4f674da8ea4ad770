"""Checkpoints: HuggingFace safetensors folders and Orbax."""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from jax.sharding import Mesh

from qzhou_jax.checkpoint.hf import iter_hf_tensors, load_hf_params
from qzhou_jax.config import ModelConfig


class Pretrained(NamedTuple):
    config: ModelConfig
    params: dict
    tokenizer_path: str


def load_pretrained(path: str | os.PathLike, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                    **config_overrides: Any) -> Pretrained:
    """Config, parameters and tokenizer folder of a saved model (a HF checkpoint folder)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model folder not found")
    cfg, params = load_hf_params(path, mesh, rules, **config_overrides)
    return Pretrained(cfg, params, path)


__all__ = ["Pretrained", "load_pretrained", "load_hf_params", "iter_hf_tensors"]
