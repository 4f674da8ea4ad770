"""Training runs: resume after SIGTERM, mesh / worker changes, the sampler, bad input, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qzhou_jax.cli import main as cli_main
from qzhou_jax.config import ConfigError
from qzhou_jax.data.pipeline import HostRows, TrainData
from qzhou_jax.data.sampler import BatchPlan, DatasetEntry
from qzhou_jax.train.config import load_run_config
from qzhou_jax.train.loop import train

ASSETS = "{assets}/demo"


def run_dict(out, steps=8, **data_overrides):
    data = {"tokenizer": "{assets}/tokenizer", "batch_size": 8, "pair_batch_size": 8, "hard_negatives": 1,
            "query_max_length": 32, "passage_max_length": 32, "eta": 0.5,
            "datasets": [{"name": "ret", "task": "retrieval", "path": f"{ASSETS}/retrieval_train.jsonl"},
                         {"name": "sts", "task": "sts", "path": f"{ASSETS}/sts_train.jsonl",
                          "instruction": "Retrieve semantically similar text"}]}
    data.update(data_overrides)
    return {"out_dir": str(out), "model": {"preset": "tiny", "compute_dtype": "float32"},
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
            "train": {"lr": 1e-3, "warmup_steps": 2, "total_steps": steps, "seed": 3},
            "data": data, "checkpoint": {"every": 4, "keep": 2},
            "log": {"every": 1, "progress": False, "tensorboard": True}, "export_hf": False}


def losses(result):
    return {h["step"]: h["loss"] for h in result.history}


def sigterm_at(k):
    def hook(step, metrics):
        if step == k - 1:  # after the k-th step: the loop saves at step k and stops
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(load_run_config(data=run_dict(out)))


def _train_rows(out_dir):
    """metrics.jsonl's training rows without the rates (time-dependent)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/loss" in line]
    timing = ("wall_time", "train/tokens_per_s", "train/steps_per_s", "train/mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_a_preemption_inside_a_logging_window_logs_the_same_rows_after_resume(tmp_path):
    """log.every 3, checkpoints every 4: an uninterrupted run logs steps 3, 4 (the checkpoint
    closes the window), 6, 8, 9. Preempted after step 5, the run writes a partial row at 5;
    the resumed run replaces it with the window 5..6, as the uninterrupted run logged it."""
    raw = run_dict(tmp_path / "full", steps=9)
    raw["log"]["every"] = 3
    train(load_run_config(data=raw))
    expected = _train_rows(tmp_path / "full")
    assert [r["step"] for r in expected] == [3, 4, 6, 8, 9]
    raw["out_dir"] = str(tmp_path / "cut")
    cfg = load_run_config(data=raw)
    # hooks see a step when its metrics are fetched (at the step-4 checkpoint here): SIGTERM then,
    # and the loop stops after step 5
    assert train(cfg, hooks=[sigterm_at(4)]).status == "preempted"
    cut = _train_rows(tmp_path / "cut")
    assert [(r["step"], r.get("partial")) for r in cut] == [(3, None), (4, None), (5, True)]
    assert train(cfg, resume=True).status == "completed"
    got = _train_rows(tmp_path / "cut")
    assert [r["step"] for r in got] == [3, 4, 6, 8, 9]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert g[k] == e[k] or (isinstance(e[k], float) and abs(g[k] - e[k]) <= 1e-6 * abs(e[k])), (k, g, e)
    # TensorBoard shows what the log holds: the partial row at 5 is gone, every row once
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    want = {(k, r["step"]): v for r in rows for k, v in r.items() if k not in ("step", "wall_time")
            and isinstance(v, float)}
    got_tb = _tensorboard_scalars(tmp_path / "cut" / "tensorboard")
    assert got_tb.keys() == want.keys() and ("train/loss", 5) not in got_tb
    np.testing.assert_allclose([got_tb[k] for k in want], [want[k] for k in want], rtol=1e-6)


def test_sigterm_then_resume_gives_identical_losses(tmp_path, uninterrupted, caplog):
    cfg = load_run_config(data=run_dict(tmp_path))
    first = train(cfg, hooks=[sigterm_at(3)])
    assert first.status == "preempted" and first.step == 3
    assert 3 in os.listdir(cfg.checkpoint_dir) or "3" in os.listdir(cfg.checkpoint_dir)
    with caplog.at_level("WARNING"):
        second = train(cfg, resume=True)
    assert "differs from the last start" not in caplog.text
    assert second.status == "completed" and second.step == 8
    full = losses(uninterrupted)
    got = {**losses(first), **losses(second)}
    assert sorted(got) == list(range(8))
    tasks = {h["step"]: h["dataset"] for h in uninterrupted.history}
    assert tasks == {h["step"]: h["dataset"] for h in first.history + second.history}
    assert len(set(tasks.values())) == 2  # the mixture really alternates datasets
    for s in range(8):
        assert got[s] == full[s], f"step {s}: {got[s]} != {full[s]}"
    # metrics.jsonl reads as one run: every step once
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/loss" in line]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # each row carries its task's own metrics under the task's name
    for r in rows:
        task = r["train/task"]
        assert f"train/{task}/{'pair_accuracy' if task == 'sts' else 'accuracy'}" in r, r
        assert (f"train/{task}/duplicates" in r) == (task == "retrieval"), r
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(cfg.output_dir, "tensorboard")))


def test_a_log_line_averages_the_steps_since_the_last_one_per_task():
    from qzhou_jax.train.loop import _window_means

    steps = [{"step": 0, "task": "retrieval", "dataset": "a", "loss": 2.0, "grad_norm": 1.0, "lr": 1e-4,
              "accuracy": 0.5, "duplicates": 1.0},
             {"step": 1, "task": "sts", "dataset": "b", "loss": 8.0, "grad_norm": 3.0, "lr": 2e-4, "pair_accuracy": 0.9},
             {"step": 2, "task": "retrieval", "dataset": "a", "loss": 4.0, "grad_norm": 2.0, "lr": 3e-4,
              "accuracy": 1.0, "duplicates": 0.0}]
    assert _window_means(steps) == {
        "loss": 14 / 3, "grad_norm": 2.0, "lr": 3e-4,
        "retrieval/loss": 3.0, "retrieval/grad_norm": 1.5, "retrieval/accuracy": 0.75, "retrieval/duplicates": 0.5,
        "sts/loss": 8.0, "sts/grad_norm": 3.0, "sts/pair_accuracy": 0.9}


def test_sigterm_outside_the_steps_ends_preempted_and_resumes(tmp_path, monkeypatch):
    """SIGTERM during the evaluation before training stops it after the current task (no
    checkpoint: nothing new to save); SIGTERM in the last step writes the final checkpoint
    and leaves the final evaluation and export to the rerun. Both exit as preempted (75),
    which the launchers requeue, instead of being killed (143)."""
    from qzhou_jax.eval import run as eval_run

    real, calls = eval_run.evaluate_task, []

    def sigterm_in_first_task(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(eval_run, "evaluate_task", sigterm_in_first_task)
    data = dict(run_dict(tmp_path, steps=4), eval={"tasks": "{assets}/demo/tasks.yaml", "max_length": 32})
    first = train(load_run_config(data=data))
    assert first.status == "preempted" and first.step == 0 and len(first.evals["before"]) == 1
    assert not [d for d in os.listdir(first.checkpoint_dir) if d.isdigit()]
    metrics = tmp_path / "metrics.jsonl"  # the cut-short evaluation is not logged as step 0's
    assert not metrics.exists() or "eval/" not in metrics.read_text()
    no_before = load_run_config(data=data, overrides=["eval.before=false"])
    second = train(no_before, resume=True, hooks=[sigterm_at(4)])
    assert second.status == "preempted" and second.step == 4 and "after" not in second.evals
    assert "4" in os.listdir(second.checkpoint_dir)
    calls.clear()  # SIGTERM in the final evaluation's first task: no partial "after" is reported
    cut = train(no_before, resume=True)
    assert cut.status == "preempted" and "after" not in cut.evals and len(calls) == 1
    third = train(no_before, resume=True)
    assert third.status == "completed" and third.step == 4 and third.history == []
    assert list(first.evals["before"]) == ["demo-retrieval"]
    assert list(third.evals["after"]) == ["demo-retrieval", "demo-sts", "demo-classification"]


def test_a_non_finite_step_is_caught_before_a_checkpoint_records_it(tmp_path, monkeypatch):
    """checkpoint.every not a multiple of log.every: the step's metrics are checked before
    the save, so no checkpoint holds a state whose step disagrees with its data position."""
    from qzhou_jax.train.step import Trainer

    real = Trainer.step_fn

    def nan_at_step_4(self, task):
        fn = real(self, task)

        def step(state, batch):
            at = int(state.step)  # the state is donated to the step
            new, metrics = fn(state, batch)
            if at == 4:
                metrics = dict(metrics, loss=metrics["loss"] * float("nan"), finite=metrics["finite"] * 0)
            return new, metrics
        return step

    monkeypatch.setattr(Trainer, "step_fn", nan_at_step_4)
    data = run_dict(tmp_path, steps=8)
    data.update(checkpoint={"every": 5, "keep": 2}, log=dict(data["log"], every=3))
    with pytest.raises(FloatingPointError, match="step 5"):  # the fifth step, as metrics and checkpoints count
        train(load_run_config(data=data))
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def _nonfinite_at(monkeypatch, steps, by_state=False):
    """The train step reports a non-finite loss at these data steps and, as its guard does,
    applies no update (the state's step does not advance). The steps are counted in this process,
    or with `by_state` read from the state (which a resumed run restores; log.every 1 keeps it
    equal to the data step)."""
    from qzhou_jax.train.step import Trainer

    real, seen = Trainer.step_fn, {"n": 0}

    def step_fn(self, task):
        fn = real(self, task)

        def step(state, batch):
            at = int(state.step) if by_state else seen["n"]
            seen["n"] += 1
            new, metrics = fn(state, batch)
            if at in steps:
                new = new._replace(step=new.step - 1)
                metrics = dict(metrics, loss=metrics["loss"] * float("nan"), finite=metrics["finite"] * 0)
            return new, metrics
        return step

    monkeypatch.setattr(Trainer, "step_fn", step_fn)


def test_skip_nonfinite_skips_isolated_steps_and_stops_on_a_run_of_them(tmp_path, monkeypatch, caplog):
    """train.skip_nonfinite: a bad batch is skipped with a warning, the checkpoint's state and data
    agree on the step (the run resumes), and more non-finite steps in a row than allowed stop it."""
    _nonfinite_at(monkeypatch, {3})
    data = run_dict(tmp_path / "a", steps=8)
    data.update(checkpoint={"every": 4, "keep": 3}, log=dict(data["log"], every=2))
    data["train"] = dict(data.get("train", {}), skip_nonfinite=1)
    with caplog.at_level("WARNING", logger="qzhou_jax.train.loop"):
        result = train(load_run_config(data=data))
    assert result.status == "completed" and result.step == 8
    assert "step 4 (" in caplog.text and "update skipped (1 in a row" in caplog.text
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[1]["step"] == 4 and rows[1]["train/skipped_steps"] == 1  # the row of steps 3-4 names the skip
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert rows[-1]["train/skipped_steps"] == 1
    data["train"]["total_steps"] = 10
    resumed = train(load_run_config(data=data), resume=True)  # state and data agree on step 8
    assert resumed.status == "completed" and resumed.step == 10
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[-1]["step"] == 10 and rows[-1]["train/skipped_steps"] == 1  # the count outlives the restart

    _nonfinite_at(monkeypatch, {3, 4})
    data = run_dict(tmp_path / "b", steps=8)
    data["train"] = dict(data.get("train", {}), skip_nonfinite=1)
    with pytest.raises(FloatingPointError, match="step 5"):
        train(load_run_config(data=data))
    with pytest.raises(ConfigError, match="train.skip_nonfinite: expected an integer >= 0"):
        load_run_config(data=dict(data, train=dict(data["train"], skip_nonfinite=-1)))


def test_a_run_of_nonfinite_steps_across_a_preemption_still_stops(tmp_path, monkeypatch):
    """skip_nonfinite 1, steps 4 and 5 non-finite, SIGTERM after step 4: the checkpoint keeps the
    count of skipped steps in a row, so the resumed run stops at step 5 as an uninterrupted one."""
    _nonfinite_at(monkeypatch, {3, 4}, by_state=True)
    data = run_dict(tmp_path, steps=8)
    data["train"] = dict(data["train"], skip_nonfinite=1)
    cfg = load_run_config(data=data)
    first = train(cfg, hooks=[sigterm_at(4)])
    assert first.status == "preempted" and first.step == 4
    with pytest.raises(FloatingPointError, match="step 5"):
        train(cfg, resume=True)


def test_an_evaluation_owed_at_a_preemption_runs_on_resume_and_is_logged_once(tmp_path):
    """eval.every 4 of 8 steps: SIGTERM during step 4 skips the step-4 evaluation; the resumed run
    evaluates step 4 first. Resuming the finished run again (a rerun after its export, say)
    evaluates the last step again without a second row. Scores equal an uninterrupted run's."""
    def rows_of(out):
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    def evals(out):
        return [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")}) for r in rows_of(out)
                if any(k.startswith("eval/") for k in r)]

    raw = run_dict(tmp_path / "full")
    raw["eval"] = {"tasks": "{assets}/demo/tasks.yaml", "every": 4, "before": False, "batch_size": 16}
    train(load_run_config(data=raw))
    expected = evals(tmp_path / "full")
    assert [s for s, _ in expected] == [4, 8]
    raw["out_dir"] = str(tmp_path / "cut")
    cfg = load_run_config(data=raw)
    assert train(cfg, hooks=[sigterm_at(4)]).status == "preempted"
    assert evals(tmp_path / "cut") == []
    again = train(cfg, resume=True)
    assert again.status == "completed" and "step_4" in again.evals
    assert evals(tmp_path / "cut") == expected
    assert train(cfg, resume=True).status == "completed"
    assert evals(tmp_path / "cut") == expected
    assert [r["step"] for r in rows_of(tmp_path / "cut") if "train/loss" in r] == list(range(1, 9))
    # a crash after the step-4 checkpoint, whose evaluation had been logged: not evaluated again
    raw["out_dir"] = str(tmp_path / "crash")
    cfg = load_run_config(data=raw)

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("node lost")
    with pytest.raises(RuntimeError, match="node lost"):
        train(cfg, hooks=[crash])
    again = train(cfg, resume=True)
    assert "step_4" not in again.evals and "after" in again.evals
    assert evals(tmp_path / "crash") == expected


def test_a_refused_resume_rewrites_nothing(tmp_path):
    """A resume refused after the restore (a plan shorter than the steps done, a changed
    optimizer) leaves the run's config record and metrics as they were, and names the key."""
    data = run_dict(tmp_path, steps=4)
    assert train(load_run_config(data=data)).status == "completed"
    ckpt = tmp_path / "checkpoints"
    record = (ckpt / "run_config.yaml").read_text()
    log = (tmp_path / "metrics.jsonl").read_text()
    short = dict(data, train=dict(data["train"], total_steps=3, warmup_steps=1))
    with pytest.raises(ValueError, match=r"train.total_steps: 3, but every checkpoint in .* is past it \(steps \[4\]\)"):
        train(load_run_config(data=short), resume=True)
    unclipped = dict(data, train=dict(data["train"], clip_norm=0))
    with pytest.raises(ValueError, match=r"differs from the one that wrote the checkpoints.* in train.clip_norm: "
                                         r"1.0 -> 0") as e:
        train(load_run_config(data=unclipped), resume=True)
    assert "damaged" not in str(e.value)
    assert (ckpt / "run_config.yaml").read_text() == record and not (ckpt / "run_config.previous.yaml").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == log
    assert sorted(d for d in os.listdir(ckpt) if d[0].isdigit()) == ["4"]  # nothing renamed "unreadable"


def test_print_config_round_trips_and_shows_the_resolved_model(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(tmp_path / "out")))
    assert cli_main(["train", "--config", str(cfg), "--set", "train.lr=2e-5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert load_run_config(str(again)) == load_run_config(str(cfg), ["train.lr=2e-5"])
    assert "#   num_hidden_layers: 2\n" in printed  # the tiny preset's, resolved
    assert "#   hidden_size: 64\n" in printed


def test_a_batch_that_does_not_divide_over_the_devices_names_the_dataset_key(tmp_path):
    data = run_dict(tmp_path, steps=2)
    data["mesh"] = {"data": 4, "fsdp": 2, "tensor": 1}
    data["data"]["datasets"][1]["batch_size"] = 6
    with pytest.raises(ValueError, match=r"data.datasets\[1\] \(sts\): global batch of 6 does not divide over 8 "
                                         r"data-parallel shards \(set its batch_size.*multiple of 8\)"):
        train(load_run_config(data=data))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_resume_without_a_checkpoint_keeps_an_earlier_log(tmp_path):
    """--resume with no checkpoint is a fresh start (what a requeued job's first start does):
    an earlier metrics.jsonl in out_dir is kept aside, as without --resume, not truncated."""
    tmp_path.mkdir(exist_ok=True)
    old = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 41))
    (tmp_path / "metrics.jsonl").write_text(old)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.old").write_text("x")
    assert train(load_run_config(data=run_dict(tmp_path, steps=2)), resume=True).status == "completed"
    kept = [n for n in os.listdir(tmp_path) if n.startswith("metrics.jsonl.")]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == old
    (events,) = [n for n in os.listdir(tmp_path) if n.startswith("tensorboard.")]  # its events too
    assert os.listdir(tmp_path / events) == ["events.out.tfevents.old"]
    assert "events.out.tfevents.old" not in os.listdir(tmp_path / "tensorboard")
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


def _tensorboard_scalars(folder, wall_time: bool = False) -> dict[tuple[str, int], float]:
    """(tag, step) -> value (or its event's wall time) from the event files under `folder`, read as
    TensorBoard reads them: a SessionLog.START at step s (a writer's purge_step) drops the steps
    from s on."""
    import glob
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[tuple[str, int], float] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, i = open(path, "rb").read(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, i)
            if i + 16 + n > len(data):  # a record cut short by a kill
                break
            e = Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                out = {k: v for k, v in out.items() if k[1] < e.step}
            for v in e.summary.value:
                out[(v.tag, e.step)] = e.wall_time if wall_time else v.simple_value
    return out


def test_tensorboard_keeps_every_step_logged_before_a_kill(tmp_path):
    """A process killed (SIGKILL: no close, no flush at exit) after its step-12 checkpoint, at step
    14: TensorBoard has every step once, as metrics.jsonl has. tensorboardX writes from a queue,
    so events logged before the kill may never have reached the file; the resume rebuilds them."""
    import subprocess
    import sys

    from qzhou_jax.train.metrics import MetricsLog

    child = ("import os, signal, sys\n"
             "from qzhou_jax.train.metrics import MetricsLog\n"
             "m = MetricsLog(sys.argv[1])\n"
             "for s in range(1, 15):\n"
             "    m.write(s, {'loss': 1.0 / s})\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # what tensorboardX still held in its queue never reached the file: here, every event
    for name in os.listdir(tmp_path / "tensorboard"):
        (tmp_path / "tensorboard" / name).write_bytes(b"")
    log = MetricsLog(str(tmp_path), resume_step=12)
    for s in range(13, 21):
        log.write(s, {"loss": 1.0 / s})
    log.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == list(range(1, 21))
    got = _tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(got) == [("train/loss", s) for s in range(1, 21)]
    np.testing.assert_allclose([got["train/loss", s] for s in range(1, 21)], [1.0 / s for s in range(1, 21)],
                               rtol=1e-6)
    # rebuilt events keep the time they were logged at (TensorBoard's relative and wall-time axes)
    logged = {r["step"]: r["wall_time"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    walls = _tensorboard_scalars(tmp_path / "tensorboard", wall_time=True)
    np.testing.assert_allclose([walls["train/loss", s] for s in range(1, 21)], [logged[s] for s in range(1, 21)],
                               atol=1e-3)


def test_resume_on_another_mesh_and_worker_count(tmp_path, uninterrupted, caplog):
    cfg = load_run_config(data=run_dict(tmp_path))
    first = train(cfg, hooks=[sigterm_at(4)])
    assert first.status == "preempted"
    moved = load_run_config(data=run_dict(tmp_path, workers=2),
                            overrides=["mesh.data=2", "mesh.fsdp=4"])
    with caplog.at_level("WARNING"):
        second = train(moved, resume=True)
    assert "the run config differs from the last start's" in caplog.text
    assert "data.workers: 0 -> 2; mesh.data: -1 -> 2; mesh.fsdp: 1 -> 4" in caplog.text
    assert os.path.isfile(os.path.join(moved.checkpoint_dir, "run_config.previous.yaml"))
    assert second.status == "completed"
    full = losses(uninterrupted)
    for s, v in losses(second).items():
        np.testing.assert_allclose(v, full[s], rtol=2e-5, err_msg=f"step {s}")
    assert [h["dataset"] for h in second.history] == [h["dataset"] for h in uninterrupted.history[4:]]


def test_a_resume_that_changes_what_the_model_computes_says_so(tmp_path, uninterrupted, caplog):
    """Pooling and attention may change on resume (the arrays fit), but the steps after compute
    another function than those before: a warning names the fields against qzhou_config.json."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, out)
    cfg = load_run_config(data=run_dict(out, steps=9), overrides=["model.pooling=last"])
    with caplog.at_level("WARNING"):
        assert train(cfg, resume=True).status == "completed"
    assert "the model computes differently from the steps trained so far" in caplog.text
    assert "model.pooling: 'mean' -> 'last'" in caplog.text


def test_a_failed_asynchronous_save_stops_the_run_at_the_next_log_line(tmp_path):
    """A checkpoint that cannot be written in the background (here a file-size limit: EFBIG, as a
    full disk gives ENOSPC) stops the run at the next logged step, not at the next save, with the
    error; steps after it are not trained for nothing. The limit lets every other file through."""
    import subprocess
    import sys

    import yaml

    raw = run_dict(tmp_path / "run", steps=12)
    raw["checkpoint"] = {"every": 4, "keep": 2}
    raw["compilation_cache_dir"] = None
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    child = ("import resource, signal, sys, time\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))\n"
             "from qzhou_jax.train.config import load_run_config\n"
             "from qzhou_jax.train.loop import train\n"
             "def hook(step, metrics):\n"
             "    if step == 4:\n"  # after step 5: the step-4 save has had time to fail
             "        time.sleep(3)\n"
             "try:\n"
             "    train(load_run_config(sys.argv[1]), hooks=[hook])\n"
             "except Exception as e:\n"
             "    print('stopped:', type(e).__name__, e)\n"
             "    sys.exit(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "run.yaml")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "stopped: ValueError" in proc.stdout and "checkpoints/4.orbax-checkpoint-tmp" in proc.stdout, proc.stdout
    assert "File too large" in proc.stdout, proc.stdout
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(steps) < 8, steps  # not trained on until the step-8 save


def test_a_full_disk_names_the_file(tmp_path):
    """A write() on a full disk raises "[Errno 28] No space left on device" without a file name;
    the metrics log and record files name theirs (/dev/full: a device that is always full)."""
    from qzhou_jax.data.records import RetrievalRecord, write_jsonl
    from qzhou_jax.train.metrics import MetricsLog

    log = MetricsLog(str(tmp_path), tensorboard=False)
    log.file.close()
    log.file = open("/dev/full", "a")  # the log's disk filled up
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.jsonl'"):
        log.write(1, {"loss": 1.0})
    with pytest.raises(OSError, match=r"No space left on device: '/dev/full'"):
        write_jsonl("/dev/full", [RetrievalRecord("q", ("p",))] * 10000)


def test_a_resume_removes_steps_beyond_keep(tmp_path, uninterrupted):
    """Orbax removes old steps after a save, so a run killed between its last save's commit and
    that removal keeps a step too many, and a resume at the last step saves nothing: the resume
    removes the oldest steps beyond checkpoint.keep (here lowered from 2 to 1: the same case)."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, out)
    assert sorted(n for n in os.listdir(out / "checkpoints") if n.isdigit()) == ["4", "8"]
    cfg = load_run_config(data=run_dict(out), overrides=["checkpoint.keep=1"])
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.step == 8 and losses(resumed) == {}
    assert sorted(n for n in os.listdir(out / "checkpoints") if n.isdigit()) == ["8"]


def test_a_save_killed_off_schedule_leaves_no_temporary_folder(tmp_path, uninterrupted):
    """A SIGKILL inside a preemption's save (SIGTERM, then the grace period ends while the step is
    written) leaves `<step>.orbax-checkpoint-tmp`; Orbax reuses that name only when the same step is
    saved again, which a preemption's off-schedule step never is, so it stayed, up to a whole
    checkpoint of arrays per event. The next start removes it."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, out)
    leftover = out / "checkpoints" / "7.orbax-checkpoint-tmp"
    (leftover / "state.orbax-checkpoint-tmp" / "d").mkdir(parents=True)
    (leftover / "state.orbax-checkpoint-tmp" / "d" / "0123abcd").write_bytes(b"\0" * 4096)
    resumed = train(load_run_config(data=run_dict(out)), resume=True)
    assert resumed.status == "completed" and resumed.step == 8
    assert not leftover.exists()
    assert sorted(n for n in os.listdir(out / "checkpoints") if "tmp" in n or n.isdigit()) == ["4", "8"]


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two `train`s on one out_dir (a requeued job while the old one still saves, a --resume typed in
    another terminal) both ran to the end, writing checkpoints, the metrics log (the second set the
    first's aside or truncated it under it) and the export into one folder. The second is refused
    before it writes anything, naming the first; once that one has ended (even by SIGKILL: the lock
    goes with its process) the run starts."""
    import subprocess
    import sys

    import yaml

    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_dict(out, steps=2)))
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242 on elsewhere'); f.flush(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".qzhou-run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in ([], ["--resume"]):
            assert cli_main(["train", "--config", str(tmp_path / "run.yaml"), *resume]) == 2
            err = capsys.readouterr().err
            assert f"out_dir {out}: another qzhou-jax run is using it (pid 4242 on elsewhere" in err, err
            assert os.listdir(out) == [".qzhou-run.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    assert sorted(n for n in os.listdir(out / "checkpoints") if n.isdigit()) == ["2"]


def test_resume_with_a_bfloat16_first_moment(tmp_path, uninterrupted, caplog):
    """`train.mu_dtype: bfloat16` restores a float32-moment checkpoint (the moment is cast), keeps
    the second moment float32, and trains on close to the float32 run."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, out)
    shutil.rmtree(out / "checkpoints" / "8")
    cfg = load_run_config(data=run_dict(out), overrides=["train.mu_dtype=bfloat16"])
    with caplog.at_level("WARNING"):
        resumed = train(cfg, resume=True)
    assert "train.mu_dtype: 'float32' -> 'bfloat16'" in caplog.text
    assert resumed.status == "completed" and sorted(losses(resumed)) == [4, 5, 6, 7]
    meta = ocp.StandardCheckpointer().metadata(os.path.join(cfg.checkpoint_dir, "8", "state"))
    meta = getattr(meta, "item_metadata", meta)
    kinds = {jax.tree_util.keystr(p): str(m.dtype) for p, m in jax.tree_util.tree_leaves_with_path(meta)
             if len(getattr(m, "shape", ())) >= 2}
    mu = {k for k, v in kinds.items() if ".mu" in k or "'mu'" in k}
    nu = {k for k, v in kinds.items() if ".nu" in k or "'nu'" in k}
    assert mu and {kinds[k] for k in mu} == {"bfloat16"}, kinds
    assert nu and {kinds[k] for k in nu} == {"float32"}, kinds
    full = losses(uninterrupted)
    for s, v in losses(resumed).items():
        np.testing.assert_allclose(v, full[s], rtol=2e-3, err_msg=f"step {s}")
    with pytest.raises(ConfigError, match=r"train.mu_dtype \(from --set train.mu_dtype=float16\): expected one of"):
        load_run_config(data=run_dict(out), overrides=["train.mu_dtype=float16"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax, after the failed restore
def test_resume_falls_back_from_an_unreadable_checkpoint(tmp_path, uninterrupted, caplog):
    """A newest step folder damaged after its commit (a lost file on a network mount): the resume
    takes the previous step, renames the damaged folder out of the way and reproduces the run. A
    config that fails every step (another model shape) raises, naming the step, and renames nothing."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.out_dir, out)
    ckpt = out / "checkpoints"
    assert {"4", "8"} <= set(os.listdir(ckpt))
    other_model = load_run_config(data=run_dict(out), overrides=["model.num_hidden_layers=3"])
    with pytest.raises(ValueError, match=r"checkpoints/8: checkpoint 8 holds parameters of other shapes "
                                         r"\(params\['layers'\]\['down_kernel'\]: \(2, .*differs from the one "
                                         r"that wrote the checkpoints .* in model.num_hidden_layers: 2 -> 3"):
        train(other_model, resume=True)  # told from the metadata: no array is read
    assert {"4", "8"} <= set(os.listdir(ckpt)) and "8.unreadable" not in os.listdir(ckpt)
    (ckpt / "8" / "data" / "metadata").unlink()
    with caplog.at_level("WARNING"):
        resumed = train(load_run_config(data=run_dict(out)), resume=True)
    assert "checkpoints/8: unreadable (FileNotFoundError" in caplog.text and "resuming from step 4" in caplog.text
    assert (ckpt / "8.unreadable").is_dir() and (ckpt / "8").is_dir()  # the rerun saved step 8 again
    assert resumed.status == "completed" and losses(resumed) == {s: v for s, v in losses(uninterrupted).items() if s >= 4}


def test_length_buckets_change_shapes_not_losses(tmp_path):
    """Padding each side to the shortest bucket that holds its longest row changes the shapes
    (and the compute), not the training: the losses equal fixed-length padding's."""
    from qzhou_jax.tokenizer import Tokenizer
    from qzhou_jax.train.loop import tokenizer_path

    def config(name, buckets):
        return load_run_config(data=run_dict(tmp_path / name, steps=4, query_max_length=64, passage_max_length=64,
                                             length_buckets=buckets))

    cfg, fixed = config("bucketed", [32, 48]), config("fixed", [])
    tok = Tokenizer(tokenizer_path(cfg), max_length=64)
    shapes = [{k: v.shape[1] for k, v in TrainData.from_config(c, tok, HostRows.of_process(0, 1))[s].batch.items() if k.endswith("_ids")}
              for c in (cfg, fixed) for s in range(4)]
    assert {x for sh in shapes[4:] for x in sh.values()} == {64}
    assert len({tuple(sh.values()) for sh in shapes[:4]}) > 1 and all(max(sh.values()) <= 64 for sh in shapes)
    bucketed, reference = train(cfg), train(fixed)
    for s, v in losses(bucketed).items():
        np.testing.assert_allclose(v, losses(reference)[s], rtol=1e-5, err_msg=f"step {s}")
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        padding = [json.loads(line)["train/padding"] for line in f if "train/loss" in line]
    with open(os.path.join(fixed.output_dir, "metrics.jsonl")) as f:
        padding_fixed = [json.loads(line)["train/padding"] for line in f if "train/loss" in line]
    assert len(padding) == 4 and all(0.0 <= p <= q for p, q in zip(padding, padding_fixed))
    assert sum(padding) < sum(padding_fixed)


def test_existing_checkpoints_need_resume(tmp_path, uninterrupted):
    cfg = load_run_config(data=run_dict(uninterrupted.out_dir))
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)


def test_resume_refuses_changed_data(tmp_path, uninterrupted):
    changed = load_run_config(data=run_dict(uninterrupted.out_dir), overrides=["data.seed=99"])
    with pytest.raises(ValueError, match="data.seed .default: train.seed. was 3 when the checkpoint was written, now 99"):
        train(changed, resume=True)


def test_run_config_changes_are_named_inside_lists():
    from qzhou_jax.checkpoint.manager import _changes

    before = {"data": {"datasets": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]}, "train": {"lr": 1}}
    after = {"data": {"datasets": [{"name": "a", "path": "x2"}, {"name": "b", "path": "y"}]}, "train": {"lr": 2}}
    assert _changes(before, after) == ["data.datasets[0].path: 'x' -> 'x2'", "train.lr: 1 -> 2"]
    assert _changes({"a": [1]}, {"a": [1, 2]}) == ["a: [1] -> [1, 2]"]


def test_a_changed_data_order_is_named_by_its_config_key():
    from qzhou_jax.data.pipeline import _order_change

    entries = [DatasetEntry("ret", "retrieval", 100, 8), DatasetEntry("sts", "sts", 500, 16)]
    before = BatchPlan(entries, 10, 0, 0.5, None).fingerprint()
    for changed, message in (
            ([DatasetEntry("ret", "retrieval", 100, 4), entries[1]],
             "data.datasets[0].batch_size (default: data.batch_size) (ret): 8 when the checkpoint was written, 4 now"),
            ([entries[0], DatasetEntry("sts", "sts", 500, 32)], "data.datasets[1].batch_size (default: data.pair_batch_size)"),
            ([entries[0], DatasetEntry("pairs", "sts", 500, 16)], "data.datasets[1].name: 'sts' when the checkpoint"),
            ([entries[0], DatasetEntry("sts", "sts", 600, 16)], "data.datasets[1] (sts): 500 records when the checkpoint "
                                                              "was written, 600 now"),
            (entries[:1], "data.datasets: 2 datasets when the checkpoint was written (ret, sts), 1 now")):
        assert message in _order_change(before, BatchPlan(changed, 10, 0, 0.5, None).fingerprint())
    assert "draw probabilities (data.alpha, data.eta" in _order_change(before, BatchPlan(entries, 10, 0, 0.3, None)
                                                                     .fingerprint())
    assert _order_change(before, BatchPlan(entries, 10, 0, 0.5, None).fingerprint()) is None


# ------------------------------------------------------------------ sampler
def test_sampler_frequencies_follow_n_alpha_and_eta():
    entries = [DatasetEntry("r1", "retrieval", 10_000, 4), DatasetEntry("r2", "retrieval", 2_500, 4),
               DatasetEntry("s", "sts", 40_000, 4), DatasetEntry("c", "classification", 900, 4)]
    for alpha, eta in ((0.5, None), (0.5, 0.72), (1.0, 0.72), (0.0, None)):
        plan = BatchPlan(entries, total_steps=10_000, seed=1, alpha=alpha, eta=eta)
        freq = np.bincount(plan.sequence, minlength=4) / 10_000
        w = np.array([e.size ** alpha for e in entries], float)
        if eta is None:
            want = w / w.sum()
        else:
            want = np.concatenate([eta * w[:2] / w[:2].sum(), (1 - eta) * w[2:] / w[2:].sum()])
        np.testing.assert_allclose(plan.probs, want, atol=1e-12)
        assert np.max(np.abs(freq - want)) < 0.02, (alpha, eta, freq, want)


def test_sampler_is_deterministic_prefix_stable_and_covers_each_epoch():
    entries = [DatasetEntry("a", "retrieval", 37, 5), DatasetEntry("b", "sts", 50, 6)]
    p1 = BatchPlan(entries, 200, seed=7)
    p2 = BatchPlan(entries, 400, seed=7)  # a longer run plans the same first 200 batches
    for s in range(200):
        d1, r1 = p1.batch(s)
        d2, r2 = p2.batch(s)
        assert d1 == d2 and np.array_equal(r1, r2)
        assert len(set(r1.tolist())) == len(r1)  # never a record twice in a batch
    # each pass reads every record once, also when batches straddle passes (37 = 7 * 5 + 2)
    rows = np.concatenate([p1.batch(s)[1] for s in range(200) if p1.dataset(s) == 0])
    passes = [rows[i:i + 37] for i in range(0, len(rows) - 36, 37)]
    assert len(passes) >= 3 and all(sorted(p.tolist()) == list(range(37)) for p in passes)
    with pytest.raises(ValueError, match=r"data.datasets\[0\] \(small\): a batch of 8 exceeds a quarter of its 30 "
                                         "records .* lower its batch_size or add records"):
        BatchPlan([DatasetEntry("small", "sts", 30, 8)], 10)


def test_the_plan_gives_the_same_batches_to_concurrent_threads():
    """grain builds batches in several threads (data.prefetch); they share the plan's cache of
    pass orders, which a new pass changes (inserted, older passes evicted): iterating over it while
    another thread inserted raised "dictionary changed size during iteration", or a KeyError."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    entries = [DatasetEntry(f"d{i}", "sts", 8, 2) for i in range(20)]  # a new pass every 4 batches of each
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for seed in range(12):
            want = BatchPlan(entries, 3000, seed=seed)
            shared = BatchPlan(entries, 3000, seed=seed)
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(shared.batch, range(3000)))
            for s, (d, rows) in enumerate(got):
                assert d == want.dataset(s) and np.array_equal(rows, want.batch(s)[1]), s
    finally:
        sys.setswitchinterval(interval)


def test_every_batch_is_from_one_dataset_and_host_slices_partition_it():
    cfg = load_run_config(data=run_dict("/tmp/unused", steps=12))
    from qzhou_jax.tokenizer import Tokenizer
    from qzhou_jax.train.loop import tokenizer_path

    tok = Tokenizer(tokenizer_path(cfg), max_length=32)
    whole = TrainData.from_config(cfg, tok, HostRows.of_process(0, 1))
    halves = [TrainData.from_config(cfg, tok, HostRows.of_process(i, 2)) for i in range(2)]
    for s in range(12):
        item = whole[s]
        assert item.task == {"ret": "retrieval", "sts": "sts"}[item.dataset]
        parts = [h[s].batch for h in halves]
        for key, value in item.batch.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def test_a_data_file_rewritten_with_as_many_records_is_noticed_on_resume(tmp_path, caplog):
    from qzhou_jax.tokenizer import Tokenizer
    from qzhou_jax.train.loop import tokenizer_path

    src = tmp_path / "ret.jsonl"
    shutil.copy(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "demo",
                             "retrieval_train.jsonl"), src)
    raw = run_dict(tmp_path, steps=4)
    raw["data"]["datasets"][0]["path"] = str(src)
    cfg = load_run_config(data=raw)
    tok = Tokenizer(tokenizer_path(cfg), max_length=32)
    saved = TrainData.from_config(cfg, tok, HostRows.of_process(0, 1)).state(3)
    with caplog.at_level("WARNING"):
        assert TrainData.from_config(cfg, tok, HostRows.of_process(0, 1)).check_state(saved) == 3
    assert "rewritten" not in caplog.text
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:-1] + [lines[-1].replace('{"query":"', '{"query":"edited ', 1)]) + "\n")
    with caplog.at_level("WARNING"):
        assert TrainData.from_config(cfg, tok, HostRows.of_process(0, 1)).check_state(saved) == 3
    assert "dataset ret: its file is" in caplog.text and "it was rewritten" in caplog.text


def test_a_checkpoint_of_older_beir_texts_is_noticed_on_resume(tmp_path, caplog):
    """BEIR documents were once title + newline + text; they are now joined as mteb joins them.
    A checkpoint written before records no text form: its resume says the texts changed."""
    from qzhou_jax.data.batches import BatchSpec
    from qzhou_jax.data.beir import BeirSource
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"text {i}"})
                                                 + "\n" for i in range(40)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"q {i}"}) + "\n"
                                                  for i in range(40)))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                + "".join(f"q{i}\td{i}\t1\n" for i in range(40)))
    tok = Tokenizer(DEMO_TOKENIZER, max_length=32)
    data = TrainData([BeirSource(folder)], [BatchSpec("retrieval", 4, 1, 32, 32)], tok, total_steps=10)
    saved = data.state(3)
    with caplog.at_level("WARNING"):
        assert data.check_state(saved) == 3
    assert "texts are built" not in caplog.text
    with caplog.at_level("WARNING"):
        assert data.check_state({k: v for k, v in saved.items() if k != "text_forms"}) == 3
    assert "dataset beir: its texts are built as BEIR document = (title + ' ' + text).strip() now, as BEIR " \
           "document = title + newline + text when the checkpoint was written" in caplog.text


def test_an_instruction_that_fills_the_length_is_refused_when_the_data_opens(tmp_path, caplog):
    from qzhou_jax.tokenizer import Tokenizer, format_prompt
    from qzhou_jax.train.loop import tokenizer_path

    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    cfg = load_run_config(data=run_dict(tmp_path, steps=4))
    tok = Tokenizer(tokenizer_path(cfg), max_length=512)
    prompt = len(tok.encode([format_prompt("", instruction)])[0])
    raw = run_dict(tmp_path, steps=4, query_max_length=prompt)
    raw["data"]["datasets"][0]["instruction"] = instruction
    with pytest.raises(ValueError, match=rf"data.datasets\[0\] \(ret\): its instruction takes {prompt} tokens of "
                                         rf"the {prompt} of query_max_length, so no query text would be left"):
        TrainData.from_config(load_run_config(data=raw), tok, HostRows.of_process(0, 1))
    # symmetric datasets carry it on both sides: the passage length counts too
    raw = run_dict(tmp_path, steps=4, query_max_length=prompt + 20, passage_max_length=prompt)
    raw["data"]["datasets"][1]["instruction"] = instruction
    raw["data"]["datasets"][1]["passage_max_length"] = prompt
    with pytest.raises(ValueError, match=r"data.datasets\[1\] \(sts\): .* no passage text would be left"):
        TrainData.from_config(load_run_config(data=raw), tok, HostRows.of_process(0, 1))
    raw = run_dict(tmp_path, steps=4, query_max_length=prompt + 2)
    raw["data"]["datasets"][0]["instruction"] = instruction
    with caplog.at_level("WARNING"):
        TrainData.from_config(load_run_config(data=raw), tok, HostRows.of_process(0, 1))
    assert f"its instruction takes {prompt} of the {prompt + 2} tokens of query_max_length: 2 are left" in caplog.text


def _decoded(tok, ids, mask):
    return [tok.hf.decode(row[m.astype(bool)]) for row, m in zip(ids, mask)]


def test_instructions_reach_the_sides_training_and_exports_give_them(tmp_path):
    """The first side of every task gets the instruction, the second side only when symmetric;
    the exports' query prompt is the instruction most retrieval queries trained with (the demo's
    records carry their own; the dataset has none); a record's own instruction must leave room."""
    from qzhou_jax.tokenizer import Tokenizer
    from qzhou_jax.train.loop import export_settings, tokenizer_path

    raw = run_dict(tmp_path, steps=4)
    raw["data"]["datasets"][1]["symmetric"] = False
    cfg = load_run_config(data=raw)
    tok = Tokenizer(tokenizer_path(cfg), max_length=512)
    data = TrainData.from_config(cfg, tok, HostRows.of_process(0, 1))
    sts = next(b for b in data.builders if b.spec.task == "sts")
    batch = sts.build(0, np.arange(4), 0)
    assert all(t.startswith("Instruct: Retrieve semantically similar text\nQuery: ")
               for t in _decoded(tok, batch["q_ids"], batch["q_mask"]))
    assert not any("Instruct:" in t for t in _decoded(tok, batch["p_ids"], batch["p_mask"]))
    record_instruction = "Given a question, retrieve passages that answer the question"
    assert data.query_instruction() == record_instruction
    assert export_settings(cfg, data).prompts["query"] == f"Instruct: {record_instruction}\nQuery: "

    # records without their own take the dataset's; the most common instruction wins
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], **({"instruction": "Own"} if i < 3 else {})} for i in range(40)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = run_dict(tmp_path, steps=4)
    raw["data"]["datasets"][0].update(path=str(path), instruction="Dataset's")
    assert TrainData.from_config(load_run_config(data=raw), tok, HostRows.of_process(0, 1)).query_instruction() == \
        "Dataset's"

    # weighted by the queries each dataset contributes (its draws), not by its record count
    from qzhou_jax.data.batches import BatchSpec
    from qzhou_jax.data.sources import ListSource

    def retrieval(n, instruction):
        return ListSource.from_dicts([{"query": f"{instruction} q{i}", "pos": [f"{instruction} p{i}"],
                                       "instruction": instruction} for i in range(n)], "retrieval")

    spec = BatchSpec("retrieval", 4, 1, 32, 32)
    few_draws = TrainData([retrieval(400, "A"), retrieval(100, "B")], [spec, spec], tok, total_steps=20,
                          weights=[0.01, 100.0])
    assert few_draws.query_instruction() == "B"
    # queries trained without any instruction: the exports' query prompt is empty, not a default
    raw = run_dict(tmp_path, steps=4, eta=None)
    raw["data"]["datasets"] = [{"name": "plain", "task": "retrieval", "path": str(path), "instruction": "  "}]
    path.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) + "\n" for i in range(40)))
    cfg = load_run_config(data=raw)
    assert cfg.data.datasets[0].instruction is None  # blank is none
    plain = TrainData.from_config(cfg, tok, HostRows.of_process(0, 1))
    assert plain.query_instruction() is None and export_settings(cfg, plain).prompts == {"query": "", "document": ""}

    # a record's own instruction that fills the query limit is refused like a dataset's
    long = "Given a web search query, retrieve relevant passages that answer the query"
    rows[5]["instruction"] = long
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt = len(tok.encode([f"Instruct: {long}\nQuery: "])[0])
    raw = run_dict(tmp_path, steps=4, query_max_length=prompt)
    raw["data"]["datasets"][0].update(path=str(path))
    with pytest.raises(ValueError, match=rf"data.datasets\[0\] \(ret\): the instruction of 1 of its records "
                                         rf"\('Given a web search .*'\) takes {prompt} tokens of the {prompt}"):
        TrainData.from_config(load_run_config(data=raw), tok, HostRows.of_process(0, 1))


def test_random_negatives_are_never_the_rows_own_positives():
    """Without hard negatives, other records' positives fill the group; queries that share a
    document (most BEIR training sets) must not get it as a negative."""
    from qzhou_jax.data.batches import BatchBuilder, BatchSpec
    from qzhou_jax.data.records import RetrievalRecord
    from qzhou_jax.data.sources import ListSource
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "tokenizer"))
    shared = [RetrievalRecord(f"q{i}", (f"doc{i % 3}", f"doc{(i + 1) % 3}")) for i in range(12)]
    records = shared + [RetrievalRecord(f"r{i}", (f"other{i}",)) for i in range(4)]
    spec = BatchSpec("retrieval", batch_size=16, hard_negatives=3, query_max_length=16, passage_max_length=16)
    builder = BatchBuilder(ListSource(records, name="shared"), spec, tok, seed=0)
    for step in range(20):
        _, p_texts, _ = builder._texts(step, range(16), 0)
        for r, rec in enumerate(records):
            negs = p_texts[4 * r + 1:4 * r + 4]
            assert not set(negs) & set(rec.pos) and len(set(negs)) == 3, (step, rec, negs)
    few = [RetrievalRecord(f"q{i}", ("same",)) for i in range(3)] + [RetrievalRecord("x", ("other",))]
    builder = BatchBuilder(ListSource(few, name="few"), spec, tok, seed=0)
    _, p_texts, _ = builder._texts(0, [3], 0)  # fewer distinct texts than negatives: repeats
    assert p_texts == ["other", "same", "same", "same"]
    assert builder._texts(0, [0], 0)[1] == ["same", "other", "other", "other"]
    # every record's positive is the same text: refused when the dataset is opened, not when a batch
    # first draws it
    with pytest.raises(ValueError, match=r"dataset 'same': every record's positive is the same text"):
        BatchBuilder(ListSource(few[:3], name="same"), spec, tok, seed=0)
    listed = [RetrievalRecord(f"q{i}", ("same",), ("n1", "n2", "n3")) for i in range(3)]
    BatchBuilder(ListSource(listed, name="listed"), spec, tok, seed=0)  # enough listed negatives: fine
    # a query whose records hold every positive there is: found out when a batch draws it
    shared_all = [RetrievalRecord("q", ("a",)), RetrievalRecord("q", ("b",)), RetrievalRecord("q", ("a",))]
    builder = BatchBuilder(ListSource(shared_all, name="shared_all"), spec, tok, seed=0)
    with pytest.raises(ValueError, match=r"data.datasets \(shared_all\): found 0 of the 3 random negatives"):
        builder._texts(0, [0], 0)  # every other record's positive is a positive of its query


def test_a_negative_listed_twice_is_drawn_once():
    """A record listing one text twice among its negatives: the row gets k distinct negatives
    (the repeat counted twice in the loss's denominator, and took the place of another)."""
    from qzhou_jax.data.batches import BatchBuilder, BatchSpec
    from qzhou_jax.data.records import RetrievalRecord
    from qzhou_jax.data.sources import ListSource
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "tokenizer"))
    records = [RetrievalRecord(f"q{i}", (f"p{i}",), ("a", "a", "b", "c", "d")) for i in range(8)]
    builder = BatchBuilder(ListSource(records, name="twice"), BatchSpec("retrieval", 8, 4, 16, 16), tok, seed=0)
    for step in range(20):
        _, p_texts, _ = builder._texts(step, range(8), 0)
        for r in range(8):
            assert sorted(p_texts[5 * r + 1:5 * r + 5]) == ["a", "b", "c", "d"], (step, r)
    # fewer distinct listed negatives than k: other records' positives fill the group
    few = [RetrievalRecord(f"q{i}", (f"p{i}",), ("a", "a", "a", "a")) for i in range(8)]
    builder = BatchBuilder(ListSource(few, name="few"), BatchSpec("retrieval", 8, 4, 16, 16), tok, seed=0)
    negs = builder._texts(0, [0], 0)[1][1:]
    assert negs[0] == "a" and len(set(negs)) == 4 and all(t.startswith("p") for t in negs[1:])


def test_negatives_are_never_a_positive_of_the_query_in_another_record(tmp_path):
    """One record per (query, positive) pair: a query's other positives live in other records.
    Neither a random negative nor a listed negative may be one of them (listed ones are left out)."""
    from qzhou_jax.data.batches import BatchBuilder, BatchSpec
    from qzhou_jax.data.records import RetrievalRecord
    from qzhou_jax.data.sources import JsonlSource, ListSource
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "tokenizer"))
    records = [RetrievalRecord("q", (f"q-doc{j}",)) for j in range(4)]  # 4 records of one query
    records += [RetrievalRecord(f"r{i}", (f"other{i}",)) for i in range(3)]
    records += [RetrievalRecord("q", ("q-doc4",), ("q-doc0", "hard", "q-doc4"))]  # 2 listed negatives are positives
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": r.query, "pos": list(r.pos), "neg": list(r.neg)}) + "\n"
                            for r in records))
    spec = BatchSpec("retrieval", batch_size=8, hard_negatives=3, query_max_length=16, passage_max_length=16)
    q_docs = {f"q-doc{j}" for j in range(5)}
    for source in (ListSource(records, name="pairs"), JsonlSource(path, "retrieval")):
        index = source.query_positives
        assert index.shared_queries == 1 and len(index.pairs) == 5
        assert index.contains(0, "q-doc3") and not index.contains(0, "other1") and not index.contains(4, "q-doc0")
        assert index.positives_among(7, records[7], records[7].neg) == [True, False, True]
        assert index.positives_among(4, records[4], ["q-doc0", "other0"]) == [False, True]
        builder = BatchBuilder(source, spec, tok, seed=0)
        for step in range(30):
            _, p_texts, _ = builder._texts(step, range(8), 0)
            for r in range(8):
                negs = p_texts[4 * r + 1:4 * r + 4]
                if r in (0, 1, 2, 3, 7):
                    assert not set(negs) & q_docs, (step, r, negs)
                if r == 7:
                    assert negs[0] == "hard" and len(set(negs)) == 3

    # the same question under another instruction is another query: its positives are fair negatives
    other = records + [RetrievalRecord("q", ("answer",), ("q-doc1",), instruction="Find duplicates")]
    index = ListSource(other, name="instr").query_positives
    assert not index.contains(8, "q-doc1") and not index.shared[8] and index.shared[0]
    assert BatchBuilder(ListSource(other, name="instr"), spec, tok, seed=0)._texts(0, [8], 0)[1][1] == "q-doc1"
    # the lookup of one text equals the vectorized pair keys (signed 64-bit keys of either sign)
    from qzhou_jax.data.sources import QueryPositives, _pair_keys

    rng = np.random.default_rng(0)
    qk, pk = rng.integers(-2**63, 2**63, 50, dtype=np.int64), rng.integers(-2**63, 2**63, 50, dtype=np.int64)
    fake = QueryPositives(np.repeat(qk, 2), np.repeat(pk, 2), np.ones(100, np.int64))
    assert np.array_equal(fake.pairs, np.unique(_pair_keys(qk, pk)))
    import qzhou_jax.data.sources as sources_mod

    keys = dict(zip(map(str, range(50)), pk.tolist()))
    original = sources_mod.text_key
    sources_mod.text_key = lambda t: keys[t]
    try:
        assert all(fake.contains(2 * j, str(j)) for j in range(50))
        assert not any(fake.contains(2 * j, str((j + 1) % 50)) for j in range(50))
    finally:
        sources_mod.text_key = original

    class Plain:  # a source without the index (any Source-like object): one is built by reading its records
        name, family = "plain", "retrieval"

        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            return records[i]

    builder = BatchBuilder(Plain(), spec, tok, seed=0)
    assert len(builder.positives.pairs) == 5 and not set(builder._texts(0, [0], 0)[1][1:]) & q_docs


def test_classification_batches_never_pair_a_text_with_itself():
    """Noisy classification data: a (text, label) row repeated, and one text filed under two
    labels. Positives always differ from the anchor's text, negatives never are the anchor's
    text and are distinct; the repeated row is left out (as anchor and as candidate)."""
    from qzhou_jax.data.batches import BatchBuilder, BatchSpec
    from qzhou_jax.data.records import ClassificationRecord
    from qzhou_jax.data.sources import ListSource
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "tokenizer"))
    records = [ClassificationRecord("dup", "A"), ClassificationRecord("dup", "A"), ClassificationRecord("a2", "A"),
               ClassificationRecord("both", "A"), ClassificationRecord("both", "B"), ClassificationRecord("b1", "B"),
               ClassificationRecord("b2", "B"), ClassificationRecord("c1", "C"), ClassificationRecord("c2", "C")]
    spec = BatchSpec("classification", batch_size=8, hard_negatives=3, query_max_length=16, passage_max_length=16)
    builder = BatchBuilder(ListSource(records, name="noisy"), spec, tok, seed=0)
    assert builder.labels.duplicates == 1 and builder.size == 8 and 1 not in builder.labels.anchors
    for step in range(50):
        q_texts, p_texts, extra = builder._texts(step, range(8), 0)
        for r, anchor in enumerate(q_texts):
            pos, negs = p_texts[4 * r], p_texts[4 * r + 1:4 * r + 4]
            assert pos != anchor and anchor not in negs and pos not in negs and len(set(negs)) == 3, \
                (step, anchor, pos, negs)
            assert extra["p_labels"][4 * r] == extra["q_labels"][r]
            assert extra["q_labels"][r] not in extra["p_labels"][4 * r + 1:4 * r + 4]
    # a dominant label (99.8%): its anchors draw negatives straight from the few other texts
    skewed = [ClassificationRecord(f"major {i}", "M") for i in range(5000)]
    skewed += [ClassificationRecord(f"minor {i}", "m") for i in range(10)]
    builder = BatchBuilder(ListSource(skewed, name="skewed"), spec, tok, seed=0)
    for step in range(20):
        _, p_texts, extra = builder._texts(step, range(8), 0)
        assert all(len(set(p_texts[4 * r + 1:4 * r + 4])) == 3 for r in range(8))


def test_retrieval_batches_carry_keys_of_their_texts():
    from qzhou_jax.data.batches import BatchBuilder, BatchSpec, sequence_keys
    from qzhou_jax.data.records import RetrievalRecord
    from qzhou_jax.data.sources import ListSource
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(os.path.dirname(__import__("qzhou_jax").__file__), "assets", "tokenizer"))
    records = [RetrievalRecord("q a", ("doc",), ("n1",)), RetrievalRecord("q b", ("doc",), ("n2",)),
               RetrievalRecord("q a", ("other",), ("doc",), instruction="Find it")]
    spec = BatchSpec("retrieval", batch_size=3, hard_negatives=1, query_max_length=16, passage_max_length=16)
    batch = BatchBuilder(ListSource(records, name="dups"), spec, tok, seed=0).build(0, range(3), 0)
    q, p = batch["q_keys"], batch["p_keys"].reshape(3, 2)
    assert q.dtype == np.int32 and p.dtype == np.int32
    assert p[0, 0] == p[1, 0] == p[2, 1] and len({p[0, 0], p[0, 1], p[1, 1], p[2, 0]}) == 4
    assert q[0] != q[2]  # same query text, but the instruction makes a different input (and query)
    assert q[0] == sequence_keys(tok.encode(["q a"]), 16)[0]
    assert q[2] == sequence_keys(tok.encode(["Instruct: Find it\nQuery: q a"]), 16)[0]
    # questions cut off the same long context are one input to the model: one key
    context = "word " * 200
    long = [RetrievalRecord(context + "first question?", ("p1",)), RetrievalRecord(context + "second?", ("p2",))]
    batch = BatchBuilder(ListSource(long, name="rc"), spec, tok, seed=0).build(0, range(2), 0)
    np.testing.assert_array_equal(batch["q_ids"][0], batch["q_ids"][1])
    assert batch["q_keys"][0] == batch["q_keys"][1]


def test_cutting_long_texts_before_tokenizing_never_changes_the_tokens():
    from qzhou_jax.data.batches import _encode

    class Words:  # one token per space-separated word, truncated like the HF tokenizer
        def encode(self, texts):
            return [[len(w) for w in t.split()][:64] for t in texts]

    natural = " ".join(["word"] * 500)  # 5 characters a token: the cut is harmless
    rulers = " ".join(["=" * 40] * 50)  # 41 characters a token: the cut would lose tokens
    for text in (natural, rulers, "short"):
        assert _encode(Words(), [text], 32)[0][:32] == Words().encode([text])[0][:32]


# --------------------------------------------------------------- bad input
def test_config_errors_name_the_key_before_any_device_work(tmp_path, monkeypatch):
    import qzhou_jax.sharding as sh

    monkeypatch.setattr(sh, "make_mesh", lambda *a, **k: pytest.fail("device work before validation"))
    path = tmp_path / "run.yaml"
    import yaml

    for bad, key in (({"train": {"lr": "fast"}}, "train.lr"), ({"trian": {}}, "trian"),
                     ({"data": {"datasets": [{"name": "x", "task": "nope", "path": "x"}]}}, "data.datasets[0].task"),
                     ({"checkpoint": {"every": 1.5}}, "checkpoint.every"),
                     ({"data": {"length_buckets": [64, 0]}}, "data.length_buckets[1]: expected a positive integer"),
                     ({"data": {"datasets": [{"name": "x", "task": "sts", "path": "a"},
                                             {"name": "x", "task": "sts", "path": "b"}]}},
                      "data.datasets: duplicate name 'x'"),
                     ({"data": {"datasets": [{"name": "x", "task": "sts", "path": "a", "fields": {"txt1": "s1"}}]}},
                      "data.datasets[0].fields: unknown field 'txt1' for sts (known: text1, text2, score)"),
                     ({"out_dir": "gs://bucket/run"}, "out_dir: 'gs://bucket/run' is a URL"),
                     ({"checkpoint": {"dir": "gs://bucket/ckpt"}}, "checkpoint.dir: 'gs://bucket/ckpt' is a URL"),
                     ({"loss": {"function": "no_such_package.losses:f"}},
                      "loss.function: cannot import 'no_such_package.losses'"),
                     ({"loss": {"function": "qzhou_jax.losses:no_such_loss"}},
                      "loss.function: qzhou_jax.losses has no 'no_such_loss'"),
                     ({"loss": {"function": "missing.py:f"}}, "loss.function: missing.py: file not found"),
                     ({"loss": {"options": {"margin": 0.1}}}, "loss.options: set only with loss.function")):
        raw = run_dict(tmp_path)
        for k, v in bad.items():
            raw[k] = {**raw.get(k, {}), **v} if isinstance(raw.get(k), dict) else v
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_run_config(path)
        assert cli_main(["train", "--config", str(path)]) == 2
    # a GPU kernel on this CPU: refused before the data is read or anything is compiled
    raw = run_dict(tmp_path)
    raw["model"]["attention_impl"] = "cudnn"
    with pytest.raises(ValueError, match="model.attention_impl: 'cudnn' is a GPU kernel and this machine's JAX "
                                         "platform is cpu"):
        train(load_run_config(data=raw))


def test_a_loss_function_named_in_the_config_is_what_the_run_trains_on(tmp_path, uninterrupted):
    """`loss.function` (a file here) replaces the built-in losses and reads `loss.options`: a
    constant added to the loss leaves the gradients, hence every step, as the built-in run's,
    and the function's own metric is logged per task."""
    (tmp_path / "my_loss.py").write_text(  # a dataclass too: the file is a module while it runs
        "from __future__ import annotations\n"
        "import dataclasses\n"
        "from qzhou_jax.train import task_loss\n\n"
        "@dataclasses.dataclass\n"
        "class Options:\n"
        "    shift: float = 0.0\n\n"
        "def shifted(q, p, batch, task, loss_cfg):\n"
        "    loss, metrics = task_loss(q, p, batch, task, loss_cfg)\n"
        "    shift = Options(**loss_cfg.options).shift\n"
        "    return loss + shift, {**metrics, 'shift': loss * 0 + shift}\n")
    raw = run_dict(tmp_path / "run")
    raw["loss"] = {"function": f"{tmp_path}/my_loss.py:shifted", "options": {"shift": 1.5}}
    cfg = load_run_config(data=raw)
    result = train(cfg)
    before, after = losses(uninterrupted), losses(result)
    assert sorted(after) == sorted(before)
    np.testing.assert_allclose([after[k] for k in sorted(after)], [before[k] + 1.5 for k in sorted(before)],
                               rtol=1e-5)
    rows = _train_rows(tmp_path / "run")
    assert any(r.get("train/retrieval/shift") == 1.5 for r in rows), rows[0]
    with pytest.raises(ValueError, match="a loss_fn was passed and loss.function is"):  # Trainer(loss_fn=...)
        cfg.loss.objective(lambda *a: None)


def test_unwritable_out_dir_and_missing_dataset_name_the_key(tmp_path, capsys):
    import yaml

    (tmp_path / "afile").write_text("")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(run_dict(tmp_path / "afile" / "run", steps=2)))
    assert cli_main(["train", "--config", str(tmp_path / "a.yaml")]) == 2
    assert f"out_dir {tmp_path}/afile/run: cannot write there ({tmp_path}/afile is a file" in capsys.readouterr().err
    raw = run_dict(tmp_path / "run", steps=2)
    raw["data"]["datasets"][1]["path"] = str(tmp_path / "nope.jsonl")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    assert cli_main(["train", "--config", str(tmp_path / "b.yaml")]) == 2
    assert f"data.datasets[1] (sts): {tmp_path}/nope.jsonl: no such file" in capsys.readouterr().err
    # an evaluation task file is read at the start, not at the first evaluation (hours in, or never
    # before the end with eval.before off), and nothing is trained or written
    raw = run_dict(tmp_path / "c", steps=2)
    raw["eval"] = {"tasks": str(tmp_path / "no-tasks.yaml"), "before": False, "every": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli_main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "eval.tasks: " in (err := capsys.readouterr().err) and "no-tasks.yaml: task file not found" in err
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_bad_record_stops_with_file_line_or_is_skipped(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"text1": f"first {i}", "text2": f"second {i}", "score": i % 5}) for i in range(40)]
    lines[6] = json.dumps({"text1": "a", "text2": "b", "score": "high"})
    src.write_text("\n".join(lines) + "\n")
    raw = run_dict(tmp_path / "run", steps=2,
                   datasets=[{"name": "p", "task": "sts", "path": str(src)}], eta=None)
    with pytest.raises(ValueError, match=rf"{src}:7.*score"):
        train(load_run_config(data=raw))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    raw["data"]["skip_bad_records"] = True
    res = train(load_run_config(data=raw))
    assert res.status == "completed"


# -------------------------------------------------------------------- CLI
def test_train_command_and_stage2_init_from(tmp_path, caplog):
    import yaml

    from qzhou_jax.train.config import check_init_from

    cfg = tmp_path / "stage1.yaml"
    raw = run_dict(tmp_path / "s1", steps=3, datasets=run_dict("")["data"]["datasets"][:1], eta=None)
    raw["export_hf"] = True
    raw["data"]["datasets"][0]["instruction"] = "Find the passage that answers the question"
    cfg.write_text(yaml.safe_dump(raw))
    # what exports killed on other machines left (a requeued pod job): the run owns its out_dir
    leftovers = [tmp_path / "s1" / "hf.qzhou-tmp-elsewhere-99-abcdef12",
                 tmp_path / "s1" / "hf.qzhou-old-elsewhere-98-0123abcd"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
    assert cli_main(["train", "--config", str(cfg)]) == 0
    assert os.path.isfile(tmp_path / "s1" / "hf" / "config.json")
    assert not any(folder.exists() for folder in leftovers)
    # converting the run's checkpoints writes the sentence-transformers files its own export wrote
    from qzhou_jax.checkpoint import convert

    convert.orbax_to_hf(tmp_path / "s1" / "checkpoints", tmp_path / "s1-converted")
    for name in ("sentence_bert_config.json", "config_sentence_transformers.json", "modules.json",
                 "1_Pooling/config.json"):
        assert (tmp_path / "s1-converted" / name).read_text() == (tmp_path / "s1" / "hf" / name).read_text(), name
    # the query prompt is the instruction the queries trained with: the demo records' own, which
    # wins over the dataset's
    st = json.loads((tmp_path / "s1" / "hf" / "config_sentence_transformers.json").read_text())
    assert st["prompts"]["query"] == "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
    firsts = {}
    for name, init in (("ckpt", tmp_path / "s1" / "checkpoints"), ("hf", tmp_path / "s1" / "hf"), ("random", None)):
        stage2 = run_dict(tmp_path / f"s2-{name}", steps=2)
        if init is not None:
            stage2["init_from"] = str(init)
            stage2["model"] = {"compute_dtype": "float32"}
        res = train(load_run_config(data=stage2), stop_after=1)
        assert res.status == "stopped"
        firsts[name] = res.history[0]["loss"]
    # a finished stage 1 gives no warning; one cut short (its newest step below its total_steps) does
    stage2 = load_run_config(data=dict(run_dict(tmp_path / "s2-check", steps=2),
                                       init_from=str(tmp_path / "s1" / "checkpoints")))
    with caplog.at_level("WARNING"):
        check_init_from(stage2)
    assert "unfinished" not in caplog.text
    run_file = tmp_path / "s1" / "checkpoints" / "run_config.yaml"
    recorded = yaml.safe_load(run_file.read_text())
    run_file.write_text(yaml.safe_dump(dict(recorded, train=dict(recorded["train"], total_steps=10))))
    with caplog.at_level("WARNING"):
        check_init_from(stage2)
    assert "newest checkpoint is step 3 of the 10" in caplog.text
    run_file.write_text(yaml.safe_dump(recorded))
    # stage 2 starts from stage 1's parameters, whether given as its checkpoints or its export
    np.testing.assert_allclose(firsts["ckpt"], firsts["hf"], rtol=1e-5)
    assert abs(firsts["ckpt"] - firsts["random"]) > 1e-4
    # a stage 1 trained with a GPU kernel (its checkpoints' config says so): stage 2 on this
    # CPU, with no attention_impl of its own, runs XLA attention
    saved = json.loads((tmp_path / "s1" / "checkpoints" / "qzhou_config.json").read_text())
    (tmp_path / "s1" / "checkpoints" / "qzhou_config.json").write_text(json.dumps(dict(saved,
                                                                                    attention_impl="cudnn")))
    stage2 = dict(run_dict(tmp_path / "s2-gpu", steps=2), init_from=str(tmp_path / "s1" / "checkpoints"),
                  model={"compute_dtype": "float32"})
    assert load_run_config(data=stage2).model_config.attention_impl == "cudnn"
    res = train(load_run_config(data=stage2), stop_after=1)
    np.testing.assert_allclose(res.history[0]["loss"], firsts["ckpt"], rtol=1e-5)
    import yaml as _yaml

    recorded = _yaml.safe_load((tmp_path / "s2-gpu" / "checkpoints" / "run_config.yaml").read_text())
    assert recorded["model"]["attention_impl"] == "xla"


def test_sigterm_to_the_process_group_with_loader_workers_exits_75(tmp_path):
    """Slurm's --signal and a VM shutdown signal every process of the job, grain's loader
    workers included. A worker killed while handing over a batch left the trainer blocked
    forever in the loader's shutdown, after its checkpoint but before exit 75 (no requeue)."""
    import subprocess
    import sys
    import time

    import yaml

    raw = run_dict(tmp_path / "run", steps=400, workers=2)
    raw["checkpoint"] = {"every": 1000, "keep": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qzhou_jax.cli", "train", "--config", str(tmp_path / "run.yaml")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("train/loss") >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers alike
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 75, (tmp_path / "train.log").read_text()[-3000:]
    assert [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]


def test_loader_workers_leave_sigterm_to_the_trainer():
    """The deterministic half of the test above: grain's worker processes survive a SIGTERM (the
    trainer stops them), and the iterator goes on and closes."""
    import multiprocessing
    import time

    from qzhou_jax.data.pipeline import close_iterator
    from qzhou_jax.tokenizer import Tokenizer
    from qzhou_jax.train.loop import tokenizer_path

    cfg = load_run_config(data=run_dict("/tmp/unused", steps=40, workers=2))
    data = TrainData.from_config(cfg, Tokenizer(tokenizer_path(cfg), max_length=32), HostRows.of_process(0, 1))
    before = set(multiprocessing.active_children())
    it = data.iterator(0)
    assert next(it).step == 0
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert workers
    for p in workers:
        os.kill(p.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(p.is_alive() for p in workers)
    assert [next(it).step for _ in range(3)] == [1, 2, 3]
    close_iterator(it, timeout=60)
    assert not any(p.is_alive() for p in workers)


def test_special_token_ids_come_from_init_from_with_a_preset_too(tmp_path, caplog):
    """A run's export writes back the ids of the checkpoint it started from, whether init_from
    gives the architecture or a preset does (the shipped stage configs); ids an encoder cannot
    use (pad_token_id -1, which transformers tolerates) are left out with a warning."""
    from qzhou_jax.config import ModelConfig

    base = tmp_path / "base"
    base.mkdir()
    hf = {**ModelConfig.preset("tiny").to_hf(), "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": -1}
    (base / "config.json").write_text(json.dumps(hf))
    for model in ({"preset": "tiny"}, {"compute_dtype": "float32"}):
        cfg = load_run_config(data={**run_dict(tmp_path / "r"), "init_from": str(base), "model": model})
        m = cfg.model_config
        assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (1, (2, 3), None)
        assert cfg.model_config.to_hf()["eos_token_id"] == [2, 3]
    assert "ignoring pad_token_id -1 (not a token id" in caplog.text
    # a preset whose init_from is not there yet (`plan` without the weights): no ids, no error
    cfg = load_run_config(data={**run_dict(tmp_path / "r"), "init_from": str(tmp_path / "absent")})
    assert cfg.model_config.bos_token_id is None


def test_the_configs_alpha_and_eta_reach_the_batch_plan(tmp_path):
    """data.alpha and data.eta of a run config decide the dataset draws of the run's plan (the
    sampler's own test builds its plan directly)."""
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    tok = Tokenizer(DEMO_TOKENIZER, max_length=32)
    data = TrainData.from_config(load_run_config(data=run_dict(tmp_path, eta=0.72, alpha=0.3)), tok)
    assert [e.task for e in data.plan.entries] == ["retrieval", "sts"]
    np.testing.assert_allclose(data.plan.probs, [0.72, 0.28])
    data = TrainData.from_config(load_run_config(data=run_dict(tmp_path, eta=None, alpha=0.3)), tok)
    w = np.array([e.size for e in data.plan.entries], float) ** 0.3
    np.testing.assert_allclose(data.plan.probs, w / w.sum())


def test_a_resume_error_does_not_count_token_ids_as_state(tmp_path):
    """Special-token ids shape no array: a checkpoint written without them does not name them among
    the settings to restore."""
    from qzhou_jax.checkpoint.manager import RunCheckpoints
    from qzhou_jax.checkpoint.orbax_io import config_to_json
    from qzhou_jax.config import ModelConfig, write_json

    tiny = ModelConfig.preset("tiny")
    write_json(tmp_path / "qzhou_config.json", config_to_json(tiny))
    ckpts = RunCheckpoints(str(tmp_path))
    now = tiny.replace(bos_token_id=1, eos_token_id=(2, 3), num_hidden_layers=3)
    assert ckpts._state_changes(now, None, ()) == ["model.num_hidden_layers: 2 -> 3"]


def test_run_metadata_that_cannot_be_written_keeps_the_last_start(tmp_path, monkeypatch):
    """run_config.yaml is replaced only once the new one is written (a full disk in between kept
    neither, and the next resume could not say what changed); a tokenizer copy that fails leaves
    no temporary folder."""
    from qzhou_jax.checkpoint import manager
    from qzhou_jax.config import ModelConfig
    from qzhou_jax.tokenizer import DEMO_TOKENIZER

    tiny = ModelConfig.preset("tiny")
    ckpts = manager.RunCheckpoints(str(tmp_path))
    ckpts.write_metadata(tiny, None, {"train": {"lr": 1e-3}})
    before = (tmp_path / "run_config.yaml").read_text()
    with pytest.raises(Exception, match="cannot represent"):
        ckpts.write_metadata(tiny, None, {"train": {"lr": object()}})
    assert (tmp_path / "run_config.yaml").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["qzhou_config.json", "run_config.yaml"]

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager, "copy_tokenizer", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*\.tokenizer\.tmp\d+'"):
        ckpts.write_metadata(tiny, DEMO_TOKENIZER)
    assert sorted(os.listdir(tmp_path)) == ["qzhou_config.json", "run_config.yaml"]


def test_a_run_short_of_disk_space_is_warned_at_the_start(tmp_path, monkeypatch, caplog):
    """checkpoint.keep checkpoints, the one being written (parameters, two Adam moments) and the
    export must fit where they go: less room reported is a warning before any work."""
    import collections

    from qzhou_jax.train import loop

    cfg = load_run_config(data=run_dict(tmp_path / "run"), overrides=["export_hf=true"])
    n = cfg.model_config.num_params()
    need = (2 + 1) * n * 12 + 2 * n * 4  # keep 2, float32 everything; out_dir and checkpoints on one disk
    usage = collections.namedtuple("usage", "total used free")
    for free, warned in ((need, False), (need - 1, True)):
        monkeypatch.setattr(loop.shutil, "disk_usage", lambda path, free=free: usage(2 * need, need, free))
        caplog.clear()
        with caplog.at_level("WARNING"):
            loop._warn_if_short_of_space(cfg)
        assert ("a save may fail for lack of room" in caplog.text) == warned, caplog.text
    assert f"{(need - 1) / 2**30:.1f} GiB free, and this run writes up to {need / 2**30:.1f} GiB there" in caplog.text
    for step in ("4", "8"):  # a resume: the checkpoints there already take their room, one more is written
        (tmp_path / "run" / "checkpoints" / step).mkdir(parents=True)
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: usage(2 * need, need, 0))
    caplog.clear()
    with caplog.at_level("WARNING"):
        loop._warn_if_short_of_space(cfg)
    assert f"writes up to {(n * 12 + 2 * n * 4) / 2**30:.1f} GiB there" in caplog.text


def test_the_metrics_log_is_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """A host that crashes after a checkpoint keeps the log up to it: before each save, the
    rows written so far are synced (os.fsync on the log's file)."""
    from qzhou_jax.checkpoint.manager import RunCheckpoints

    log_path = os.path.realpath(tmp_path / "metrics.jsonl")
    events, real_fsync, real_save = [], os.fsync, RunCheckpoints.save

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == log_path:
            with open(log_path) as f:
                events.append(("synced", max(json.loads(line)["step"] for line in f)))
        return real_fsync(fd)

    def save(self, step, *args, **kwargs):
        events.append(("saved", step))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(RunCheckpoints, "save", save)
    train(load_run_config(data=run_dict(tmp_path)))
    assert events == [("synced", 4), ("saved", 4), ("synced", 8), ("saved", 8)]


def test_unreadable_xla_cache_entries_are_removed_once(tmp_path, monkeypatch):
    """A truncated or empty entry of XLA's cache (a writer killed, a host crashed) made JAX warn and
    compile again at every start and never rewrite it: it is removed before the run compiles. An
    entry that decompresses is decompressed once (listed in .qzhou-checked.json); one modified in
    the last two minutes may still be being written and is left for a later start."""
    from jax._src import compilation_cache

    from qzhou_jax.train import xla_cache

    cache = tmp_path / "xla"
    cache.mkdir()
    whole = compilation_cache.compress_executable(os.urandom(5000))
    (cache / "jit_a-1-cache").write_bytes(whole)
    (cache / "jit_b-2-cache").write_bytes(whole[: len(whole) // 2])
    (cache / "jit_c-3-cache").write_bytes(b"")
    (cache / "jit_d-4-cache").write_bytes(whole[:10])  # new: perhaps still being written
    (cache / "jit_a-1-atime").write_bytes(b"x")  # not an entry
    old = time.time() - 600
    for name in ("jit_a-1-cache", "jit_b-2-cache", "jit_c-3-cache"):
        os.utime(cache / name, (old, old))
    calls = []
    real = compilation_cache.decompress_executable
    monkeypatch.setattr(compilation_cache, "decompress_executable", lambda b: calls.append(len(b)) or real(b))
    assert sorted(xla_cache.drop_unreadable_entries(str(cache))) == ["jit_b-2-cache", "jit_c-3-cache"]
    assert sorted(os.listdir(cache)) == [".qzhou-checked.json", "jit_a-1-atime", "jit_a-1-cache", "jit_d-4-cache"]
    assert len(calls) == 3
    assert xla_cache.drop_unreadable_entries(str(cache)) == [] and len(calls) == 3  # checked once
    os.utime(cache / "jit_d-4-cache", (old, old))
    assert xla_cache.drop_unreadable_entries(str(cache)) == ["jit_d-4-cache"]

    class Checked(Exception):
        pass

    def check(cache_dir=None):
        raise Checked(jax.config.jax_compilation_cache_dir)

    monkeypatch.setattr(xla_cache, "drop_unreadable_entries", check)
    with pytest.raises(Checked):  # the run checks its cache before compiling anything
        train(load_run_config(data=run_dict(tmp_path / "run")))


def test_jax_writes_a_removed_cache_entry_again(tmp_path):
    """What the removal is for: JAX never rewrites a truncated entry (the file exists) and warns
    at every start; once it is removed, the next start compiles and writes it whole."""
    import subprocess
    import sys

    child = ("import sys, warnings\n"
             "import jax, jax.numpy as jnp\n"
             "from qzhou_jax.train import xla_cache\n"
             "xla_cache.drop_unreadable_entries(sys.argv[1]) if sys.argv[2] == 'drop' else None\n"
             "f = jax.jit(lambda x: jnp.tanh(x) @ x.T)\n"
             "with warnings.catch_warnings(record=True) as w:\n"
             "    warnings.simplefilter('always')\n"
             "    f(jnp.ones((8, 8))).block_until_ready()\n"
             "print('WARNED' if any('persistent compilation cache' in str(x.message) for x in w) else 'CLEAN')\n")
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}

    def start(mode):
        r = subprocess.run([sys.executable, "-c", child, str(cache), mode], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    assert start("keep") == "CLEAN"
    [entry] = [p for p in cache.iterdir() if p.name.startswith("jit__lambda") and p.name.endswith("-cache")]
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[: size // 2])
    old = time.time() - 600
    os.utime(entry, (old, old))
    assert start("keep") == "WARNED"
    assert entry.stat().st_size == size // 2  # not written again
    assert start("drop") == "CLEAN"  # removed, compiled, written whole
    assert entry.stat().st_size == size
    assert start("drop") == "CLEAN"


def test_the_folder_lock_is_agreed_by_every_process(tmp_path, monkeypatch):
    """With several processes only process 0 takes the lock; the others learn through the hosts'
    exchange whether it did, and stop with it instead of waiting in their first collective."""
    import fcntl

    from qzhou_jax import hosts
    from qzhou_jax.train import loop

    cfg = load_run_config(data=run_dict(tmp_path / "run"))
    os.makedirs(cfg.output_dir)
    posted = []

    def gather(self, round_id, values, what):
        posted.append(list(values))
        return np.asarray([[theirs[0]], [1]])

    monkeypatch.setattr(hosts.HostExchange, "gather", gather)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with open(os.path.join(cfg.output_dir, loop.LOCK_FILE), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(jax, "process_index", lambda: 0)
        theirs = [0]  # what process 0 posts, as the others see it
        with pytest.raises(ValueError, match="another qzhou-jax run is using it"):
            with loop._RunLock(cfg):
                pass
        assert posted == [[0]]
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        with pytest.raises(ValueError, match="process 0 could not take the run's lock"):
            with loop._RunLock(cfg):
                pass
        assert posted == [[0], [1]]
    theirs = [1]
    with loop._RunLock(cfg):  # process 1: takes nothing itself, goes on with process 0
        pass
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with loop._RunLock(cfg) as lock:
        assert [f is not None for f in lock.files] == [True]


def test_an_unreadable_cache_entry_that_cannot_be_removed_is_left_to_jax(tmp_path, monkeypatch, caplog):
    """A cache shared read-only: the entry stays (JAX warns and compiles, as before) and the run goes on."""
    from qzhou_jax.train import xla_cache

    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "jit_b-2-cache").write_bytes(b"\x28\xb5")
    old = time.time() - 600
    os.utime(cache / "jit_b-2-cache", (old, old))

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "remove", refuse)
    with caplog.at_level("WARNING"):
        assert xla_cache.drop_unreadable_entries(str(cache)) == []
    assert (cache / "jit_b-2-cache").exists() and "cannot be removed" in caplog.text
