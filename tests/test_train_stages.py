"""Stage 1 (retrieval) then stage 2 (all tasks) of the tiny model on real public data.

Uses ../shared/data (skipped when absent): SNLI triplets and the Chinese hard-negative set
for retrieval, STS-B train (CoSENT) and Banking77 train (class-masked InfoNCE) in stage 2;
STS-B dev Spearman must improve over the untrained model.
"""

from __future__ import annotations

import os

import yaml

from qzhou_jax.train.config import load_run_config
from qzhou_jax.train.loop import train

STS_INSTR = "Retrieve semantically similar text"


def test_stage1_then_stage2_improves_stsb(shared_data, tmp_path):
    d = str(shared_data)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{
        "name": "STSBenchmark-dev", "type": "sts", "path": f"{d}/sts/stsb_en/dev.jsonl",
        "fields": {"text1": "sentence1", "text2": "sentence2", "score": "score"}, "instruction": STS_INSTR}]}))
    common = {"model": {"preset": "tiny", "compute_dtype": "float32"},
              "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
              "log": {"every": 10, "progress": False, "tensorboard": False},
              "eval": {"tasks": str(tasks), "batch_size": 128, "max_length": 64},
              "checkpoint": {"every": 1000}, "export_hf": False}
    retrieval = [
        {"name": "snli", "task": "retrieval", "path": f"{d}/training/snli/triplets.jsonl",
         "fields": {"query": "anchor", "pos": "positive", "neg": "negative"}, "instruction": STS_INSTR},
        {"name": "zh-hard-negatives", "task": "retrieval",
         "path": f"{d}/training/text2vec_bge_finetune_zh/train.jsonl", "instruction": STS_INSTR},
    ]
    data = {"tokenizer": "{assets}/tokenizer", "batch_size": 32, "pair_batch_size": 64, "hard_negatives": 1,
            "query_max_length": 48, "passage_max_length": 48}
    stage1 = {**common, "out_dir": str(tmp_path / "stage1"),
              "train": {"lr": 5e-4, "warmup_steps": 5, "total_steps": 30, "seed": 0},
              "data": {**data, "datasets": retrieval}}
    r1 = train(load_run_config(data=stage1))
    assert r1.status == "completed"
    untrained = r1.evals["before"]["STSBenchmark-dev"]["main_score"]

    stage2 = {**common, "out_dir": str(tmp_path / "stage2"), "init_from": str(tmp_path / "stage1" / "checkpoints"),
              "model": {"compute_dtype": "float32"},
              "train": {"lr": 5e-4, "warmup_steps": 5, "total_steps": 40, "seed": 1},
              "data": {**data, "eta": 0.4, "datasets": retrieval + [
                  {"name": "stsb", "task": "sts", "path": f"{d}/sts/stsb_en/train.jsonl",
                   "fields": {"text1": "sentence1", "text2": "sentence2"}, "instruction": STS_INSTR},
                  {"name": "banking77", "task": "classification", "path": f"{d}/classification/banking77/train.jsonl",
                   "instruction": "Given a online banking query, find the corresponding intents"}]}}
    cfg2 = load_run_config(data=stage2)
    r2 = train(cfg2)
    assert r2.status == "completed"
    seen = {h["dataset"] for h in r2.history}
    assert {"stsb", "banking77"} & seen, seen
    stage1_score = r2.evals["before"]["STSBenchmark-dev"]["main_score"]
    final = r2.evals["after"]["STSBenchmark-dev"]["main_score"]
    print(f"STS-B dev Spearman: untrained {untrained:.4f}, after stage 1 {stage1_score:.4f}, after stage 2 {final:.4f}")
    assert final > untrained + 0.02
    assert os.path.isdir(cfg2.checkpoint_dir)
