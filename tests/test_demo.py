"""The README's main job: `qzhou-jax demo` trains, evaluates before and after, saves, exports."""

from __future__ import annotations

import json
import os

import pytest

from qzhou_jax.cli import main as cli_main
from qzhou_jax.train.cli import DEMO_CONFIG
from qzhou_jax.train.config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_demo_is_the_demo_config():
    assert os.path.samefile(os.path.join(ROOT, "configs", "demo.yaml"), DEMO_CONFIG)
    cfg = load_run_config(DEMO_CONFIG)
    assert cfg.model_config.num_params() < 1_000_000 and cfg.model_config.compute_dtype == "float32"
    assert {d.task for d in cfg.data.datasets} == {"retrieval", "sts", "classification"}


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--steps", "6", "--set", "log.progress=false"]) == 0
    printed = capsys.readouterr().out
    for task, metric in (("demo-retrieval", "ndcg_at_10"), ("demo-sts", "cosine_spearman"),
                         ("demo-classification", "accuracy")):
        assert any(line.split()[:2] == [task, metric] for line in printed.splitlines()), printed
    assert os.path.isfile(out / "hf" / "config.json") and os.path.isfile(out / "hf" / "modules.json")
    assert os.path.isdir(out / "checkpoints" / "6")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("eval/demo-sts" in r for r in rows) and any("train/loss" in r for r in rows)
    # a second demo replaces its own previous output, but never a folder it did not write
    assert cli_main(["demo", "--out", str(out), "--steps", "2", "--set", "log.progress=false"]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli_main(["demo", "--out", str(other), "--steps", "2"]) == 2
    assert (other / "keep.txt").read_text() == "x"


def test_an_interrupted_demo_exits_75_and_resumes(tmp_path, capsys, monkeypatch):
    import signal

    import qzhou_jax.train.loop as loop

    real = loop.train

    def interrupted(cfg, resume=False, **kw):
        def hook(step, metrics):
            if step == 1:  # after the second step
                os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, resume=resume, hooks=[hook])

    monkeypatch.setattr(loop, "train", interrupted)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "8", "--set", "log.progress=false", "--set", "log.every=1",
            "--set", "eval.tasks=null", "--set", "export_hf=false"]
    assert cli_main(argv) == 75
    captured = capsys.readouterr()
    assert "held-out task" not in captured.out and "demo --resume" in captured.err
    (saved,) = [int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()]
    assert saved < 8
    monkeypatch.setattr(loop, "train", real)
    assert cli_main(argv + ["--resume"]) == 0
    assert os.path.isdir(out / "checkpoints" / "8")
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if "train/loss" in line] == list(range(1, 9))


def test_the_score_table_of_a_resumed_run_reads_the_scores_before_training(tmp_path):
    """A resumed run does not evaluate the untrained model again: its "before" column comes from
    metrics.jsonl, and a task without a score there shows "-", not nan."""
    import io

    from qzhou_jax.train.cli import _score_table
    from qzhou_jax.train.loop import RunResult

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/a": 0.25, "eval/c": "nan"}) + "\n"
                                            + json.dumps({"step": 5, "train/loss": 1.0, "eval/a": 0.5}) + "\n")
    task = {"qzhou_jax": {"task": {"main_score": "ndcg_at_10"}}}
    result = RunResult("completed", 9, [], {"after": {"a": {"main_score": 0.75, **task},
                                                      "b": {"main_score": 0.5, **task},
                                                      "c": {"main_score": 0.5, **task}}}, str(tmp_path), "")
    out = io.StringIO()
    _score_table(result, out)
    rows = [line.split() for line in out.getvalue().splitlines()[2:]]
    assert rows == [["a", "ndcg_at_10", "0.2500", "0.7500"], ["b", "ndcg_at_10", "-", "0.5000"],
                    ["c", "ndcg_at_10", "nan", "0.5000"]]


@pytest.mark.parametrize("name", ["stage1", "stage2"])
@pytest.mark.parametrize("size", ["0.5b", "1.5b", "7b"])
def test_stage_presets_load_with_the_paper_hyperparameters(name, size, monkeypatch):
    monkeypatch.setenv("QZHOU_DATA", "/data")
    monkeypatch.setenv("QZHOU_MODELS", "/models")
    cfg = load_run_config(os.path.join(ROOT, "configs", f"{name}-qwen2.5-{size}.yaml"))
    assert cfg.model_config.hidden_size == {"0.5b": 896, "1.5b": 1536, "7b": 3584}[size]
    assert cfg.model_config.attention == "bidirectional" and cfg.model_config.pooling == "mean"
    assert cfg.loss.temperature == 0.02 and cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 300
    assert cfg.data.batch_size == 256 and cfg.data.hard_negatives == 4
    assert (cfg.data.query_max_length, cfg.data.passage_max_length) == (256, 1536)
    # NLI is CoSENT data in stage 2 (recipe §5: stage 1 is retrieval only)
    assert not any("nli" in d.name or "nli" in d.path for d in cfg.data.datasets if d.task == "retrieval")
    if name == "stage1":
        assert (cfg.train.lr, cfg.train.total_steps) == (3e-5, 32000)
        assert {d.task for d in cfg.data.datasets} == {"retrieval"}
        from qzhou_jax.train.config import expand_path

        assert expand_path(cfg.init_from).startswith("/models/")
    else:
        assert (cfg.train.lr, cfg.train.total_steps, cfg.data.eta, cfg.data.pair_batch_size) == (2e-5, 8000, 0.72, 768)
        assert {d.task for d in cfg.data.datasets} == {"retrieval", "sts", "classification"}
        # STS scores and NLI labels are different scales: one CoSENT dataset each (a batch comes
        # from one dataset), and NLI is not in the retrieval share
        sts = [d for d in cfg.data.datasets if d.task == "sts"]
        assert len(sts) == 2 and len({d.path for d in sts}) == 2
        assert cfg.init_from == f"runs/stage1-qwen2.5-{size}/checkpoints"


@pytest.mark.parametrize("mesh, expect", [
    ("tpu-slice", ({"data": 1, "fsdp": -1, "tensor": 1}, "splash", 32)),
    ("tpu-v5e-tensor2", ({"data": 1, "fsdp": -1, "tensor": 2}, "splash", 16)),
    ("gpu-node", ({"data": 1, "fsdp": -1, "tensor": 1}, "cudnn", 32)),
    ("gpu-multinode", ({"data": -1, "fsdp": 8, "tensor": 1}, "cudnn", 32)),
])
def test_mesh_presets_compose_with_a_stage_preset(tmp_path, monkeypatch, mesh, expect):
    """configs/meshes/*.yaml go last in a `base:` list and change only how the run is laid out."""
    import dataclasses

    monkeypatch.setenv("QZHOU_DATA", "/data")
    monkeypatch.setenv("QZHOU_MODELS", "/models")
    configs = os.path.join(ROOT, "configs")
    run = tmp_path / "run.yaml"
    run.write_text(f"base: [{configs}/stage1-qwen2.5-7b.yaml, {configs}/meshes/{mesh}.yaml]\n")
    cfg, plain = load_run_config(str(run)), load_run_config(os.path.join(configs, "stage1-qwen2.5-7b.yaml"))
    assert (dataclasses.asdict(cfg.mesh), cfg.model_config.attention_impl, cfg.train.chunk_size) == expect
    assert cfg.data == plain.data and cfg.loss == plain.loss and cfg.model_config.hidden_size == 3584
