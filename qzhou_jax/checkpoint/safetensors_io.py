"""Minimal safetensors reading and writing on numpy, bfloat16 included.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw bytes. Reading parses the header only; each
tensor is read into its own buffer when asked for (or memory-mapped with `mmap=True`:
pages of a long-lived mapping stay in the process's resident set once touched, so
streaming a large checkpoint through one mapping makes the RSS grow to the file size).
Writing streams: with a `layout` given up front, tensors are pulled from an iterator one
at a time. Corrupt or truncated files are reported with the file and tensor name.
(`safetensors`' own numpy backend cannot read bfloat16.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from typing import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from qzhou_jax.config import atomic_write

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
log = logging.getLogger(__name__)


class SafetensorsError(ValueError):
    pass


class SafeFile:
    """Read-only view of one .safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{self.path}: corrupt safetensors header (length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise SafetensorsError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                       f"not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r}: bad header entry {info!r}") from None
            if begin < 0 or min(shape, default=0) < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: bad header entry {info!r}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: byte range does not match shape {shape}")
            if self._start + end > size:
                raise SafetensorsError(
                    f"{self.path}: truncated file: tensor {name!r} needs bytes up to {self._start + end}, "
                    f"file has {size}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._map: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str, mmap: bool = False) -> np.ndarray:
        """The tensor, read into a fresh array (freed when dropped), or with `mmap=True` a
        read-only view of a memory mapping of the file kept open by this object."""
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        if mmap:
            if self._map is None:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            return self._map[self._start + begin:self._start + end].view(dtype).reshape(shape)
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise SafetensorsError(f"{self.path}: truncated file while reading tensor {name!r}")
                done += n
        return out


def _as_bytes(arr: np.ndarray) -> memoryview:
    """Raw bytes of an array without copying when it is already C-contiguous."""
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
          metadata: Mapping[str, str] | None = None,
          layout: Sequence[tuple[str, np.dtype, Sequence[int]]] | None = None) -> None:
    """Write tensors: a mapping, or (name, array) pairs.

    Without `layout`, the pairs are collected first (the header needs every shape before
    the data). With `layout` — (name, dtype, shape) for every tensor, in file order — the
    header is written first and the pairs are pulled one at a time, so only one tensor
    needs to be in memory; each must match its layout entry. The file is written under a
    temporary name and renamed when complete.
    """
    if layout is None:
        items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
        layout = [(name, arr.dtype, arr.shape) for name, arr in items]
        tensors = items
    elif isinstance(tensors, Mapping):
        tensors = tensors.items()
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        dtype = np.dtype(dtype)
        if dtype not in CODES:
            raise SafetensorsError(f"{path}: tensor {name!r}: dtype {dtype} has no safetensors code")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if len(header) - ("__metadata__" in header) != len(layout):
        raise SafetensorsError(f"{path}: duplicate tensor names")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pairs = iter(tensors)
        for name, dtype, shape in layout:
            got = next(pairs, None)
            if got is None:
                raise SafetensorsError(f"{path}: tensor {name!r} announced but not given")
            got_name, arr = got
            if (got_name != name or np.dtype(arr.dtype) != np.dtype(dtype)
                    or tuple(arr.shape) != tuple(shape)):
                raise SafetensorsError(
                    f"{path}: expected tensor {name!r} {np.dtype(dtype)} {tuple(shape)}, got "
                    f"{got_name!r} {arr.dtype} {tuple(arr.shape)}")
            f.write(_as_bytes(arr))
            del arr, got
        if next(pairs, None) is not None:
            raise SafetensorsError(f"{path}: more tensors given than announced in the layout")


class TensorStore:
    """All tensors of a HF checkpoint folder: single-file or sharded with an index."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        index = os.path.join(self.folder, "model.safetensors.index.json")
        single = os.path.join(self.folder, "model.safetensors")
        self._where: dict[str, str] = {}
        if os.path.exists(single):  # transformers' order: the single file wins over an index beside it
            if os.path.exists(index):
                log.warning("%s: holds both model.safetensors and model.safetensors.index.json; reading "
                            "model.safetensors, as transformers does", self.folder)
            self._where = {k: single for k in SafeFile(single).names()}
        elif os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise SafetensorsError(f"{index}: not a valid safetensors index (weight_map: expected an object "
                                       f"of tensor names to file names)")
            self._where = {k: os.path.join(self.folder, v) for k, v in weight_map.items()}
        else:
            others = [n for n in sorted(os.listdir(self.folder)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))
                      or n.endswith(".bin.index.json")]
            raise FileNotFoundError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json"
                + (f" (found {', '.join(others[:3])}: convert PyTorch weights to safetensors first, e.g. load them "
                   f"with transformers and save_pretrained)" if others else ""))
        self._files: dict[str, SafeFile] = {}

    def _file(self, name: str) -> SafeFile:
        path = self._where[name]
        if path not in self._files:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in the index for tensor {name!r} but missing")
            self._files[path] = SafeFile(path)
        f = self._files[path]
        if name not in f._entries:
            raise SafetensorsError(f"{path}: tensor {name!r} is listed in the index but not in the file")
        return f

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)
