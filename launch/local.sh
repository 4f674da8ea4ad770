#!/usr/bin/env bash
# Run N JAX processes on this machine, joined by jax.distributed, each with its own CPU
# devices: a multi-host run in miniature, for testing multi-process code paths.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] -- QZHOU_JAX_ARGS...
       launch/local.sh [options] --exec -- COMMAND [ARGS...]

Starts N processes on localhost. Process i runs `qzhou-jax QZHOU_JAX_ARGS...` after
jax.distributed.initialize(coordinator, N, i); every process sees D CPU devices, so the
run has N x D devices in all. With --exec, COMMAND runs as is and finds the coordinator,
process count and process id in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (it must call jax.distributed.initialize itself).

options:
  -n, --processes N    number of processes (default 2)
  -d, --devices D      CPU devices per process (default 4; XLA_FLAGS
                       --xla_force_host_platform_device_count)
  -p, --port PORT      coordinator port on localhost (default 12355)
      --logs DIR       write process i's output to DIR/process_<i>.log (default: a new
                       temporary folder); process 0's output is also shown here
      --python PY      Python interpreter (default: python3)
      --exec           run COMMAND instead of qzhou-jax (see above)
  -h, --help           this text

examples:
  launch/local.sh -n 2 -d 4 -- train --config configs/demo.yaml --set out_dir=runs/mp
  launch/local.sh -n 2 -d 4 -- train --config configs/demo.yaml --set out_dir=runs/mp --resume

The exit status is the first non-zero exit status of the processes (0 when all succeed).
When one process fails, the others are stopped (SIGTERM, then SIGKILL after
LOCAL_SH_GRACE seconds, default 10); when one is preempted (status 75), the others are
left to save. SIGTERM to the launcher is passed on to every process as a preemption
notice, and the launcher returns once they have saved and exited (status 75). A second
Ctrl-C stops the processes still running (SIGTERM, then SIGKILL after LOCAL_SH_GRACE seconds).
EOF
}

processes=2
devices=4
port=12355
logs=""
python=python3
exec_mode=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--processes) processes="$2"; shift 2 ;;
    -d|--devices) devices="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --exec) exec_mode=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: nothing to run: give the qzhou-jax arguments after -- (see --help)" >&2
  exit 2
fi
for v in processes devices port; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: --${v}: expected a positive integer, got '${!v}'" >&2
    exit 2
  fi
done
if [[ -z "$logs" ]]; then
  logs="$(mktemp -d "${TMPDIR:-/tmp}/qzhou-local.XXXXXX")"
fi
mkdir -p "$logs"

# Process i: initialize jax.distributed, then run the qzhou-jax command line.
read -r -d '' bootstrap <<'PY' || true
import os, sys
import jax
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                           int(os.environ["JAX_PROCESS_ID"]))
# jax.distributed is up: keep the library from initializing it a second time.
os.environ.pop("JAX_COORDINATOR_ADDRESS")
from qzhou_jax.cli import main
sys.exit(main(sys.argv[1:]))
PY

GRACE=${LOCAL_SH_GRACE:-10}
if ! [[ "$GRACE" =~ ^[0-9]+$ ]]; then
  echo "local.sh: LOCAL_SH_GRACE: expected a whole number of seconds, got '$GRACE'" >&2
  exit 2
fi
pids=()
declare -A done_pids=()
tail_pid=""
running() {  # the pids of processes that have not been reaped
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n "${done_pids[$pid]:-}" ]] || echo "$pid"
  done
}
# Stop the processes still running: SIGTERM (a trainer saves a checkpoint at its next step),
# then SIGKILL after GRACE seconds (a process whose peer died is stuck in a collective).
stop_all() {
  local grace=$1 pid waited=0 alive
  for pid in $(running); do
    kill -TERM "$pid" 2>/dev/null || true
  done
  while (( waited < grace * 5 )); do
    alive=0
    for pid in $(running); do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    (( alive )) || return 0
    sleep 0.2 || true
    waited=$((waited + 1))
  done
  for pid in $(running); do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
on_exit() {
  stop_all "$GRACE"
  [[ -z "$tail_pid" ]] || kill "$tail_pid" 2>/dev/null || true
}
trap on_exit EXIT
# A signal to the launcher is passed on to the processes (SIGTERM: a preemption notice, so
# each trainer saves and exits 75), and the launcher waits for them and returns their status.
# A Ctrl-C in a terminal, or a signal to the whole process group (Slurm, a VM shutdown), has
# reached every process already; the `|| true` after each sleep keeps the launcher waiting
# when that signal also ends its own sleep.
signalled=""
forward_term() {
  signalled=TERM
  local pid
  for pid in $(running); do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap forward_term TERM
# A second Ctrl-C stops the processes that the first one did not (one blocked in a collective
# with a process that left, or waiting for a save that cannot finish).
interrupts=0
trap 'signalled=INT; interrupts=$((interrupts + 1))' INT

echo "local.sh: $processes processes x $devices CPU devices, coordinator localhost:$port, logs in $logs" >&2
for ((i = 0; i < processes; i++)); do
  log="$logs/process_$i.log"
  : >"$log"
  (
    # Only this launcher's processes: no cluster environment JAX would detect instead.
    unset SLURM_JOB_ID OMPI_COMM_WORLD_SIZE OMPI_MCA_orte_hnp_uri TPU_WORKER_HOSTNAMES TPU_PROCESS_ADDRESSES
    export JAX_PLATFORMS=cpu
    flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
    export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devices"
    export JAX_COORDINATOR_ADDRESS="localhost:$port"
    export JAX_NUM_PROCESSES="$processes"
    export JAX_PROCESS_ID="$i"
    if [[ $exec_mode -eq 1 ]]; then
      exec "$@"
    else
      exec "$python" -c "$bootstrap" "$@"
    fi
  ) >"$log" 2>&1 &
  pids+=("$!")
done

# Show process 0's output as it comes.
tail -n +1 -f "$logs/process_0.log" &
tail_pid=$!
[[ "$signalled" != TERM ]] || forward_term  # a SIGTERM while the processes were starting

status=0
remaining=$processes
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      # the first failure; a process that only lost its peer (69) gives way to the peer's own
      # status (it ends a moment later, often in the same poll)
      if [[ $rc -ne 0 ]] && { [[ $status -eq 0 ]] ||
           { [[ $status -eq 69 ]] && [[ " 69 75 137 143 " != *" $rc "* ]]; }; }; then
        status=$rc
        if [[ $rc -eq 75 ]]; then
          # preempted: the others stop at the same step (JAX's preemption sync point) and save
          echo "local.sh: process $i was preempted (status 75); waiting for the others to save" >&2
        elif ! [[ $rc -eq 130 && "$signalled" == INT ]]; then  # after Ctrl-C every process stops by itself
          echo "local.sh: process $i exited with status $rc (log: $logs/process_$i.log); stopping the others" >&2
          stop_all "$GRACE"
        fi
      fi
    fi
  done
  if (( interrupts > 1 )); then
    interrupts=0
    echo "local.sh: second Ctrl-C: stopping the processes still running" >&2
    [[ $status -ne 0 ]] || status=130
    stop_all "$GRACE"
  fi
  sleep 0.2 || true
done
sleep 0.3 || true
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
tail_pid=""
pids=()
echo "local.sh: done, status $status (logs in $logs)" >&2
exit "$status"
