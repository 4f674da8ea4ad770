"""launch/slurm_gpu.sbatch's process layout and requeueing, and launch/local.sh's stops and
status, with stub commands (no Slurm, no GPU).

A Python `srun` stub runs the step's tasks the way Slurm lays them out over several nodes:
per task SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID, the step's SLURM_STEP_TASKS_PER_NODE
("8(x2)", "8,4"), SLURM_STEP_GPUS (the step's GPUs on the node) and CUDA_VISIBLE_DEVICES as
the GPU binding gives it (none: every task sees all of the node's GPUs; single: one each;
per_task:K: K each; closest: the GPUs of the task's socket).
"""
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")

SRUN = r'''
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
counts = [int(c) for c in os.environ["STUB_TASKS_PER_NODE"].split(",")]   # tasks on each node
gpus = int(os.environ.get("STUB_GPUS_PER_NODE", "8"))
bind = os.environ.get("STUB_BIND", "none")

def compress(xs):
    out, i = [], 0
    while i < len(xs):
        j = i
        while j < len(xs) and xs[j] == xs[i]:
            j += 1
        out.append(f"{xs[i]}(x{j - i})" if j - i > 1 else str(xs[i]))
        i = j
    return ",".join(out)

procs, rank = [], 0
for node, n in enumerate(counts):
    for local in range(n):
        if bind == "none":
            cvd = list(range(gpus))
        elif bind == "single":
            cvd = [local]
        elif bind.startswith("per_task:"):
            k = int(bind.split(":")[1])
            cvd = list(range(local * k, local * k + k))
        elif bind == "closest":   # two sockets, tasks block-distributed over them
            half = gpus // 2
            cvd = list(range(half)) if local < n // 2 else list(range(half, gpus))
        elif bind == "unbound":   # no GPU gres binding: no CUDA_VISIBLE_DEVICES, no SLURM_STEP_GPUS
            cvd = None
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                   SLURM_STEP_TASKS_PER_NODE=compress(counts), SLURM_TASKS_PER_NODE=compress(counts),
                   SLURM_STEP_NUM_TASKS=str(sum(counts)))
        if cvd is not None:
            env.update(SLURM_STEP_GPUS=",".join(map(str, range(gpus))), CUDA_VISIBLE_DEVICES=",".join(map(str, cvd)))
        procs.append(subprocess.Popen(args, env=env))
        rank += 1
rc = 0
for p in procs:
    rc = max(rc, p.wait() & 255)
sys.exit(rc)
'''

TRAINER = r'''#!/usr/bin/env bash
line="$(printf 'id=%s node=%s cvd=%s local=%s args=' "$JAX_PROCESS_ID" "$SLURM_NODEID" "$CUDA_VISIBLE_DEVICES" \
  "$JAX_LOCAL_DEVICE_IDS"; printf '%q ' "$@")"
echo "$line" >> "$STUB_LOG"   # one write: the tasks run at once
if [[ -n "${STUB_STEP:-}" && "$JAX_PROCESS_ID" == 0 ]]; then echo "$STUB_STEP" > "$QZ_PREEMPTED_MARKER"; fi
[[ "$JAX_PROCESS_ID" == 0 ]] && exit "${STUB_RC:-0}"; exit 0
'''

SCONTROL = r'''#!/usr/bin/env bash
if [[ $1 == show ]]; then printf "nodeA\nnodeB\nnodeC\n"; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
if [[ $1 == requeue && -n "${STUB_REQUEUE_FAILS:-}" ]]; then
  n=$(cat "$STUB_LOG.fails" 2>/dev/null || echo 0)
  if (( n < STUB_REQUEUE_FAILS )); then
    echo $((n + 1)) > "$STUB_LOG.fails"
    echo "slurm_requeue error: Socket timed out on send/recv operation" >&2; exit 1
  fi
fi
echo "requeued" >> "$STUB_LOG"
'''

# `nvidia-smi -L`: 8 GPUs; with STUB_MIG, GPU 0 split into MIG instances listed under it
NVIDIA_SMI = r'''#!/usr/bin/env bash
for i in 0 1 2 3 4 5 6 7; do
  echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"
  if [[ $i == 0 && -n "${STUB_MIG:-}" ]]; then
    for m in 0 1 2; do echo "  MIG 2g.20gb     Device  $m: (UUID: MIG-$i-$m)"; done
  fi
done
'''


def _stubs(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in {"srun": f"#!{sys.executable}" + SRUN, "qzhou-jax": TRAINER, "scontrol": SCONTROL,
                       "nvidia-smi": NVIDIA_SMI,
                       "sleep": f"#!/bin/sh\nexec {shutil.which('sleep')} 0.05\n"}.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(stat.S_IRWXU)
    return bin_


def _run(tmp_path, tasks_per_node, ntasks_per_node_requested, bind="none", extra=None, args=("--config", "c.yaml")):
    bin_ = _stubs(tmp_path)
    log = tmp_path / "calls.log"
    if log.exists():
        log.unlink()
    counts = [int(c) for c in tasks_per_node.split(",")]
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "node[A-C]", "SLURM_NTASKS": str(sum(counts)),
           "SLURM_NTASKS_PER_NODE": str(ntasks_per_node_requested), "SLURM_JOB_NUM_NODES": str(len(counts)),
           "STUB_TASKS_PER_NODE": tasks_per_node, "STUB_BIND": bind, "TMPDIR": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_RESTART_COUNT", "QZ_REQUEUE"):
        env.pop(k, None)
    env.update(extra or {})
    r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *args], capture_output=True, text=True, env=env,
                       timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    return r, lines


def _driven(lines):
    """(node, process id) -> physical GPUs the process would drive; raises on an id its CUDA_VISIBLE_DEVICES lacks."""
    out = {}
    for line in lines:
        if not line.startswith("id="):
            continue
        f = dict(kv.split("=", 1) for kv in line.split(" ")[:4])
        cvd = f["cvd"].split(",")
        ids = [int(i) for i in f["local"].split(",") if i != ""]
        bad = [i for i in ids if i >= len(cvd)]
        assert not bad, f"process {f['id']} on node {f['node']} gets JAX_LOCAL_DEVICE_IDS={f['local']} but sees only " \
                        f"CUDA_VISIBLE_DEVICES={f['cvd']}: JAX fails at initialize (no such device)"
        out[(int(f["node"]), int(f["id"]))] = [int(cvd[i]) for i in ids]
    return out


def _check_layout(lines, counts, gpus=8):
    driven = _driven(lines)
    for node, n in enumerate(counts):
        mine = {pid: g for (nd, pid), g in driven.items() if nd == node}
        flat = [g for gs in mine.values() for g in gs]
        assert len(flat) == len(set(flat)), f"node {node}: two processes drive the same GPU: {mine}"
        if n == 1:
            assert sorted(flat) == list(range(gpus)), \
                f"node {node}: its only process drives GPUs {flat} of the {gpus} allocated"


# ---------------------------------------------------------------- process layout


@pytest.mark.parametrize("layout, requested, bind", [
    ("8,8", 8, "none"),        # the documented default: one process per GPU, every task sees all 8
    ("8,8", 8, "single"),      # --gpus-per-task=1 / --gpu-bind=single:1
    ("1,1", 1, "none"),        # the documented one-process-per-node form
])
def test_documented_layouts_are_right(tmp_path, layout, requested, bind):
    r, lines = _run(tmp_path, layout, requested, bind)
    assert r.returncode == 0, r.stderr
    _check_layout(lines, [int(c) for c in layout.split(",")])


def test_one_task_per_node_via_ntasks_drives_all_gpus(tmp_path):
    """`sbatch --nodes=2 --ntasks=2 launch/slurm_gpu.sbatch ...`: the header's --ntasks-per-node=8 stays
    in SLURM_NTASKS_PER_NODE (--ntasks makes it a maximum) while Slurm starts one task per node: the
    layout follows the tasks the step runs on the node, so each process drives all 8 GPUs (read from
    the requested 8, each drove SLURM_LOCALID's one GPU: 2 of 16 trained)."""
    r, lines = _run(tmp_path, "1,1", 8, "none")
    assert r.returncode == 0, r.stderr
    _check_layout(lines, [1, 1])


def test_several_gpus_bound_per_task(tmp_path):
    """--ntasks-per-node=4 --gpus-per-task=2 (Slurm binds 2 GPUs to each task): each process drives
    both of its own GPUs (SLURM_LOCALID 2 and 3 would index past them)."""
    r, lines = _run(tmp_path, "4,4", 4, "per_task:2")
    assert r.returncode == 0, r.stderr
    _check_layout(lines, [4, 4])
    driven = _driven(lines)
    assert all(len(g) == 2 for g in driven.values()), driven


def test_gpu_bind_closest_is_refused_or_right(tmp_path):
    """--gpu-bind=closest: a task sees its socket's 4 GPUs, shared with 3 other tasks (SLURM_LOCALID
    4..7 index past them): every process gets a distinct GPU it sees, or the job stops with a message."""
    r, lines = _run(tmp_path, "8", 8, "closest")
    if r.returncode != 0 and not lines:
        assert "GPU" in r.stderr, r.stderr
        return
    _check_layout(lines, [8])


def test_gpus_counted_from_nvidia_smi_without_a_binding(tmp_path):
    """No GPU binding (no CUDA_VISIBLE_DEVICES): the node's GPUs are the `GPU n:` lines of
    `nvidia-smi -L`; the MIG instances listed under a GPU are not more GPUs."""
    for mig in ("", "1"):
        r, lines = _run(tmp_path, "1,1", 1, "unbound", extra={"STUB_MIG": mig})
        assert r.returncode == 0, r.stderr
        local = sorted(ln.split(" ")[3] for ln in lines if ln.startswith("id="))
        assert local == ["local=0,1,2,3,4,5,6,7"] * 2, (mig, lines)


def test_train_arguments_survive_quoting(tmp_path):
    args = ("--config", "my configs/c.yaml", "--set", 'name=a b "q" $HOME `x` *', "--set", "x=it's")
    r, lines = _run(tmp_path, "1", 1, "none", args=args)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in lines if ln.startswith("id=0")][0]
    logged = line.split("args=", 1)[1]
    expected = " ".join(subprocess.run(["bash", "-c", 'printf "%q " "$@"', "_", "train", *args],
                                       capture_output=True, text=True).stdout.split(" "))
    assert logged.strip() == expected.strip()


# ---------------------------------------------------------------- requeue


def test_requeue_and_resume_once(tmp_path):
    r, lines = _run(tmp_path, "2", 2, "single", extra={"STUB_RC": "137", "STUB_STEP": "500"})
    assert r.returncode == 0 and "requeued" in lines, (r.stderr, lines)
    r, lines = _run(tmp_path, "2", 2, "single", extra={"SLURM_RESTART_COUNT": "1"},
                    args=("--config", "c.yaml", "--resume"))
    assert all(ln.count("--resume") == 1 for ln in lines if ln.startswith("id="))


def test_no_endless_requeue_without_progress(tmp_path):
    """`sbatch --time=00:05:00 ...` (a smoke test) or a start-up longer than the time limit less 300 s:
    SIGTERM comes before the first step every time and the trainer exits 75 at the same step; after
    QZ_MAX_STALLED_REQUEUES (3) requeues in a row without a new step the job is not requeued again."""
    outcomes = []
    for restart in range(6):
        extra = {"STUB_RC": "75", "STUB_STEP": "0"}
        if restart:
            extra["SLURM_RESTART_COUNT"] = str(restart)
        r, lines = _run(tmp_path, "2", 2, "single", extra=extra)
        outcomes.append("requeued" in lines)
        if not outcomes[-1]:
            break
    # the first run reached step 0 (progress); three more ended there: not requeued after the third
    assert outcomes == [True, True, True, False], outcomes
    assert "3 requeues in a row reached no step past 0; not requeueing" in r.stderr and r.returncode == 75
    # a run that gets further starts the count again
    r, lines = _run(tmp_path, "2", 2, "single", extra={"STUB_RC": "75", "STUB_STEP": "40", "SLURM_RESTART_COUNT": "5"})
    assert "requeued" in lines, r.stderr


def test_a_failed_requeue_request_is_retried(tmp_path):
    """`scontrol requeue` is one RPC to slurmctld; a busy controller answers 'Socket timed out': it is
    tried again, or a week-long chain ends with the checkpoint written but no job to resume it."""
    r, lines = _run(tmp_path, "2", 2, "single",
                    extra={"STUB_RC": "75", "STUB_STEP": "500", "STUB_REQUEUE_FAILS": "1"})
    assert "requeued" in lines, (r.returncode, r.stderr)


# ---------------------------------------------------------------- local.sh


def test_local_second_ctrl_c_stops_a_stuck_process(tmp_path):
    """Ctrl-C: process 0 stops (130); process 1 does not (blocked in a collective with the process that
    left, or waiting for a save). A second Ctrl-C stops it (SIGTERM, then SIGKILL after the grace)."""
    worker = tmp_path / "w.py"
    worker.write_text(
        "import os, signal, sys, time\n"
        "i = int(os.environ['JAX_PROCESS_ID'])\n"
        "if i == 1:\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "open(os.path.join(sys.argv[1], f'started_{i}'), 'w').close()\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "-n", "2", "--logs", str(tmp_path / "logs"),
                             "--exec", "--", sys.executable, str(worker), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "LOCAL_SH_GRACE": "1"})
    deadline = time.time() + 30
    while not all((tmp_path / f"started_{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)  # the user presses Ctrl-C again
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("local.sh still running 10 s after a second Ctrl-C")
    assert proc.returncode == 130


def test_local_status_is_the_crash_not_the_lost_peer(tmp_path):
    """Process 1 crashes (3); process 0 notices at once and exits 69 (lost a peer). When both have
    ended by the same 0.2 s poll, the launcher reports the crash, not the 69 of process 0, which a
    wrapper that reruns on 69 (as tpu_pod.sh does) would take for a reason to rerun."""
    worker = tmp_path / "w.py"
    worker.write_text(
        "import os, sys, time\n"
        "i, d = int(os.environ['JAX_PROCESS_ID']), sys.argv[1]\n"
        "if i == 1:\n"
        "    time.sleep(1.0); open(os.path.join(d, 'crashed'), 'w').close(); sys.exit(3)\n"
        "while not os.path.exists(os.path.join(d, 'crashed')):\n"
        "    time.sleep(0.005)\n"
        "time.sleep(0.02)\n"
        "sys.exit(69)\n")
    for k in range(3):
        d = tmp_path / f"run{k}"
        d.mkdir()
        r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "-n", "2", "--logs", str(d / "logs"), "--exec", "--",
                            sys.executable, str(worker), str(d)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 3, r.stderr
