"""Model-based cleaning: hard negatives mined from an embedding model's ranks, and dropping
(query, positive) pairs the model scores low (recipe §4).

Both take ``encode(texts, instruction) -> float32 [n, dim]`` (``Encoder.encode``), so any model
qzhou-jax can load does the scoring. Queries are encoded with their record's instruction
(QZhou's prompt), passages without, as asymmetric retrieval is trained and evaluated, or with
``passage_instruction`` for symmetric data (NLI triplets: the same instruction on both sides).

Mining: the corpus (by default every distinct positive and negative of the input; or the user's
passages) is searched for each selected query on the default device (``search``); the positives
of every record with the same query, the record's existing negatives and the query itself are
removed from the ranking, and the
negatives are drawn at random from what is left at ranks ``ranks[0]..ranks[1]`` (1-based, both
included; the recipe: 10 to 30). Ranks near the top are skipped because they are often unlabelled
positives; ``max_score_ratio`` (e.g. 0.95) also drops candidates scoring above that fraction of
the positive's score.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qzhou_jax.data.records import RetrievalRecord
from qzhou_jax.synth import checks

__all__ = ["search", "mine_negatives", "positive_scores", "score_filter", "check_mine_args", "check_filter_args",
           "EncodeFn"]

EncodeFn = Callable[[Sequence[str], "str | None"], np.ndarray]
SEARCH_MARGIN = 32  # ranks searched past the window's end, for a query's own texts to drop out of


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


@functools.partial(jax.jit, static_argnames=("k",))
def _scan_top_k(q: jax.Array, blocks: jax.Array, n_docs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    nb, bs, _ = blocks.shape

    def body(carry, xs):
        best_v, best_i = carry
        d, b = xs
        s = jnp.dot(q, d.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        col = b * bs + jnp.arange(bs)
        s = jnp.where(col[None, :] < n_docs, s, -jnp.inf)
        v, i = jax.lax.top_k(s, k)
        v, j = jax.lax.top_k(jnp.concatenate([best_v, v], axis=1), k)
        i = jnp.take_along_axis(jnp.concatenate([best_i, col[i]], axis=1), j, axis=1)
        return (v, i), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.full((q.shape[0], k), -1, jnp.int32))
    (v, i), _ = jax.lax.scan(body, init, (blocks, jnp.arange(nb)))
    return v, i


def _merge(best_v: np.ndarray, best_i: np.ndarray, v: np.ndarray, i: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    allv, alli = np.concatenate([best_v, v], axis=1), np.concatenate([best_i, i], axis=1)
    order = np.argsort(-allv, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(allv, order, axis=1), np.take_along_axis(alli, order, axis=1)


def search(queries: np.ndarray, docs: np.ndarray, k: int, *, query_block: int = 1024, doc_block: int = 65536,
           device_bytes: int = 4 << 30, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar docs per query: (indices int64, scores float32), each
    [nq, min(k, nd)], best first. Equal scores come in no guaranteed order.

    Runs on the default device: the corpus goes there one chunk of at most ``device_bytes`` at a
    time (normalized, in ``dtype``: ``bfloat16`` halves it), and every query block is scanned
    over the chunk's ``doc_block``-row blocks; the running best stays on the host. Host memory
    holds one normalized chunk besides the inputs.
    """
    nq, nd = len(queries), len(docs)
    k = min(int(k), nd)
    if k < 1 or nq == 0:
        return np.zeros((nq, max(k, 0)), np.int64), np.zeros((nq, max(k, 0)), np.float32)
    dim = docs.shape[1]
    bs = max(k, min(doc_block, nd))
    per_chunk = max(1, int(device_bytes) // (bs * dim * jnp.dtype(dtype).itemsize)) * bs
    qb = min(query_block, nq)
    best_v = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    for c0 in range(0, nd, per_chunk):
        part = docs[c0:c0 + per_chunk]
        nb = math.ceil(len(part) / bs)
        blocks = np.zeros((nb * bs, dim), np.float32)
        blocks[: len(part)] = _unit(part)
        blocks = jax.device_put(blocks.reshape(nb, bs, dim).astype(jnp.dtype(dtype)))
        vs, is_ = np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
        for q0 in range(0, nq, qb):
            q = np.zeros((qb, queries.shape[1]), np.float32)
            rows = _unit(queries[q0:q0 + qb])
            q[: len(rows)] = rows
            v, i = _scan_top_k(jnp.asarray(q, dtype), blocks, jnp.int32(len(part)), k)
            vs[q0:q0 + len(rows)] = np.asarray(v)[: len(rows)]
            is_[q0:q0 + len(rows)] = np.asarray(i)[: len(rows)] + c0
        del blocks
        best_v, best_i = (vs, is_) if best_v.shape[1] == 0 else _merge(best_v, best_i, vs, is_, k)
    return best_i, best_v


def _encode_queries(records: Sequence[RetrievalRecord], encode: EncodeFn,
                    instruction: str | None = None) -> np.ndarray:
    """Queries with their instructions (``instruction`` for records without one), grouped so each
    instruction is one encode call."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.instruction or instruction].append(i)
    out: np.ndarray | None = None
    for instruction, rows in groups.items():
        emb = encode([records[i].query for i in rows], instruction)
        if out is None:
            out = np.zeros((len(records), emb.shape[1]), np.float32)
        out[rows] = emb
    return out if out is not None else np.zeros((0, 0), np.float32)


def positive_scores(records: Sequence[RetrievalRecord], encode: EncodeFn, query_emb: np.ndarray | None = None,
                    instruction: str | None = None, passage_instruction: str | None = None) -> list[np.ndarray]:
    """Cosine of each record's query (with its instruction) to each of its positives."""
    q = _unit(query_emb if query_emb is not None else _encode_queries(records, encode, instruction))
    flat = [p for r in records for p in r.pos]
    p = _unit(encode(flat, passage_instruction)) if flat else np.zeros((0, q.shape[1]), np.float32)
    out, start = [], 0
    for i, r in enumerate(records):
        out.append(p[start:start + len(r.pos)] @ q[i])
        start += len(r.pos)
    return out


def check_mine_args(ranks: tuple[int, int], num_negatives: int, max_score_ratio: float | None) -> None:
    """The mining settings' errors, before any model is loaded."""
    lo, hi = int(ranks[0]), int(ranks[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"--ranks: expected 1 <= FIRST <= LAST, got {lo} {hi}")
    if num_negatives < 1:
        raise ValueError(f"--num-negatives: expected at least 1, got {num_negatives}")
    if max_score_ratio is not None and not 0 < max_score_ratio:
        raise ValueError(f"--max-score-ratio: expected a positive number, got {max_score_ratio}")


def check_filter_args(min_score: float | None, drop_fraction: float | None) -> None:
    """The score filter's settings' errors, before any model is loaded."""
    if (min_score is None) == (drop_fraction is None):
        raise ValueError("give exactly one of --min-score and --drop-fraction")
    if drop_fraction is not None and not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"--drop-fraction: expected a fraction in [0, 1), got {drop_fraction}")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise ValueError(f"--min-score: a cosine similarity, in [-1, 1]; got {min_score}")


def mine_negatives(records: Sequence[RetrievalRecord], encode: EncodeFn, *, ranks: tuple[int, int] = (10, 30),
                   num_negatives: int = 4, corpus: Sequence[str] | None = None, fill: bool = False, seed: int = 0,
                   max_score_ratio: float | None = None, query_block: int = 1024,
                   instruction: str | None = None,
                   passage_instruction: str | None = None) -> tuple[list[RetrievalRecord], dict]:
    """Records with mined hard negatives, and counts.

    Selected are the records without negatives (``fill``: every record with fewer than
    ``num_negatives``, topped up to that many). Others are returned unchanged. ``instruction`` is
    used to encode the queries of records without their own, ``passage_instruction`` the corpus.
    """
    check_mine_args(ranks, num_negatives, max_score_ratio)
    lo, hi = int(ranks[0]), int(ranks[1])
    records = list(records)
    chosen = [i for i, r in enumerate(records) if (len(r.neg) < num_negatives if fill else not r.neg)]
    stats: dict[str, Any] = {"records": len(records), "selected": len(chosen), "mined": 0, "short": 0}
    if not chosen:
        return records, stats
    if corpus is None:
        corpus = [t for r in records for t in (*r.pos, *r.neg)]
    texts, keys, seen = [], [], set()
    for t in corpus:  # distinct passages (after normalization), first spelling kept
        key = checks.normalize(t)
        if key and key not in seen:
            seen.add(key)
            texts.append(t)
            keys.append(key)
    stats["corpus"] = len(texts)
    sel = [records[i] for i in chosen]
    # each distinct query (with its instruction) is encoded and searched once
    slot: dict[tuple[str, str | None], int] = {}
    row_query = [slot.setdefault((r.query, r.instruction or instruction), len(slot)) for r in sel]
    firsts = {q: r for r, q in zip(sel, row_query)}
    distinct = [firsts[q] for q in range(len(slot))]
    q_emb = _encode_queries(distinct, encode, instruction)
    d_emb = encode(texts, passage_instruction)
    # every positive of the same query counts as its own (data often holds one record per
    # (query, positive) pair): none of them may come back as a negative
    positives_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        positives_of[checks.normalize(r.query)].update(checks.normalize(p) for p in r.pos)
    left_out = [positives_of[checks.normalize(r.query)] | {checks.normalize(r.query)} for r in distinct]
    excluded = [left_out[q] | {checks.normalize(t) for t in r.neg} for r, q in zip(sel, row_query)]
    # search a fixed depth; the few queries whose left-out texts reach into the window (a query
    # with many positives) are searched again, deeper
    k = min(len(texts), hi + SEARCH_MARGIN)
    idx, val = search(q_emb, d_emb, k, query_block=query_block)
    idx, val = list(idx), list(val)
    deeper = sorted({q for r, q in enumerate(row_query)
                     if k < len(texts) and sum(keys[j] not in excluded[r] for j in idx[q]) < hi})
    if deeper:
        deep = set(deeper)
        k2 = min(len(texts), hi + max(len(excluded[r]) for r, q in enumerate(row_query) if q in deep))
        idx2, val2 = search(q_emb[deeper], d_emb, k2, query_block=query_block)
        for q, i2, v2 in zip(deeper, idx2, val2):
            idx[q], val[q] = i2, v2
    stats["distinct_queries"] = len(distinct)
    stats["searched_deeper"] = len(deeper)
    idx = [idx[q] for q in row_query]
    val = [val[q] for q in row_query]
    q_emb = q_emb[row_query]
    pos_best = None
    if max_score_ratio is not None:
        pos_best = np.array([s.max() for s in positive_scores(sel, encode, q_emb,
                                                              passage_instruction=passage_instruction)])
    window_scores = []
    for row, (i, r) in enumerate(zip(chosen, sel)):
        ranked = [(j, s) for j, s in zip(idx[row], val[row]) if keys[j] not in excluded[row]]
        window = ranked[lo - 1:hi]
        if pos_best is not None:
            window = [(j, s) for j, s in window if s <= max_score_ratio * pos_best[row]]
        need = num_negatives - len(r.neg)
        rng = np.random.default_rng([seed, i])
        pick = sorted(rng.choice(len(window), size=min(need, len(window)), replace=False)) if window else []
        new = tuple(texts[window[p][0]] for p in pick)
        window_scores.extend(window[p][1] for p in pick)
        stats["mined"] += len(new)
        stats["short"] += len(new) < need
        records[i] = RetrievalRecord(r.query, r.pos, r.neg + new, r.instruction)
    stats["mean_negative_score"] = float(np.mean(window_scores)) if window_scores else None
    return records, stats


def score_filter(records: Sequence[RetrievalRecord], encode: EncodeFn, *, min_score: float | None = None,
                 drop_fraction: float | None = None, instruction: str | None = None,
                 passage_instruction: str | None = None) -> tuple[list[RetrievalRecord], dict]:
    """Drop positives the model scores below ``min_score`` (a record left without positives is
    dropped), or the ``drop_fraction`` of records whose best positive scores lowest. Exactly one of
    the two is given. Counts include the score distribution to choose a threshold from."""
    check_filter_args(min_score, drop_fraction)
    scores = positive_scores(records, encode, instruction=instruction, passage_instruction=passage_instruction)
    best = np.array([s.max() for s in scores])
    stats: dict[str, Any] = {"records": len(records),
                             "best_positive_score_percentiles": {
                                 str(q): round(float(np.percentile(best, q)), 4) for q in (1, 5, 10, 25, 50, 75)}}
    out: list[RetrievalRecord] = []
    if drop_fraction is not None:
        n_drop = int(round(drop_fraction * len(records)))
        order = np.lexsort((np.arange(len(records)), best))  # lowest first, ties by position
        dropped = set(order[:n_drop].tolist())
        out = [r for i, r in enumerate(records) if i not in dropped]
        stats["threshold"] = float(best[order[n_drop - 1]]) if n_drop else None
        stats["dropped_positives"] = sum(len(records[i].pos) for i in dropped)
    else:
        dropped_pos = 0
        for r, s in zip(records, scores):
            keep = tuple(p for p, v in zip(r.pos, s) if v >= min_score)
            dropped_pos += len(r.pos) - len(keep)
            if keep:
                out.append(RetrievalRecord(r.query, keep, r.neg, r.instruction))
        stats["threshold"] = float(min_score)
        stats["dropped_positives"] = dropped_pos
    stats["dropped_records"] = len(records) - len(out)
    return out, stats
