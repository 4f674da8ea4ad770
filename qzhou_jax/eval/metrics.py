"""MTEB's metrics on embeddings and scores, in numpy.

Each function follows the definition used by `mteb` 2.x (and, for retrieval, by
trec_eval through pytrec_eval), tie handling included, so scores computed here equal the
reference implementations on the same embeddings:

- retrieval / reranking: nDCG@k, MAP@k, recall@k, precision@k (trec_eval's `ndcg_cut`,
  `map_cut`, `recall`, `P`, `success`), MRR@k (mteb's); documents with equal scores are
  ranked by descending document id, as trec_eval does. Cosines are computed in float64 here
  (mteb: float32, through torch), and means are not rounded (mteb rounds all but MRR to 5
  decimals), so on the same embeddings results agree to 5e-6 except where float32 rounding
  reorders documents (cosines within about 1e-3 of 1);
- STS and summarization: Pearson and Spearman correlation (scipy's definitions);
- pair classification: average precision (scikit-learn's), best accuracy and best F1 over
  thresholds (mteb's search, which never splits tied scores).

Classification and clustering need scikit-learn (logistic regression, mini-batch k-means,
V-measure); they live in `qzhou_jax.eval.evaluators` and import it when used.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)


# ------------------------------------------------------------------ correlation
def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get the average of their ranks (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(xs)])
    avg = first + (counts + 1) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = avg[group]
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson's r in float64; nan when either input is constant (scipy returns nan too)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"pearson: need two 1-D inputs of equal length >= 2, got {x.shape} and {y.shape}")
    xm, ym = x - x.mean(), y - y.mean()
    xmax, ymax = np.max(np.abs(xm)), np.max(np.abs(ym))
    if xmax == 0 or ymax == 0:
        return math.nan
    xm, ym = xm / xmax, ym / ymax
    r = float(np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)))
    return max(-1.0, min(1.0, r))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


# ------------------------------------------------------------------ pair scores
def _precision(a: np.ndarray, b: np.ndarray) -> type:
    """The dtype scikit-learn computes paired distances in: float32 when both sides are
    float32 (as this package's encoders return them), float64 otherwise."""
    return np.float32 if np.asarray(a).dtype == np.float32 and np.asarray(b).dtype == np.float32 else np.float64


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows as mteb computes it: scikit-learn's
    1 - paired_cosine_distances (1 - |a/|a| - b/|b||^2 / 2, which keeps identical pairs at
    exactly 1), in the embeddings' precision (`_precision`)."""
    dt = _precision(a, b)
    a = np.asarray(a, dt)
    b = np.asarray(b, dt)
    na = np.sqrt(np.einsum("ij,ij->i", a, a))[:, None]
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))[:, None]
    diff = a / np.where(na == 0, 1, na) - b / np.where(nb == 0, 1, nb)
    return 1 - 0.5 * np.einsum("ij,ij->i", diff, diff)


def model_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The model's own similarity of matching rows as mteb computes it for a cosine model
    (`pairwise_cos_sim`: torch's `normalize`, then row sums of the products, in float32 on the
    CPU). With torch installed the same torch operations run here, so the scores are mteb's to
    the bit; without it numpy computes the same formula, which can differ in the last bit. That
    last bit matters: pairs of identical texts (cosine 1) are ordered by it, and their order
    moves `similarity_ap`, the thresholds and a `max_*` taken from them."""
    a32 = np.ascontiguousarray(a, np.float32)
    b32 = np.ascontiguousarray(b, np.float32)
    try:
        import torch
    except ImportError:
        unit = [x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), np.float32(1e-12))[:, None] for x in (a32, b32)]
        return (unit[0] * unit[1]).sum(axis=-1)
    with torch.no_grad():
        ta = torch.nn.functional.normalize(torch.from_numpy(a32), p=2, dim=1)
        tb = torch.nn.functional.normalize(torch.from_numpy(b32), p=2, dim=1)
        return (ta * tb).sum(dim=-1).numpy()


def pair_scores(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """mteb's per-pair scores, in the precision mteb computes each: cosine (scikit-learn),
    euclidean and manhattan distances (scikit-learn) and the dot product (numpy, row by
    row) in the embeddings' precision, and the model's similarity (cosine, through torch,
    `model_similarity`) always in float32. Rounding matters here: float32 ties scores that float64 separates,
    and ties move pair classification's AP and thresholds."""
    dt = _precision(a, b)
    a = np.asarray(a, dt)
    b = np.asarray(b, dt)
    diff = a - b
    return {
        "cosine": cosine_rows(a, b),
        "similarity": model_similarity(a, b),
        "euclidean": np.sqrt(np.einsum("ij,ij->i", diff, diff)),
        "manhattan": np.abs(diff).sum(axis=-1),
        "dot": np.array([np.dot(x, y) for x, y in zip(a, b)], dt).reshape(len(a)),
    }


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Average precision of ranking by descending score, tied scores as one threshold
    (scikit-learn's `average_precision_score`); nan without positives."""
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, np.float64)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    if len(tps) == 0 or tps[-1] == 0:
        return math.nan
    fps = last + 1 - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _sorted_rows(scores: np.ndarray, labels: np.ndarray, high_is_similar: bool) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores if high_is_similar else scores, kind="stable")
    return scores[order], labels[order]


def best_accuracy(scores: np.ndarray, labels: np.ndarray, high_is_similar: bool) -> tuple[float, float]:
    """Best accuracy of 'similar if the score is past a threshold', and that threshold."""
    s, y = _sorted_rows(np.asarray(scores, np.float64), np.asarray(labels), high_is_similar)
    n = len(y)
    pos = np.cumsum(y == 1)[:-1]
    neg_left = np.sum(y == 0) - np.cumsum(y != 1)[:-1]
    cut = np.flatnonzero(s[:-1] != s[1:])
    if len(cut) == 0:
        return 0.0, -1.0
    acc = (pos[cut] + neg_left[cut]) / n
    best = int(np.argmax(acc))
    if acc[best] <= 0:
        return 0.0, -1.0
    i = cut[best]
    return float(acc[best]), float((s[i] + s[i + 1]) / 2)


def best_f1(scores: np.ndarray, labels: np.ndarray, high_is_similar: bool) -> tuple[float, float, float, float]:
    """Best F1 over thresholds: (f1, precision, recall, threshold)."""
    s, y = _sorted_rows(np.asarray(scores, np.float64), np.asarray(labels), high_is_similar)
    total = int(np.sum(y))
    correct = np.cumsum(y == 1)[:-1]
    cut = np.flatnonzero((s[:-1] != s[1:]) & (correct > 0))
    if len(cut) == 0 or total == 0:
        return 0.0, 0.0, 0.0, 0.0
    precision = correct[cut] / (cut + 1)
    recall = correct[cut] / total
    f1 = 2 * precision * recall / (precision + recall)
    best = int(np.argmax(f1))
    if f1[best] <= 0:
        return 0.0, 0.0, 0.0, 0.0
    i = cut[best]
    return float(f1[best]), float(precision[best]), float(recall[best]), float((s[i] + s[i + 1]) / 2)


def pair_classification_scores(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """mteb's pair-classification metrics: per similarity function accuracy, F1, precision,
    recall and AP, and the max over functions (`max_ap` is the main score)."""
    labels = np.asarray(labels, np.int64)
    scores = pair_scores(a, b)
    funcs = [("similarity", scores["similarity"], True), ("cosine", scores["cosine"], True),
             ("manhattan", scores["manhattan"], False), ("euclidean", scores["euclidean"], False),
             ("dot", scores["dot"], True)]
    out: dict[str, float] = {}
    best: dict[str, list[float]] = {}
    for name, s, high in funcs:
        acc, _ = best_accuracy(s, labels, high)
        f1, precision, recall, _ = best_f1(s, labels, high)
        ap = average_precision(labels, s if high else -s)
        for metric, value in (("accuracy", acc), ("f1", f1), ("precision", precision), ("recall", recall),
                              ("ap", ap)):
            out[f"{name}_{metric}"] = value
            best.setdefault(metric, []).append(value)
    for metric, values in best.items():
        out[f"max_{metric}"] = max(values)
    return out


def sts_scores(a: np.ndarray, b: np.ndarray, gold: Sequence[float]) -> dict[str, float]:
    """mteb's STS metrics: Pearson and Spearman of gold scores against cosine similarity,
    negative euclidean and manhattan distances, and (`pearson`, `spearman`) the model's own
    similarity, which is cosine computed as mteb's torch path does (`pair_scores`)."""
    scores = pair_scores(a, b)
    out: dict[str, float] = {}
    for name, s in (("cosine", scores["cosine"]), ("manhattan", -scores["manhattan"]),
                    ("euclidean", -scores["euclidean"])):
        out[f"{name}_pearson"] = pearson(gold, s)
        out[f"{name}_spearman"] = spearman(gold, s)
    # mteb's `pearson` / `spearman` use the model's own similarity (cosine, through torch)
    out["pearson"], out["spearman"] = pearson(gold, scores["similarity"]), spearman(gold, scores["similarity"])
    return out


# ------------------------------------------------------------------ retrieval
def retrieval_scores(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                     k_values: Sequence[int] = K_VALUES, per_query: bool = False) -> dict[str, float]:
    """trec_eval's nDCG@k, MAP@k, recall@k, P@k, success@k and mteb's MRR@k, averaged over queries.

    `rankings[qid]` lists document ids best first (already sorted, ties broken by descending
    id); `qrels[qid][doc_id]` is the graded relevance (>= 1 counts as relevant, the grade is
    the nDCG gain). Queries of `rankings` missing from `qrels` are skipped, as trec_eval does.
    """
    k_values = sorted(set(int(k) for k in k_values))
    kmax = k_values[-1]
    discount = 1.0 / np.log2(np.arange(2, kmax + 2))
    sums: dict[str, list[float]] = {}
    for qid, ranked in rankings.items():
        rel = qrels.get(qid)
        if rel is None:
            continue
        grades = np.array([max(int(rel.get(d, 0)), 0) for d in ranked[:kmax]], np.float64)
        grades = np.pad(grades, (0, kmax - len(grades)))
        hit = grades >= 1
        num_rel = sum(1 for g in rel.values() if int(g) >= 1)
        ideal = np.sort(np.array([int(g) for g in rel.values() if int(g) >= 1], np.float64))[::-1]
        ideal = np.pad(ideal[:kmax], (0, max(0, kmax - len(ideal))))
        hits = np.cumsum(hit)
        dcg = np.cumsum(grades * discount)
        idcg = np.cumsum(ideal * discount)
        prec_at_hit = np.where(hit, hits / np.arange(1, kmax + 1), 0.0)
        ap = np.cumsum(prec_at_hit)
        first = int(np.argmax(hit)) if hit.any() else None
        for k in k_values:
            row = {
                f"ndcg_at_{k}": dcg[k - 1] / idcg[k - 1] if idcg[k - 1] > 0 else 0.0,
                f"map_at_{k}": ap[k - 1] / num_rel if num_rel else 0.0,
                f"recall_at_{k}": hits[k - 1] / num_rel if num_rel else 0.0,
                f"precision_at_{k}": hits[k - 1] / k,
                f"mrr_at_{k}": 1.0 / (first + 1) if first is not None and first < k else 0.0,
                f"hit_rate_at_{k}": 1.0 if hits[k - 1] > 0 else 0.0,
            }
            for name, value in row.items():
                sums.setdefault(name, []).append(float(value))
    if not sums:
        raise ValueError("retrieval: no query has both a ranking and relevance judgements")
    order = ["ndcg", "map", "recall", "precision", "mrr", "hit_rate"]
    out = {}
    for metric in order:
        for k in k_values:
            values = sums[f"{metric}_at_{k}"]
            out[f"{metric}_at_{k}"] = values if per_query else float(np.mean(values))
    return out


def id_order(ids: Sequence[str]) -> np.ndarray:
    """Rank of each id in ascending string order (code points, as strcmp on UTF-8)."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    return rank


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float64 (zero rows stay zero)."""
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def _select(values: np.ndarray, ranks: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's `k` best entries by (value, rank) descending, in no
    particular order. Equal values straddling the cut are decided by rank, so which of
    several identical documents make the top k does not depend on the blocking."""
    n = values.shape[1]
    if k >= n:
        return np.broadcast_to(np.arange(n), values.shape)
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(values, part, axis=1).min(axis=1)
    ties = np.flatnonzero((values >= kth[:, None]).sum(axis=1) > k)
    for r in ties:  # rare: exact ties at the cut (duplicate documents)
        cand = np.flatnonzero(values[r] >= kth[r])
        part[r] = cand[np.lexsort((-ranks[r, cand], -values[r, cand]))[:k]]
    return part


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, doc_rank: np.ndarray, query_block: int = 256,
          doc_block: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most cosine-similar documents per query: (indices, scores), each [nq, min(k, nd)],
    best first, equal scores ordered by descending document id (`doc_rank` from `id_order`).

    Scores are computed in float64 block by block (so the ranking does not depend on the
    blocking or on float32 rounding), and memory stays at query_block x doc_block scores
    (plus one float64 copy of a block of each side) whatever the corpus size.
    """
    nq, nd = len(queries), len(docs)
    k = min(k, nd)
    idx_out = np.zeros((nq, k), np.int64)
    val_out = np.zeros((nq, k), np.float64)
    for q0 in range(0, nq, query_block):
        q = unit_rows(queries[q0:q0 + query_block])
        best_i = np.zeros((len(q), 0), np.int64)
        best_v = np.zeros((len(q), 0), np.float64)
        for d0 in range(0, nd, doc_block):
            s = q @ unit_rows(docs[d0:d0 + doc_block]).T
            ids = np.broadcast_to(np.arange(d0, d0 + s.shape[1]), s.shape)
            part = _select(s, doc_rank[ids], k)
            best_i = np.concatenate([best_i, np.take_along_axis(ids, part, axis=1)], axis=1)
            best_v = np.concatenate([best_v, np.take_along_axis(s, part, axis=1)], axis=1)
            if best_i.shape[1] > k:
                keep = _select(best_v, doc_rank[best_i], k)
                best_i = np.take_along_axis(best_i, keep, axis=1)
                best_v = np.take_along_axis(best_v, keep, axis=1)
        for r in range(len(q)):  # final order: score descending, then id descending
            o = np.lexsort((-doc_rank[best_i[r]], -best_v[r]))
            idx_out[q0 + r] = best_i[r][o]
            val_out[q0 + r] = best_v[r][o]
    return idx_out, val_out
