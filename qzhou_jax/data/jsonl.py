"""JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator


class RecordError(ValueError):
    """A bad input record; the message names file, line and field."""


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for every non-blank line; a leading UTF-8 BOM is dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield lineno, line


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """An object's dict; a key given twice (json.loads would keep the last silently) raises."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def decode_json_line(line: bytes, where: str) -> Any:
    """``json.loads`` of one line, with errors as RecordError naming ``where``; an object with a
    key given twice is one, and so are a lone surrogate escape, an integer too long for Python
    (over 4300 digits) and nesting too deep to parse."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:  # rstrip: a cut-off line's error column is on the line
        obj = json.loads(text.rstrip("\r\n"), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except _DuplicateKey as e:
        raise RecordError(f"{where}: field {e.args[0]!r} given twice in one object") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting deeper than the stack
        raise RecordError(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None
    if _SURROGATE_ESCAPE.search(line):  # a pair is one character; a lone half cannot be written out again
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(f"{where}: a \\u escape of a lone surrogate (half of a UTF-16 pair), "
                              "not a character") from None
    return obj


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line."""
    for lineno, line in iter_lines(path):
        yield lineno, decode_json_line(line, f"{os.fspath(path)}:{lineno}")


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts from a JSONL file of objects with `field` (or of bare JSON strings), one per non-blank line."""
    texts = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, (dict, str)):
            raise RecordError(f"{path}:{lineno}: expected a JSON object with a {field!r} field or a JSON string, "
                              f"got {type(obj).__name__}")
        value = obj if isinstance(obj, str) else obj.get(field)
        if isinstance(obj, dict) and field not in obj:
            raise RecordError(f"{path}:{lineno}: missing field {field!r}")
        if not isinstance(value, str):
            raise RecordError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    if not texts:
        raise RecordError(f"{path}: no records (empty file)")
    return texts
