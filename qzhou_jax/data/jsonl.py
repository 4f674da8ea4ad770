"""JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class RecordError(ValueError):
    """A bad input record; the message names file, line and field."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts from a JSONL file of objects with `field` (or of bare JSON strings)."""
    texts = []
    for lineno, obj in iter_jsonl(path):
        value = obj if isinstance(obj, str) else obj.get(field) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and field not in obj:
            raise RecordError(f"{path}:{lineno}: missing field {field!r}")
        if not isinstance(value, str):
            raise RecordError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    if not texts:
        raise RecordError(f"{path}: no records (empty file)")
    return texts
