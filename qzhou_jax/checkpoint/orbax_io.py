"""Orbax parameter checkpoints: written one parameter at a time, restored onto any mesh.

Layout of a folder written here (`save_orbax_params`, `convert hf-to-orbax`):

    <out>/params/              Orbax checkpoint; its pytree (params/state) is the nested
                               params dict {"embed_tokens", "layers": {...}, "final_norm"}
    <out>/qzhou_config.json    ModelConfig fields (param_dtype = the stored dtype)
    <out>/config.json          the same as a HuggingFace config.json
    <out>/tokenizer/           tokenizer files, when a tokenizer was given
    <out>/sentence_transformers.json   max_seq_length and prompts of the HF folder it came
                               from (`st_folder`), when it had them
    <out>/QZHOU_CHECKPOINT     JSON marker, written last: format, dtypes, where things are

The folder is assembled under a temporary name and renamed when complete, so a folder
with the final name always has its marker. The pytree is written with Orbax's partial
saving, one parameter per save, so only one (sharded) parameter is alive at a time; it
is a standard Orbax pytree and restores with `ocp.StandardCheckpointer().restore(
out/"params/state", target)` as well as with `load_orbax_params`.

Reading (`open_params_checkpoint`) also accepts training checkpoints: an Orbax
`CheckpointManager` folder (the latest step is used), one step folder of it, or a bare
pytree folder. The parameters are found inside the saved tree as the first dict holding
`embed_tokens`, `layers` and `final_norm` (e.g. under `params`, `params/encoder`; NNX
`{"value": ...}` wrappers are looked through); everything else (optimizer state, step)
is never read. Restoring places each parameter directly in its sharding on the mesh
(`sharding.named_sharding` of its declared logical axes), whatever mesh it was saved
from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from qzhou_jax import sharding, st_folder
from qzhou_jax.checkpoint.export import (atomic_output_dir, check_tokenizer, copy_tokenizer, release_host_memory,
                                         write_json)
from qzhou_jax.config import ModelConfig, naming_the_file, read_json
from qzhou_jax.model.qwen2 import ParamSpec, check_param_split, check_params, param_specs

log = logging.getLogger(__name__)

MARKER = "QZHOU_CHECKPOINT"
CONFIG_FILE = "qzhou_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT = "qzhou-jax-params"
FORMAT_VERSION = 1
_PYTREE_METADATA = "_METADATA"
_WRAPPER_KEYS = ("value", "raw_value")


# ------------------------------------------------------------------ configs
def config_to_json(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def read_model_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A ModelConfig from `qzhou_config.json` (ModelConfig fields) or a HF `config.json`
    (a file, or a folder holding either; qzhou_config.json wins)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (CONFIG_FILE, "config.json"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} or config.json")
    raw = read_json(path, "model config not found")
    if "model_type" in raw:
        return ModelConfig.from_hf(path, **overrides)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        log.warning("%s: ignoring unknown config field(s) %s", path, unknown)
    try:
        return ModelConfig(**{**{k: v for k, v in raw.items() if k in known}, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------- saving
def _nest(path: str, value: Any) -> dict:
    *groups, leaf = path.split("/")
    tree: dict = {leaf: value}
    for g in reversed(groups):
        tree = {g: tree}
    return tree


def _pytree_subdir(directory: str) -> str:
    """The folder holding the pytree of a finalized Orbax (v1 layout) checkpoint."""
    if os.path.isfile(os.path.join(directory, _PYTREE_METADATA)):
        return directory
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if os.path.isfile(os.path.join(sub, _PYTREE_METADATA)):
            return sub
    raise ValueError(f"{directory}: no Orbax pytree ({_PYTREE_METADATA}) found")


def write_params(directory: str, leaves: Iterable[tuple[str, jax.Array]]) -> str:
    """Save ("layers/q_kernel", array) pairs into one Orbax pytree checkpoint at `directory`.

    Each pair is saved (and then dropped by this function) before the next is pulled, with
    Orbax's partial saving, then the checkpoint is finalized. Returns the pytree folder.
    """
    from orbax.checkpoint.experimental.v1 import partial as ocp_partial

    count = 0
    for path, value in leaves:
        ocp_partial.save(directory, _nest(path, value))
        del value
        release_host_memory()
        count += 1
    if not count:
        raise ValueError(f"{directory}: no parameters to save")
    ocp_partial.finalize(directory)
    return _pytree_subdir(directory)


def write_orbax_folder(folder: str, cfg: ModelConfig, leaves: Iterable[tuple[str, jax.Array]],
                       tokenizer_dir: str | os.PathLike | None = None, source: str | None = None,
                       source_dtype: str | None = None, settings: st_folder.Settings | None = None) -> dict:
    """Fill an (empty, temporary) folder with params, configs, tokenizer, sentence-transformers
    settings; marker last."""
    with naming_the_file(folder):  # Orbax's OSErrors (a full disk) name no file
        pytree = write_params(os.path.join(folder, PARAMS_DIR), leaves)
    write_json(os.path.join(folder, CONFIG_FILE), config_to_json(cfg))
    write_json(os.path.join(folder, "config.json"), cfg.to_hf(cfg.param_dtype))
    if settings is not None and settings != st_folder.Settings():
        st_folder.save_settings(folder, settings)
    tok = None
    if tokenizer_dir is not None:
        os.makedirs(os.path.join(folder, TOKENIZER_DIR))
        if copy_tokenizer(tokenizer_dir, os.path.join(folder, TOKENIZER_DIR)):
            tok = TOKENIZER_DIR
        else:
            os.rmdir(os.path.join(folder, TOKENIZER_DIR))
    info = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "params": os.path.relpath(pytree, folder).replace(os.sep, "/"),
        "param_dtype": cfg.param_dtype, "source_dtype": source_dtype or cfg.param_dtype,
        "source": source, "tokenizer": tok, "param_paths": list(param_specs(cfg)),
    }
    write_json(os.path.join(folder, MARKER), info)
    return info


def save_orbax_params(params: Mapping[str, Any], cfg: ModelConfig, out: str | os.PathLike,
                      tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
                      source_dtype: str | None = None, settings: st_folder.Settings | None = None) -> str:
    """Write a params dict (any sharding) as an Orbax params folder; returns its path.

    cfg.param_dtype is recorded as the parameters' dtype (set it to match them); settings:
    the sentence-transformers max_seq_length and prompts a later HF export writes.
    """
    leaves = check_params(params, cfg)
    dtype = str(np.dtype(leaves[0][1].dtype))
    if dtype != cfg.param_dtype:
        cfg = cfg.replace(param_dtype=dtype)
    out = os.path.abspath(os.fspath(out))
    check_tokenizer(tokenizer_dir, out)
    with atomic_output_dir(out, overwrite, inputs=[tokenizer_dir]) as tmp:
        write_orbax_folder(tmp, cfg, iter(leaves), tokenizer_dir, source_dtype=source_dtype, settings=settings)
    return out


# ---------------------------------------------------------------- restoring
def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a finished folder written by this module (it has the marker)."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def _handler():
    """Orbax's pytree handler, used directly: the params pytree may sit below the folder
    Orbax's checkpointers consider the checkpoint (e.g. params/state, <step>/params)."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointHandler()


def _damaged(pytree_dir: str, what: str, e: BaseException) -> ValueError:
    """A short error for a checkpoint TensorStore cannot read (its messages carry the whole
    store spec)."""
    text = str(e).split(" [tensorstore_spec=")[0].strip() or type(e).__name__
    return ValueError(f"{pytree_dir}: cannot read {what} (damaged or incomplete checkpoint?): {text[:400]}")


def tree_metadata(pytree_dir: str) -> Any:
    """The metadata tree of an Orbax pytree folder (shapes and dtypes, no array read); a damaged
    folder raises ValueError naming it."""
    from etils import epath

    handler = _handler()
    try:
        meta = handler.metadata(epath.Path(pytree_dir))
    except (ValueError, OSError, RuntimeError) as e:  # TensorStore reports damaged files as these
        raise _damaged(pytree_dir, "the parameters' metadata", e) from e
    finally:
        handler.close()
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def _find_root(tree: Any, keys: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Key path of the first (breadth-first) dict holding the encoder's top-level params."""
    queue = [(tree, keys)]
    while queue:
        node, path = queue.pop(0)
        if isinstance(node, Mapping):
            if {"embed_tokens", "layers", "final_norm"} <= set(node):
                return path
            queue.extend((v, path + (str(k),)) for k, v in node.items())
    return None


@dataclasses.dataclass
class ParamsCheckpoint:
    """Where a params tree lives in an Orbax checkpoint, and how to restore it."""

    pytree_dir: str
    root: tuple[str, ...]
    config: ModelConfig
    tokenizer_dir: str | None
    info: dict
    tree: Any  # orbax metadata tree
    settings: st_folder.Settings | None = None  # sentence-transformers settings kept beside it

    def keys(self, path: str) -> tuple[str, ...]:
        """Full key path of parameter `path` ("layers/q_kernel") in the saved tree."""
        node, keys = self.tree, self.root
        for k in self.root:
            node = node[k]
        for part in path.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                where = "/".join(keys) or "<root>"
                raise ValueError(f"{self.pytree_dir}: missing parameter {path!r} (under {where})")
            node, keys = node[part], keys + (part,)
        while isinstance(node, Mapping) and len(node) == 1 and next(iter(node)) in _WRAPPER_KEYS:
            k = next(iter(node))
            node, keys = node[k], keys + (k,)
        return keys

    def leaf_metadata(self, path: str) -> Any:
        node = self.tree
        for k in self.keys(path):
            node = node[k]
        return node

    def stored_dtype(self, path: str = "embed_tokens") -> str:
        return str(np.dtype(self.leaf_metadata(path).dtype))

    def check(self) -> None:
        """Every parameter present, with the shape the config implies."""
        for path, spec in param_specs(self.config).items():
            meta = self.leaf_metadata(path)
            shape = tuple(getattr(meta, "shape", ()) or ())
            if shape != spec.shape:
                raise ValueError(f"{self.pytree_dir}: parameter {path!r} has shape {shape}, "
                                 f"the model config implies {spec.shape}")

    def _target(self, spec: ParamSpec, mesh: Mesh | None, rules) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return sharding.named_sharding(spec.axes, mesh, rules, spec.shape)

    def restore(self, paths: Iterable[str], mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                dtype: str | None = None) -> dict[str, jax.Array]:
        """{path: array} for the given parameters, each placed in its sharding on `mesh`
        (one device without a mesh), cast to `dtype` (default: as stored)."""
        import orbax.checkpoint as ocp

        specs = param_specs(self.config)
        item: dict = {}
        args: dict = {}
        wanted = {}
        for path in paths:
            spec, keys = specs[path], self.keys(path)
            leaf_dtype = np.dtype(dtype) if dtype else np.dtype(self.leaf_metadata(path).dtype)
            target = self._target(spec, mesh, rules)
            node_i, node_a = item, args
            for k in keys[:-1]:
                node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
            node_i[keys[-1]] = jax.ShapeDtypeStruct(spec.shape, leaf_dtype, sharding=target)
            node_a[keys[-1]] = ocp.ArrayRestoreArgs(sharding=target, global_shape=spec.shape, dtype=leaf_dtype)
            wanted[path] = keys
        from etils import epath

        handler = _handler()
        try:
            restored = handler.restore(epath.Path(self.pytree_dir), args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except (ValueError, OSError, RuntimeError) as e:
            raise _damaged(self.pytree_dir, ", ".join(wanted), e) from e
        finally:
            handler.close()
        out = {}
        for path, keys in wanted.items():
            node = restored
            for k in keys:
                node = node[k]
            out[path] = node
        return out

    def restore_all(self, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
        """The nested params dict, every parameter in its sharding (restored one parameter
        at a time, so host buffers never hold more than one)."""
        params: dict = {}
        for path in param_specs(self.config):
            value = self.restore([path], mesh, rules, dtype)[path]
            node = params
            *groups, leaf = path.split("/")
            for g in groups:
                node = node.setdefault(g, {})
            node[leaf] = value
        return params

    def lazy(self, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None) -> "LazyParams":
        """A read-only nested mapping that restores a parameter each time it is looked up."""
        return LazyParams(self, mesh, rules, "")


class LazyParams(Mapping):
    """params["layers"]["q_kernel"] restores that one parameter (not cached), so a
    consumer that looks each parameter up once holds one parameter at a time."""

    def __init__(self, ckpt: ParamsCheckpoint, mesh, rules, prefix: str):
        self._ckpt, self._mesh, self._rules, self._prefix = ckpt, mesh, rules, prefix
        paths = [p[len(prefix):] for p in param_specs(ckpt.config) if p.startswith(prefix)]
        self._children = list(dict.fromkeys(p.split("/")[0] for p in paths))

    def __getitem__(self, key: str) -> Any:
        if key not in self._children:
            raise KeyError(key)
        path = self._prefix + key
        if path in param_specs(self._ckpt.config):
            release_host_memory()
            return self._ckpt.restore([path], self._mesh, self._rules)[path]
        return LazyParams(self._ckpt, self._mesh, self._rules, path + "/")

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Finished steps of a CheckpointManager folder (plain integer names), oldest first."""
    steps = []
    for name in os.listdir(root):
        m = re.fullmatch(r"(?:[A-Za-z_]*[_-])?(\d+)", name)
        full = os.path.join(root, name)
        if m and os.path.isdir(full):
            steps.append((int(m.group(1)), full))
    return sorted(steps)


def _pytree_dirs(folder: str) -> list[str]:
    """`folder` itself if it is a pytree checkpoint, else its item subfolders that are
    ("params" first)."""
    if os.path.isfile(os.path.join(folder, _PYTREE_METADATA)):
        return [folder]
    names = sorted(os.listdir(folder), key=lambda n: (n != PARAMS_DIR, n))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n, _PYTREE_METADATA))]


def _locate(path: str) -> tuple[str, tuple[str, ...], Any, list[str]]:
    """(pytree dir, params root keys, metadata tree, folders to search for config/tokenizer)."""
    candidates: list[tuple[str, list[str]]] = []
    if os.path.isfile(os.path.join(path, _PYTREE_METADATA)):
        candidates.append((path, [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]))
    else:
        steps = step_dirs(path)
        folders = [path] if not steps else [steps[-1][1]]
        for folder in folders:
            for d in _pytree_dirs(folder):
                candidates.append((d, [folder, path, os.path.dirname(path)] if steps else [folder, os.path.dirname(folder)]))
        if steps:
            log.info("%s: using the latest step, %s", path, os.path.basename(steps[-1][1]))
        if not candidates and not steps:
            # a finalized v1 checkpoint folder (params/ of our layout) holds the pytree one level down
            for name in sorted(os.listdir(path)):
                sub = os.path.join(path, name)
                if os.path.isdir(sub):
                    candidates.extend((d, [path, os.path.dirname(path)]) for d in _pytree_dirs(sub))
    if not candidates:
        raise ValueError(f"{path}: not an Orbax checkpoint (no {_PYTREE_METADATA} in it, in a step folder or in "
                         f"an item folder), nor a folder written by `convert hf-to-orbax` ({MARKER} missing)")
    for pytree_dir, search in candidates:
        tree = tree_metadata(pytree_dir)
        root = _find_root(tree)
        if root is not None:
            return pytree_dir, root, tree, search
    raise ValueError(f"{path}: no parameters (a tree with embed_tokens, layers, final_norm) in "
                     + ", ".join(d for d, _ in candidates))


def open_params_checkpoint(path: str | os.PathLike, config: ModelConfig | str | os.PathLike | None = None,
                           tokenizer_dir: str | os.PathLike | None = None,
                           **config_overrides: Any) -> ParamsCheckpoint:
    """Find the params in a folder written here or in a training checkpoint.

    config: a ModelConfig, or a qzhou_config.json / config.json (file or folder) for
    checkpoints that do not carry one (searched next to the checkpoint otherwise).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    info: dict = {}
    if is_orbax_checkpoint(path):
        info = read_json(os.path.join(path, MARKER))
        if info.get("format") != FORMAT:
            raise ValueError(f"{os.path.join(path, MARKER)}: unknown format {info.get('format')!r}")
        pytree_dir = os.path.join(path, info.get("params", PARAMS_DIR))
        if not os.path.isfile(os.path.join(pytree_dir, _PYTREE_METADATA)):
            raise ValueError(f"{pytree_dir}: Orbax params missing or incomplete ({_PYTREE_METADATA} not found)")
        tree = tree_metadata(pytree_dir)
        root = _find_root(tree)
        if root is None:
            raise ValueError(f"{pytree_dir}: no parameters (embed_tokens, layers, final_norm) in the checkpoint")
        search = [path]
        if tokenizer_dir is None and info.get("tokenizer"):
            tokenizer_dir = os.path.join(path, info["tokenizer"])
    else:
        if os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise ValueError(f"{path}: incomplete checkpoint ({MARKER} marker missing: the conversion that "
                             "wrote it did not finish)")
        pytree_dir, root, tree, search = _locate(path)
    if isinstance(config, ModelConfig):
        cfg = config.replace(**config_overrides) if config_overrides else config
    elif config is not None:
        cfg = read_model_config(config, **config_overrides)
    else:
        for folder in search:
            if any(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_FILE, "config.json")):
                cfg = read_model_config(folder, **config_overrides)
                break
        else:
            raise FileNotFoundError(
                f"{path}: no model config ({CONFIG_FILE} or config.json) found in {', '.join(search)}; "
                "pass one (--config)")
    if tokenizer_dir is None:
        for folder in search:
            if os.path.isfile(os.path.join(folder, TOKENIZER_DIR, "tokenizer_config.json")):
                tokenizer_dir = os.path.join(folder, TOKENIZER_DIR)
                break
    settings = next((found for found in map(st_folder.load_settings, search) if found is not None), None)
    ckpt = ParamsCheckpoint(pytree_dir, root, cfg, None if tokenizer_dir is None else os.fspath(tokenizer_dir),
                            info, tree, settings)
    ckpt.check()
    return ckpt


def load_orbax(path: str | os.PathLike, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
               **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any], str | None]:
    """(config, params, tokenizer folder or None); see `load_orbax_params`."""
    ckpt = open_params_checkpoint(path, **config_overrides)
    cfg = ckpt.config
    if "param_dtype" not in config_overrides and cfg.param_dtype != ckpt.stored_dtype():
        cfg = cfg.replace(param_dtype=ckpt.stored_dtype())
    check_param_split(cfg, mesh, rules, strict=False)
    return cfg, ckpt.restore_all(mesh, rules, dtype=cfg.param_dtype), ckpt.tokenizer_dir


def load_orbax_params(path: str | os.PathLike, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                      **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from an Orbax params folder or a training checkpoint; every
    parameter restored straight into its sharding on `mesh` (or one device), in
    cfg.param_dtype (the stored dtype unless overridden, e.g. param_dtype="float32")."""
    cfg, params, _ = load_orbax(path, mesh, rules, **config_overrides)
    return cfg, params
