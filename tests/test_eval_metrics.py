"""Metric functions against the reference implementations (pytrec_eval, scipy, scikit-learn, mteb)."""

import numpy as np
import pytest
import pytrec_eval
import scipy.stats
from sklearn.metrics import average_precision_score

from qzhou_jax.eval import metrics as M


def _run_with_ties(rng, n_queries=40, n_docs=60):
    doc_ids = [f"doc{j}" for j in rng.permutation(n_docs)] + ["x9", "x10"]  # mixed-length ids
    qrels, run, rankings = {}, {}, {}
    rank = M.id_order(doc_ids)
    for i in range(n_queries):
        qid = f"q{i}"
        rel = {doc_ids[j]: int(rng.integers(1, 3)) for j in rng.choice(len(doc_ids), rng.integers(1, 5), replace=False)}
        if i % 7 == 0:
            rel[doc_ids[int(rng.integers(len(doc_ids)))]] = 0  # judged non-relevant
        qrels[qid] = rel
        scores = np.round(rng.random(len(doc_ids)), 1).astype(np.float32)  # many ties
        keep = rng.permutation(len(doc_ids))[: int(rng.integers(5, len(doc_ids)))]  # truncated runs
        order = keep[np.lexsort((-rank[keep], -scores[keep]))]
        run[qid] = {doc_ids[j]: float(scores[j]) for j in keep}
        rankings[qid] = [doc_ids[j] for j in order]
    run["q_unjudged"] = {"doc1": 1.0}
    rankings["q_unjudged"] = ["doc1"]
    return qrels, run, rankings


def test_retrieval_metrics_equal_pytrec_eval():
    rng = np.random.default_rng(0)
    qrels, run, rankings = _run_with_ties(rng)
    ks = [1, 3, 5, 10, 20, 100]
    measures = {f"{m}.{','.join(map(str, ks))}" for m in ("ndcg_cut", "map_cut", "recall", "P", "success")}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    got = M.retrieval_scores(rankings, qrels, ks, per_query=True)
    qids = [q for q in rankings if q in qrels]
    assert sorted(ref) == sorted(qids)
    names = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P", "hit_rate": "success"}
    for ours, theirs in names.items():
        for k in ks:
            expect = [ref[q][f"{theirs}_{k}"] for q in qids]
            np.testing.assert_allclose(got[f"{ours}_at_{k}"], expect, atol=1e-12, err_msg=f"{ours}@{k}")
    mean = M.retrieval_scores(rankings, qrels, ks)
    assert abs(mean["ndcg_at_10"] - np.mean([ref[q]["ndcg_cut_10"] for q in qids])) < 1e-12


def test_mrr_equals_mteb():
    from mteb._evaluators.retrieval_metrics import mrr

    qrels, run, rankings = _run_with_ties(np.random.default_rng(1))
    run.pop("q_unjudged"), rankings.pop("q_unjudged")
    ref = mrr(qrels, run, [1, 5, 10])
    got = M.retrieval_scores(rankings, qrels, [1, 5, 10], per_query=True)
    for k in (1, 5, 10):
        np.testing.assert_allclose(got[f"mrr_at_{k}"], ref[f"MRR@{k}"], atol=1e-12)


def test_top_k_matches_a_full_sort_with_id_tie_break():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    d = rng.standard_normal((50, 8)).astype(np.float32)
    d[10] = d[3]  # identical documents: equal scores, broken by descending id
    ids = [f"d{j}" for j in range(50)]
    rank = M.id_order(ids)
    idx, val = M.top_k(q, d, 12, rank, query_block=3, doc_block=16)
    full = M.unit_rows(q) @ M.unit_rows(d).T
    for r in range(len(q)):
        order = np.lexsort((-rank, -full[r]))[:12]
        np.testing.assert_array_equal(idx[r], order)
        np.testing.assert_allclose(val[r], full[r][order], rtol=1e-12)
    assert list(M.id_order(["b", "a", "ab", "Z"])) == [3, 1, 2, 0]
    # many identical documents straddling the cut: the highest ids make it, whatever the blocking
    d = np.repeat(rng.standard_normal((1, 8)), 40, axis=0).astype(np.float32)
    for doc_block in (7, 16, 64):
        idx, _ = M.top_k(q[:2], d, 5, M.id_order(ids[:40]), doc_block=doc_block)
        assert [[ids[j] for j in row] for row in idx] == [["d9", "d8", "d7", "d6", "d5"]] * 2


def test_correlations_equal_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = np.round(rng.random(200) * 5, 1)
    y = x + rng.standard_normal(200)
    assert abs(M.pearson(x, y) - scipy.stats.pearsonr(x, y)[0]) < 1e-12
    assert abs(M.spearman(x, y) - scipy.stats.spearmanr(x, y)[0]) < 1e-12
    np.testing.assert_allclose(M.rankdata(x), scipy.stats.rankdata(x))
    assert np.isnan(M.pearson(np.ones(5), np.arange(5.0)))


def test_average_precision_equals_sklearn_with_ties():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 2)
    assert abs(M.average_precision(labels, scores) - average_precision_score(labels, scores)) < 1e-12
    assert abs(M.average_precision(labels, -scores) - average_precision_score(labels, -scores)) < 1e-12


def test_threshold_search_equals_mteb():
    from mteb.mocks import MockPairClassificationTask

    task = MockPairClassificationTask()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.random(150) + 0.4 * labels, 2)
    for high in (True, False):
        s = scores if high else -scores
        ref_acc = task._find_best_acc_and_threshold(list(s), labels, high)
        ref_f1 = task._find_best_f1_and_threshold(list(s), labels, high)
        assert M.best_accuracy(s, labels, high) == pytest.approx(ref_acc, abs=1e-12)
        assert M.best_f1(s, labels, high) == pytest.approx(ref_f1, abs=1e-12)
    emb1, emb2 = rng.standard_normal((150, 8)), rng.standard_normal((150, 8))
    cos = M.cosine_rows(emb1, emb2).tolist()
    dist = {"cosine_scores": cos, "similarity_scores": cos}
    p = M.pair_scores(emb1, emb2)
    dist.update(euclidean_distances=p["euclidean"].tolist(), manhattan_distances=p["manhattan"].tolist(),
                dot_scores=p["dot"].tolist())
    ref = task._compute_metrics(dist, labels.tolist())
    got = M.pair_classification_scores(emb1, emb2, labels)
    assert set(ref) == set(got)
    for key in ref:
        assert abs(ref[key] - got[key]) < 1e-12, key
