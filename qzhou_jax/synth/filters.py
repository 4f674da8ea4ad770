"""Cleaning without a model (recipe §4): global deduplication, and removing training records
too close to evaluation data.

Texts are compared after ``checks.normalize`` (NFKC, case-folded, sentence punctuation dropped).

- ``dedup``: across every file given, a record whose key (retrieval: query and positives; sts: both
  texts and the score; classification: text and label) was seen before is dropped; inside retrieval
  records, negatives that repeat the query, another negative, or a positive of any record with the
  same query (in any of the files) are dropped too: a positive listed as a negative trains the
  model against itself.
- ``decontaminate``: a record is dropped when any of its texts equals an evaluation text, or shares
  a run of ``ngram`` units with one: 13 words by default (the usual choice for decontamination),
  26 characters for Chinese, Japanese and Korean text (``cjk_ngram``: a CJK character carries about
  half a word). Whole-text matches count only for evaluation texts of at least ``min_words`` words
  (4) or ``min_cjk_chars`` CJK characters (5): a one-word title or a two-character name would remove
  every training text that happens to equal it.
"""

from __future__ import annotations

import array
import hashlib
import logging
import os
from collections import Counter, deque
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from qzhou_jax.data.jsonl import iter_jsonl
from qzhou_jax.data.records import ClassificationRecord, PairRecord, Record, RetrievalRecord
from qzhou_jax.synth import checks

__all__ = ["Dedup", "dedup", "EvalIndex", "eval_texts", "decontaminated", "decontaminate"]

log = logging.getLogger(__name__)

# identifiers, labels and metadata: not evaluation texts (STS-B's rows carry sid, genre, dataset, year)
ID_FIELDS = frozenset({"_id", "id", "qid", "pid", "docid", "doc_id", "query_id", "query-id", "corpus-id",
                       "corpus_id", "label", "score", "sid", "genre", "dataset", "year", "source", "split", "lang",
                       "language"})


def _digest(*parts: str) -> bytes:
    """16 bytes standing for a tuple of strings (keys of millions of records stay small)."""
    return hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=16).digest()


def _key(record: Record) -> bytes:
    if isinstance(record, RetrievalRecord):
        return _digest("r", checks.normalize(record.query), *sorted(checks.normalize(p) for p in record.pos))
    if isinstance(record, PairRecord):
        return _digest("s", checks.normalize(record.text1), checks.normalize(record.text2), repr(record.score))
    return _digest("c", checks.normalize(record.text), record.label)


class Dedup:
    """Global deduplication of several datasets in priority order, in two passes so that memory holds
    16-byte digests, not records (11M records: about 1 GB): ``scan`` every dataset first (the
    positives of every query, wherever they are listed), then ``filter`` each dataset in turn.
    ``summary()`` has the counts per filtered dataset."""

    def __init__(self):
        self.query_positive: set[bytes] = set()  # digests of (normalized query, normalized positive)
        self.seen: set[bytes] = set()
        self.label_of: dict[bytes, str] = {}
        self.relabelled: set[bytes] = set()
        self.counts: list[Counter] = []

    def scan(self, records: Iterable[Record]) -> None:
        for r in records:
            if isinstance(r, RetrievalRecord):
                q = checks.normalize(r.query)
                self.query_positive.update(_digest("qp", q, checks.normalize(p)) for p in r.pos)

    def _clean_negatives(self, record: RetrievalRecord) -> tuple[RetrievalRecord, int]:
        """Without negatives that repeat the query, an earlier negative, or a positive of the query."""
        q = checks.normalize(record.query)
        taken = {q}
        keep = []
        for n in record.neg:
            key = checks.normalize(n)
            if key not in taken and _digest("qp", q, key) not in self.query_positive:
                taken.add(key)
                keep.append(n)
        if len(keep) == len(record.neg):
            return record, 0
        return RetrievalRecord(record.query, record.pos, tuple(keep), record.instruction), len(record.neg) - len(keep)

    def filter(self, records: Iterable[Record]) -> Iterator[Record]:
        """The records of one dataset not seen earlier in it or in a dataset filtered before."""
        c = Counter()
        self.counts.append(c)
        for r in records:
            c["read"] += 1
            key = _key(r)
            if key in self.seen:
                c["duplicates"] += 1
                continue
            self.seen.add(key)
            if isinstance(r, RetrievalRecord):
                r, n = self._clean_negatives(r)
                c["negatives_dropped"] += n
            elif isinstance(r, ClassificationRecord):
                text = _digest(checks.normalize(r.text))
                if self.label_of.setdefault(text, r.label) != r.label:
                    self.relabelled.add(text)
            c["written"] += 1
            yield r

    def summary(self) -> dict[str, Any]:
        return {"datasets": [dict(c) for c in self.counts], "texts_with_several_labels": len(self.relabelled)}


def dedup(datasets: Sequence[Iterable[Record]]) -> tuple[list[list[Record]], dict[str, Any]]:
    """Each dataset without the records seen earlier in it or in an earlier dataset. Counts per dataset."""
    datasets = [list(d) for d in datasets]
    d = Dedup()
    for records in datasets:
        d.scan(records)
    out = [list(d.filter(records)) for records in datasets]
    return out, d.summary()


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ID_FIELDS:
                yield from _strings(v)


def _beir_split_texts(folder: str, split: str) -> Iterator[str]:
    """The queries of a BEIR split and the documents relevant to them (title and text)."""
    from qzhou_jax.data.beir import beir_files, load_corpus, load_qrels, load_queries

    corpus_path, queries_path, qrels_path = beir_files(folder, split)
    qrels = load_qrels(qrels_path, split)
    docs = {d for rel in qrels.values() for d, score in rel.items() if score > 0}
    yield from load_queries(queries_path, keep=set(qrels)).values()
    for doc in load_corpus(corpus_path, keep=docs).values():
        yield from (t for t in (doc.get("title"), doc.get("text")) if t)


def eval_texts(paths: Sequence[str], split: str = "test") -> Iterator[str]:
    """Evaluation texts: every string of every JSON line of the given files (ids, labels and
    scores excepted); for a BEIR folder (one with a qrels/ folder, or with corpus.jsonl and
    queries.jsonl: then the missing qrels/<split>.tsv is an error), the queries of ``split`` and
    the documents relevant to them, not the whole corpus (train and test splits often share it;
    name its files to use all of it); for any other folder, every .jsonl file below it."""
    for path in paths:
        if os.path.isdir(path) and (os.path.isdir(os.path.join(path, "qrels")) or all(
                os.path.isfile(os.path.join(path, f)) for f in ("corpus.jsonl", "queries.jsonl"))):
            yield from _beir_split_texts(path, split)  # without qrels/: an error naming it
            continue
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".jsonl"))
            if not files:
                raise FileNotFoundError(f"{path}: no .jsonl files in this folder")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for f in files:
            for _, obj in iter_jsonl(f):
                yield from _strings(obj)


_CJK_SCRIPTS = frozenset({"HAN", "KANA", "HANGUL"})
_MUL = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2^64
_INV = pow(_MUL, -1, 1 << 64)
_POWERS: dict[int, np.ndarray] = {}


def _powers(base: int, length: int) -> np.ndarray:
    """base^0 .. base^(length-1) modulo 2^64 (uint64 arithmetic wraps), cached and grown."""
    have = _POWERS.get(base)
    if have is None or len(have) < length:
        size = max(length, 2 * len(have) if have is not None else 1024)
        steps = np.full(size, base, np.uint64)
        steps[0] = 1
        with np.errstate(over="ignore"):
            have = np.cumprod(steps, dtype=np.uint64)
        _POWERS[base] = have
    return have[:length]


_UNIT_HASHES: dict[str, int] = {}  # a cache: the same words recur across texts


def stable_hash(text: str) -> int:
    """A signed 64-bit hash that every process computes alike (Python's ``hash`` of a str is salted
    per process): the first 8 bytes of the text's BLAKE2b."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def unit_hash(unit: str) -> int:
    """``stable_hash`` of a text unit (a word or a CJK character), cached: units recur across texts
    (whole texts do not, and go to ``stable_hash`` directly)."""
    value = _UNIT_HASHES.get(unit)
    if value is None:
        if len(_UNIT_HASHES) >= 1 << 21:
            _UNIT_HASHES.clear()
        value = _UNIT_HASHES[unit] = stable_hash(unit)
    return value


def run_hashes(text_units: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every run of ``n`` consecutive units, vectorized: the run i..i+n-1 hashes to
    sum_j h(u_j) * MUL^(i+n-1-j) modulo 2^64 with h = ``unit_hash``, from one cumulative sum (a
    polynomial rolling hash)."""
    m = len(text_units) - n + 1
    if m <= 0:
        return np.zeros(0, np.int64)
    x = np.fromiter(map(unit_hash, text_units), np.int64, len(text_units)).view(np.uint64)
    with np.errstate(over="ignore"):
        q = np.concatenate([np.zeros(1, np.uint64), np.cumsum(x * _powers(_INV, len(x)), dtype=np.uint64)])
        runs = (q[n:] - q[:m]) * _powers(_MUL, len(x))[n - 1:]
    return runs.view(np.int64)


class EvalIndex:
    """Normalized evaluation texts and their runs of ``ngram`` words (``cjk_ngram`` CJK characters)."""

    def __init__(self, texts: Iterable[str], ngram: int = 13, cjk_ngram: int = 26, min_words: int = 4,
                 min_cjk_chars: int = 5):
        if ngram < 1 or cjk_ngram < 1:
            raise ValueError(f"--ngram / --cjk-ngram: expected positive lengths, got {ngram} and {cjk_ngram}")
        self.ngram, self.cjk_ngram = int(ngram), int(cjk_ngram)
        # 64-bit hashes of whole texts and of their runs (a collision is vanishingly rare), kept
        # as sorted numpy arrays: 8 bytes a run, not a Python object each
        exact, grams = array.array("q"), array.array("q")
        self.texts = 0
        for t in texts:
            u = checks.units(t)
            if not u:
                continue
            self.texts += 1
            cjk = checks.script_of_units(u) in _CJK_SCRIPTS
            if len(u) >= (min_cjk_chars if cjk else min_words):
                exact.append(stable_hash(" ".join(u)))
            grams.extend(run_hashes(u, self.cjk_ngram if cjk else self.ngram).tolist())
        self.exact = np.unique(np.frombuffer(exact, np.int64)) if exact else np.zeros(0, np.int64)
        self.grams = np.unique(np.frombuffer(grams, np.int64)) if grams else np.zeros(0, np.int64)

    def save(self, folder: str) -> None:
        """The hash arrays as .npy files, for `mapped` (worker processes share them read-only)."""
        np.save(os.path.join(folder, "exact.npy"), self.exact)
        np.save(os.path.join(folder, "grams.npy"), self.grams)

    @classmethod
    def mapped(cls, folder: str, ngram: int, cjk_ngram: int, texts: int) -> "EvalIndex":
        """An index whose arrays are memory-mapped from `save`'s files (one copy in the page cache
        for every process)."""
        index = cls.__new__(cls)
        index.ngram, index.cjk_ngram, index.texts = ngram, cjk_ngram, texts
        index.exact = np.load(os.path.join(folder, "exact.npy"), mmap_mode="r")
        index.grams = np.load(os.path.join(folder, "grams.npy"), mmap_mode="r")
        return index

    @staticmethod
    def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> bool:
        if not len(keys) or not len(sorted_keys):
            return False
        pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return bool(np.any(sorted_keys[pos] == keys))

    def hit(self, text: str) -> bool:
        u = checks.units(text)
        if not u:
            return False
        n = self.cjk_ngram if checks.script_of_units(u) in _CJK_SCRIPTS else self.ngram
        return (self._contains(self.exact, np.array([stable_hash(" ".join(u))], np.int64))
                or self._contains(self.grams, run_hashes(u, n)))


def _fields(record: Record) -> Iterator[tuple[str, str]]:
    if isinstance(record, RetrievalRecord):
        yield "query", record.query
        for p in record.pos:
            yield "pos", p
        for n in record.neg:
            yield "neg", n
    elif isinstance(record, PairRecord):
        yield "text1", record.text1
        yield "text2", record.text2
    else:
        yield "text", record.text


def _first_hit(record: Record, index: EvalIndex) -> str | None:
    """The name of the record's first field close to an evaluation text, or None."""
    return next((name for name, text in _fields(record) if index.hit(text)), None)


_WORKER_INDEX: EvalIndex | None = None  # a worker process's index (`_start_worker`)


def _start_worker(folder: str, ngram: int, cjk_ngram: int, texts: int) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = EvalIndex.mapped(folder, ngram, cjk_ngram, texts)


def _hits_of_chunk(chunk: list[Record]) -> list[str | None]:
    return [_first_hit(r, _WORKER_INDEX) for r in chunk]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _hits(records: Iterable[Record], index: EvalIndex, workers: int,
          chunk_size: int) -> Iterator[tuple[Record, str | None]]:
    """(record, first hit or None) in input order; with ``workers > 1``, checked by worker processes a
    chunk at a time, at most 2 chunks per worker in flight (memory stays bounded on any input size).
    The workers are spawned, not forked (a fork of a process whose other threads hold locks, JAX's
    for one, can hang), and memory-map the index's arrays from a temporary folder. A script that
    calls this with ``workers > 1`` needs Python's ``if __name__ == "__main__":`` guard, as any
    spawned pool does."""
    if workers <= 1:
        for r in records:
            yield r, _first_hit(r, index)
        return
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qzhou-decontaminate-") as folder:
        index.save(folder)
        args = (folder, index.ngram, index.cjk_ngram, index.texts)
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=args) as pool:
            pending: deque = deque()
            for chunk in _chunks(records, chunk_size):
                pending.append((chunk, pool.apply_async(_hits_of_chunk, (chunk,))))
                while len(pending) >= 2 * workers:
                    done, result = pending.popleft()
                    yield from zip(done, result.get())
            while pending:
                done, result = pending.popleft()
                yield from zip(done, result.get())


def decontaminated(records: Iterable[Record], index: EvalIndex, stats: dict[str, Any], workers: int = 1,
                   chunk_size: int = 256) -> Iterator[Record]:
    """The records none of whose texts is close to an evaluation text, streamed in input order;
    ``stats`` gets the counts (by the field that hit) when the stream is exhausted."""
    if workers < 1:
        raise ValueError(f"--workers: expected at least 1, got {workers}")
    hits: Counter = Counter()
    n = kept = 0
    stats.update(read=0, dropped=0, dropped_by_field={}, eval_texts=index.texts, ngram=index.ngram,
                 cjk_ngram=index.cjk_ngram)
    for record, field in _hits(records, index, workers, chunk_size):
        n += 1
        if field is None:
            kept += 1
            yield record
        else:
            hits[field] += 1
    stats.update(read=n, dropped=n - kept, dropped_by_field=dict(hits))
    if n and not kept:
        log.warning("decontaminate: every record was dropped: is the training data the evaluation data, "
                    "or do both come from one corpus (for a BEIR folder, only the --against-split queries "
                    "and their relevant documents count)?")


def decontaminate(records: Iterable[Record], index: EvalIndex, workers: int = 1) -> tuple[list[Record], dict[str, Any]]:
    """``decontaminated`` as a list, with its counts."""
    stats: dict[str, Any] = {}
    kept = list(decontaminated(records, index, stats, workers))
    return kept, stats
