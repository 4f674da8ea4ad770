"""launch/tpu_pod.sh for real against a fake `gcloud`: a slice of two workers whose "VMs" are
folders on this machine. The fake keeps the slice's state (absent, READY, PREEMPTED) in a file,
copies `scp`'d files into each worker's home and runs `ssh` commands there with bash, so the
launcher's own setup, start and follow scripts run as they would on the workers. The workers'
`python3 -m venv` makes a stub venv whose `qzhou-jax` exits with the statuses a test scripts.
`sleep` is shortened so the launcher's polling loops take a fraction of a second.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import sys

import pytest

LAUNCHER = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tpu_pod.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")
WORKERS = 2

FAKE_GCLOUD = """\
import json, os, pathlib, shutil, subprocess, sys

root = pathlib.Path(os.environ["FAKE_TPU"])
state_file = root / "state.json"
state = json.loads(state_file.read_text()) if state_file.exists() else {"node": "NONE", "queued": "NONE"}
args = sys.argv[1:]
with open(root / "calls.log", "a") as f:
    f.write(json.dumps(args) + "\\n")
assert args[:2] == ["compute", "tpus"], args
kind, verb, name = args[2], args[3], args[4]


def opt(flag):
    return args[args.index(flag) + 1]


def homes(which="all"):
    ids = range(WORKERS) if which == "all" else [int(which)]
    return [(i, root / f"worker{i}") for i in ids]


def save():
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file)


def wipe():  # a deleted VM takes its disk with it
    for _, home in homes():
        shutil.rmtree(home, ignore_errors=True)


def take_failure(what):  # the next call of this kind fails while "<what>_failures" counts down
    path = root / f"{what}_failures"
    if what == "ssh" and "qzhou-follow" in opt("--command"):
        return False
    if not path.exists() or int(path.read_text()) <= 0:
        return False
    path.write_text(str(int(path.read_text()) - 1))
    return True


lag = root / "preempt_after"  # the slice is preempted, and the API shows it, only this many calls later
if lag.exists():
    left = int(lag.read_text()) - 1
    if left <= 0:
        lag.unlink()
        state.update(node="PREEMPTED", queued="SUSPENDED" if state["queued"] != "NONE" else "NONE")
        save()
    else:
        lag.write_text(str(left))
if (kind == "queued-resources" and verb == "describe" and state["queued"] in ("WAITING_FOR_RESOURCES", "ACCEPTED", "PROVISIONING")
        and (root / "ready_after").exists()):  # a queued request that gets its capacity after this many describes
    left = int((root / "ready_after").read_text()) - 1
    (root / "ready_after").write_text(str(left))
    if left <= 0:
        for _, home in homes():
            home.mkdir(exist_ok=True)
        state.update(node="READY", queued="ACTIVE")
        save()
if (kind == "tpu-vm" and verb == "describe" and state["node"] in ("REPAIRING", "RESTARTING")
        and (root / "settle_after").exists()):  # a maintenance event that ends after this many describes
    left = int((root / "settle_after").read_text()) - 1
    (root / "settle_after").write_text(str(left))
    if left <= 0:
        state.update(node="READY")
        save()
if verb == "create" and take_failure("create"):
    print(f"ERROR: (gcloud.compute.tpus.{kind}.create) RESOURCE_EXHAUSTED: There is no more capacity in the zone",
          file=sys.stderr)
    sys.exit(1)
if verb == "describe" and take_failure("describe"):
    print(f"ERROR: (gcloud.compute.tpus.{kind}.describe) There was a problem refreshing your current auth "
          "tokens: ('Connection aborted.', RemoteDisconnected('Remote end closed connection'))", file=sys.stderr)
    sys.exit(1)
if verb == "describe":
    current = state["node"] if kind == "tpu-vm" else state["queued"]
    if current == "NONE":
        sys.exit(f"ERROR: (gcloud) NOT_FOUND: {name}")
    fmt = next(a for a in args if a.startswith("--format="))
    print("10.0.0.2" if "ipAddress" in fmt else current)
elif verb == "create":
    for _, home in homes():
        home.mkdir()
    state.update(node="READY", queued="ACTIVE" if kind == "queued-resources" else "NONE")
    save()
elif verb == "delete":
    wipe()
    state.update(node="NONE", queued="NONE")
    save()
elif verb in ("scp", "ssh") and take_failure(verb):  # a VM just created, a network blip
    print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) [/usr/bin/{verb}] exited with return code [255].",
          file=sys.stderr)
    sys.exit(255 if verb == "ssh" else 1)
elif verb in ("scp", "ssh") and state["node"] != "READY":
    print("ssh: connect to host 10.0.0.2 port 22: Connection refused", file=sys.stderr)
    sys.exit(255 if verb == "ssh" else 1)
elif verb == "scp":
    dest = next(i for i, a in enumerate(args) if a.endswith(":"))
    for _, home in homes(opt("--worker")):
        for src in args[4:dest]:
            shutil.copy(src, home)
elif verb == "ssh":
    if "qzhou-follow" in opt("--command"):
        if (root / "drop_next_follow").exists():  # the log stream's connection drops (and the API, for a while)
            (root / "describe_failures").write_text((root / "drop_next_follow").read_text() or "0")
            (root / "drop_next_follow").unlink()
            print("Connection to 10.0.0.2 closed by remote host.", file=sys.stderr)
            sys.exit(255)
        (root / "release").touch()  # lets a waiting trainer finish
    rc = 0
    for i, home in homes(opt("--worker")):
        env = {**os.environ, "HOME": str(home), "FAKE_WORKER": str(i)}
        rc = subprocess.run(["bash", "-c", opt("--command")], cwd=home, env=env).returncode or rc
    sys.exit(rc)
else:
    sys.exit(f"fake gcloud: unexpected {args}")
"""

# `python3 -m venv DIR` on a worker: a venv of stubs (pip logs, python reports a jax version).
FAKE_PYTHON = """\
import os, pathlib, stat, sys

assert sys.argv[1:3] == ["-m", "venv"], sys.argv
bin_dir = pathlib.Path(sys.argv[3]) / "bin"
bin_dir.mkdir(parents=True)
stubs = {
    "python": "print('0.10.2')",
    "pip": "import json, os, pathlib, sys\\n"
           "root = pathlib.Path(os.environ['FAKE_TPU'])\\n"
           "with open(root / 'pip.log', 'a') as f:\\n"
           "    f.write(json.dumps([os.environ['FAKE_WORKER'], sys.argv[1:]]) + '\\\\n')\\n"
           "sys.exit((root / 'pip_fails').exists())",
    "qzhou-jax": open(os.environ["FAKE_TRAINER"]).read(),
}
for name, body in stubs.items():
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\\n{body}\\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
"""

# The trainer on a worker: logs its arguments and exits as plan.json says for its n-th run;
# "preempt" takes the slice away (the VM is stopped under it) and exits as SIGTERM would.
FAKE_TRAINER = """\
import json, os, pathlib, sys

root = pathlib.Path(os.environ["FAKE_TPU"])
worker = int(os.environ["FAKE_WORKER"])
import signal, time
log = root / f"trainer{worker}.log"
n = len(log.read_text().splitlines()) if log.exists() else 0
with open(log, "a") as f:
    f.write(json.dumps({"args": sys.argv[1:], "cwd": os.getcwd(), "t": time.time(),
                        "coordinator": os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        "data": os.environ.get("QZHOU_DATA")}) + "\\n")
action = json.loads((root / "plan.json").read_text())[worker][n]
print(f"worker {worker} run {n + 1}: {action}", flush=True)
lock = root / f"tpu{worker}.pid"  # one process at a time on a worker's TPU (/dev/vfio/0 busy)
if lock.exists():
    try:
        os.kill(int(lock.read_text()), 0)
        print(f"RuntimeError: TPU initialization failed: open(/dev/vfio/0): Device or resource busy "
              f"(process {lock.read_text()})", flush=True)
        sys.exit(1)
    except ProcessLookupError:
        pass
lock.write_text(str(os.getpid()))
if action == "wait":  # runs until a log stream is attached
    import time
    deadline = time.time() + 60
    while not (root / "release").exists() and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0)
if action.startswith("lagging-preempt:"):  # lagging-preempt:K:RC: exits RC; the API shows PREEMPTED K calls later
    _, k, rc = action.split(":")
    deadline = time.time() + 60  # exits once the log stream is attached (counts the calls after it)
    while not (root / "release").exists() and time.time() < deadline:
        time.sleep(0.05)
    (root / "preempt_after").write_text(k)
    sys.exit(int(rc))
if action.startswith("until-term:"):  # runs until SIGTERM, then saves for S seconds and exits 75
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(float(action.split(":")[1]))
    (root / f"ended{worker}_{n}").write_text(str(time.time()))
    sys.exit(75)
if action.startswith("sleep:"):
    time.sleep(float(action.split(":")[1]))
    sys.exit(0)
if action == "repair":  # a maintenance event: the slice is REPAIRING (then READY again), the run is gone
    state = json.loads((root / "state.json").read_text())
    state.update(node="REPAIRING")
    (root / "state.tmp").write_text(json.dumps(state))
    os.replace(root / "state.tmp", root / "state.json")
    action = "vanish"
if action == "vanish":  # the VM reboots under the run: its processes are gone, no exit status is written
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
if action == "edit-then-preempt":  # the user edits the config in their checkout during the run
    with open(os.environ["FAKE_TREE_CONFIG"], "a") as f:
        f.write("# edited during the run\\n")
    action = "preempt"
if action == "preempt":
    state = json.loads((root / "state.json").read_text())
    state.update(node="PREEMPTED", queued="SUSPENDED" if state["queued"] != "NONE" else "NONE")
    (root / "state.tmp").write_text(json.dumps(state))
    os.replace(root / "state.tmp", root / "state.json")
    sys.exit(143)
sys.exit(int(action))
"""


@pytest.fixture
def fake_slice(tmp_path):
    root = tmp_path / "tpu"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def script(name, body):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(0o755)
        return path

    script("gcloud", f"#!{sys.executable}\nWORKERS = {WORKERS}\n" + FAKE_GCLOUD)
    python = script("fake-python3", f"#!{sys.executable}\n" + FAKE_PYTHON)
    script("sleep", f"#!/bin/sh\nexec {shutil.which('sleep')} 0.1\n")
    (root / "trainer.py").write_text(FAKE_TRAINER)
    env = {**os.environ, "FAKE_TPU": str(root), "FAKE_TRAINER": str(root / "trainer.py"), "TMPDIR": str(tmp_path),
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    for var in ("QZ_TPU_NAME", "QZ_TPU_ZONE", "QZ_TPU_PROJECT", "QZ_TPU_TYPE", "QZ_KEEP_WORK"):
        env.pop(var, None)

    class Slice:
        def start(self, *args, plan=None, gcloud_tries=3, launcher=LAUNCHER, extra_env=None):
            if plan is not None:
                (root / "plan.json").write_text(json.dumps(plan))
            return subprocess.Popen(["bash", str(launcher), *args, "--name", "qz", "--zone", "us-east5-a"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    env={**env, "QZ_GCLOUD_TRIES": str(gcloud_tries), **(extra_env or {})})

        def launch(self, *args, timeout=120, **kw):
            p = self.start(*args, **kw)
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:  # the launcher and what it runs here (the log stream)
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
                return subprocess.CompletedProcess(p.args, "timed out", out, err)
            return subprocess.CompletedProcess(p.args, p.returncode, out, err)

        def run(self, plan, *extra, **kw):
            return self.launch("run", "--type", "v5e-32", "--python", str(python), "--config",
                               "configs/stage1-qwen2.5-7b.yaml", "--set", "out_dir=/mnt/runs/s1",
                               "--env", "QZHOU_DATA=/mnt/my data", "--skip-config-check", *extra, plan=plan, **kw)

        def drop_next_follow(self, describe_failures=0):
            (root / "drop_next_follow").write_text(str(describe_failures))

        def fail_next(self, what, n):  # describe, scp or ssh (not the log stream's)
            (root / f"{what}_failures").write_text(str(n))

        def trainer_runs(self, worker):
            log = root / f"trainer{worker}.log"
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        def calls(self, *words):
            rows = [json.loads(line) for line in (root / "calls.log").read_text().splitlines()]
            return [r for r in rows if all(w in r for w in words)]

        def installs(self):
            rows = [json.loads(line) for line in (root / "pip.log").read_text().splitlines()]
            return [r for r in rows if "-e" in r[1]]

        def state(self):
            return json.loads((root / "state.json").read_text())

        home = staticmethod(lambda worker: root / f"worker{worker}")
        root_dir = root
        fake_python = str(python)
        env_vars = env

    return Slice()


def test_run_resumes_after_a_saved_preemption_a_lost_slice_and_a_lost_peer(fake_slice):
    """75 (checkpoint saved) and 69 (a peer died) restart on the same slice without reinstalling;
    a preempted slice is deleted, created again, reinstalled; every restart passes --resume."""
    plan = [["75", "preempt", "69", "0"], ["75", "143", "69", "0"]]
    r = fake_slice.run(plan)
    assert r.returncode == 0, r.stderr
    assert "training finished" in r.stderr
    for i in range(WORKERS):
        runs = fake_slice.trainer_runs(i)
        assert len(runs) == 4, runs
        expected = ["train", "--config", "configs/stage1-qwen2.5-7b.yaml", "--set", "out_dir=/mnt/runs/s1"]
        assert [run["args"] for run in runs] == [expected] + [expected + ["--resume"]] * 3
        assert all(run["coordinator"] == "10.0.0.2:8476" and run["data"] == "/mnt/my data" for run in runs)
        assert all(run["cwd"] == str(fake_slice.home(i) / "qzhou-jax") for run in runs)
        # the tree that was shipped and unpacked is this one
        assert (fake_slice.home(i) / "qzhou-jax" / "launch" / "tpu_pod.sh").read_bytes() == LAUNCHER.read_bytes()
    # worker 0's log reached the launcher's output, run by run (not the preempted one's: its VM is gone)
    for n, action in enumerate(plan[0], 1):
        assert (f"worker 0 run {n}: {action}" in r.stdout) == (action != "preempt"), r.stdout
    assert "slice PREEMPTED" in r.stderr and "deleting it to create it again" in r.stderr
    assert "restart 1 of 10" in r.stderr and "restart 3 of 10" in r.stderr
    # one slice created at the start and one after the preemption; installed on each, not on the other restarts
    assert len(fake_slice.calls("queued-resources", "create")) == 2
    assert len(fake_slice.calls("queued-resources", "delete")) == 1
    assert sorted(w for w, _ in fake_slice.installs()) == ["0", "0", "1", "1"]
    assert fake_slice.state() == {"node": "READY", "queued": "ACTIVE"}


def test_run_gives_up_after_max_restarts_and_does_not_restart_a_failure(fake_slice):
    r = fake_slice.run([["75", "75"], ["75", "75"]], "--max-restarts", "1")
    assert r.returncode == 75, r.stderr
    assert "preempted again after 1 restarts in a row; giving up" in r.stderr
    assert len(fake_slice.trainer_runs(0)) == 2

    # a new `run` on the READY slice reuses it and installs the tree again: files gone from the
    # tree go, a relative out_dir's runs/ stays
    tree = fake_slice.home(0) / "qzhou-jax"
    (tree / "runs" / "s1").mkdir(parents=True)
    (tree / "runs" / "s1" / "metrics.jsonl").write_text("{}\n")
    (tree / "removed_module.py").write_text("")
    r = fake_slice.run([["75", "75", "1"], ["75", "75", "1"]])
    assert r.returncode == 1, r.stderr
    assert (tree / "runs" / "s1" / "metrics.jsonl").read_text() == "{}\n"
    assert not (tree / "removed_module.py").exists() and (tree / "qzhou_jax" / "cli.py").is_file()
    assert "training failed with status 1" in r.stderr and "restart" not in r.stderr
    assert fake_slice.trainer_runs(0)[-1]["args"][-1] != "--resume"
    assert len(fake_slice.installs()) == 2 * WORKERS  # the first run's setup, and this run's (attempt 0)
    assert len(fake_slice.calls("queued-resources", "create")) == 1

    r = fake_slice.launch("status")
    assert r.returncode == 0 and r.stdout == "slice: READY\nqueued resource: ACTIVE\n"
    r = fake_slice.launch("down")
    assert r.returncode == 0 and fake_slice.state() == {"node": "NONE", "queued": "NONE"}
    assert not fake_slice.home(0).exists()


def test_a_spot_slice_is_created_again_after_a_preemption(fake_slice):
    r = fake_slice.run([["preempt", "0"], ["143", "0"]], "--provisioning", "spot")
    assert r.returncode == 0, r.stderr
    assert [c[:4] for c in fake_slice.calls("create")] == [["compute", "tpus", "tpu-vm", "create"]] * 2
    assert "--spot" in fake_slice.calls("create")[0]
    assert len(fake_slice.calls("tpu-vm", "delete")) == 1 and not fake_slice.calls("queued-resources", "delete")
    assert [run["args"][-1] for run in fake_slice.trainer_runs(1)] == ["out_dir=/mnt/runs/s1", "--resume"]
    assert fake_slice.state() == {"node": "READY", "queued": "NONE"}


def test_logs_reattaches_to_a_running_job_and_returns_its_status(fake_slice):
    r = fake_slice.run([["0"], ["0"]])
    assert r.returncode == 0, r.stderr
    home = fake_slice.home(0)
    (home / "qzhou-run" / "exit_code").write_text("75\n")
    r = fake_slice.launch("logs")
    assert r.returncode == 75 and "worker 0 run 1: 0" in r.stdout, (r.stdout, r.stderr)


def test_a_dropped_log_stream_reconnects_and_the_run_status_is_the_trainers(fake_slice):
    """The connection that streams worker 0's log drops: while the run goes on, the launcher
    attaches again; when the run ended meanwhile, its exit status (not ssh's 255) decides."""
    fake_slice.drop_next_follow()
    r = fake_slice.run([["wait"], ["wait"]])
    assert r.returncode == 0, r.stderr
    assert "lost the log stream (status 255); the run goes on, reconnecting" in r.stderr
    assert r.stdout.count("worker 0 run 1: wait") == 1 and len(fake_slice.trainer_runs(0)) == 1
    assert any(c[-1] == "bash ~/qzhou-follow.sh 20" for c in fake_slice.calls("ssh"))

    fake_slice.drop_next_follow()
    r = fake_slice.run([["wait", "75", "0"], ["wait", "75", "0"]])
    assert r.returncode == 0, r.stderr
    assert "restart 1 of 10" in r.stderr and "training failed" not in r.stderr
    assert [run["args"][-1] for run in fake_slice.trainer_runs(0)[1:]] == ["out_dir=/mnt/runs/s1", "--resume"]


def test_gcloud_errors_are_retried_and_an_unreadable_state_is_never_a_preemption(fake_slice):
    """describe failing for another reason than NOT_FOUND (an expired token, an API outage) is
    retried; while it cannot be read, nothing is created or deleted, and a healthy run whose log
    stream dropped meanwhile is followed again, not restarted."""
    fake_slice.fail_next("describe", 2)
    r = fake_slice.run([["wait"], ["wait"]])
    assert r.returncode == 0, r.stderr
    assert "describe qz failed (try 2 of 3), retrying in 30 s" in r.stderr

    fake_slice.drop_next_follow(describe_failures=3)  # a whole round of describes fails
    r = fake_slice.run([["wait", "wait"], ["wait", "wait"]])
    assert r.returncode == 0, r.stderr
    assert "lost the log stream (status 255) and could not read the slice's state; trying again" in r.stderr
    assert "restart" not in r.stderr and len(fake_slice.trainer_runs(0)) == 2

    fake_slice.fail_next("describe", 100)
    for command, words in (("run", "could not read the state of slice qz; nothing was created or deleted"),
                           ("down", "could not read the state of qz; nothing was deleted")):
        r = fake_slice.run([[], []]) if command == "run" else fake_slice.launch("down")
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert "failed 3 times: ERROR: (gcloud.compute.tpus." in r.stderr
    assert not fake_slice.calls("delete") and len(fake_slice.calls("create")) == 1
    assert fake_slice.state() == {"node": "READY", "queued": "ACTIVE"}


def test_copies_and_ssh_connections_are_retried_and_a_failing_setup_is_not(fake_slice):
    """A freshly created VM refuses ssh for a while: copies and connections (status 255) are
    tried again; a command that fails on a worker (here pip) stops the launcher at once."""
    fake_slice.fail_next("scp", 2)
    fake_slice.fail_next("ssh", 2)
    r = fake_slice.run([["0"], ["0"]])
    assert r.returncode == 0, r.stderr
    assert "copying to the workers failed with status 1 (try 2 of 3), retrying in 30 s" in r.stderr
    assert "ssh to the workers failed with status 255 (try 2 of 3), retrying in 30 s" in r.stderr
    assert len(fake_slice.trainer_runs(0)) == 1

    fake_slice.fail_next("ssh", 1)
    (fake_slice.home(0).parent / "pip_fails").touch()
    r = fake_slice.run([["0", "0"], ["0", "0"]])
    assert r.returncode == 2 and "setup on the workers of qz failed" in r.stderr, r.stderr
    assert r.stderr.count("retrying in 30 s") == 1 and len(fake_slice.trainer_runs(0)) == 1

    fake_slice.fail_next("scp", 3)
    r = fake_slice.run([["0", "0"], ["0", "0"]])
    assert r.returncode == 2 and "could not copy the tree to the workers of qz" in r.stderr, r.stderr


# ------------------------------------------- restarts around other events of a long run
def _write_state(fake_slice, **state):
    (fake_slice.root_dir / "state.json").write_text(json.dumps(state))


def test_a_waiting_queued_request_is_waited_for_not_deleted(fake_slice):
    """The user's first `run` waited hours in the queue (WAITING_FOR_RESOURCES) and was stopped
    (laptop closed, Ctrl-C); `run` again waits for that request rather than delete it and queue anew."""
    _write_state(fake_slice, node="NONE", queued="WAITING_FOR_RESOURCES")
    (fake_slice.root_dir / "ready_after").write_text("3")
    r = fake_slice.run([["0"], ["0"]])
    assert r.returncode == 0, r.stderr
    assert not fake_slice.calls("delete"), r.stderr
    assert not fake_slice.calls("create"), r.stderr


def test_a_preemption_the_api_shows_late_is_still_a_preemption(fake_slice):
    """SIGTERM before the trainer's handler is installed (imports, jax.distributed.initialize) or
    with checkpoint.save_on_preemption: false ends the trainer with 143 while the TPU API still says
    READY for a few more seconds: the launcher waits a while for the state before it calls the
    exit a failure."""
    r = fake_slice.run([["lagging-preempt:3:143", "0"], ["143", "0"]])
    assert "training failed with status 143" not in r.stderr, r.stderr
    assert r.returncode == 0 and "restart 1 of 10" in r.stderr, r.stderr


def test_a_preemption_during_the_restart_recreates_the_slice(fake_slice):
    """75 comes from the SIGTERM of a preemption; the slice is still READY when the launcher reuses
    it, and goes away while the start script is copied: it is recreated and the run resumed."""
    r = fake_slice.run([["lagging-preempt:4:75", "0"], ["75", "0"]])
    assert r.returncode == 0 and "training finished" in r.stderr, r.stderr
    assert len(fake_slice.calls("queued-resources", "create")) == 2


def test_a_preemption_during_setup_of_the_new_slice_recreates_it(fake_slice):
    """The new spot slice is preempted while the tree is being installed (setup takes minutes)."""
    (fake_slice.root_dir / "preempt_after").write_text("4")  # describe, describe, create, scp -> gone at ssh
    r = fake_slice.run([["0"], ["0"]], "--provisioning", "spot")
    assert r.returncode == 0 and "training finished" in r.stderr, r.stderr


def test_no_capacity_when_recreating_a_spot_slice_is_retried(fake_slice):
    """After a spot preemption the zone often has no capacity for a while: a failed `tpu-vm create`
    is a restart to try again later, not the end of the launcher."""
    (fake_slice.root_dir / "create_failures").write_text("1")
    r = fake_slice.run([["0"], ["0"]], "--provisioning", "spot")
    assert r.returncode == 0, (r.returncode, r.stderr)


def test_a_restart_waits_for_the_previous_run_to_end(fake_slice):
    """A previous run on the slice is still going (its launcher died with the user's laptop; a peer
    stuck after worker 0's 69). `run --resume` TERMs it and waits until it has saved and ended
    before it replaces the code and starts the new trainer (two processes on one TPU: /dev/vfio
    busy)."""
    plan = [["until-term:1.5", "sleep:3", "0"], ["until-term:1.5", "sleep:3", "0"]]
    p = fake_slice.start("run", "--type", "v5e-32", "--python", fake_slice.fake_python, "--config",
                         "configs/stage1-qwen2.5-7b.yaml", "--skip-config-check", plan=plan)
    deadline = time.time() + 60
    while not all(len(fake_slice.trainer_runs(i)) == 1 for i in range(WORKERS)) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the first launcher dies; the detached trainers go on
    p.communicate()
    r = fake_slice.run(plan, "--resume")
    assert r.returncode == 0, (r.stdout, r.stderr)
    runs = fake_slice.trainer_runs(0)
    ended = float((fake_slice.root_dir / "ended0_0").read_text())
    assert runs[1]["t"] >= ended, "the new trainer started while the previous one was still running"
    assert len(runs) == 2


def test_a_run_whose_processes_vanished_is_not_followed_forever(fake_slice):
    """Worker 0's VM rebooted (maintenance) or someone killed the process group: no exit_code will
    ever be written. The follow script says so (status 70) and the run is resumed."""
    r = fake_slice.run([["vanish", "0"], ["vanish", "0"]], timeout=20)
    assert r.returncode != "timed out", r.stderr
    assert r.returncode == 0 and "--resume" in fake_slice.trainer_runs(0)[-1]["args"], r.stderr


def test_logs_and_train_ride_out_a_dropped_stream_as_run_does(fake_slice):
    """`logs` exits with the run's exit status: a dropped connection (255) or a failed copy of the
    follow script (1, read as 'training failed') is ridden out as `run` does."""
    r = fake_slice.run([["0"], ["0"]])
    assert r.returncode == 0, r.stderr
    fake_slice.drop_next_follow()
    r = fake_slice.launch("logs")
    assert r.returncode == 0, (r.returncode, r.stderr)
    fake_slice.fail_next("scp", 1)
    r = fake_slice.launch("logs")
    assert r.returncode == 0, (r.returncode, r.stderr)


def test_a_recreated_slice_gets_the_tree_the_run_started_with(fake_slice, tmp_path):
    """A week-long run: the user keeps editing their checkout. After a preemption the new slice
    gets the tree packed when the launcher started, and the config is not checked again (a
    half-edited or removed config would end the launcher at the restart)."""
    tree = tmp_path / "tree"
    (tree / "launch").mkdir(parents=True)
    (tree / "configs").mkdir()
    shutil.copy(LAUNCHER, tree / "launch" / "tpu_pod.sh")
    config = tree / "configs" / "stage1-qwen2.5-7b.yaml"
    config.write_text("out_dir: /mnt/runs/s1\n")
    r = fake_slice.launch("run", "--type", "v5e-32", "--python", fake_slice.fake_python, "--config",
                          "configs/stage1-qwen2.5-7b.yaml", "--skip-config-check",
                          plan=[["edit-then-preempt", "0"], ["143", "0"]], launcher=tree / "launch" / "tpu_pod.sh",
                          extra_env={"FAKE_TREE_CONFIG": str(config)})
    assert r.returncode == 0, r.stderr
    shipped = (fake_slice.home(0) / "qzhou-jax" / "configs" / "stage1-qwen2.5-7b.yaml").read_text()
    assert shipped == "out_dir: /mnt/runs/s1\n", shipped


def test_a_sigterm_to_the_run_s_process_group_keeps_its_exit_status(fake_slice):
    """SIGTERM to the run's process group (`kill -TERM -- -$(cat ~/qzhou-run/pid)`, the pid file the
    start script writes; a systemd stop): the wrapper outlives it and records the trainer's 75
    (it used to die at once, leaving no exit_code for the launcher and `logs` to wait for)."""
    p = fake_slice.start("run", "--type", "v5e-32", "--python", fake_slice.fake_python, "--config",
                         "configs/stage1-qwen2.5-7b.yaml", "--skip-config-check",
                         plan=[["until-term:0.5", "0"], ["until-term:0.5", "0"]])
    deadline = time.time() + 60
    while not all(len(fake_slice.trainer_runs(i)) == 1 for i in range(WORKERS)) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    for i in range(WORKERS):
        os.kill(-int((fake_slice.home(i) / "qzhou-run" / "pid").read_text()), signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError("the launcher hangs: " + err)
    assert p.returncode == 0 and "preempted (status 75, slice READY): restart 1" in err, err


def test_a_slice_under_repair_is_waited_for_not_deleted(fake_slice):
    """A maintenance event takes the slice to REPAIRING and the run with it: the launcher waits
    for READY (keeping the queued resource's capacity), installs and resumes; a repair that
    outlasts QZ_SETTLE_MINUTES is treated as a lost slice."""
    (fake_slice.root_dir / "settle_after").write_text("3")
    r = fake_slice.run([["repair", "0"], ["repair", "0"]])
    assert r.returncode == 0, r.stderr
    assert "slice qz is REPAIRING; waiting for it to become READY" in r.stderr
    assert not fake_slice.calls("delete") and len(fake_slice.calls("create")) == 1
    assert len(fake_slice.installs()) == 2 * WORKERS
    assert fake_slice.trainer_runs(0)[-1]["args"][-1] == "--resume"

    (fake_slice.root_dir / "settle_after").unlink()  # this repair does not end
    plan = [["repair", "0"] * 2] * WORKERS  # the plan counts a worker's runs across launches
    r = fake_slice.run(plan, extra_env={"QZ_SETTLE_MINUTES": "2"})
    assert r.returncode == 0, r.stderr
    assert "(1 of 2 minutes)" in r.stderr and "slice qz is REPAIRING (queued resource: ACTIVE); deleting it" in r.stderr
    assert len(fake_slice.calls("queued-resources", "create")) == 2


def test_max_restarts_counts_restarts_in_a_row(fake_slice):
    """A run that trained for QZ_RESTART_RESET_S seconds made progress: a week of spot
    preemptions does not use up --max-restarts."""
    plan = [["75", "75", "75", "0"], ["75", "75", "75", "0"]]
    r = fake_slice.run(plan, "--max-restarts", "1", extra_env={"QZ_RESTART_RESET_S": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("restart 1 of 1,") == 3 and len(fake_slice.trainer_runs(0)) == 4
