"""Every evaluator against mteb's own task classes on the same embeddings, and the mteb wrapper.

The same data is written to files for qzhou-jax and handed to mteb's task classes as
in-memory datasets (no download); one deterministic fake encoder (embeddings depend on the
text and on the instruction it gets) serves both sides, mteb's side through
`QZhouMtebModel`, so the instruction rule is exercised too.
"""

import hashlib
import json

import mteb
import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.mocks import (LegacyMockClusteringFastTask, MockClassificationTask, MockClusteringTask,
                        MockPairClassificationTask, MockRerankingTask, MockRetrievalTask, MockSTSTask,
                        MockSummarizationTask)
from mteb.types import PromptType

from qzhou_jax.eval import metrics as M
from qzhou_jax.eval.mteb_model import QZhouMtebModel
from qzhou_jax.eval.run import evaluate
from qzhou_jax.eval.tasks import load_task_specs
from qzhou_jax.tokenizer import format_prompt

DIM = 16
K = 5  # latent topics


class FakeEncoder:
    """Embeddings from a latent topic vector per text (where known) plus noise seeded by the
    exact prompt string, so a different instruction gives a different embedding."""

    def __init__(self, topic_of, offset=0.0, float32=False):
        self.topic_of = topic_of
        self.centers = np.random.default_rng(0).standard_normal((K, DIM))
        self.calls = []
        # offset: a vector shared by every embedding (cosines near 1, where float32 rounding
        # ties scores); float32: return float32, as the real encoder does
        self.shared = offset * np.random.default_rng(2).standard_normal(DIM)
        self.float32 = float32

    def encode(self, texts, instruction=None, progress=False):
        self.calls.append((len(texts), instruction))
        out = np.zeros((len(texts), DIM))
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(format_prompt(t, instruction).encode()).digest()[:8], "little")
            noise = np.random.default_rng(seed).standard_normal(DIM)
            topic = self.topic_of.get(t)
            out[i] = self.shared + (noise if topic is None else 1.5 * self.centers[topic] + noise)
        out = out.astype(np.float32)
        return out if self.float32 else out.astype(np.float64)  # float32 values, exact in float64 on both sides


def _texts(rng, n, prefix):
    topics = rng.integers(0, K, n)
    return [f"{prefix} {i} on topic {k}" for i, k in enumerate(topics)], topics.tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data of every task type, as files and as mteb datasets."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("evaldata")
    topic_of = {}
    w = {"root": root}

    def jsonl(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    # STS and pair classification: pairs of texts; score / label from the topics
    a, ta = _texts(rng, 120, "sentence")
    b, tb = _texts(rng, 120, "other sentence")
    topic_of.update(zip(a, ta)), topic_of.update(zip(b, tb))
    a[5], b[7] = a[3], b[2]  # repeated sentences
    score = [float(np.clip((ta[i] == tb[i]) * 3 + rng.normal(1, 0.8), 0, 5)) for i in range(120)]
    labels = [int(ta[i] == tb[i]) for i in range(120)]
    w["sts"] = (a, b, score)
    jsonl("sts.jsonl", [{"sentence1": x, "sentence2": y, "score": s} for x, y, s in zip(a, b, score)])
    w["pairs"] = (a, b, labels)
    jsonl("pairs.jsonl", [{"text1": x, "text2": y, "label": lab} for x, y, lab in zip(a, b, labels)])
    # classification
    tr, ttr = _texts(rng, 150, "train text")
    te, tte = _texts(rng, 60, "test text")
    topic_of.update(zip(tr, ttr)), topic_of.update(zip(te, tte))
    w["cls"] = (tr, [f"c{k}" for k in ttr], te, [f"c{k}" for k in tte])
    jsonl("cls_train.jsonl", [{"text": t, "label": f"c{k}"} for t, k in zip(tr, ttr)])
    jsonl("cls_test.jsonl", [{"text": t, "label": f"c{k}"} for t, k in zip(te, tte)])
    # clustering: flat (bootstrap protocol) and cluster sets (legacy protocol)
    cl, tcl = _texts(rng, 90, "cluster text")
    topic_of.update(zip(cl, tcl))
    w["clu"] = (cl, tcl)
    jsonl("clustering.jsonl", [{"text": t, "label": k} for t, k in zip(cl, tcl)])
    sets = [(cl[i:i + 30], tcl[i:i + 30]) for i in range(0, 90, 30)]
    w["clu_sets"] = sets
    jsonl("clustering_sets.jsonl", [{"sentences": s, "labels": lab} for s, lab in sets])
    # retrieval, BEIR folder: documents and queries share topics; graded qrels; a duplicate document
    docs, tdocs = _texts(rng, 80, "document")
    topic_of.update(zip(docs, tdocs))
    doc_ids = [f"doc{j}" for j in range(80)]
    titles = [f"Title {j}" if j % 3 else "" for j in range(80)]
    for j, (title, text) in enumerate(zip(titles, docs)):
        topic_of[(title + " " + text).strip()] = tdocs[j]
    docs[11], titles[11] = docs[4], titles[4]  # identical documents: tied scores
    queries, tq = _texts(rng, 25, "question")
    topic_of.update(zip(queries, tq))
    qrels = {}
    for i, k in enumerate(tq):
        same = [j for j in range(80) if tdocs[j] == k]
        picked = rng.choice(same, size=min(len(same), int(rng.integers(1, 4))), replace=False)
        qrels[f"q{i}"] = {doc_ids[j]: int(rng.integers(1, 3)) for j in picked}
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n"
                                               for d, t, x in zip(doc_ids, titles, docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                for i, q in enumerate(queries)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, rel in qrels.items() for d, s in rel.items()))
    w["beir"] = (doc_ids, titles, docs, queries, qrels)
    # reranking records
    rr = []
    for i in range(20):
        k = int(rng.integers(0, K))
        q = f"rerank query {i} on topic {k}"
        topic_of[q] = k
        pos = [f"rerank pos {i}.{j}" for j in range(2)]
        neg = [f"rerank neg {i}.{j}" for j in range(5)]
        for p in pos:
            topic_of[p] = k
        for j, n in enumerate(neg):
            topic_of[n] = (k + 1 + j) % K if j else k
        rr.append({"query": q, "positive": pos, "negative": neg})
    rr.append({"query": "no negatives", "positive": ["x"], "negative": []})  # dropped, as in mteb
    rr.append({"query": "no positives", "positive": [], "negative": ["y"]})  # dropped, as in mteb
    w["rerank"] = rr
    jsonl("rerank.jsonl", rr)
    # summarization
    summ = []
    for i in range(12):
        human = [f"human summary {i}.{j}" for j in range(2)]
        machine = [f"machine summary {i}.{j}" for j in range(5)]
        rel = [float(x) for x in rng.integers(1, 6, 5)]
        if i == 3:
            rel = [2.0] * 5  # constant gold scores: skipped by both
        summ.append({"text": f"article {i}", "human_summaries": human, "machine_summaries": machine, "relevance": rel})
    w["summ"] = summ
    jsonl("summ.jsonl", summ)
    w["encoder"] = FakeEncoder(topic_of)
    return w


def _ours(world, entry):
    task = {"split": "test", **entry}
    path = world["root"] / "tasks.json"
    path.write_text(json.dumps([task]))
    spec = load_task_specs(str(path))[0]
    return evaluate([spec], world["encoder"])[spec.name]


def _theirs(task, world):
    model = QZhouMtebModel(world["encoder"], name="test/fake")
    return task.evaluate(model, split="test", encode_kwargs={"batch_size": 16})["default"], model


def _instruction(task, prompt_type=PromptType.query):
    """What the wrapper gives this mteb task's texts (the task file must say the same)."""
    return QZhouMtebModel(FakeEncoder({}), name="test/fake").instruction(task.metadata, prompt_type)


def _compare(ours, theirs, keys, tol=1e-6, main=True):
    split = ours["scores"]["test"][0]
    for key in keys:
        assert key in theirs, key
        assert abs(split[key] - float(theirs[key])) <= tol, (key, split[key], theirs[key])
    if main:
        assert abs(ours["main_score"] - float(theirs["main_score"])) <= tol


def test_sts_equals_mteb(world):
    a, b, score = world["sts"]

    class Task(MockSTSTask):
        min_score, max_score = 0, 5

        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "score": score})})
            self.data_loaded = True

    task = Task()
    theirs, model = _theirs(task, world)
    ours = _ours(world, {"name": "sts", "type": "sts", "path": "sts.jsonl", "instruction": _instruction(task, None)})
    assert model.instructions_used[("MockSTSTask", "text")] == ours["qzhou_jax"]["instructions"]["text1"]
    _compare(ours, theirs, ["cosine_spearman", "cosine_pearson", "euclidean_spearman", "manhattan_pearson",
                            "pearson", "spearman"])


def test_pair_classification_equals_mteb(world):
    a, b, labels = world["pairs"]

    class Task(MockPairClassificationTask):
        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "labels": labels})})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": "pairs", "type": "pair_classification", "path": "pairs.jsonl",
                         "instruction": _instruction(task, None)})
    keys = [k for k in theirs if k.startswith(("cosine_", "max_", "euclidean_", "manhattan_", "dot_"))]
    assert "max_ap" in keys
    _compare(ours, theirs, keys)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_pair_classification_float32_equals_mteb(world, offset):
    """float32 embeddings, as the real encoder returns: mteb scores them in float32
    (scikit-learn's paired distances, numpy's dot, torch for the model similarity). With a
    large shared offset the cosines sit within 1e-5 of 1, where float32 rounding ties pairs
    that float64 separates, and AP and the thresholds depend on those ties: the
    scikit-learn and numpy scores agree exactly, and so do the `similarity_*` ones, which
    qzhou-jax computes with torch's operations as mteb does (when torch is installed)."""
    a, b, labels = world["pairs"]
    encoder = FakeEncoder(world["encoder"].topic_of, offset=offset, float32=True)
    emb = encoder.encode(a + b)
    cos32 = M.cosine_rows(emb[:len(a)], emb[len(a):])
    cos64 = M.cosine_rows(emb[:len(a)].astype(np.float64), emb[len(a):].astype(np.float64))
    assert cos32.dtype == np.float32 and cos64.dtype == np.float64
    if offset:
        assert len(np.unique(cos32)) < len(np.unique(cos64)) == len(a)

    class Task(MockPairClassificationTask):
        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "labels": labels})})
            self.data_loaded = True

    task = Task()
    float32_world = dict(world, encoder=encoder)
    theirs, _ = _theirs(task, float32_world)
    ours = _ours(float32_world, {"name": f"pairs32_{offset:g}", "type": "pair_classification",
                                 "path": "pairs.jsonl", "instruction": _instruction(task, None)})
    keys = [k for k in theirs if k.startswith(("cosine_", "euclidean_", "manhattan_", "dot_", "similarity_", "max_"))]
    assert "cosine_ap" in keys and "max_ap" in keys and "similarity_ap" in keys
    split = ours["scores"]["test"][0]
    if offset:
        assert abs(split["cosine_ap"] - split["similarity_ap"]) < 0.05  # the same ranking up to rounding
    _compare(ours, theirs, keys)


def test_pair_classification_with_identical_pairs_equals_mteb(world):
    """Pairs whose two texts are the same (PAWS-X dev has 72 of 2,000, with both labels): their
    cosine is 1 up to float32 rounding, and the model similarity's rounding (mteb: torch's
    normalize and row sums) orders them inside that tie, which moves `similarity_ap`, the
    thresholds and a `max_*` taken from them. float32 embeddings, as the real encoder gives."""
    a, b, labels = world["pairs"]
    b = list(b)
    for i in range(0, 120, 4):  # a quarter of the pairs identical, labels of both kinds
        b[i] = a[i]
    labels = [1 if i % 8 == 0 else lab for i, lab in enumerate(labels)]
    labels = [0 if i % 8 == 4 else lab for i, lab in enumerate(labels)]
    path = world["root"] / "pairs_identical.jsonl"
    path.write_text("".join(json.dumps({"text1": x, "text2": y, "label": lab}) + "\n" for x, y, lab in zip(a, b, labels)))
    encoder = FakeEncoder(world["encoder"].topic_of, float32=True)

    class Task(MockPairClassificationTask):
        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": a, "sentence2": b, "labels": labels})})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, dict(world, encoder=encoder))
    ours = _ours(dict(world, encoder=encoder), {"name": "pairs_identical", "type": "pair_classification",
                                               "path": "pairs_identical.jsonl", "instruction": _instruction(task, None)})
    keys = [k for k in theirs if k.startswith(("similarity_", "cosine_", "max_", "euclidean_", "manhattan_", "dot_"))]
    assert "similarity_ap" in keys and "max_accuracy" in keys
    _compare(ours, theirs, keys, tol=1e-12)


def test_classification_equals_mteb_sampling(world):
    tr, ytr, te, yte = world["cls"]

    class Task(MockClassificationTask):
        samples_per_label, n_experiments = 6, 4

        def load_data(self, **kw):
            self.dataset = DatasetDict({"train": Dataset.from_dict({"text": tr, "label": ytr}),
                                        "test": Dataset.from_dict({"text": te, "label": yte})})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": "cls", "type": "classification", "train": "cls_train.jsonl", "path": "cls_test.jsonl",
                         "instruction": _instruction(task, None),
                         "options": {"samples_per_label": 6, "n_experiments": 4}})
    _compare(ours, theirs, ["accuracy", "f1", "f1_weighted", "precision", "recall"])
    per = ours["scores"]["test"][0]["scores_per_experiment"]
    assert [round(p["accuracy"], 9) for p in per] == [round(p["accuracy"], 9) for p in theirs["scores_per_experiment"]]
    assert ours["qzhou_jax"]["counts"]["num_train_encoded"] <= 4 * 6 * K


def test_clustering_bootstrap_equals_mteb(world):
    texts, labels = world["clu"]

    class Task(LegacyMockClusteringFastTask):  # mteb's current (bootstrapped) clustering protocol
        max_document_to_embed, max_fraction_of_documents_to_embed = None, 0.5
        n_clusters, max_documents_per_cluster, k_mean_batch_size = 4, 30, 16

        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentences": texts, "labels": labels})})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": "clu", "type": "clustering", "path": "clustering.jsonl",
                         "instruction": _instruction(task, None),
                         "options": {"max_fraction_of_documents_to_embed": 0.5, "n_clusters": 4,
                                     "max_documents_per_cluster": 30, "k_mean_batch_size": 16}})
    _compare(ours, theirs, ["v_measure", "v_measure_std", "ami"])
    assert ours["scores"]["test"][0]["v_measures"] == pytest.approx(theirs["v_measures"], abs=1e-9)


def test_clustering_legacy_equals_mteb(world):
    sets = world["clu_sets"]

    class Task(MockClusteringTask):
        def load_data(self, **kw):
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentences": [s for s, _ in sets],
                                                                    "labels": [lab for _, lab in sets]})})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": "clu-sets", "type": "clustering", "path": "clustering_sets.jsonl",
                         "instruction": _instruction(task, None), "options": {"protocol": "legacy"}})
    _compare(ours, theirs, ["v_measure"])


def _retrieval_split(queries, query_ids, corpus_rows, qrels, top_ranked=None):
    return RetrievalSplitData(queries=Dataset.from_dict({"id": query_ids, "text": queries}),
                              corpus=Dataset.from_list(corpus_rows), relevant_docs=qrels, top_ranked=top_ranked)


RETRIEVAL_KEYS = [f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in (1, 3, 10, 100)]


def test_retrieval_beir_equals_mteb(world):
    doc_ids, titles, docs, queries, qrels = world["beir"]
    rows = [{"id": d, "title": t, "text": x} for d, t, x in zip(doc_ids, titles, docs)]

    class Task(MockRetrievalTask):
        def load_data(self, **kw):
            self.dataset = {"default": {"test": _retrieval_split(queries, [f"q{i}" for i in range(len(queries))],
                                                                 rows, qrels)}}
            self.data_loaded = True

    task = Task()
    theirs, model = _theirs(task, world)
    ours = _ours(world, {"name": "beir", "type": "retrieval", "path": "beir", "instruction": _instruction(task)})
    assert ours["qzhou_jax"]["task"]["format"] == "beir"
    assert ours["qzhou_jax"]["instructions"]["document"] is None  # asymmetric: queries only
    assert model.instructions_used[("MockRetrievalTask", "document")] is None
    _compare(ours, theirs, RETRIEVAL_KEYS, tol=6e-6)  # mteb rounds retrieval means to 5 decimals


RERANK_KEYS = ["map_at_1000", "mrr_at_10", "ndcg_at_10"]
SUBQUERY_KEYS = RERANK_KEYS + [f"max_over_subqueries_{k}" for k in RERANK_KEYS]


def _rerank_both(world, rr, name, subqueries=False):
    """Reranking records `rr` scored by qzhou-jax (written to <name>.jsonl) and by mteb's reranking
    task on the same embeddings. A record's query may be a list of texts: mteb then gets one query
    `<record>_<j>` per text and, with `subqueries`, its max_over_subqueries scores."""
    from mteb._evaluators.retrieval_metrics import max_over_subqueries

    (world["root"] / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rr))
    queries, qids, rows, qrels, top = [], [], [], {}, {}
    for i, r in enumerate(rr):
        base = f"query{i}"
        ids = [f"apositive_{base}_{j:05d}" for j in range(len(r["positive"]))] + \
              [f"negative_{base}_{j:05d}" for j in range(len(r["negative"]))]
        rows += [{"id": d, "title": "", "text": t} for d, t in zip(ids, r["positive"] + r["negative"])]
        texts = r["query"] if isinstance(r["query"], list) else [r["query"]]
        for j, text in enumerate(texts):
            qid = f"{base}_{j}" if isinstance(r["query"], list) else base
            queries.append(text), qids.append(qid)
            qrels[qid] = {d: int(d.startswith("apositive")) for d in ids}
            top[qid] = ids

    class Task(MockRerankingTask):
        def load_data(self, **kw):
            self.dataset = {"default": {"test": _retrieval_split(queries, qids, rows, qrels, top)}}
            self.data_loaded = True

        def task_specific_scores(self, scores, qrels, results, hf_split, hf_subset):
            return max_over_subqueries(qrels, results, self.k_values) if subqueries else {}

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": name, "type": "reranking", "path": f"{name}.jsonl",
                         "instruction": _instruction(task), "symmetric": False,
                         **({"main_score": "max_over_subqueries_map_at_1000"} if subqueries else {})})
    return ours, theirs, qids


def _rerank_records(world):
    return [dict(r) for r in world["rerank"] if r["negative"] and r["positive"]]


def test_reranking_records_equal_mteb(world):
    ours, theirs, _ = _rerank_both(world, _rerank_records(world), "rerank_kept")
    assert ours["qzhou_jax"]["counts"]["num_queries"] == 20
    _compare(ours, theirs, RERANK_KEYS, tol=6e-6)
    # the file with the records mteb drops (no positive, or no negative) scores the same
    ours_all = _ours(world, {"name": "rerank", "type": "reranking", "path": "rerank.jsonl",
                             "instruction": ours["qzhou_jax"]["instructions"]["query"], "symmetric": False})
    assert ours_all["scores"] == ours["scores"]


def test_reranking_with_tied_candidates_equals_mteb(world):
    """A negative with a positive's text (tied cosines): the tie-break is mteb's."""
    rr = _rerank_records(world)
    for r in rr[:5]:
        r["negative"] = [r["positive"][0]] + r["negative"][1:]
    ours, theirs, _ = _rerank_both(world, rr, "rerank_ties")
    _compare(ours, theirs, RERANK_KEYS, tol=6e-6)


def test_reranking_with_query_lists_equals_mteb_max_over_subqueries(world):
    """MindSmallReranking's layout: a record's query is a list of texts (a browsing history).
    mteb scores each text as a query `<record>_<j>` and its main score, max_over_subqueries,
    ranks the record's candidates by their best score over the texts."""
    rr = _rerank_records(world)
    for i, r in enumerate(rr):  # 1 to 3 texts per record; the first is the record's own query
        r["query"] = [r["query"]] + [f"history {i}.{j}" for j in range(i % 3)]
    rr[4]["query"] = rr[4]["query"][0]  # a single text among lists
    ours, theirs, qids = _rerank_both(world, rr, "rerank_lists", subqueries=True)
    assert ours["qzhou_jax"]["counts"]["num_queries"] == len(qids) == 38
    _compare(ours, theirs, SUBQUERY_KEYS, tol=6e-6, main=False)
    split = ours["scores"]["test"][0]
    assert ours["main_score"] == split["max_over_subqueries_map_at_1000"] != split["map_at_1000"]
    # a task file's lists are refused where they have no meaning
    bad = world["root"] / "bad_rerank.jsonl"
    bad.write_text(json.dumps({"query": [], "positive": ["a"], "negative": ["b"]}) + "\n")
    with pytest.raises(Exception, match=r"bad_rerank.jsonl:1: field 'query' is an empty list"):
        _ours(world, {"name": "bad", "type": "reranking", "path": "bad_rerank.jsonl", "instruction": None})


def test_query_lists_with_tied_candidates_equal_mteb(world):
    """Ties inside the max-over-texts merge break as mteb breaks them."""
    rr = _rerank_records(world)
    for i, r in enumerate(rr):
        r["query"] = [r["query"]] + [f"history {i}.{j}" for j in range(i % 3)]
        if i < 8:
            r["negative"] = [r["positive"][0]] + r["negative"][1:]
    ours, theirs, _ = _rerank_both(world, rr, "rerank_lists_ties", subqueries=True)
    _compare(ours, theirs, SUBQUERY_KEYS, tol=6e-6, main=False)


def test_query_lists_whose_other_texts_change_the_ranking_equal_mteb(world):
    """History texts on a negative's topic: the max over a record's texts changes its ranking."""
    rr = _rerank_records(world)
    for i, r in enumerate(rr):
        k = int(r["query"].rsplit(" ", 1)[1])
        hist = [f"topical history {i}.{j}" for j in range(1 + i % 2)]
        for h in hist:  # on the topic of the record's negative 1: max over texts lifts that negative
            world["encoder"].topic_of[h] = (k + 2) % 5
        r["query"] = [r["query"]] + hist
    ours, theirs, _ = _rerank_both(world, rr, "rerank_lists_topical", subqueries=True)
    _compare(ours, theirs, SUBQUERY_KEYS, tol=6e-6, main=False)


def test_the_subquery_main_score_of_single_text_records_is_the_plain_one(world):
    ours = _ours(world, {"name": "rerank_single", "type": "reranking", "path": "rerank.jsonl",
                         "instruction": None, "symmetric": False,
                         "main_score": "max_over_subqueries_map_at_1000"})
    split = ours["scores"]["test"][0]
    assert ours["main_score"] == split["max_over_subqueries_map_at_1000"] == split["map_at_1000"]


def test_summarization_equals_mteb(world):
    summ = world["summ"]

    class Task(MockSummarizationTask):
        min_score, max_score = 0, 5

        def load_data(self, **kw):
            cols = {k: [s[k] for s in summ] for k in summ[0]}
            self.dataset = DatasetDict({"test": Dataset.from_dict(cols)})
            self.data_loaded = True

    task = Task()
    theirs, _ = _theirs(task, world)
    ours = _ours(world, {"name": "summ", "type": "summarization", "path": "summ.jsonl",
                         "instruction": _instruction(task, None)})
    assert ours["qzhou_jax"]["counts"]["num_skipped"] == 1
    _compare(ours, theirs, ["cosine_spearman", "cosine_pearson", "dot_spearman"])


def test_result_files_have_mteb_shape(world):
    ours = _ours(world, {"name": "sts", "type": "sts", "path": "sts.jsonl", "instruction": "Find similar"})
    tr = mteb.TaskResult.from_dict(ours)
    assert tr.task_name == "sts" and tr.scores["test"][0]["main_score"] == ours["main_score"]
    meta = ours["qzhou_jax"]
    assert meta["instructions"] == {"text1": "Find similar", "text2": "Find similar"}
    assert meta["prompt_template"] == "Instruct: {instruction}\nQuery: {text}"
    assert ours["dataset_revision"].startswith("sha256:")


def test_wrapper_passes_mteb_mock_tasks(world):
    """mteb's model check (`mteb.mock_run`) runs every mock task; here the text tasks of the
    task types qzhou-jax covers and a multilingual one, through the same `mteb.evaluate` path
    (the full grid, which also passes, takes about a minute on two cores)."""
    from mteb.mocks import MockMultilingualSTSTask

    model = QZhouMtebModel(world["encoder"], name="test/fake")
    assert model.mteb_model_meta.framework == ["JAX"]
    assert model.mteb_model_meta.similarity_fn_name.value == "cosine"
    tasks = [MockRetrievalTask(), MockRerankingTask(), MockSTSTask(), MockPairClassificationTask(),
             MockClassificationTask(), MockClusteringTask(), MockSummarizationTask(), MockMultilingualSTSTask()]
    results = mteb.evaluate(model, tasks, cache=None, raise_error=True, show_progress_bar=False)
    assert sorted(r.task_name for r in results.task_results) == sorted(t.metadata.name for t in tasks)
    for r in results.task_results:
        assert np.isfinite(r.get_score()), r.task_name
    assert ("MockRetrievalTask", "document") in model.instructions_used


def test_wrapper_instruction_rule(tmp_path):
    enc = FakeEncoder({})
    model = QZhouMtebModel(enc, name="test/fake")
    sci = mteb.get_task("SCIDOCS").metadata
    arg = mteb.get_task("ArguAna").metadata
    sts = mteb.get_task("STSBenchmark").metadata
    instr = "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper"
    assert model.instruction(sci, PromptType.query) == instr
    assert model.instruction(sci, PromptType.document) is None  # asymmetric retrieval: queries only
    assert model.instruction(arg, PromptType.document) == "Given a claim, find documents that refute the claim"
    assert model.instruction(sts, None) == "Retrieve semantically similar text"
    assert QZhouMtebModel(enc, use_instructions=False).instruction(sts, None) is None
    assert QZhouMtebModel(enc, instructions={"STSBenchmark": "custom"}).instruction(sts, None) == "custom"
    table = tmp_path / "task_to_instructions.json"  # the published tables' layout
    table.write_text(json.dumps({"STSBenchmark": "from a file", "SCIDOCS": None}))
    from_file = QZhouMtebModel(enc, instructions=str(table))
    assert from_file.instruction(sts, None) == "from a file" and from_file.instruction(sci, PromptType.query) is None


def test_wrapper_outside_the_tables_asks_mteb_for_the_query_side_only(recwarn):
    """A task outside QZhou's tables takes mteb's prompt: asymmetric documents get none (mteb is
    not asked, so it does not warn about a missing 'document' prompt); a symmetric task's
    documents get its query prompt (the same instruction on both sides)."""
    model = QZhouMtebModel(FakeEncoder({}), name="test/fake")
    base = mteb.get_task("SCIDOCS").metadata
    asym = base.model_copy(update={"name": "OutsideRetrieval", "prompt": {"query": "Find papers"}})
    sym = base.model_copy(update={"name": "OutsidePairs", "type": "PairClassification",
                                  "prompt": {"query": "Same meaning"}})
    assert model.instruction(asym, PromptType.query) == "Find papers"
    assert model.instruction(asym, PromptType.document) is None
    assert model.instruction(sym, PromptType.document) == "Same meaning"
    assert model.instruction(sym, None) == "Same meaning"  # pair tasks encode without a prompt type
    assert not [w for w in recwarn if "not found" in str(w.message)]

