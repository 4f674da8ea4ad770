"""Random-access record sources: the pipeline samples indices and reads records by index.

A source has a ``name``, a ``family`` (one of ``FAMILIES``), ``len()`` and ``source[i] -> Record``;
classification sources also expose ``labels`` (int label id per record) and ``label_names``, so a
sampler can pick same-class positives without reading texts.

Retrieval sources expose ``query_positives`` (a ``QueryPositives``): which texts are positives of a
record's query in any record, for data with one record per (query, positive) pair; and
``instructions``: how many records carry each of their own instructions (at most
``ScanKeys.MAX_INSTRUCTIONS`` distinct ones are kept; ``instructions_capped`` says whether more were
seen, ``records_with_instruction`` counts them all).

``JsonlSource`` validates a whole file once, up front, and then keeps only byte offsets: a bad line
stops the run before any device work starts, and memory does not grow with the texts. Records are
re-read from disk on access, which is what grain's random-access model wants.
"""

from __future__ import annotations

import array
import collections
import hashlib
import logging
import operator
import os
import threading
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from qzhou_jax.data.jsonl import decode_json_line
from qzhou_jax.data.records import (
    DEFAULT_FIELDS, FAMILIES, RECORD_TYPES, BadRecords, Record, RecordError, parse_record, resolve_fields,
)

__all__ = ["Source", "JsonlSource", "ListSource", "QueryPositives", "open_source", "label_index", "text_key"]

log = logging.getLogger(__name__)


@runtime_checkable
class Source(Protocol):
    name: str
    family: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Record: ...


def list_index(i: Any, n: int) -> int:
    """A list-like index: negative counts from the end; out of range raises IndexError."""
    try:
        i = operator.index(i)
    except TypeError:
        raise TypeError(f"source indices must be integers, not {type(i).__name__}") from None
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"index {i} out of range for a source of {n} records")
    return j


def text_key(text: str) -> int:
    """A 64-bit key of a text, the same in every process (BLAKE2b): classification sources keep one
    per record so that batches never pair a text with itself (repeated rows, one text under two labels)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def query_key(record: Any) -> int:
    """The key of a retrieval record's query: its text and its own instruction, if any."""
    instruction = getattr(record, "instruction", None)
    return text_key(record.query if not instruction else f"{instruction}\x00{record.query}")


def label_index(labels: Iterable[str]) -> tuple[np.ndarray, list[str]]:
    """(int32 id per label, sorted distinct label names): ids are stable whatever the record order."""
    labels = list(labels)
    names = sorted(set(labels))
    ids = {name: k for k, name in enumerate(names)}
    return np.fromiter((ids[x] for x in labels), dtype=np.int32, count=len(labels)), names


_PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of 64-bit keys


def _pair_keys(query_keys: np.ndarray, text_keys: np.ndarray) -> np.ndarray:
    """One uint64 key per (query key, text key) pair."""
    with np.errstate(over="ignore"):
        queries = np.asarray(query_keys, np.int64).view(np.uint64)
        return (queries * _PAIR_MIX) ^ np.asarray(text_keys, np.int64).view(np.uint64)


class QueryPositives:
    """The positives of each record's query over the whole source.

    One record per (query, positive) pair is a common layout (flattened qrels, mined or synthesized
    data): a record's ``pos`` then holds one of its query's positives, and another record's positive,
    drawn as a random negative, or a listed negative can be one of the others. The loss would push the
    query away from a relevant text. ``contains(i, text)`` says whether ``text`` is a positive of record
    ``i``'s query in another record; it keeps (query, positive) key pairs only for queries that several
    records share (a record's own ``pos`` is checked directly), so one-record-per-query data costs 9
    bytes per record and no lookups. A query is its text with its record's instruction: the same
    question under two instructions is two inputs, whose positives and negatives may differ. Built
    from a key of every query and positive (two hashes per record at scan time).
    """

    def __init__(self, query_keys: np.ndarray, positive_keys: np.ndarray, positive_counts: np.ndarray,
                 fewest_negatives: int | None = None):
        self.query_keys = np.asarray(query_keys, np.int64)
        self.distinct_positives = len(np.unique(np.asarray(positive_keys, np.int64)))
        self.fewest_negatives = fewest_negatives  # the fewest hard negatives a record lists (None: unknown)
        n = len(self.query_keys)
        _, inverse, counts = np.unique(self.query_keys, return_inverse=True, return_counts=True)
        owner = np.repeat(np.arange(n), np.asarray(positive_counts, np.int64))
        self.shared = counts[inverse] > 1  # per record: its query is in other records too
        shared = self.shared[owner]
        self.pairs = np.unique(_pair_keys(self.query_keys[owner[shared]], np.asarray(positive_keys)[shared]))
        self.shared_queries = int((counts > 1).sum())  # distinct queries with several records

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "QueryPositives":
        keys = ScanKeys("retrieval")
        for r in records:
            keys.add(r)
        return keys.query_positives()

    def contains(self, i: int, text: str) -> bool:
        """Whether ``text`` is a positive of record ``i``'s query in one of the records sharing that query
        (always False for a query no other record has: its positives are the record's own ``pos``)."""
        if not self.shared[i]:
            return False
        mask = (1 << 64) - 1  # _pair_keys on Python ints: a numpy call per text costs ~10 us
        key = np.uint64(((int(self.query_keys[i]) & mask) * int(_PAIR_MIX) & mask) ^ (text_key(text) & mask))
        j = int(np.searchsorted(self.pairs, key))
        return j < len(self.pairs) and self.pairs[j] == key

    def is_positive(self, i: int, record: Any, text: str) -> bool:
        """Whether ``text`` is a positive of the query of record ``i`` (``record``): its own or another's."""
        return text in record.pos or self.contains(i, text)

    def positives_among(self, i: int, record: Any, texts: Sequence[str]) -> list[bool]:
        """``is_positive`` for each of ``texts`` (a record's listed negatives), in one lookup."""
        own = set(record.pos)
        if not self.shared[i] or not texts:
            return [t in own for t in texts]
        keys = np.fromiter((text_key(t) for t in texts), np.int64, len(texts))
        wanted = _pair_keys(np.full(len(texts), self.query_keys[i]), keys)
        at = np.minimum(np.searchsorted(self.pairs, wanted), len(self.pairs) - 1)  # pairs: sorted, non-empty
        return [t in own or bool(f) for t, f in zip(texts, self.pairs[at] == wanted)]


class ScanKeys:
    """What a source keeps of each record while it scans them: label and text key (classification),
    query and positive keys and the records' own instructions, counted (retrieval). ``attach`` sets
    the source's attributes."""

    MAX_INSTRUCTIONS = 10_000  # distinct per-record instructions counted; more are only flagged

    def __init__(self, family: str):
        self.family = family
        self.labels: list[str] = []
        self.text, self.query, self.pos, self.pos_n = (array.array("q") for _ in range(4))
        self.fewest_negatives: int | None = None
        self.instructions: collections.Counter[str] = collections.Counter()
        self.instructions_capped = False
        self.with_instruction = 0  # records with their own instruction, counted or not

    def add(self, record: Any) -> None:
        if self.family == "classification":
            self.labels.append(record.label)
            self.text.append(text_key(record.text))
        elif self.family == "retrieval":
            self.query.append(query_key(record))
            self.pos.extend(map(text_key, record.pos))
            self.pos_n.append(len(record.pos))
            n = len(record.neg)
            self.fewest_negatives = n if self.fewest_negatives is None else min(self.fewest_negatives, n)
            instr = record.instruction
            if instr:
                self.with_instruction += 1
                if instr in self.instructions or len(self.instructions) < self.MAX_INSTRUCTIONS:
                    self.instructions[instr] += 1
                else:
                    self.instructions_capped = True

    def query_positives(self) -> QueryPositives:
        arr = lambda a: np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64)  # noqa: E731
        return QueryPositives(arr(self.query), arr(self.pos), arr(self.pos_n), self.fewest_negatives)

    def attach(self, source: Any) -> None:
        if self.family == "classification":
            source.labels, source.label_names = label_index(self.labels)
            source.text_keys = np.frombuffer(self.text, np.int64).copy()
        elif self.family == "retrieval":
            source.query_positives = self.query_positives()
            source.instructions = dict(self.instructions)
            source.instructions_capped = self.instructions_capped
            source.records_with_instruction = self.with_instruction


class JsonlSource:
    """Records of one family from a JSONL file, read by index.

    The constructor scans the file once: it parses and validates every non-blank line and keeps the
    byte offsets of the good ones (``offsets``, int64) and, for classification, ``labels`` (int32 id
    per record) and ``label_names`` (sorted). Texts are not kept; ``source[i]`` reads and parses line i
    again. A bad line raises ``RecordError("path:line: field ...")``; with ``skip_bad_records`` it is
    skipped, counted in ``skipped`` and reported in one warning. A file with no records is an error.

    The open file handle is per process and opened lazily, so the object pickles (for grain worker
    processes) without it. Reads use ``os.pread`` and are safe from several threads.
    """

    def __init__(self, path: str | os.PathLike, family: str, fields: Mapping[str, str] | None = None,
                 skip_bad_records: bool = False, name: str | None = None):
        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")
        self.path = os.fspath(path)
        self.family = family
        self.fields = resolve_fields(DEFAULT_FIELDS[family], fields, family)
        self.name = name or os.path.splitext(os.path.basename(self.path))[0]
        self.labels: np.ndarray | None = None
        self.text_keys: np.ndarray | None = None
        self.label_names: list[str] | None = None
        self.query_positives: QueryPositives | None = None
        self.instructions: dict[str, int] = {}
        self.instructions_capped = False
        self.records_with_instruction = 0
        self._abspath = os.path.abspath(self.path)
        self._file = None
        self._pid = None
        self._lock = threading.Lock()
        self._scan(BadRecords(skip=skip_bad_records))

    @property
    def size_bytes(self) -> int:
        """The file's size when it was scanned (a resume compares it, to notice a rewritten file)."""
        return int(self._stat[0])

    def _scan(self, errors: BadRecords) -> None:
        if os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: a folder, not a JSONL file (a BEIR folder? use format beir)")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        starts = array.array("q")
        keys = ScanKeys(self.family)
        end = 0
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            pos = 0
            for lineno, line in enumerate(f, 1):
                start, pos = pos, pos + len(line)
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line, start = line[3:], start + 3
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    record = parse_record(decode_json_line(line, where), self.family, self.fields, where)
                except RecordError as e:
                    errors.handle(e)
                    continue
                starts.append(start)
                end = pos
                keys.add(record)
        self._stat = (st.st_size, st.st_mtime_ns)
        self.skipped = errors.count
        errors.warn(self.path, log)
        if not starts:
            why = f"all {errors.count} non-blank lines are bad" if errors.count else "empty file"
            raise RecordError(f"{self.path}: no records ({why})")
        # bounds[i]:bounds[i+1] holds record i's line (and any blank or skipped lines after it).
        self._bounds = np.empty(len(starts) + 1, dtype=np.int64)
        self._bounds[:-1] = np.frombuffer(starts, dtype=np.int64)
        self._bounds[-1] = end
        keys.attach(self)

    @property
    def offsets(self) -> np.ndarray:
        """Byte offset of each record's line (int64, read-only view)."""
        view = self._bounds[:-1]
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            with self._lock:
                if self._file is None or self._pid != os.getpid():
                    f = open(self._abspath, "rb", buffering=0)
                    st = os.fstat(f.fileno())
                    if (st.st_size, st.st_mtime_ns) != self._stat:
                        f.close()
                        raise RecordError(f"{self.path}: the file changed after it was scanned; "
                                          "open the source again")
                    self._file, self._pid = f, os.getpid()
        return self._file

    def _read(self, start: int, size: int) -> bytes:
        f = self._handle()
        if hasattr(os, "pread"):
            return os.pread(f.fileno(), size, start)
        with self._lock:  # no pread (Windows): seek + read under the lock
            f.seek(start)
            return f.read(size)

    def __getitem__(self, i: int) -> Record:
        j = list_index(i, len(self))
        start, stop = int(self._bounds[j]), int(self._bounds[j + 1])
        line = self._read(start, stop - start).split(b"\n", 1)[0]
        where = f"{self.path}: record {j} (byte {start})"
        return parse_record(decode_json_line(line, where), self.family, self.fields, where)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"JsonlSource({self.path!r}, family={self.family!r}, records={len(self)}"
                + (f", skipped={self.skipped}" if self.skipped else "") + ")")


class ListSource:
    """An in-memory list of records with the ``Source`` interface (tests, BEIR, small transformed sets)."""

    def __init__(self, records: Sequence[Record], family: str | None = None, name: str = "list"):
        records = list(records)
        if not records:
            raise ValueError(f"{name}: no records")
        if family is None:
            family = next((fam for fam, cls in RECORD_TYPES.items() if isinstance(records[0], cls)), None)
            if family is None:
                raise TypeError(f"{name}: not a record: {type(records[0]).__name__}")
        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")
        cls = RECORD_TYPES[family]
        for k, r in enumerate(records):
            if not isinstance(r, cls):
                raise TypeError(f"{name}: record {k} is a {type(r).__name__}, expected {cls.__name__} ({family})")
        self.records = records
        self.family = family
        self.name = name
        self.skipped = 0
        self.labels: np.ndarray | None = None
        self.label_names: list[str] | None = None
        self.text_keys: np.ndarray | None = None
        self.query_positives: QueryPositives | None = None
        self.instructions: dict[str, int] = {}
        self.instructions_capped = False
        self.records_with_instruction = 0
        keys = ScanKeys(family)
        for r in records:
            keys.add(r)
        keys.attach(self)

    @classmethod
    def from_dicts(cls, rows: Iterable[Any], family: str, fields: Mapping[str, str] | None = None,
                   name: str = "list") -> "ListSource":
        """Parse dicts, validated like JSONL lines (errors say "name:row")."""
        return cls([parse_record(obj, family, fields, f"{name}:{k + 1}") for k, obj in enumerate(rows)],
                   family, name)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[list_index(i, len(self.records))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, family={self.family!r}, records={len(self)})"


FORMATS = ("jsonl", "beir", "tfds")


def open_source(spec: Mapping[str, Any]) -> Source:
    """A source from a dataset entry of the training config.

    Keys: ``task`` (the family: retrieval, sts, classification), ``path``, ``format`` ("jsonl", "beir" or
    "tfds"; default "beir" when ``path`` is a folder, else "jsonl"), ``name`` (default: the file or folder
    name), ``fields`` (our name -> the data's name), ``skip_bad_records``, ``split`` (BEIR: qrels split,
    default "train"; TFDS: default "train") and ``data_dir`` (TFDS). For TFDS, ``path`` is the dataset
    name as ``tfds.data_source`` takes it ("glue/stsb", "ag_news_subset:1.0.0"). Other keys are ignored
    (they belong to the sampler or pipeline).
    """
    task = spec.get("task")
    if task not in FAMILIES:
        raise ValueError(f"dataset {spec.get('name', spec.get('path'))!r}: task must be one of "
                         f"{', '.join(FAMILIES)}, got {task!r}")
    path = spec.get("path")
    if not path:
        raise ValueError(f"dataset {spec.get('name')!r}: no path")
    path = os.fspath(path)
    fmt = spec.get("format") or ("beir" if os.path.isdir(path) else "jsonl")
    if fmt not in FORMATS:
        raise ValueError(f"dataset {spec.get('name', path)!r}: unknown format {fmt!r} (expected one of "
                         f"{', '.join(FORMATS)})")
    fields = spec.get("fields") or None
    skip = bool(spec.get("skip_bad_records", False))
    name = spec.get("name")
    if fmt == "jsonl":
        return JsonlSource(path, task, fields=fields, skip_bad_records=skip, name=name)
    if fmt == "beir":
        from qzhou_jax.data.beir import BeirSource

        if task != "retrieval":
            raise ValueError(f"dataset {name or path!r}: BEIR folders hold retrieval data, not {task}")
        if fields:
            raise ValueError(f"dataset {name or path!r}: 'fields' does not apply to BEIR folders")
        return BeirSource(path, split=spec.get("split") or "train", name=name)
    from qzhou_jax.data.tfds_source import TfdsSource

    return TfdsSource(path, split=spec.get("split") or "train", family=task, fields=fields,
                      data_dir=spec.get("data_dir"), skip_bad_records=skip, source_name=name)
