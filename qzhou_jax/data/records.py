"""The three record families training reads, and their validation.

Every training example is one of (recipe §4):

- retrieval: a query, one or more positive passages, optional hard negatives and an optional
  instruction (``RetrievalRecord``);
- scored pairs for STS / NLI (``PairRecord``);
- classification: a text and its label (``ClassificationRecord``).

``parse_record`` turns one JSON object into a record, mapping the user's field names onto ours and
checking every value. Errors are ``RecordError`` (a ``ValueError``) whose message starts with the
location ("file:line") and names the field, e.g. ``data.jsonl:17: field 'score': not a number: 'n/a'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from qzhou_jax.config import fsync_file, fsync_folder, naming_the_file
from qzhou_jax.data.jsonl import RecordError, decode_json_line, iter_lines

__all__ = [
    "FAMILIES", "DEFAULT_FIELDS", "RecordError", "RetrievalRecord", "PairRecord", "ClassificationRecord",
    "Record", "RECORD_TYPES", "BadRecords", "parse_record", "resolve_fields", "record_to_dict",
    "family_of", "iter_rows", "check_output_path", "write_records",
]

FAMILIES = ("retrieval", "sts", "classification")  # the train step's task names


@dataclass(frozen=True)
class RetrievalRecord:
    """A query, its positive passage(s), hard negatives and an optional per-record instruction."""

    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...] = ()
    instruction: str | None = None

    def __post_init__(self):  # accept lists for convenience; keep the record hashable
        if not isinstance(self.pos, tuple):
            object.__setattr__(self, "pos", tuple(self.pos))
        if not isinstance(self.neg, tuple):
            object.__setattr__(self, "neg", tuple(self.neg))


@dataclass(frozen=True)
class PairRecord:
    """Two texts and a similarity score (STS scores, NLI 2/1/0, binary 1/0); only the order matters to CoSENT."""

    text1: str
    text2: str
    score: float


@dataclass(frozen=True)
class ClassificationRecord:
    """A text and its label; labels are always strings (an integer label 3 becomes "3")."""

    text: str
    label: str


Record = Union[RetrievalRecord, PairRecord, ClassificationRecord]
RECORD_TYPES: dict[str, type] = {"retrieval": RetrievalRecord, "sts": PairRecord,
                                 "classification": ClassificationRecord}

DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "retrieval": {"query": "query", "pos": "pos", "neg": "neg", "instruction": "instruction"},
    "sts": {"text1": "text1", "text2": "text2", "score": "score"},
    "classification": {"text": "text", "label": "label"},
}

log = logging.getLogger(__name__)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")


def family_of(record: Record) -> str:
    """The family name of a record instance."""
    for family, cls in RECORD_TYPES.items():
        if isinstance(record, cls):
            return family
    raise TypeError(f"not a record: {type(record).__name__}")


def resolve_fields(defaults: Mapping[str, str], fields: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """``defaults`` updated with the user's mapping (our name -> name in the data); unknown names are an error."""
    out = dict(defaults)
    for ours, theirs in (fields or {}).items():
        if ours not in defaults:
            raise ValueError(f"unknown field {ours!r} for {what} (known: {', '.join(defaults)})")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"field mapping {ours!r} -> {theirs!r}: the name in the data must be a non-empty string")
        out[ours] = theirs
    return out


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


class _Row:
    """One input object with its location; `get_*` methods raise RecordError naming the field."""

    __slots__ = ("obj", "where")

    def __init__(self, obj: Any, where: str):
        if not isinstance(obj, Mapping):
            raise RecordError(f"{_prefix(where)}expected a JSON object, got {_json_type(obj)}")
        self.obj = obj
        self.where = where

    def error(self, name: str, what: str) -> RecordError:
        return RecordError(f"{_prefix(self.where)}field {name!r}: {what}")

    def missing(self, name: str) -> RecordError:
        keys = ", ".join(map(str, list(self.obj)[:12])) or "none"
        return self.error(name, f"missing (the record has: {keys})")

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def text(self, name: str) -> str:
        if name not in self.obj:
            raise self.missing(name)
        return check_text(self.obj[name], self, name)

    def texts(self, name: str, required: bool) -> tuple[str, ...]:
        """A string or a list of strings. Required: at least one."""
        if required and name not in self.obj:
            raise self.missing(name)
        return self.texts_of(self.obj.get(name), name, required)

    def texts_of(self, value: Any, name: str, required: bool) -> tuple[str, ...]:
        if value is None and not required:
            return ()
        if isinstance(value, str):
            return (check_text(value, self, name),)
        if not isinstance(value, (list, tuple)):
            raise self.error(name, f"must be a string or a list of strings, got {_json_type(value)}")
        if required and not value:
            raise self.error(name, "empty list (need at least one text)")
        return tuple(check_text(v, self, name, item=k) for k, v in enumerate(value))

    def optional_text(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_json_type(value)}")
        return value if value.strip() else None

    def score(self, name: str) -> float:
        if name not in self.obj:
            raise self.missing(name)
        return check_score(self.obj[name], self, name)

    def label(self, name: str) -> str:
        if name not in self.obj:
            raise self.missing(name)
        return check_label(self.obj[name], self, name)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def check_text(value: Any, row: _Row, name: str, item: int | None = None) -> str:
    """A non-empty, not whitespace-only string (returned unchanged)."""
    at = "" if item is None else f"item {item}: "
    if not isinstance(value, str):
        raise row.error(name, f"{at}must be a string, got {_json_type(value)}")
    if not value.strip():
        raise row.error(name, f"{at}empty text" if not value else f"{at}whitespace-only text")
    return value


def check_score(value: Any, row: _Row, name: str) -> float:
    """A finite number; numeric strings ("3.5") are accepted, booleans are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise row.error(name, f"must be a number, got {_json_type(value)}")
    try:
        if isinstance(value, str) and "_" in value:  # float() reads "1_000" as 1000
            raise ValueError(value)
        score = float(value)
    except ValueError:
        raise row.error(name, f"not a number: {value!r}") from None
    except OverflowError:  # float() of an integer beyond its range (10**400)
        raise row.error(name, "not a finite number: an integer beyond the range of a float") from None
    if not math.isfinite(score):
        raise row.error(name, f"not a finite number: {value!r}")
    return score


def check_label(value: Any, row: _Row, name: str) -> str:
    """Labels normalized to strings: "sports" stays, 3 -> "3", 3.0 -> "3", true -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        if not value.strip():
            raise row.error(name, "empty label")
        return value
    raise row.error(name, f"must be a string or an integer, got {_json_type(value)}"
                    + (f" {value!r}" if isinstance(value, float) else ""))


def parse_record(obj: Any, family: str, fields: Mapping[str, str] | None = None, where: str = "") -> Record:
    """One JSON object -> a record of ``family``.

    ``fields`` maps our field name to the name in the data (``{"query": "anchor", "pos": "positive"}``);
    names not given use ``DEFAULT_FIELDS[family]``. ``pos``/``neg`` take a string or a list of strings;
    ``neg`` (missing -> ``()``) and ``instruction`` (missing, null or blank -> ``None``) are optional.
    Raises ``RecordError("{where}: field 'name': <what is wrong>")`` naming the field as the data spells it.
    """
    _check_family(family)
    f = resolve_fields(DEFAULT_FIELDS[family], fields, family) if fields else DEFAULT_FIELDS[family]
    row = _Row(obj, where)
    if family == "retrieval":
        return RetrievalRecord(row.text(f["query"]), row.texts(f["pos"], required=True),
                               row.texts(f["neg"], required=False), row.optional_text(f["instruction"]))
    if family == "sts":
        return PairRecord(row.text(f["text1"]), row.text(f["text2"]), row.score(f["score"]))
    return ClassificationRecord(row.text(f["text"]), row.label(f["label"]))


def record_to_dict(record: Record) -> dict[str, Any]:
    """Our JSONL format.

    retrieval {query, pos, neg, instruction (only when set)}; sts {text1, text2, score}; classification {text, label}.
    """
    if isinstance(record, RetrievalRecord):
        d: dict[str, Any] = {"query": record.query, "pos": list(record.pos), "neg": list(record.neg)}
        if record.instruction is not None:
            d["instruction"] = record.instruction
        return d
    if isinstance(record, PairRecord):
        return {"text1": record.text1, "text2": record.text2, "score": record.score}
    if isinstance(record, ClassificationRecord):
        return {"text": record.text, "label": record.label}
    raise TypeError(f"not a record: {type(record).__name__}")


class BadRecords:
    """What to do with a bad record: raise (default) or, with ``skip=True``, count it and go on.

    ``count`` is the number skipped; ``examples`` keeps the first few messages (each "file:line: field ...").
    """

    def __init__(self, skip: bool = False, keep: int = 5):
        self.skip = skip
        self.keep = keep
        self.count = 0
        self.examples: list[str] = []

    def handle(self, error: RecordError) -> None:
        """Raise ``error``, or record it when skipping."""
        if not self.skip:
            raise error
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(error))

    def warn(self, what: str, logger: logging.Logger = log) -> None:
        """One warning with the count and the first few reasons (nothing when no record was skipped)."""
        if self.count:
            more = "; ..." if self.count > len(self.examples) else ""
            logger.warning("%s: skipped %d bad record%s: %s%s", what, self.count, "s" * (self.count != 1),
                           "; ".join(self.examples), more)


def iter_rows(path: str | os.PathLike, errors: BadRecords | None = None) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed JSON) for every non-blank line of a JSONL file.

    A line that is not JSON (or not UTF-8) raises ``RecordError("file:line: not valid JSON ...")``, or is
    counted in ``errors`` and skipped when ``errors.skip`` is set.
    """
    errors = errors or BadRecords()
    for lineno, line in iter_lines(path):
        where = f"{os.fspath(path)}:{lineno}"
        try:
            yield where, decode_json_line(line, where)
        except RecordError as e:
            errors.handle(e)


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """An output file path that can be written: not a folder, not existing unless ``overwrite``, in
    an existing folder. Checked before any work, so a long job does not fail at its end."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder; --output names the file to write")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path}: output exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder for the output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot write in {folder} (no write permission)")
    return path


def write_records(path: str | os.PathLike, records: Iterable[Record], overwrite: bool = False) -> int:
    """Write records as JSONL in our format; returns the count.

    The file is written under a temporary name in the same folder and renamed at the end, so a failure
    (a bad input record raising half way) leaves no output file. An existing ``path`` is an error unless
    ``overwrite``.
    """
    with staged_outputs([path], overwrite) as (tmp,):
        return write_jsonl(tmp, records)


def write_jsonl(path: str, records: Iterable[Record]) -> int:
    """Records as JSONL into `path` (a temporary file of `staged_outputs`); returns the count."""
    n = 0
    with naming_the_file(path), open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record_to_dict(record), ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


@contextlib.contextmanager
def staged_outputs(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> Iterator[list[str]]:
    """Temporary files next to several outputs, renamed into place together when the block ends
    and removed when it fails or is interrupted: a job writing several files leaves all of them
    or none (each checked with `check_output_path` first)."""
    paths = [check_output_path(p, overwrite) for p in paths]
    tmps = [os.path.join(os.path.dirname(os.path.abspath(p)), f".{os.path.basename(p)}.tmp{os.getpid()}")
            for p in paths]
    try:
        yield tmps
        for tmp in tmps:  # on disk before any is renamed: a crash of the host leaves old or new
            fsync_file(tmp)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        for folder in {os.path.dirname(t) for t in tmps}:
            fsync_folder(folder)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
