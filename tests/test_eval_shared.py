"""`qzhou-jax eval` end to end on real data (../shared/data; skipped when absent).

STS-B dev and the SciFact training queries (full 5,183-document corpus), with two tiny random
Qwen2 models of different sizes and seeds (no trained model is involved: the point is that
the numbers equal the reference implementations on the same embeddings, whatever the model).
The reference side re-encodes the same texts with the same encoder settings and scores them
with scipy / scikit-learn (STS) and pytrec_eval / mteb's MRR (retrieval).
"""

import json
import os
import shutil

import numpy as np
import pytest
import pytrec_eval
import scipy.stats
from sklearn.metrics.pairwise import paired_cosine_distances

from hf_utils import save_hf, tiny_hf_model
from qzhou_jax import cli
from qzhou_jax.checkpoint import load_pretrained
from qzhou_jax.eval.encoder import Encoder, length_buckets
from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

MAX_LENGTH = 32
STS_INSTRUCTION = "Retrieve semantically similar text"  # STSBenchmark's entry in the MTEB(eng, v2) table
SCIFACT_INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"  # this test's own
MODELS = {"seed0-h32": dict(seed=0, hidden=32, layers=2, mlp=48),
          "seed1-h64": dict(seed=1, hidden=64, layers=2, mlp=96, heads=4, kv_heads=2)}


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_eval")
    tasks = root / "tasks.yaml"
    tasks.write_text(
        f"- name: STSBenchmark\n  path: {shared_data}/sts/stsb_en/dev.jsonl\n  split: dev\n"
        f"- name: SciFact-train\n  type: retrieval\n  path: {shared_data}/retrieval/scifact_beir\n  split: train\n"
        f"  instruction: {SCIFACT_INSTRUCTION}\n")
    out = {}
    for name, kw in MODELS.items():
        kw = dict(kw)
        model_dir = root / name
        save_hf(tiny_hf_model(seed=kw.pop("seed"), vocab=2048, **kw), model_dir)
        for f in os.listdir(DEMO_TOKENIZER):
            shutil.copy(f"{DEMO_TOKENIZER}/{f}", model_dir / f)
        result_file = root / f"{name}.json"
        rc = cli.main(["eval", "--model", str(model_dir), "--tasks", str(tasks), "--output", str(result_file),
                       "--max-length", str(MAX_LENGTH), "--dtype", "float32", "--devices", "1",
                       "--bucket-steps", "1", "--quiet"])
        assert rc == 0
        out[name] = (model_dir, json.loads(result_file.read_text()))
    return shared_data, out


class _MemoTokenizer(Tokenizer):
    """Token ids remembered across the two models (same tokenizer): SciFact's 8 MB corpus is
    tokenized once on the reference side."""

    memo: dict = {}

    def encode(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        self.memo.update(zip(missing, super().encode(missing) if missing else []))
        return [self.memo[t] for t in texts]


def _reference_encoder(model_dir):
    """The encoder the command above builds (one device, powers-of-two buckets, batch 32): the
    same text lists give the same batches, hence the same embeddings."""
    cfg, params, tok_path = load_pretrained(model_dir, compute_dtype="float32")
    tok = _MemoTokenizer(tok_path, max_length=MAX_LENGTH)
    return Encoder(params, cfg, tok, batch_size=32, buckets=length_buckets(MAX_LENGTH, 1))


@pytest.mark.parametrize("name", list(MODELS))
def test_stsb_dev_equals_scipy(run, name):
    data, models = run
    model_dir, results = models[name]
    rows = [json.loads(line) for line in open(f"{data}/sts/stsb_en/dev.jsonl", encoding="utf-8")]
    s1, s2 = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    gold = np.array([r["score"] for r in rows])
    unique = list(dict.fromkeys(s1 + s2))
    emb = _reference_encoder(model_dir).encode(unique, instruction=STS_INSTRUCTION)
    at = {t: i for i, t in enumerate(unique)}
    e1 = emb[[at[t] for t in s1]].astype(np.float64)
    e2 = emb[[at[t] for t in s2]].astype(np.float64)
    cos = 1 - paired_cosine_distances(e1, e2)
    got = results["STSBenchmark"]["scores"]["dev"][0]
    assert abs(got["cosine_spearman"] - scipy.stats.spearmanr(gold, cos)[0]) < 1e-6
    assert abs(got["cosine_pearson"] - scipy.stats.pearsonr(gold, cos)[0]) < 1e-6
    assert results["STSBenchmark"]["main_score"] == got["cosine_spearman"]
    assert results["STSBenchmark"]["qzhou_jax"]["counts"]["num_pairs"] == 1500


@pytest.mark.parametrize("name", list(MODELS))
def test_scifact_train_equals_pytrec_eval(run, name):
    from mteb._evaluators.retrieval_metrics import mrr

    data, models = run
    model_dir, results = models[name]
    folder = f"{data}/retrieval/scifact_beir"
    corpus = [json.loads(line) for line in open(f"{folder}/corpus.jsonl", encoding="utf-8")]
    queries = {(q := json.loads(line))["_id"]: q["text"] for line in open(f"{folder}/queries.jsonl", encoding="utf-8")}
    qrels: dict = {}
    for line in open(f"{folder}/qrels/train.tsv", encoding="utf-8").read().splitlines()[1:]:
        qid, did, score = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(score)
    qids = [q for q in queries if q in qrels]
    doc_ids = [str(d["_id"]) for d in corpus]
    docs = [(d["title"] + " " + d["text"]).strip() if d["title"] else d["text"] for d in corpus]
    enc = _reference_encoder(model_dir)
    q = enc.encode([queries[i] for i in qids], instruction=SCIFACT_INSTRUCTION).astype(np.float64)
    d = enc.encode(docs).astype(np.float64)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :1000]
    run_dict = {qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(qids)}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,10", "map_cut.10,100", "recall.10,100,1000",
                                                 "P.1,10"}).evaluate(run_dict)
    got = results["SciFact-train"]["scores"]["train"][0]
    for ours, theirs in [("ndcg_at_10", "ndcg_cut_10"), ("ndcg_at_1", "ndcg_cut_1"), ("map_at_10", "map_cut_10"),
                         ("map_at_100", "map_cut_100"), ("recall_at_100", "recall_100"),
                         ("recall_at_1000", "recall_1000"), ("precision_at_1", "P_1")]:
        expect = float(np.mean([ref[i][theirs] for i in qids]))
        assert abs(got[ours] - expect) < 1e-6, (ours, got[ours], expect)
    assert abs(got["mrr_at_10"] - float(np.mean(mrr(qrels, run_dict, [10])["MRR@10"]))) < 1e-6
    meta = results["SciFact-train"]["qzhou_jax"]
    assert meta["counts"]["num_queries"] == 809 and meta["counts"]["num_documents"] == 5183
    assert meta["instructions"] == {"query": SCIFACT_INSTRUCTION, "document": None}
    assert meta["encoding"]["max_length"] == MAX_LENGTH and meta["model"]["path"] == str(model_dir)
