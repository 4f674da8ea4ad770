"""HuggingFace safetensors <-> qzhou-jax parameters, one tensor at a time.

Names and layouts come from `model.qwen2.param_specs`: HF stores a Linear weight as
[out, in]; here it is [in..., out...] with heads split out, and layers are stacked.

Loading streams: each HF tensor is read, converted, and written into its slot of
a pre-allocated sharded device array, so the host holds one tensor at a time and no
device holds more than its shard. Saving gathers one layer's tensor at a time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qzhou_jax import sharding
from qzhou_jax.checkpoint.safetensors_io import TensorStore
from qzhou_jax.config import ModelConfig
from qzhou_jax.model.qwen2 import ParamSpec, check_param_split, param_specs

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def from_hf_layout(spec: ParamSpec, t: np.ndarray) -> np.ndarray:
    """One HF tensor (one layer) -> this project's layout for that layer."""
    shape = spec.shape[1:] if spec.stacked else spec.shape
    if not spec.fan_in:
        return t.reshape(shape)
    return np.ascontiguousarray(t.T).reshape(shape)


def to_hf_layout(spec: ParamSpec, x: np.ndarray) -> np.ndarray:
    """One layer of a parameter -> the HF tensor ([out, in] for Linear weights)."""
    if spec.fan_in is None:
        return np.ascontiguousarray(x)
    if spec.fan_in == 0:
        return np.ascontiguousarray(x).reshape(-1)
    n_in = math.prod(x.shape[:spec.fan_in])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


def hf_shape(spec: ParamSpec) -> tuple[int, ...]:
    shape = spec.shape[1:] if spec.stacked else spec.shape
    if spec.fan_in is None:
        return tuple(shape)
    if spec.fan_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[spec.fan_in:]), math.prod(shape[:spec.fan_in]))


def hf_names(spec: ParamSpec, cfg: ModelConfig, prefix: str = "") -> list[str]:
    if spec.stacked:
        return [prefix + spec.hf.format(i=i) for i in range(cfg.num_hidden_layers)]
    return [prefix + spec.hf]


def detect_prefix(names: list[str]) -> str:
    """'model.' for Qwen2ForCausalLM checkpoints, '' for bare Qwen2Model/QZhouModel ones."""
    names = set(names)
    if "model.embed_tokens.weight" in names:
        return "model."
    if "embed_tokens.weight" in names:
        return ""
    raise ValueError("no embed_tokens.weight (with or without 'model.' prefix) in the checkpoint")


def check_tensors(store: TensorStore, cfg: ModelConfig, where: str) -> str:
    """Missing/unexpected/mis-shaped tensors -> ValueError naming them. Returns the prefix."""
    prefix = detect_prefix(store.names())
    expected: dict[str, tuple[int, ...]] = {}
    for spec in param_specs(cfg).values():
        for name in hf_names(spec, cfg, prefix):
            expected[name] = hf_shape(spec)
    present = set(store.names())
    missing = [n for n in expected if n not in present]
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = []
    for n in sorted(present - set(expected)):
        if n == "lm_head.weight":
            log.info("%s: ignoring lm_head.weight (an embedding model has no LM head)", where)
        elif not n.endswith(IGNORED_SUFFIXES):
            extra.append(n)
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        got = tuple(store.shape(name))
        if got != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {got}, config.json implies {shape}")
        kind = np.dtype(store.dtype(name))
        if kind.kind in "iub":  # cast to float, integers would load as garbage weights
            raise ValueError(f"{where}: tensor {name!r} is stored as {kind.name}, not floating point (a quantized "
                             "checkpoint? load the unquantized weights)")
    return prefix


class DictStore:
    """A TensorStore over in-memory arrays (e.g. a torch state dict turned into numpy)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], folder: str = "<in memory>"):
        self.tensors, self.folder = tensors, folder

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.tensors[name].dtype)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name])


def _target_sharding(spec: ParamSpec, mesh: Mesh | None, rules) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding.named_sharding(spec.axes, mesh, rules, spec.shape)


def _place(host: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
    """Host array -> global array in `target`; each process only reads its own shards."""
    return jax.make_array_from_callback(host.shape, target, lambda idx: host[idx])


def _stack_into(spec: ParamSpec, layers: Iterator[np.ndarray], dtype, target) -> jax.Array:
    """Fill a [L, ...] sharded array one layer at a time (donated in-place updates)."""
    if isinstance(target, NamedSharding):
        layer_target = NamedSharding(target.mesh, PartitionSpec(*tuple(target.spec)[1:]))
    else:
        layer_target = target
    buf = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=target)()
    # dynamic_update_slice updates the donated buffer in place; `a.at[i].set(x)` lowers to a
    # scatter that XLA:CPU runs in float32 over the whole stack (3x the memory for bf16).
    set_layer = jax.jit(lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x, i, 0),
                        donate_argnums=0, out_shardings=target)
    for i, layer in enumerate(layers):
        buf = set_layer(buf, _place(layer, layer_target), np.int32(i))
    return buf


def iter_params(store: TensorStore, cfg: ModelConfig, mesh: Mesh | None = None,
                rules: Mapping[str, Any] | None = None, where: str = "") -> Iterator[tuple[str, jax.Array]]:
    """("layers/q_kernel", sharded array) per parameter of a checked HF checkpoint, one
    parameter at a time (stacked ones are filled one layer at a time)."""
    prefix = check_tensors(store, cfg, where or store.folder)
    check_param_split(cfg, mesh, rules, strict=False)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for path, spec in param_specs(cfg).items():
        target = _target_sharding(spec, mesh, rules)
        names = hf_names(spec, cfg, prefix)
        convert = lambda n: from_hf_layout(spec, np.asarray(store.get(n)).astype(dtype, copy=False))  # noqa: E731
        if spec.stacked:
            value = _stack_into(spec, (convert(n) for n in names), dtype, target)
        else:
            value = _place(convert(names[0]), target)
        yield path, value
        del value


def load_params(store: TensorStore, cfg: ModelConfig, mesh: Mesh | None = None,
                rules: Mapping[str, Any] | None = None, where: str = "") -> dict[str, Any]:
    """Stream a checked HF checkpoint into a nested params dict (as `Qwen2Encoder.params()`)."""
    params: dict[str, Any] = {}
    for path, value in iter_params(store, cfg, mesh, rules, where):
        node = params
        *groups, leaf = path.split("/")
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = value
    return params


def source_dtype(store: TensorStore) -> str:
    """The checkpoint's floating dtype as a ModelConfig dtype name.

    A checkpoint whose tensors mix dtypes (float32 norms beside bfloat16 matrices, as some
    mixed-precision trainers save) gives float32, which holds each of them exactly; casting
    all to one of the narrower dtypes would round the others."""
    names = store.names()
    prefix = detect_prefix(names)
    # the tensors that are loaded: not an LM head, nor buffers such as rotary_emb.inv_freq (float32 in
    # checkpoints of any dtype), which would make a bfloat16 checkpoint look mixed
    names = [n for n in names if n.startswith(prefix) and not n.endswith(("lm_head.weight", *IGNORED_SUFFIXES))]

    def dtype_of(name):
        return np.dtype(store.dtype(name)) if hasattr(store, "dtype") else np.asarray(store.get(name)).dtype

    kinds = {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}
    found: dict[str, int] = {}
    for name in names:
        dtype = dtype_of(name)
        if dtype.kind == "f" or dtype == np.dtype(jnp.bfloat16):
            key = kinds.get(dtype, "float32")
            found[key] = found.get(key, 0) + 1
    if len(found) > 1:
        log.warning("the checkpoint mixes floating dtypes (%s tensors): its parameters are kept as float32, "
                    "which holds each of them exactly", ", ".join(f"{n} {k}" for k, n in sorted(found.items())))
        return "float32"
    return next(iter(found), "float32")


def load_hf_params(path: str | os.PathLike, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                   **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and parameters from a HF checkpoint folder (config.json + safetensors)."""
    cfg = ModelConfig.from_hf(path, **config_overrides)
    return cfg, load_params(TensorStore(path), cfg, mesh, rules)


def _to_host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array -> one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=None)
def _layer_taker(sharding: jax.sharding.Sharding | None):
    """Jitted `a[i]` with a traced index: one compile per shape, the layer keeps the
    array's sharding minus the layer axis (no replication onto every device)."""
    out = None
    if isinstance(sharding, NamedSharding):
        out = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), out_shardings=out)


def _layer(stacked: Any, i: int) -> Any:
    if not isinstance(stacked, jax.Array):
        return np.asarray(stacked)[i]
    sh = stacked.sharding if isinstance(stacked.sharding, NamedSharding) else None
    return _layer_taker(sh)(stacked, np.int32(i))


def iter_gathered(params: Mapping[str, Any], cfg: ModelConfig,
                  prefix: str = "") -> Iterator[tuple[ParamSpec, str, np.ndarray]]:
    """(spec, HF name, host array in this package's layout), gathering one layer of one parameter
    at a time: the part of `iter_hf_tensors` that every process of a job must run alike.

    `params` may be any nested mapping (e.g. a lazy one that restores a parameter when it
    is looked up): each parameter is looked up once and dropped before the next.
    """
    for path, spec in param_specs(cfg).items():
        node = params
        for part in path.split("/"):
            node = node[part]
        names = hf_names(spec, cfg, prefix)
        for i, name in enumerate(names):
            yield spec, name, _to_host(_layer(node, i) if spec.stacked else node)
        del node


def iter_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig, dtype: str | None = None,
                    prefix: str = "", gathered: Iterator[tuple[ParamSpec, str, np.ndarray]] | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) pairs, gathering one layer of one parameter at a time (`iter_gathered`,
    or the `gathered` iterator given), cast to `dtype` and laid out as HF stores them."""
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
    for spec, name, host in (iter_gathered(params, cfg, prefix) if gathered is None else gathered):
        if out_dtype is not None:
            host = host.astype(out_dtype, copy=False)
        yield name, to_hf_layout(spec, host)
        del host
