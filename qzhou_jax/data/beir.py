"""BEIR folders as retrieval training data, and loaders for their three files.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``, tab-separated). ``BeirSource`` makes one
``RetrievalRecord`` per query with at least one qrel of score > 0: the positives are those documents,
in qrels order, and there are no hard negatives (mine them separately).

Document text: ``(title + " " + text).strip()`` when the title is non-empty, else ``text.strip()``:
MTEB's form (``mteb/_create_dataloaders.py``), so training positives, mined passages and the
evaluation corpus are the same strings.

The loaders (``load_corpus``, ``load_queries``, ``load_qrels``) check ids and name the file and line of
anything wrong; the eval package can use them for BEIR-format test sets.
"""

from __future__ import annotations

import math
import os
from typing import Any, Collection, Iterator

from qzhou_jax.data.jsonl import iter_lines
from qzhou_jax.data.records import RecordError, RetrievalRecord, iter_rows
from qzhou_jax.data.sources import ListSource

__all__ = ["BeirSource", "load_corpus", "load_queries", "load_qrels", "doc_text", "beir_files"]

_LAYOUT = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


def beir_files(folder: str | os.PathLike, split: str = "train") -> tuple[str, str, str]:
    """(corpus, queries, qrels) paths of a BEIR folder; a missing file raises FileNotFoundError."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder ({_LAYOUT})")
    paths = (os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl"),
             os.path.join(folder, "qrels", f"{split}.tsv"))
    for p in paths:
        if not os.path.isfile(p):
            extra = ""
            if p == paths[2] and os.path.isdir(os.path.join(folder, "qrels")):
                have = sorted(f[:-4] for f in os.listdir(os.path.join(folder, "qrels")) if f.endswith(".tsv"))
                extra = f"; splits here: {', '.join(have) or 'none'}"
            raise FileNotFoundError(f"{p}: no such file ({_LAYOUT}{extra})")
    return paths


def _file(path: str | os.PathLike, default_name: str) -> str:
    path = os.fspath(path)
    return os.path.join(path, default_name) if os.path.isdir(path) else path


def _id(obj: Any, where: str) -> str:
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object")
    if "_id" not in obj:
        raise RecordError(f"{where}: field '_id': missing")
    value = obj["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"{where}: field '_id': must be a string or an integer, got {value!r}")
    value = str(value)
    if not value.strip():
        raise RecordError(f"{where}: field '_id': empty id")
    return value


def _iter_docs(path: str, what: str) -> Iterator[tuple[str, str, dict]]:
    """(where, id, obj) per line, with duplicate ids an error naming both lines."""
    seen: dict[str, str] = {}
    for where, obj in iter_rows(path):
        doc_id = _id(obj, where)
        if doc_id in seen:
            raise RecordError(f"{where}: field '_id': duplicate {what} id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = where.rsplit(":", 1)[1]
        yield where, doc_id, obj


def _str_field(obj: dict, name: str, where: str, required: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise RecordError(f"{where}: field {name!r}: missing")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {name!r}: must be a string, got {type(value).__name__}")
    return value


def load_corpus(path: str | os.PathLike, keep: Collection[str] | None = None) -> dict[str, dict[str, str]]:
    """``{doc id: {"title": ..., "text": ...}}`` from corpus.jsonl (a folder or the file itself).

    Every line is checked (``_id`` present and unique; ``text`` a string; ``title`` optional); with
    ``keep`` only those ids are returned, which keeps memory down for big corpora. An empty corpus is
    an error. Documents may have empty text (BEIR corpora have a few); ``BeirSource`` refuses them as
    positives.
    """
    path = _file(path, "corpus.jsonl")
    docs: dict[str, dict[str, str]] = {}
    n = 0
    for where, doc_id, obj in _iter_docs(path, "document"):
        n += 1
        text = _str_field(obj, "text", where, required=True)
        title = _str_field(obj, "title", where, required=False)
        if keep is None or doc_id in keep:
            docs[doc_id] = {"title": title, "text": text}
    if n == 0:
        raise RecordError(f"{path}: no documents (empty corpus)")
    return docs


def load_queries(path: str | os.PathLike, keep: Collection[str] | None = None) -> dict[str, str]:
    """``{query id: text}`` from queries.jsonl (a folder or the file); ids unique, texts non-empty."""
    path = _file(path, "queries.jsonl")
    queries: dict[str, str] = {}
    for where, qid, obj in _iter_docs(path, "query"):
        text = _str_field(obj, "text", where, required=True)
        if not text.strip():
            raise RecordError(f"{where}: field 'text': empty text (query {qid!r})")
        if keep is None or qid in keep:
            queries[qid] = text
    if not queries and keep is None:
        raise RecordError(f"{path}: no queries (empty file)")
    return queries


def read_qrels(path: str) -> list[tuple[str, str, str, float]]:
    """(where, query id, doc id, score) per data line; header optional; (query, doc) pairs unique."""
    rows: list[tuple[str, str, str, float]] = []
    seen: dict[tuple[str, str], int] = {}
    first = True
    for lineno, raw in iter_lines(path):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        cols = line.split("\t")
        if len(cols) != 3:
            raise RecordError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                              f"got {len(cols)}")
        qid, did, score = (c.strip() for c in cols)
        try:
            value = float(score)
        except ValueError:
            if first:  # the header line (query-id, corpus-id, score)
                first = False
                continue
            raise RecordError(f"{where}: field 'score': not a number: {score!r}") from None
        if not math.isfinite(value):
            raise RecordError(f"{where}: field 'score': not a finite number: {score!r}")
        if not qid or not did:
            raise RecordError(f"{where}: field {'query-id' if not qid else 'corpus-id'!r}: empty id")
        if (qid, did) in seen:
            raise RecordError(f"{where}: duplicate qrel for query {qid!r} and document {did!r} "
                              f"(first at line {seen[qid, did]})")
        first = False
        seen[qid, did] = lineno
        rows.append((where, qid, did, value))
    return rows


def load_qrels(path: str | os.PathLike, split: str = "test") -> dict[str, dict[str, int | float]]:
    """``{query id: {doc id: score}}`` from ``qrels/<split>.tsv`` (``path`` a BEIR folder or the tsv file).

    Scores are ints when integral (BEIR's relevance grades), floats otherwise.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "qrels", f"{split}.tsv")
    qrels: dict[str, dict[str, int | float]] = {}
    for _, qid, did, score in read_qrels(path):
        qrels.setdefault(qid, {})[did] = int(score) if score.is_integer() else score
    return qrels


def doc_text(doc: dict[str, str], title_sep: str = " ") -> str:
    """A BEIR document as one text, as mteb joins it: ``(title + title_sep + text).strip()`` when the
    title is non-empty, else ``text.strip()``."""
    title, text = doc.get("title") or "", doc.get("text") or ""
    return (title + title_sep + text).strip() if title else text.strip()


class BeirSource(ListSource):
    """Retrieval records from a BEIR folder: one per query with a positive qrel (score > 0).

    ``pos`` are the relevant documents' texts (``doc_text``), ``neg`` is empty, ``instruction`` is the
    given one (default none). Errors name the file and line: qrels naming an unknown query or document
    id, duplicate ids, an empty corpus, a positive document with no text; a missing file raises
    FileNotFoundError. ``queries_without_positive`` counts queries whose qrels are all <= 0 (dropped).
    Only the queries and documents the qrels use are kept in memory.
    """

    def __init__(self, folder: str | os.PathLike, split: str = "train", name: str | None = None,
                 title_sep: str = " ", instruction: str | None = None):
        corpus_path, queries_path, qrels_path = beir_files(folder, split)
        qrels = read_qrels(qrels_path)
        if not qrels:
            raise RecordError(f"{qrels_path}: no qrels")
        corpus = load_corpus(corpus_path, keep={did for _, _, did, _ in qrels})
        queries = load_queries(queries_path, keep={qid for _, qid, _, _ in qrels})
        positives: dict[str, list[str]] = {}
        for where, qid, did, score in qrels:
            if qid not in queries:
                raise RecordError(f"{where}: field 'query-id': {qid!r} is not in {queries_path}")
            if did not in corpus:
                raise RecordError(f"{where}: field 'corpus-id': {did!r} is not in {corpus_path}")
            if score > 0:
                text = doc_text(corpus[did], title_sep)
                if not text.strip():
                    raise RecordError(f"{where}: field 'corpus-id': document {did!r} (relevant to query "
                                      f"{qid!r}) has no title and no text in {corpus_path}")
                positives.setdefault(qid, []).append(text)
        self.folder = os.fspath(folder)
        self.split = split
        self.text_form = f"BEIR document = (title + {title_sep!r} + text).strip()"  # checked on resume
        self.num_qrels = len(qrels)
        self.queries_without_positive = len(queries) - len(positives)
        records = [RetrievalRecord(text, tuple(positives[qid]), (), instruction)
                   for qid, text in queries.items() if qid in positives]
        if not records:
            raise RecordError(f"{qrels_path}: no query has a qrel with score > 0")
        base = os.path.basename(os.path.normpath(self.folder))
        super().__init__(records, "retrieval", name or (base if split == "train" else f"{base}-{split}"))
