"""Writing HuggingFace / sentence-transformers model folders, one tensor at a time.

The folder `save_hf` writes loads with `transformers.AutoModel.from_pretrained(path)` (a
plain `Qwen2Model`, `is_causal: false` for bidirectional encoders, no remote code) and with
`sentence_transformers.SentenceTransformer(path)`:

    config.json                          model_type qwen2, architectures [Qwen2Model]
    model.safetensors                    or model-0000i-of-0000n.safetensors + index
    tokenizer.json, tokenizer_config.json, ...   copied from the tokenizer folder
    modules.json, sentence_bert_config.json, 1_Pooling/, config_sentence_transformers.json
                                         sentence-transformers' files (`st_folder.write`):
                                         pooling, max_seq_length, the "query" prompt

Tensor names carry no `model.` prefix (a bare `Qwen2Model`). Tensors are gathered and
written one at a time (`hf.iter_hf_tensors` -> `safetensors_io.write` with the layout
announced up front), so the host never holds more than about one tensor. Everything is
written into a temporary sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import uuid
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qzhou_jax import st_folder
from qzhou_jax.checkpoint import safetensors_io
from qzhou_jax.checkpoint.hf import hf_names, hf_shape, iter_gathered, iter_hf_tensors
from qzhou_jax.config import ModelConfig, fsync_file, fsync_folder, write_json
from qzhou_jax.model.qwen2 import check_params, param_specs
from qzhou_jax.tokenizer import VOCABULARY_FILES

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_SEQ_LENGTH = st_folder.DEFAULT_MAX_SEQ_LENGTH
DEFAULT_QUERY_INSTRUCTION = st_folder.DEFAULT_QUERY_INSTRUCTION
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Markers of a folder this package may replace with overwrite=True.
_MODEL_FOLDER_FILES = ("config.json", "QZHOU_CHECKPOINT", "qzhou_config.json", SINGLE_FILE, INDEX_FILE)


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists and overwriting was not asked for."""


# ----------------------------------------------------------------- host memory
def _libc():
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_host_memory() -> None:
    """Hand memory that was freed back to the OS (glibc `malloc_trim`; no-op elsewhere).

    Between two streamed tensors, glibc keeps the pages of freed buffers (e.g. the host
    copies Orbax makes while writing) in its arenas, so without this the resident set
    creeps up by a large fraction of a tensor per tensor.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def frugal_host_allocator(threshold: int = 1 << 20) -> None:
    """Process-wide (glibc): serve allocations of `threshold` bytes and more with mmap, so
    a freed tensor goes back to the OS at once. glibc's default threshold adapts upward
    to 32 MiB, after which per-layer buffers are carved from arenas that only grow. Used
    by the converters; costs a page-fault or two per large allocation."""
    lib = _libc()
    if lib is not None and hasattr(lib, "mallopt"):
        lib.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD


# ------------------------------------------------------------------ atomic folders
_LEFTOVER = re.compile(r"\.qzhou-(?:tmp|old)-(?P<tag>(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8})")


_OPEN_TAGS: set[str] = set()  # the writes this process has open (a restarted container may reuse its pid)


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "host"


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = (), owned: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder next to `out`; rename it to `out` on success.

    On any exception (or interrupt) the temporary folder is removed. A killed process
    leaves only `<out>.qzhou-tmp-<host>-<pid>-<id>` (or, killed while replacing `out`, the
    previous folder as `<out>.qzhou-old-<host>-<pid>-<id>`), which nothing mistakes for a
    finished folder. Once the new `out` is in place, such leftovers of this machine's ended
    processes are removed, and with `owned` (the caller owns the parent folder: a training
    run's out_dir) those of other machines too; the others are named in a warning.
    With `overwrite`, an existing `out` is replaced only once the new one is complete,
    and never when it is, or holds, one of the `inputs`.
    """
    out = os.path.abspath(os.fspath(out))
    inputs = tuple(inputs)
    _check_output(out, overwrite, inputs)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tag = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = f"{out}.qzhou-tmp-{tag}"
    os.makedirs(tmp)
    _OPEN_TAGS.add(tag)
    try:
        yield tmp
        _check_output(out, overwrite, inputs)
        _sync_tree(tmp)
        if os.path.lexists(out):
            old = f"{out}.qzhou-old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            fsync_folder(parent)
            _remove(old)
        else:
            os.rename(tmp, out)
            fsync_folder(parent)
    finally:
        _OPEN_TAGS.discard(tag)
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_leftovers(out, owned, inputs)


def _sync_tree(folder: str) -> None:
    """Every file and folder under `folder` on disk (before it is renamed into place): a host
    that crashes after the rename leaves a whole export, not files of zero length."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_folder(root)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _remove_leftovers(out: str, owned: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Remove the `<out>.qzhou-tmp-*` / `<out>.qzhou-old-*` folders that interrupted writes of
    `out` left: this machine's whose process has ended, and with `owned` other machines' too
    (never one of a running process here, nor an input)."""
    parent, base = os.path.split(out)
    keep = {os.path.realpath(os.fspath(p)) for p in inputs if p is not None}
    removed, others = [], []
    for name in sorted(os.listdir(parent)):
        match = _LEFTOVER.fullmatch(name[len(base):]) if name.startswith(base + ".") else None
        if match is None or os.path.realpath(os.path.join(parent, name)) in keep:
            continue
        here, pid = match["host"] == _host(), int(match["pid"])
        ended = not _running(pid) if pid != os.getpid() else match["tag"] not in _OPEN_TAGS
        if (here and ended) or (owned and not here):
            try:
                _remove(os.path.join(parent, name))
                removed.append(name)
            except OSError as e:
                log.warning("%s: could not remove %s, left by an interrupted write: %s", parent, name, e)
        else:
            others.append(name)
    if removed:
        log.info("%s: removed %s, left by interrupted writes of %s", parent, ", ".join(removed), base)
    if others:
        log.warning("%s: %s were left by writes of %s that were interrupted on another machine or are still "
                    "running; remove them once no write of it is running", parent, ", ".join(others), base)


def _check_output(out: str, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output that exists (without `overwrite`), that is a file or a folder this
    package did not write, that holds training checkpoints, or that is or holds an input."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out}: output already exists (use --overwrite / overwrite=True to replace it)")
    real = os.path.realpath(out)
    for src in inputs:
        if src is None:
            continue
        src_real = os.path.realpath(os.fspath(src))
        if src_real == real or src_real.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"{out}: is {'the input' if src_real == real else 'a folder holding the input'} "
                                    f"{os.fspath(src)}; refusing to replace it (write to another folder)")
    if not os.path.isdir(out):
        raise OutputExistsError(f"{out}: exists and is not a folder; refusing to replace it")
    if os.listdir(out) and not any(os.path.exists(os.path.join(out, f)) for f in _MODEL_FOLDER_FILES):
        raise OutputExistsError(
            f"{out}: exists and is not a model folder (no config.json or QZHOU_CHECKPOINT); refusing to replace it")
    steps = sorted(n for n in os.listdir(out) if n.isdigit() and os.path.isdir(os.path.join(out, n)))
    if steps:
        raise OutputExistsError(
            f"{out}: holds training checkpoints (step folders {', '.join(steps[:4])}{' ...' if len(steps) > 4 else ''})"
            f"; refusing to replace it")


def tokenizer_files(src: str | os.PathLike) -> list[str]:
    """The tokenizer files in folder `src` (none when it has no vocabulary file)."""
    src = os.fspath(src)
    if not any(os.path.isfile(os.path.join(src, n)) for n in VOCABULARY_FILES):
        return []
    return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]


def check_tokenizer(src: str | os.PathLike | None, out: str, required: bool = True) -> bool:
    """Before anything is written: whether `src` holds a tokenizer. Without one, an error if
    `required` (a folder the user named), else a warning that `out` will have none."""
    if src is not None:
        src = os.fspath(src)
        if not os.path.isdir(src):
            if required:
                raise FileNotFoundError(f"{src}: tokenizer folder not found")
        elif tokenizer_files(src):
            _check_loads(src)
            return True
        elif required:
            raise FileNotFoundError(f"{src}: no tokenizer files (none of {', '.join(VOCABULARY_FILES)})")
    log.warning("%s: will hold no tokenizer files (%s); sentence-transformers, `encode` and `eval` need them: "
                "pass a tokenizer folder (--tokenizer)", out,
                "none given" if src is None else f"none in {src}")
    return False


def _check_loads(src: str) -> None:
    """Tokenizer files that transformers cannot load (a truncated or foreign tokenizer.json) are
    refused here, not when the converted model is first used."""
    from qzhou_jax.tokenizer import Tokenizer

    try:
        Tokenizer(src)
    except Exception as e:  # whatever transformers raises on bad files (KeyError, JSON errors, ...)
        raise ValueError(f"{src}: its tokenizer files do not load ({type(e).__name__}: {e})") from None


def copy_tokenizer(src: str | os.PathLike | None, dst: str) -> list[str]:
    """Copy the tokenizer files that exist in `src` into `dst`; returns their names."""
    if src is None:
        return []
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: tokenizer folder not found")
    copied = tokenizer_files(src)
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    _truncate_right(os.path.join(dst, "tokenizer_config.json"))
    return copied


def _truncate_right(path: str) -> None:
    """A copied tokenizer_config.json is set to cut texts from the end, as this package's encoders
    do (the instruction comes first; sentence-transformers and transformers read the setting from
    this file, or from tokenizer.json's "truncation" when this file does not say)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):  # absent, or not JSON: the tokenizer's own loader reports it
        return
    if not isinstance(raw, dict):
        return
    side = raw.get("truncation_side")
    if side is None:  # then transformers takes tokenizer.json's
        try:
            with open(os.path.join(os.path.dirname(path), "tokenizer.json"), encoding="utf-8") as f:
                truncation = json.load(f).get("truncation") or {}
            side = str(truncation.get("direction", "right")).lower()
        except (OSError, ValueError, AttributeError):
            return
    if side != "right":
        log.warning("tokenizer_config.json: truncation_side %r written as 'right': texts are cut from the end, as "
                    "this model was trained and evaluated", side)
        write_json(path, {**raw, "truncation_side": "right"})


# ---------------------------------------------------------------- safetensors
def hf_layout(cfg: ModelConfig, dtype: str, prefix: str = "") -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every HF tensor, in the order `iter_hf_tensors` yields them."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = []
    for spec in param_specs(cfg).values():
        for name in hf_names(spec, cfg, prefix):
            out.append((name, np_dtype, hf_shape(spec)))
    return out


def plan_shards(layout: list[tuple[str, np.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
    """Greedy split in order: each shard at most `max_shard_bytes` (a larger tensor alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive size, got {max_shard_bytes}")
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * np.dtype(entry[1]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_safetensors(folder: str, tensors: Iterator[tuple[str, np.ndarray]],
                      layout: list[tuple[str, np.dtype, tuple[int, ...]]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Stream `tensors` (in `layout` order) into one file or shards + index; returns file names."""
    shards = plan_shards(layout, max_shard_bytes)
    tensors = iter(tensors)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        safetensors_io.write(os.path.join(folder, fname), itertools.islice(tensors, len(shard)),
                             metadata={"format": "pt"}, layout=shard)
    if len(shards) > 1:
        total = sum(math.prod(shape) * np.dtype(dt).itemsize for _, dt, shape in layout)
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


# -------------------------------------------------------------------- folders
def _leaf_dtype(params: Mapping[str, Any]) -> str:
    return str(np.dtype(params["embed_tokens"].dtype))


def write_hf_folder(folder: str, params: Mapping[str, Any], cfg: ModelConfig, dtype: str,
                    tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    settings: st_folder.Settings | None = None, tensors: Any = None) -> list[str]:
    """Write everything of an HF/sentence-transformers folder into an existing `folder`.
    `tensors`: the `iter_hf_tensors(params, cfg, dtype)` iterator to write from (default: a new one)."""
    dtype = str(jnp.dtype(dtype))
    layout = hf_layout(cfg, dtype)
    tensors = iter_hf_tensors(params, cfg, dtype) if tensors is None else tensors
    files = write_safetensors(folder, tensors, layout, max_shard_bytes)
    write_json(os.path.join(folder, "config.json"), cfg.to_hf(dtype))
    copy_tokenizer(tokenizer_dir, folder)
    st_folder.write(folder, cfg, settings)
    return files


def save_hf(params: Mapping[str, Any], cfg: ModelConfig, out: str | os.PathLike, dtype: str | None = None,
            tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            settings: st_folder.Settings | None = None, overwrite: bool = False,
            max_seq_length: int | None = None, query_instruction: str | None = None, owned: bool = False) -> str:
    """Write `params` (nested dict, any sharding) as a HF + sentence-transformers folder.

    dtype: tensor dtype on disk (default: the parameters' own dtype). settings:
    sentence-transformers' max_seq_length and prompts (default: `st_folder`'s defaults);
    max_seq_length / query_instruction change those. Tensors are gathered one layer at a
    time. Returns the absolute output path. owned: `out`'s parent folder is the caller's alone (a
    training run's out_dir), so every leftover of an interrupted earlier export is removed
    (`atomic_output_dir`).

    In a job of several processes every process calls it (each tensor is gathered through
    collectives) and process 0 writes: `out` must be its path. The processes agree through the
    coordination service that process 0 can write before the first tensor and that it wrote
    after the last, and all raise when it could not.
    """
    check_params(params, cfg)  # before anything is written
    settings = (settings or st_folder.Settings()).overridden(max_seq_length, query_instruction)
    dtype = dtype or _leaf_dtype(params)
    out = os.path.abspath(os.fspath(out))
    if jax.process_count() > 1:
        _save_hf_from_every_process(params, cfg, out, dtype, tokenizer_dir, max_shard_bytes, settings, overwrite,
                                    owned)
        return out
    check_tokenizer(tokenizer_dir, out)
    with atomic_output_dir(out, overwrite, owned=owned) as tmp:
        write_hf_folder(tmp, params, cfg, dtype, tokenizer_dir, max_shard_bytes, settings)
    return out


def _save_hf_from_every_process(params: Mapping[str, Any], cfg: ModelConfig, out: str, dtype: str,
                                tokenizer_dir: Any, max_shard_bytes: int, settings: st_folder.Settings,
                                overwrite: bool, owned: bool) -> None:
    """`save_hf` in a multi-process job: every process gathers, process 0 writes. A process that
    stopped between two tensors would leave the others in a collective, so process 0 checks
    its output before the first one, and after a failed write still takes part in the rest."""
    from qzhou_jax.hosts import HostExchange

    exchange, writer = HostExchange("save_hf"), jax.process_index() == 0
    problem = ""
    if writer:
        try:
            check_tokenizer(tokenizer_dir, out)
            _check_output(out, overwrite)
        except (OSError, ValueError) as e:
            problem = str(e)
    ready = exchange.gather("ready", [not problem], f"{out}: agreeing that process 0 can write the export")
    if not ready[0, 0]:
        raise ValueError(problem or f"{out}: process 0 cannot write the export (its log says why)")
    gathered = iter_gathered(params, cfg)  # the collectives; the host-side work is process 0's alone
    if writer:
        try:
            with atomic_output_dir(out, overwrite, owned=owned) as tmp:
                write_hf_folder(tmp, params, cfg, dtype, tokenizer_dir, max_shard_bytes, settings,
                                iter_hf_tensors(params, cfg, str(jnp.dtype(dtype)), gathered=gathered))
        except Exception as e:  # e.g. a full disk: the other processes still gather every tensor
            problem = f"{type(e).__name__}: {e}"
            log.error("%s: the export failed (%s); gathering the remaining tensors with the other processes",
                      out, problem)
    for _ in gathered:  # the tensors process 0 did not take (all of them, on the other processes)
        pass
    done = exchange.gather("written", [not problem], f"{out}: waiting for process 0 to write the export")
    if not done[0, 0]:
        raise ValueError(f"{out}: the export failed on process 0: {problem or 'its log says why'}")
