"""Multi-process training on one machine: 2 processes x 4 CPU devices (jax.distributed on
localhost, gloo collectives) against 1 process x 8 devices, and per-host data splits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from qzhou_jax.train.config import load_run_config
from qzhou_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(out, steps):
    return {"out_dir": str(out), "model": {"preset": "tiny", "compute_dtype": "float32"},
            "mesh": {"data": 2, "fsdp": -1, "tensor": 1},
            "train": {"lr": 1e-3, "warmup_steps": 2, "total_steps": steps, "schedule": "constant", "seed": 5},
            "data": {"tokenizer": "{assets}/tokenizer", "batch_size": 8, "pair_batch_size": 8, "hard_negatives": 1,
                     "query_max_length": 32, "passage_max_length": 32, "eta": 0.5,
                     "datasets": [{"name": "ret", "task": "retrieval", "path": "{assets}/demo/retrieval_train.jsonl"},
                                  {"name": "sts", "task": "sts", "path": "{assets}/demo/sts_train.jsonl"}]},
            "checkpoint": {"every": 3, "keep": 2}, "export_hf": False,
            "log": {"every": 1, "progress": False, "tensorboard": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def bucketed(cfg):
    """Length buckets below the 32-token maximum: each host pads its rows to its own bucket, and
    the loop pads every host to the longest host's length."""
    cfg["data"]["length_buckets"] = [16, 24]
    return cfg


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    from qzhou_jax.data.pipeline import HostRows, TrainData
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    reference = train(load_run_config(data=bucketed(config(tmp_path / "one", 8))))
    ref = {h["step"]: h["loss"] for h in reference.history}
    # the two hosts do choose different lengths for some steps, which the loop must reconcile
    cfg, tok = load_run_config(data=bucketed(config(tmp_path / "x", 6))), Tokenizer(DEMO_TOKENIZER, max_length=32)
    hosts = [TrainData.from_config(cfg, tok, HostRows.of_process(i, 2)) for i in range(2)]
    assert any(hosts[0][s].batch[k].shape != hosts[1][s].batch[k].shape for s in range(6) for k in ("q_ids", "p_ids"))

    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(bucketed(config(tmp_path / "two", 6))))
    outs = _finish(_launch(cfg_path, tmp_path, free_port()))
    for out in outs:
        assert "the 2 hosts agree on padded lengths through the coordination service" in out, out[-3000:]
    with open(tmp_path / "two" / "metrics.jsonl") as f:  # written by process 0
        two = {r["step"] - 1: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    assert sorted(two) == list(range(6))
    for s, v in two.items():
        np.testing.assert_allclose(v, ref[s], rtol=1e-5, err_msg=f"step {s}")

    # the 2-process checkpoint resumes in one process (8 devices), and continues like the reference
    resumed = train(load_run_config(data=bucketed(config(tmp_path / "two", 8))), resume=True)
    assert resumed.status == "completed" and [h["step"] for h in resumed.history] == [6, 7]
    for h in resumed.history:
        np.testing.assert_allclose(h["loss"], ref[h["step"]], rtol=1e-5, err_msg=f"step {h['step']}")


def _finish(procs, timeout=600):
    """The outputs of the processes, which must all exit 0."""
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_a_tensor_axis_across_processes_trains_on_the_whole_batch(tmp_path):
    """One device per process and the tensor axis over both (one process per GPU, tensor
    parallel over GPUs): the processes hold the same batch rows, so both build all of them;
    the losses equal one process's on 8 devices. The run ends with the HF export, each tensor
    gathered from both processes and written by process 0, equal to the one-process export."""
    from qzhou_jax.checkpoint.safetensors_io import TensorStore

    def cfg(out):
        c = config(out, 3)
        c["mesh"] = {"data": 1, "fsdp": 1, "tensor": 2}
        c["export_hf"] = True
        return c

    reference = train(load_run_config(data={**cfg(tmp_path / "one"), "mesh": {"data": 1, "fsdp": 4, "tensor": 2}}))
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg(tmp_path / "two")))
    _finish(_launch(cfg_path, tmp_path, free_port(), devices=1))
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        two = {r["step"] - 1: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    assert sorted(two) == [0, 1, 2]
    for h in reference.history:
        np.testing.assert_allclose(two[h["step"]], h["loss"], rtol=1e-5, err_msg=f"step {h['step']}")
    one, both = TensorStore(str(tmp_path / "one" / "hf")), TensorStore(str(tmp_path / "two" / "hf"))
    assert sorted(both.names()) == sorted(one.names()) and len(one.names()) > 10
    for name in one.names():
        np.testing.assert_allclose(both.get(name), one.get(name), rtol=0, atol=2e-5, err_msg=name)
    assert json.loads((tmp_path / "two" / "hf" / "config.json").read_text()) == \
        json.loads((tmp_path / "one" / "hf" / "config.json").read_text())
    assert [p for p in os.listdir(tmp_path / "two") if ".qzhou-tmp-" in p] == []


def _launch(cfg_path, cwd, port, log_dir=None, devices=4, args=(), **extra_env):
    procs = []
    for i in range(2):
        env = {**os.environ, **extra_env, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "PYTHONPATH": os.pathsep.join(p for p in (ROOT, extra_env.get("PYTHONPATH"),
                                                         os.environ.get("PYTHONPATH")) if p)}
        out = open(os.path.join(log_dir, f"p{i}.log"), "w") if log_dir else subprocess.PIPE
        procs.append(subprocess.Popen([sys.executable, "-m", "qzhou_jax.cli", "-v", "train", "--config", str(cfg_path),
                                       *args],
                                      env=env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT, text=True))
        if log_dir:
            out.close()  # the child has its own descriptor
    return procs


def test_sigterm_to_one_process_saves_every_process_at_the_same_step(tmp_path):
    """A preemption notice reaches one host: JAX's preemption sync point (its own SIGTERM
    handler, which the loop must not replace) makes both processes save the same step and
    exit with 75. With a Python handler in each process, the signalled one stopped alone
    and both crashed in the next collective."""
    import signal
    import time

    cfg = config(tmp_path / "run", 400)
    cfg["checkpoint"] = {"every": 1000, "keep": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    marker = tmp_path / "preempted"  # what launch/slurm_gpu.sbatch reads besides srun's status
    def sigterm_to_one_when(ready, procs):
        """Wait for `ready()`, send SIGTERM to process 1 only, and return both exit codes and logs."""
        deadline = time.time() + 300
        try:
            while not ready():
                assert time.time() < deadline and all(p.poll() is None for p in procs), \
                    (tmp_path / "p1.log").read_text()[-3000:]
                time.sleep(0.05)
            procs[1].send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
        assert codes == [75, 75], logs[1][-3000:]
        return logs

    metrics = tmp_path / "run" / "metrics.jsonl"
    logs = sigterm_to_one_when(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
                               _launch(tmp_path / "run.yaml", tmp_path, free_port(), log_dir=str(tmp_path),
                                       QZ_PREEMPTED_MARKER=str(marker)))
    saved = [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and 3 <= int(saved[0]) < 400
    for log in logs:
        assert f"preempted: checkpoint for step {saved[0]} written" in log
    assert marker.read_text() == f"{saved[0]}\n"

    # Resumed, and preempted again while restoring and compiling. JAX's sync point is the step
    # after the highest one the processes last reported, 0 before any: the notice set it to 1,
    # which the resumed run (at step saved + 1 and on) never reached, and it trained on to the
    # end. It now stops before its first step, or saves after it.
    first = int(saved[0])
    logs = sigterm_to_one_when(lambda: "resumed from" in (tmp_path / "p1.log").read_text(),
                               _launch(tmp_path / "run.yaml", tmp_path, free_port(), log_dir=str(tmp_path),
                                       args=("--resume",)))
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert saved[-1] in (first, first + 1), (saved, logs[1][-2000:])


def test_only_a_lost_process_is_reported_as_one():
    """The errors of a collective or agreement whose peer is gone lead to status 69 (rerun with
    --resume); this process's own failures, such as running out of device memory, keep their
    traceback and status, or a launcher would rerun them up to its limit."""
    from qzhou_jax.hosts import peer_lost as _peer_lost

    for text in ("UNAVAILABLE: Task 1 heartbeat timeout", "Gloo AllGather failed: Connection reset by peer",
                 "barrier failed because: task is set to ERROR", "NCCL operation failed: remote process exited",
                 "step 3: agreement: failed after 2 s (another process stopped; its log says why): x"):
        assert _peer_lost(RuntimeError(text)), text
    for text in ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB",
                 "INTERNAL: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED", "dictionary changed size during iteration"):
        assert not _peer_lost(RuntimeError(text)), text


def test_a_process_that_loses_another_exits_at_once_with_69(tmp_path):
    """Process 1 is killed (a lost VM) during training: process 0's next collective fails, and it
    says so and exits with 69 at once, where it used to print XLA's traceback and wait a minute
    or more in JAX's shutdown barrier for the dead process before aborting (134). A rerun with
    --resume continues from the last checkpoint."""
    import signal
    import time

    cfg = config(tmp_path / "run", 400)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    procs = _launch(tmp_path / "run.yaml", tmp_path, free_port(), log_dir=str(tmp_path))
    deadline = time.time() + 300
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        code = procs[0].wait(timeout=240)
        took = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "p0.log").read_text()
    assert code == 69, log[-3000:]
    assert "process 0 of 2: a step, collective or agreement between the processes failed" in log
    assert "rerun the job with --resume" in log and "Fatal Python error" not in log
    assert took < 30, (took, log[-2000:])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert saved and saved[-1] % 3 == 0


@pytest.mark.parametrize("processes", [2, 4])
def test_each_record_read_once_per_epoch_across_processes(processes):
    from qzhou_jax.data.pipeline import HostRows, TrainData
    from qzhou_jax.data.sources import open_source
    from qzhou_jax.data.batches import BatchSpec
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    tok = Tokenizer(DEMO_TOKENIZER, max_length=16)
    path = os.path.join(ROOT, "qzhou_jax", "assets", "demo", "sts_train.jsonl")
    src = open_source({"name": "sts", "task": "sts", "path": path})
    n, b = len(src), 40  # 1500 records: the epoch ends inside batch 38
    hosts = [TrainData([src], [BatchSpec("sts", b, 0, 16, 16)], tok, total_steps=80, seed=2,
                       host=HostRows.of_process(i, processes)) for i in range(processes)]
    text_to_index = {(src[i].text1, src[i].text2): i for i in range(n)}
    assert len(text_to_index) == n
    read: list[int] = []
    for step in range(80):  # two passes, in step order
        for h in hosts:
            d, rows = h.plan.batch(step)
            read.extend(int(r) for r in rows[h.host.rows(b)])
    assert sorted(read[:n]) == list(range(n))          # first pass: every record once
    assert sorted(read[n:2 * n]) == list(range(n))     # second pass too
    # the rows a host builds are the records the plan gives it (checked on the texts)
    item = hosts[-1][37]
    _, rows = hosts[-1].plan.batch(37)
    want = tok.pad(tok.encode([src[int(r)].text1 for r in rows[hosts[-1].host.rows(b)]]), length=16)[0]
    np.testing.assert_array_equal(item.batch["q_ids"], want)


class FakeCoordination:
    """The coordination service's key-value store and barriers, shared by threads standing in for hosts."""

    def __init__(self, hosts: int):
        import threading

        self.hosts, self.store, self.lock = hosts, {}, threading.Lock()
        self.barriers: dict = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.store, key
            self.store[key] = value

    def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
        import threading

        with self.lock:
            barrier = self.barriers.setdefault(barrier_id, threading.Barrier(self.hosts))
        try:
            barrier.wait(timeout_in_ms / 1000)
        except threading.BrokenBarrierError:
            raise TimeoutError(f"barrier {barrier_id} timed out") from None

    def key_value_dir_get(self, key):
        with self.lock:
            return [(k, v) for k, v in self.store.items() if k.startswith(key + "/")]

    def key_value_delete(self, key):
        with self.lock:
            del self.store[key]

    def key_value_try_get(self, key):
        with self.lock:
            if key not in self.store:
                raise KeyError(key)  # the real client raises NOT_FOUND
            return self.store[key]


def _exchange(name, fake, host, hosts):
    """A HostExchange for a thread standing in for `host` (the same key namespace on every host,
    as the same call order gives real processes)."""
    from qzhou_jax.hosts import HostExchange

    ex = HostExchange(name, fake, host, hosts, timeout_s=30)
    ex.prefix = name
    return ex


def _as_hosts(fn, hosts: int):
    """fn(h) in one thread per host; {h: its return value or the exception it raised}."""
    import threading

    out = {}

    def run(h):
        try:
            out[h] = fn(h)
        except Exception as e:  # noqa: BLE001 - recorded for the test to inspect
            out[h] = e

    threads = [threading.Thread(target=run, args=(h,)) for h in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_hosts_agree_on_bucketed_lengths_through_the_coordination_service():
    """Each host posts its own lengths; all get the longest, keys of past steps are deleted, and a
    host that never arrives stops the others with a message instead of a hang."""
    import threading

    from qzhou_jax.data.pipeline import CommonLengths

    hosts, steps = 3, [0, 1, 4, 5, 9]  # bucketed steps only, in the same order on every host
    mine = {(h, s): (16 * (1 + (h + s) % 3), 24 + 8 * ((h * s) % 2)) for h in range(hosts) for s in steps}
    fake, got = FakeCoordination(hosts), {}

    def host(h, agree):
        for s in steps:
            batch = {"q_ids": np.ones((2, mine[h, s][0]), np.int32), "q_mask": np.ones((2, mine[h, s][0]), np.int32),
                     "p_ids": np.ones((4, mine[h, s][1]), np.int32), "p_mask": np.ones((4, mine[h, s][1]), np.int32)}
            out = agree.pad(s, batch, pad_id=7)
            got[h, s] = (out["q_ids"].shape[1], out["p_ids"].shape[1])
            q_extra = out["q_ids"].shape[1] - mine[h, s][0]
            assert (out["q_ids"][:, mine[h, s][0]:] == 7).all() and out["q_mask"][:, mine[h, s][0]:].sum() == 0
            assert q_extra >= 0 and out["p_mask"].shape == out["p_ids"].shape

    agreements = [CommonLengths(fake, h, hosts, timeout_s=60) for h in range(hosts)]
    assert len({a.prefix for a in agreements}) == hosts  # a namespace per run; the hosts' own processes count alike
    for a in agreements:
        a.prefix = "run"
    threads = [threading.Thread(target=host, args=(h, agreements[h])) for h in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in steps:
        want = (max(mine[h, s][0] for h in range(hosts)), max(mine[h, s][1] for h in range(hosts)))
        assert all(got[h, s] == want for h in range(hosts)), s
    assert sorted(fake.store) == [f"run/9/{h}" for h in range(hosts)]  # only the last exchange's keys remain

    late = CommonLengths(FakeCoordination(2), 0, 2, timeout_s=0.2)
    with pytest.raises(RuntimeError, match=r"step 3: the length agreement of this bucketed step: failed after 0 s "
                                           r"\(not every process reached it within the 0.2 s allowed"):
        late.lengths(3, (16, 32))

    class Dead(FakeCoordination):  # the service reports a dead peer at once (its heartbeat stopped)
        def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
            raise RuntimeError("UNAVAILABLE: Task 1 heartbeat timeout")

    with pytest.raises(RuntimeError, match=r"failed after 0 s \(another process stopped; its log says why\): "
                                           r"UNAVAILABLE: Task 1 heartbeat timeout"):
        CommonLengths(Dead(2), 0, 2, timeout_s=60).lengths(3, (16, 32))
    assert CommonLengths(fake, 0, 1).lengths(3, (16, 32)) == (16, 32)  # one process: no exchange


def test_hosts_check_that_they_share_the_output_folder(tmp_path):
    """Process 0 writes a token into the folder and every process must read it: a folder on each
    host's own disk fails at the start on every process, naming the hosts that do not see it (it
    used to hang at the first checkpoint, hours in). The token file is removed."""
    from qzhou_jax.hosts import check_shared_folder

    shared, own = tmp_path / "shared", tmp_path / "host2-disk"
    shared.mkdir(), own.mkdir()
    fake = FakeCoordination(3)
    ok = _as_hosts(lambda h: check_shared_folder(str(shared), "out_dir", _exchange("f", fake, h, 3)), 3)
    assert ok == {0: None, 1: None, 2: None} and list(shared.iterdir()) == []
    fake = FakeCoordination(3)
    folders = {0: shared, 1: shared, 2: own}  # the same path, but host 2 mounts its own disk there
    bad = _as_hosts(lambda h: check_shared_folder(str(folders[h]), "out_dir", _exchange("f", fake, h, 3)), 3)
    assert all(isinstance(e, ValueError) and "processes [2] of 3 do not see the files" in str(e) for e in bad.values())
    fake = FakeCoordination(3)
    folders = {0: tmp_path / "not-there", 1: shared, 2: shared}  # process 0 cannot write: no host waits for it
    bad = _as_hosts(lambda h: check_shared_folder(str(folders[h]), "out_dir", _exchange("f", fake, h, 3)), 3)
    assert all(isinstance(e, ValueError) and "process 0 cannot write there" in str(e) for e in bad.values())


def test_an_evaluation_stops_at_the_same_task_on_every_host_after_a_preemption_notice():
    """With several processes JAX's SIGTERM handler posts a notice to the coordination service;
    the hosts agree on it before each evaluation task, so all of them stop at the same task even
    when they see the notice at different moments (a host stopping alone would deadlock)."""
    from qzhou_jax.hosts import PREEMPTION_NOTICE_KEY
    from qzhou_jax.train.loop import _Preemption, _stop_check

    fake = FakeCoordination(3)

    def host(h):
        preempt = _Preemption(enabled=False)
        check = _stop_check(preempt, _exchange("e", fake, h, 3))
        for task in range(6):
            if task == 2 and h == 1:  # host 1 receives SIGTERM while task 1 runs
                fake.key_value_set(PREEMPTION_NOTICE_KEY, "2026-11-27T00:00:00Z")
            if check():
                return task, preempt.flag
        return None, preempt.flag

    got = _as_hosts(host, 3)
    assert set(got.values()) == {(2, True)}, got
    quiet = _as_hosts(lambda h: _stop_check(_Preemption(False), _exchange("q", FakeCoordination(1), 0, 1))(), 1)
    assert quiet == {0: False}


_NOTICE_SCRIPT = """
import os, signal, sys, time
import jax
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], 2, int(os.environ["JAX_PROCESS_ID"]))
from qzhou_jax.hosts import HostExchange, preemption_noticed
before = preemption_noticed()
HostExchange("sync", timeout_s=60).gather(0, [0], "before")
if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler takes it: a preemption notice
deadline = time.time() + 30
while not preemption_noticed() and time.time() < deadline:
    time.sleep(0.1)
print("noticed", before, preemption_noticed(), flush=True)
HostExchange("sync", timeout_s=60).gather(0, [0], "after")
"""


def test_a_sigterm_to_one_process_is_a_notice_every_process_reads():
    """What an evaluation checks between tasks (`hosts.preemption_noticed`): the key JAX's
    preemption sync manager sets in the coordination service when any process gets SIGTERM.
    It is JAX's own, unpublished name, so this runs real processes, not a stand-in."""
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_PROCESS_ID": str(i),
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, "-c", _NOTICE_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for out in _finish(procs, timeout=120):
        assert "noticed False True" in out, out[-2000:]


def test_two_processes_fall_back_from_an_unreadable_checkpoint_together(tmp_path):
    """The newest step folder damaged after its commit (its data item lost): both processes find it
    unreadable, agree through the coordination service to resume from the previous step, process 0
    renames the damaged folder, and the run completes with the uninterrupted run's losses."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "run", 6)))
    _finish(_launch(cfg_path, tmp_path, free_port()))
    ckpt = tmp_path / "run" / "checkpoints"
    assert {"3", "6"} <= set(os.listdir(ckpt))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        full = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    (ckpt / "6" / "data" / "metadata").unlink()
    outs = _finish(_launch(cfg_path, tmp_path, free_port(), args=("--resume",)))
    for out in outs:
        assert "checkpoints/6: unreadable (" in out and "resuming from step 3" in out, out[-3000:]
    assert (ckpt / "6.unreadable").is_dir() and (ckpt / "6").is_dir()  # the rerun saved step 6 again
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        again = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    assert sorted(again) == sorted(full)
    for s in (4, 5, 6):
        np.testing.assert_allclose(again[s], full[s], rtol=1e-5, err_msg=f"step {s}")



def test_a_step_unreadable_on_one_process_only_is_left_by_both(tmp_path):
    """Damage only process 1 meets (its own shard files): the processes agree that the step did not
    read, both resume from the previous one, and the run continues as the uninterrupted one."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "run", 6)))
    _finish(_launch(cfg_path, tmp_path, free_port()))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        full = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    inject = os.path.join(ROOT, "tests", "mp_inject")
    outs = _finish(_launch(cfg_path, tmp_path, free_port(), args=("--resume",), QZ_TEST_UNREADABLE_STEP="6",
                           PYTHONPATH=inject), timeout=300)
    for out in outs:
        assert "resuming from step 3" in out, out[-3000:]
    assert "unreadable on process(es) [1]" in outs[0] and "step 6 unreadable on this process only" in outs[1]
    assert (tmp_path / "run" / "checkpoints" / "6.unreadable").is_dir()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        again = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
    for step in (4, 5, 6):
        np.testing.assert_allclose(again[step], full[step], rtol=1e-5, err_msg=f"step {step}")


_EXPORT_SCRIPT = """
import os, sys
import jax
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], 2, int(os.environ["JAX_PROCESS_ID"]))
from qzhou_jax.checkpoint import export, hf
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import create_model
from qzhou_jax.sharding import make_mesh

cfg = ModelConfig.preset("tiny", compute_dtype="float32")
params = create_model(cfg, seed=0, mesh=make_mesh({"data": 1, "fsdp": -1, "tensor": 1})).encoder.params()
fail = sys.argv[2] == "fail"
if fail and jax.process_index() == 0:  # host memory runs out converting the third tensor, on process 0 only
    real, seen = hf.to_hf_layout, []
    def failing(spec, host):
        seen.append(1)
        if len(seen) == 3:
            raise MemoryError("host memory exhausted")
        return real(spec, host)
    hf.to_hf_layout = failing
try:
    if fail:
        export.save_hf(params, cfg, sys.argv[1])
    else:
        export.save_hf(params, cfg, sys.argv[1], dtype="bfloat16", max_seq_length=64, query_instruction="Find it")
    print("EXPORTED", flush=True)
except ValueError as e:
    print("FAILED", e, flush=True)
"""


def _export_from_two_processes(tmp_path, out, mode):
    script = tmp_path / "export.py"
    script.write_text(_EXPORT_SCRIPT)
    port, procs = free_port(), []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_PROCESS_ID": str(i),
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return _finish(procs, timeout=300)


def test_an_export_from_two_processes_keeps_its_settings(tmp_path):
    """save_hf's dtype and sentence-transformers settings hold when every process gathers and
    process 0 writes."""
    from qzhou_jax.checkpoint.safetensors_io import TensorStore

    outs = _export_from_two_processes(tmp_path, tmp_path / "hf", "ok")
    assert all("EXPORTED" in out for out in outs), outs[1][-2000:]
    store = TensorStore(str(tmp_path / "hf"))
    assert {str(store.dtype(n)) for n in store.names()} == {"bfloat16"}
    assert json.loads((tmp_path / "hf" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    prompts = json.loads((tmp_path / "hf" / "config_sentence_transformers.json").read_text())["prompts"]
    assert "Find it" in prompts["query"]


def test_an_export_failing_on_process_0_stops_every_process(tmp_path):
    """save_hf with two processes: process 0 fails converting a tensor after its gather; it still
    takes part in the remaining gathers, so both processes report the failure instead of one
    waiting in a collective for ever, and no folder is left behind."""
    outs = _export_from_two_processes(tmp_path, tmp_path / "hf", "fail")
    assert "FAILED" in outs[0] and "MemoryError: host memory exhausted" in outs[0], outs[0][-2000:]
    assert "FAILED" in outs[1] and "the export failed on process 0" in outs[1], outs[1][-2000:]
    assert not os.path.exists(tmp_path / "hf") and [p for p in os.listdir(tmp_path) if ".qzhou-tmp-" in p] == []
