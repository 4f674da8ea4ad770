"""Reading evaluation data: BEIR folders and JSONL files, with errors that name the file and line.

Formats (one JSON object per line unless said otherwise; field names configurable):

- retrieval, BEIR folder: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`,
  `text`), `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`; header optional). A
  document's text is its title and text joined by a space, as in mteb.
- retrieval, records: `query`, `pos` (list of str), `neg` (list of str), optional
  `instruction`. The corpus is the union of all pos and neg texts (deduplicated); each
  record is one query whose relevant documents are its pos texts.
- reranking, records: `query`, `positive`/`pos`, `negative`/`neg`; each query is scored
  against its own candidates only (mteb's reranking). A `query` may be a list of texts
  (MindSmallReranking's browsing history): each is a query of its own with the record's
  candidates and judgements, and the `max_over_subqueries_*` metrics rank each record's
  candidates by their best score over its texts (mteb's `max_over_subqueries`).
- sts: `text1`, `text2`, `score` (also `sentence1` / `sentence2`).
- pair_classification: `text1`, `text2`, `label` in {0, 1} (also `sentence1` / `sentence2`,
  `labels`).
- classification: `text`, `label` (a train file and an evaluation file).
- clustering: `text`, `label` (one label, or a list for hierarchical labels), or one line
  per cluster set with `sentences` and `labels` lists.
- summarization: `text`, `human_summaries`, `machine_summaries`, `relevance`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from qzhou_jax.data.jsonl import RecordError, iter_jsonl

log = logging.getLogger(__name__)

# canonical field -> names accepted in files, first match wins (a task's `fields` goes first)
DEFAULT_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "retrieval": {"query": ("query",), "pos": ("pos", "positive"), "neg": ("neg", "negative"),
                  "instruction": ("instruction",)},
    "reranking": {"query": ("query",), "pos": ("positive", "pos"), "neg": ("negative", "neg"),
                  "instruction": ("instruction",)},
    "sts": {"text1": ("text1", "sentence1"), "text2": ("text2", "sentence2"), "score": ("score",)},
    "pair_classification": {"text1": ("text1", "sentence1"), "text2": ("text2", "sentence2"),
                            "label": ("label", "labels")},
    "classification": {"text": ("text",), "label": ("label",)},
    "clustering": {"text": ("text", "sentences"), "label": ("label", "labels")},
    "summarization": {"text": ("text",), "human_summaries": ("human_summaries",),
                      "machine_summaries": ("machine_summaries",), "relevance": ("relevance",)},
}


def field_names(task_type: str, overrides: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    names = {k: tuple(v) for k, v in DEFAULT_FIELDS[task_type].items()}
    for key, name in (overrides or {}).items():
        if key not in names:
            raise ValueError(f"fields: unknown field {key!r} for {task_type} tasks (known: {sorted(names)})")
        names[key] = (name,)
    return names


def _get(obj: Any, names: tuple[str, ...], where: str, required: bool = True) -> Any:
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in names:
        if name in obj:
            return obj[name]
    if required:
        alts = " or ".join(repr(n) for n in names)
        raise RecordError(f"{where}: missing field {alts}")
    return None


def _str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}: field {name!r} must be a list of strings")
    return list(value)


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{where}: field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _nonempty(path: str, count: int, what: str = "records") -> None:
    if count == 0:
        raise RecordError(f"{path}: no {what} (empty file)")



def fingerprint(paths: Iterable[str]) -> str:
    """sha256 over the bytes of the data files (the local stand-in for a dataset revision)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


# ------------------------------------------------------------------ retrieval
@dataclasses.dataclass
class RetrievalData:
    query_ids: list[str]
    queries: list[str]
    query_instructions: list[str | None]  # per-query instruction from the file, if any
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, int]]
    candidates: dict[str, list[str]] | None  # reranking: each query's own documents
    files: list[str]
    # reranking records: record id -> the ids of its queries (several where its query is a list of
    # texts, else one)
    subqueries: dict[str, list[str]] | None = None


def load_beir(folder: str, split: str, qrels_path: str | None = None) -> RetrievalData:
    """A BEIR folder; only the queries judged in `qrels/<split>.tsv` are evaluated.

    Files are read and checked by `qzhou_jax.data.beir` (the training reader); qrels naming
    a query or document that does not exist stop with the file, line and id."""
    from qzhou_jax.data.beir import doc_text, load_corpus, load_queries, read_qrels

    corpus_file = os.path.join(folder, "corpus.jsonl")
    queries_file = os.path.join(folder, "queries.jsonl")
    qrels_file = qrels_path or os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_file):
        raise FileNotFoundError(f"{qrels_file}: no such file (qrels of the requested split)")
    corpus = load_corpus(corpus_file)
    all_q = load_queries(queries_file)
    qrels: dict[str, dict[str, int]] = {}
    for where, qid, did, score in read_qrels(qrels_file):
        if qid not in all_q:
            raise RecordError(f"{where}: query-id {qid!r} is not in {queries_file}")
        if did not in corpus:
            raise RecordError(f"{where}: corpus-id {did!r} is not in {corpus_file}")
        qrels.setdefault(qid, {})[did] = int(score)
    if not qrels:
        raise RecordError(f"{qrels_file}: no relevance judgements (empty file)")
    doc_ids = list(corpus)
    docs = [doc_text(d) for d in corpus.values()]  # title and text joined by a space, as in mteb
    query_ids = [q for q in all_q if q in qrels]  # file order
    return RetrievalData(query_ids, [all_q[q] for q in query_ids], [None] * len(query_ids), doc_ids, docs, qrels,
                         None, [corpus_file, queries_file, qrels_file])


def load_retrieval_records(path: str, fields: Mapping[str, str] | None = None,
                           reranking: bool = False) -> RetrievalData:
    """Records (query, pos, neg, instruction) as a retrieval corpus, or as reranking candidates."""
    names = field_names("reranking" if reranking else "retrieval", fields)
    query_ids, queries, instructions = [], [], []
    doc_index: dict[str, int] = {}
    doc_ids, docs = [], []
    qrels: dict[str, dict[str, int]] = {}
    candidates: dict[str, list[str]] = {}
    subqueries: dict[str, list[str]] = {}  # every reranking record: its queries' ids
    lines = dropped = 0
    for lineno, obj in iter_jsonl(path):
        lines += 1
        where = f"{path}:{lineno}"
        query = _get(obj, names["query"], where)
        if reranking and isinstance(query, list):  # several texts for one record (a history)
            query = _str_list(query, names["query"][0], where)
            if not query:
                raise RecordError(f"{where}: field {names['query'][0]!r} is an empty list")
        else:
            query = _str(query, names["query"][0], where)
        pos = _str_list(_get(obj, names["pos"], where), names["pos"][0], where)
        neg = _str_list(_get(obj, names["neg"], where, required=reranking) or [], names["neg"][0], where)
        instr = _get(obj, names["instruction"], where, required=False)
        if instr is not None:
            instr = _str(instr, names["instruction"][0], where)
            instr = instr if instr.strip() else None  # blank is none, as in training records
        if reranking and not (pos and neg):  # mteb drops such records too: nothing to rank
            dropped += 1
            continue
        if not pos:
            raise RecordError(f"{where}: no positive passages (field {names['pos'][0]!r} is empty)")
        if reranking:
            qid = f"query{lines - dropped - 1}"
            ids = [f"apositive_{qid}_{i:05d}" for i in range(len(pos))] + \
                  [f"negative_{qid}_{i:05d}" for i in range(len(neg))]
            doc_ids.extend(ids)
            docs.extend(pos + neg)
            rel = {d: (1 if d.startswith("apositive_") else 0) for d in ids}
            texts = query if isinstance(query, list) else [query]
            sub = [f"{qid}_{j}" for j in range(len(texts))] if isinstance(query, list) else [qid]
            for one, text in zip(sub, texts):
                qrels[one], candidates[one] = rel, ids
                query_ids.append(one)
                queries.append(text)
                instructions.append(instr)
            subqueries[qid] = sub
            continue
        qid = f"q{lineno}"
        rel = {}
        for text, grade in [(t, 1) for t in pos] + [(t, 0) for t in neg]:
            if text not in doc_index:
                doc_index[text] = len(docs)
                doc_ids.append(f"d{len(docs)}")
                docs.append(text)
            if grade:
                rel[doc_ids[doc_index[text]]] = 1
        qrels[qid] = rel
        query_ids.append(qid)
        queries.append(query)
        instructions.append(instr)
    _nonempty(path, lines)
    if not query_ids:
        raise RecordError(f"{path}: no record has both positive and negative passages (nothing to rerank)")
    if dropped:
        log.warning("%s: %d of %d records dropped: no positive or no negative passages (nothing to rerank)",
                    path, dropped, lines)
    return RetrievalData(query_ids, queries, instructions, doc_ids, docs, qrels,
                         candidates if reranking else None, [path], subqueries if reranking else None)


# ------------------------------------------------------------------ pairs, labels
@dataclasses.dataclass
class PairData:
    text1: list[str]
    text2: list[str]
    values: list[float]  # gold scores (sts) or 0/1 labels (pair classification)
    files: list[str]


def load_pairs(path: str, task_type: str, fields: Mapping[str, str] | None = None) -> PairData:
    names = field_names(task_type, fields)
    key = "score" if task_type == "sts" else "label"
    t1, t2, values = [], [], []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        t1.append(_str(_get(obj, names["text1"], where), names["text1"][0], where))
        t2.append(_str(_get(obj, names["text2"], where), names["text2"][0], where))
        v = _get(obj, names[key], where)
        if key == "label":
            if isinstance(v, bool):
                v = int(v)
            if v not in (0, 1):
                raise RecordError(f"{where}: field {names[key][0]!r} must be 0 or 1, got {v!r}")
            values.append(int(v))
        else:
            values.append(_number(v, names[key][0], where))
    _nonempty(path, len(t1))
    if key == "label" and len(set(values)) < 2:
        raise RecordError(f"{path}: all pairs have label {values[0]}; pair classification needs both 0 and 1")
    if key == "score" and len(set(values)) < 2:
        raise RecordError(f"{path}: {len(values)} pair{'s' * (len(values) > 1)}, all with score {values[0]:g}; "
                          "STS correlates scores with similarities and needs at least two different scores")
    return PairData(t1, t2, values, [path])


def _label(value: Any, name: str, where: str) -> Any:
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)):
        raise RecordError(f"{where}: field {name!r} must be a string or an integer, got {value!r}")
    return value


@dataclasses.dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[Any]
    files: list[str]


def load_labelled(path: str, fields: Mapping[str, str] | None = None) -> LabelledTexts:
    """Classification records: text and label (str or int)."""
    names = field_names("classification", fields)
    texts, labels = [], []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        texts.append(_str(_get(obj, names["text"], where), names["text"][0], where))
        labels.append(_label(_get(obj, names["label"], where), names["label"][0], where))
    _nonempty(path, len(texts))
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        raise RecordError(f"{path}: labels mix strings and integers; use one kind")
    return LabelledTexts(texts, labels, [path])


@dataclasses.dataclass
class ClusteringData:
    sets: list[tuple[list[str], list[Any]]]  # one (texts, labels) per cluster set; label: value or list (levels)
    files: list[str]


def load_clustering(path: str, fields: Mapping[str, str] | None = None) -> ClusteringData:
    """Flat records (one set) or one cluster set per line (lists of sentences and labels)."""
    names = field_names("clustering", fields)
    flat_texts: list[str] = []
    flat_labels: list[Any] = []
    sets: list[tuple[list[str], list[Any]]] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = _get(obj, names["text"], where)
        label = _get(obj, names["label"], where)
        if isinstance(text, list):  # a cluster set
            texts = _str_list(text, names["text"][0], where)
            if not isinstance(label, list) or len(label) != len(texts):
                raise RecordError(f"{where}: a cluster set needs one label per sentence "
                                  f"({len(texts)} sentences)")
            sets.append((texts, [_label(x, names["label"][0], where) for x in label]))
            continue
        flat_texts.append(_str(text, names["text"][0], where))
        if isinstance(label, list):
            if not label:
                raise RecordError(f"{where}: field {names['label'][0]!r} is an empty list")
            flat_labels.append([_label(x, names["label"][0], where) for x in label])
        else:
            flat_labels.append(_label(label, names["label"][0], where))
    if flat_texts and sets:
        raise RecordError(f"{path}: mixes single texts and cluster sets; use one layout")
    if flat_texts:
        sets = [(flat_texts, flat_labels)]
    _nonempty(path, len(sets))
    return ClusteringData(sets, [path])


@dataclasses.dataclass
class SummarizationData:
    texts: list[str]
    human: list[list[str]]
    machine: list[list[str]]
    relevance: list[list[float]]
    files: list[str]


def load_summarization(path: str, fields: Mapping[str, str] | None = None) -> SummarizationData:
    names = field_names("summarization", fields)
    texts, human, machine, relevance = [], [], [], []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        texts.append(_str(_get(obj, names["text"], where), names["text"][0], where))
        h = _str_list(_get(obj, names["human_summaries"], where), names["human_summaries"][0], where)
        m = _str_list(_get(obj, names["machine_summaries"], where), names["machine_summaries"][0], where)
        r = _get(obj, names["relevance"], where)
        if not isinstance(r, list) or len(r) != len(m):
            raise RecordError(f"{where}: field {names['relevance'][0]!r} needs one score per machine summary "
                              f"({len(m)})")
        if not h or not m:
            raise RecordError(f"{where}: needs at least one human and one machine summary")
        human.append(h)
        machine.append(m)
        relevance.append([_number(x, names["relevance"][0], where) for x in r])
    _nonempty(path, len(texts))
    return SummarizationData(texts, human, machine, relevance, [path])


def check_labels_cover(train: Sequence[Any], path: str) -> None:
    if len(set(map(str, train))) < 2:
        raise RecordError(f"{path}: the training labels hold a single class; classification needs at least two")
