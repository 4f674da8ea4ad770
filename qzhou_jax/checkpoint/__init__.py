"""Checkpoints: HuggingFace safetensors folders and Orbax.

- `load_pretrained(path, mesh)`: config, params and tokenizer of a HF folder or of an
  Orbax folder written by `convert hf-to-orbax` / `save_orbax_params` (told apart by the
  `QZHOU_CHECKPOINT` marker), every parameter placed in its sharding on `mesh`.
- `load_hf_params` / `save_hf`: HF safetensors (+ sentence-transformers files) <-> params.
- `save_orbax_params` / `load_orbax_params`: Orbax params folders (and training checkpoints).
- `qzhou_jax.checkpoint.convert`: the `convert` CLI and `hf_to_orbax` / `orbax_to_hf`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from jax.sharding import Mesh

from qzhou_jax.checkpoint.export import save_hf
from qzhou_jax.checkpoint.hf import iter_hf_tensors, load_hf_params
from qzhou_jax.checkpoint.orbax_io import (is_orbax_checkpoint, load_orbax, load_orbax_params,
                                           open_params_checkpoint, save_orbax_params)
from qzhou_jax.config import ModelConfig


class Pretrained(NamedTuple):
    config: ModelConfig
    params: dict
    tokenizer_path: str


def load_pretrained(path: str | os.PathLike, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                    **config_overrides: Any) -> Pretrained:
    """Config, parameters and tokenizer folder of a saved model.

    `path` is a HF checkpoint folder (config.json + safetensors + tokenizer files), an
    Orbax folder written by this package (params/ + qzhou_config.json + tokenizer/), or a
    training run's checkpoints/ folder (its latest step) or one step folder of it.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model folder not found")
    if is_orbax_checkpoint(path):
        cfg, params, tokenizer_dir = load_orbax(path, mesh, rules, **config_overrides)
        return Pretrained(_portable(cfg, mesh, config_overrides), params,
                          tokenizer_dir or os.path.join(path, "tokenizer"))
    if os.path.isdir(os.path.join(path, "params")) and os.path.isfile(os.path.join(path, "qzhou_config.json")):
        raise ValueError(f"{path}: incomplete Orbax checkpoint (QZHOU_CHECKPOINT marker missing: the conversion "
                         "that wrote it did not finish)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
            # HF weights without their config (as `convert hf-to-orbax` says), not a training checkpoint
            raise FileNotFoundError(f"{os.path.join(path, 'config.json')}: no config.json found")
        # a training checkpoint: a run's checkpoints/ folder (latest step) or one step of it
        cfg, params, tokenizer_dir = load_orbax(path, mesh, rules, **config_overrides)
        if tokenizer_dir is None:
            raise FileNotFoundError(f"{path}: no tokenizer/ folder next to the checkpoint")
        return Pretrained(_portable(cfg, mesh, config_overrides), params, tokenizer_dir)
    cfg, params = load_hf_params(path, mesh, rules, **config_overrides)
    return Pretrained(_portable(cfg, mesh, config_overrides), params, path)


KERNEL_PLATFORM = {"cudnn": "gpu", "splash": "tpu"}


def _portable(cfg: ModelConfig, mesh: Mesh | None, overrides: Mapping[str, Any]) -> ModelConfig:
    """A saved config's attention kernel is the training machine's (cuDNN on GPU, splash on TPU);
    on another platform the model runs XLA attention, the same function, unless the caller asked
    for a kernel."""
    import logging

    from qzhou_jax.sharding import platform as platform_of

    want = KERNEL_PLATFORM.get(cfg.attention_impl)
    if want is None or "attention_impl" in overrides:
        return cfg
    platform = platform_of(mesh)
    if platform == want:
        return cfg
    logging.getLogger(__name__).info("the model was saved with attention_impl %r (a %s kernel); on %s it runs "
                                     "'xla' attention", cfg.attention_impl, want.upper(), platform)
    return cfg.replace(attention_impl="xla")


__all__ = [
    "Pretrained", "load_pretrained", "load_hf_params", "iter_hf_tensors", "save_hf", "save_orbax_params",
    "load_orbax_params", "open_params_checkpoint", "is_orbax_checkpoint",
]
