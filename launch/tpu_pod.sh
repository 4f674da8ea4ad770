#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod) with gcloud: create or reuse the slice,
# install this working tree on every worker, run `qzhou-jax train` on all workers, stream
# worker 0's log, and after a preemption recreate the slice and resume.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND [options] [-- TRAIN_ARGS...]

commands:
  up        create the slice unless it exists and is READY (a PREEMPTED one is deleted first)
  setup     copy this working tree (git-tracked and untracked, not ignored, files) to every
            worker and install it into ~/qzhou-venv (with the tpu extra)
  train     start `qzhou-jax train --config CONFIG TRAIN_ARGS...` on all workers
            (--worker=all, detached: it survives a dropped ssh) and stream worker 0's log
  logs      stream worker 0's log until the run ends; exits with the run's exit status
  run       up + setup + train; after a preemption (the slice is gone or not READY, the
            trainer exited with 75 after saving a checkpoint, with 69 after losing another
            worker's process, or is gone without a status: 70) recreate / restart and train
            again with --resume, up to --max-restarts times; the tree is packed once, when
            `run` starts
  status    print the slice's state
  down      delete the slice (and its queued resource)

options (environment variable in brackets):
  --name NAME          TPU name (QZ_TPU_NAME) [required]
  --zone ZONE          zone, e.g. us-east5-a (QZ_TPU_ZONE) [required]
  --project PROJECT    Google Cloud project (QZ_TPU_PROJECT; default: gcloud's)
  --type TYPE          accelerator type: v4-32, v5p-64, v5litepod-32 (or v5e-32), v6e-32 ...
                       (QZ_TPU_TYPE) [up, run]
  --version VERSION    TPU software version (QZ_TPU_VERSION; default by type: v4
                       tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                       v6e v2-alpha-tpuv6e)
  --provisioning MODE  queued (default: a queued resource, waits for capacity), queued-spot,
                       spot, preemptible or on-demand (QZ_TPU_PROVISIONING)
  --config PATH        training config, relative to the repository root [train, run]
  --set KEY=VALUE      config override for train (repeatable)
  --env NAME=VALUE     environment variable for the trainer on every worker (repeatable), e.g.
                       the configs' QZHOU_DATA and QZHOU_MODELS
  --resume             pass --resume to the first train as well
  --max-restarts N     restarts in a row after preemptions in `run` (default 10); a run that
                       trained for QZ_RESTART_RESET_S seconds (default 3600) starts the count again
  --python PY          Python (>= 3.11) on the workers that creates the venv (default python3)
  --setup-cmd CMD      shell command run on every worker before installing (e.g. one that
                       installs python3.11 and python3.11-venv on an older image); it runs at
                       every setup, also on a slice that already ran it, so make it idempotent
  --jax-version V      jax / jaxlib pinned on the workers, matching the tpu extra's libtpu
                       (default 0.10.2)
  --port PORT          jax.distributed coordinator port on worker 0 (default 8476)
  --dry-run            print the gcloud commands instead of running them
  --skip-config-check  do not check the config locally with `qzhou-jax train --print-config`
                       (for paths, such as init_from, that exist only on the workers)
  -h, --help           this text

gcloud failures are retried every 30 s, QZ_GCLOUD_TRIES times (default 10): reading the slice's
state (an error other than NOT_FOUND: an expired token, an API outage), copying to the workers,
and ssh connections that fail (status 255; a command that fails on a worker is not retried). A
state that cannot be read is never taken for a preemption: `up` and `down` stop without
creating or deleting anything, and `run` keeps following the training.

The run's out_dir (checkpoints, metrics) must be one folder shared by every worker that
outlives the VMs, so that a recreated slice resumes from it: a shared filesystem (NFS /
Filestore, or a gcsfuse-mounted bucket) mounted by --setup-cmd; gs:// URLs are refused.
Data paths must be readable from every worker.

examples:
  launch/tpu_pod.sh run --name qz-7b --zone us-east5-a --type v5p-64 \
      --setup-cmd 'sudo mkdir -p /mnt/runs && { mountpoint -q /mnt/runs || sudo mount -o rw,intr 10.0.0.2:/runs /mnt/runs; }' \
      --env QZHOU_DATA=/mnt/runs/data --env QZHOU_MODELS=/mnt/runs/models \
      --config configs/stage1-qwen2.5-7b.yaml --set out_dir=/mnt/runs/stage1-7b
  launch/tpu_pod.sh logs --name qz-7b --zone us-east5-a
  launch/tpu_pod.sh down --name qz-7b --zone us-east5-a
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
say() { echo "tpu_pod.sh: $*" >&2; }

command="${1:-}"
case "$command" in
  up|setup|train|logs|run|status|down) shift ;;
  -h|--help|"") usage; [[ -n "$command" ]] && exit 0; exit 2 ;;
  *) die "unknown command '$command' (see --help)" ;;
esac

name="${QZ_TPU_NAME:-}"
zone="${QZ_TPU_ZONE:-}"
project="${QZ_TPU_PROJECT:-}"
accel="${QZ_TPU_TYPE:-}"
version="${QZ_TPU_VERSION:-}"
provisioning="${QZ_TPU_PROVISIONING:-queued}"
config=""
sets=()
envs=()
resume=0
max_restarts=10
python=python3
setup_cmd=""
jax_version=0.10.2
port=8476
gcloud_tries="${QZ_GCLOUD_TRIES:-10}"
settle_minutes="${QZ_SETTLE_MINUTES:-30}"
restart_reset_s="${QZ_RESTART_RESET_S:-3600}"
dry_run=0
check_config=1
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --provisioning) provisioning="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --env)
      [[ "${2:-}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected NAME=VALUE, got '${2:-}'"
      envs+=("$2"); shift 2 ;;
    --resume) resume=1; shift ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --setup-cmd) setup_cmd="$2"; shift 2 ;;
    --jax-version) jax_version="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --skip-config-check) check_config=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
case "$provisioning" in
  queued|queued-spot|spot|preemptible|on-demand) ;;
  *) die "--provisioning: expected queued, queued-spot, spot, preemptible or on-demand, got '$provisioning'" ;;
esac
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts: expected a non-negative integer, got '$max_restarts'"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "--port: expected a port number, got '$port'"
[[ "$gcloud_tries" =~ ^[1-9][0-9]*$ ]] || die "QZ_GCLOUD_TRIES: expected a positive integer, got '$gcloud_tries'"
[[ "$settle_minutes" =~ ^[0-9]+$ ]] || die "QZ_SETTLE_MINUTES: expected a non-negative integer, got '$settle_minutes'"
[[ "$restart_reset_s" =~ ^[0-9]+$ ]] || die "QZ_RESTART_RESET_S: expected a non-negative integer, got '$restart_reset_s'"

# v5e-N is the name used in docs; gcloud calls it v5litepod-N.
accel="${accel/#v5e-/v5litepod-}"
if [[ -n "$accel" && -z "$version" ]]; then
  case "$accel" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "--version is required for accelerator type '$accel'" ;;
  esac
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/qzhou-tpu.XXXXXX")"
trap '[[ -n "${QZ_KEEP_WORK:-}" ]] || rm -rf "$work"' EXIT

gc() {
  local args=("$@")
  [[ -n "$project" ]] && args+=(--project "$project")
  if [[ $dry_run -eq 1 ]]; then
    printf '+ gcloud' >&2
    printf ' %q' "${args[@]}" >&2
    echo >&2
    return 0
  fi
  gcloud "${args[@]}"
}

ssh_workers() {  # ssh_workers WORKERS COMMAND
  gc compute tpus tpu-vm ssh "$name" --zone "$zone" --worker "$1" --command "$2"
}

retrying() {  # retrying WHAT RETRY_ON(any|255) COMMAND...: COMMAND again while it fails (with 255 only:
  # ssh's own failure, not the remote command's), QZ_GCLOUD_TRIES times in all; its last status
  local what="$1" on="$2" tries=0 rc
  shift 2
  while true; do
    rc=0
    "$@" || rc=$?
    [[ $rc -eq 0 ]] && return 0
    [[ "$on" == any || $rc -eq "$on" ]] || return "$rc"
    tries=$((tries + 1))
    [[ $tries -lt $gcloud_tries ]] || return "$rc"
    say "$what failed with status $rc (try $tries of $gcloud_tries), retrying in 30 s"
    sleep 30
  done
}

describe() {  # describe tpu-vm|queued-resources FORMAT: the field; NONE when there is no such
  # resource (gcloud: NOT_FOUND) or the field is empty; UNKNOWN when gcloud keeps failing otherwise
  # (an expired token, an API outage), which no caller takes for a preemption
  local out tries=0
  if [[ $dry_run -eq 1 ]]; then echo NONE; return; fi
  while true; do
    if out="$(gcloud compute tpus "$1" describe "$name" --zone "$zone" ${project:+--project "$project"} \
              --format="$2" 2>"$work/describe.err")"; then
      echo "${out:-NONE}"
      return
    fi
    if grep -q NOT_FOUND "$work/describe.err"; then echo NONE; return; fi
    tries=$((tries + 1))
    if [[ $tries -ge $gcloud_tries ]]; then
      say "gcloud compute tpus $1 describe $name failed $tries times: $(grep -m 1 . "$work/describe.err")"
      echo UNKNOWN
      return
    fi
    say "gcloud compute tpus $1 describe $name failed (try $tries of $gcloud_tries), retrying in 30 s"
    sleep 30
  done
}

node_state() { describe tpu-vm 'value(state)'; }  # READY, CREATING, PREEMPTED, ..., NONE or UNKNOWN

queued_state() {  # ACTIVE, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDED, FAILED, ..., NONE or UNKNOWN
  describe queued-resources 'value(state.state)'
}

cmd_down() {
  local queued node
  queued="$(queued_state)"
  node="$(node_state)"
  [[ "$queued" != UNKNOWN && "$node" != UNKNOWN ]] || die "could not read the state of $name; nothing was deleted"
  if [[ "$queued" != NONE || ( $dry_run -eq 1 && "$provisioning" == queued* ) ]]; then
    say "deleting queued resource $name (and its slice)"
    gc compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet
  elif [[ "$node" != NONE || $dry_run -eq 1 ]]; then
    say "deleting slice $name"
    gc compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
  else
    say "no slice or queued resource named $name in $zone"
  fi
}

wait_queued_active() {  # until the queued resource $name is ACTIVE; dies when it FAILED or is SUSPENDED
  local q
  while [[ $dry_run -eq 0 ]]; do
    q="$(queued_state)"
    case "$q" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $name is $q (see: gcloud compute tpus queued-resources describe $name --zone $zone)" ;;
      *) say "queued resource $name: $q; waiting"; sleep 60 ;;
    esac
  done
}

up_result=""
cmd_up() {  # sets up_result to "created" or "reused"; gcloud's output goes to stderr
  local state queued settled=0
  state="$(node_state)"
  # A slice being repaired, restarted or started (a maintenance event) comes back by itself:
  # wait for it (up to QZ_SETTLE_MINUTES) rather than delete it and lose its capacity.
  while [[ "$state" =~ ^(CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING)$ && $settled -lt $settle_minutes ]]; do
    say "slice $name is $state; waiting for it to become READY ($settled of $settle_minutes minutes)"
    sleep 60
    settled=$((settled + 1))
    state="$(node_state)"
  done
  if [[ "$state" == READY && $settled -gt 0 ]]; then
    say "slice $name is READY again; installing and starting anew (its processes did not survive)"
    up_result=created
    return
  fi
  if [[ "$state" == READY ]]; then
    say "slice $name is READY; reusing it"
    up_result=reused
    return
  fi
  [[ "$state" != UNKNOWN ]] || die "could not read the state of slice $name; nothing was created or deleted"
  queued="$(queued_state)"
  [[ "$queued" != UNKNOWN ]] || die "could not read the state of queued resource $name; nothing was created or deleted"
  case "$queued" in  # a request already in the queue (an earlier `up` or `run`): keep its place
    CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING)
      say "queued resource $name is $queued; waiting for it instead of requesting another"
      wait_queued_active
      up_result=created
      return ;;
  esac
  [[ -n "$accel" ]] || die "--type is required to create slice $name"
  if [[ "$state" != NONE || "$queued" != NONE ]]; then
    say "slice $name is $state (queued resource: $queued); deleting it to create it again"
    cmd_down >&2
    while [[ "$(node_state)" != NONE || "$(queued_state)" != NONE ]]; do sleep 15; done
  fi
  case "$provisioning" in
    queued|queued-spot)
      local spot=()
      [[ "$provisioning" == queued-spot ]] && spot=(--spot)
      say "requesting $accel ($version) as queued resource $name"
      gc compute tpus queued-resources create "$name" --zone "$zone" --node-id "$name" \
        --accelerator-type "$accel" --runtime-version "$version" ${spot[@]+"${spot[@]}"} >&2
      wait_queued_active
      ;;
    *)
      local flag=()
      [[ "$provisioning" == spot ]] && flag=(--spot)
      [[ "$provisioning" == preemptible ]] && flag=(--preemptible)
      say "creating $accel ($version) slice $name ($provisioning)"
      gc compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" \
        ${flag[@]+"${flag[@]}"} >&2
      ;;
  esac
  up_result=created
}

cmd_setup() {
  if [[ -f "$work/qzhou-jax.tgz" ]]; then :
  elif say "packing $root"; git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$work/qzhou-jax.tgz")
  else
    tar -C "$root" --exclude=.git --exclude=runs --exclude='__pycache__' -czf "$work/qzhou-jax.tgz" .
  fi
  {
    echo 'set -euo pipefail'
    printf 'PY=%q\nJAX_VERSION=%q\n' "$python" "$jax_version"
    if [[ -n "$setup_cmd" ]]; then printf '%s\n' "$setup_cmd"; fi
    stop_previous_run
    cat <<'EOF'
# replace the code, keep runs/ (a relative out_dir's checkpoints on a one-host slice)
mkdir -p ~/qzhou-jax && find ~/qzhou-jax -mindepth 1 -maxdepth 1 ! -name runs -exec rm -rf {} +
tar -xzf ~/qzhou-jax.tgz -C ~/qzhou-jax
[ -x ~/qzhou-venv/bin/python ] || "$PY" -m venv ~/qzhou-venv
~/qzhou-venv/bin/pip install -q -U pip
~/qzhou-venv/bin/pip install -q -e "$HOME/qzhou-jax[tpu]" "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION"
echo "$(hostname): jax $(~/qzhou-venv/bin/python -c 'import jax; print(jax.__version__)') installed"
EOF
  } >"$work/qzhou-setup.sh"
  say "copying to every worker of $name and installing"
  retrying "copying to the workers" any \
    gc compute tpus tpu-vm scp "$work/qzhou-jax.tgz" "$work/qzhou-setup.sh" "$name:" --zone "$zone" --worker all \
    || die "could not copy the tree to the workers of $name (above)"
  retrying "ssh to the workers" 255 ssh_workers all 'bash ~/qzhou-setup.sh' \
    || die "setup on the workers of $name failed (above)"
}

stop_previous_run() {  # shell code: TERM a previous run's process group and wait until it has ended
  cat <<'EOF'
if [ -f ~/qzhou-run/pid ] && old="$(cat ~/qzhou-run/pid)" && kill -0 -- "-$old" 2>/dev/null; then
  echo "$(hostname): stopping the previous run (process group $old)" >&2
  kill -TERM -- "-$old" 2>/dev/null || true
  for _ in $(seq 600); do kill -0 -- "-$old" 2>/dev/null || break; sleep 1; done  # it saves a checkpoint
  kill -KILL -- "-$old" 2>/dev/null || true
  while kill -0 -- "-$old" 2>/dev/null; do sleep 1; done
fi
EOF
}

write_follow_script() {
  cat >"$work/qzhou-follow.sh" <<'EOF'
# Stream the log of the run started by qzhou-start.sh (from line 1, or its last $1 lines);
# exit with its status.
tail -n "${1:-+1}" -F ~/qzhou-run/train.log 2>/dev/null &
t=$!
while [ ! -f ~/qzhou-run/exit_code ]; do
  if ! kill -0 "$(cat ~/qzhou-run/pid 2>/dev/null)" 2>/dev/null; then  # no run, or it is gone (a reboot)
    sleep 2
    [ -f ~/qzhou-run/exit_code ] && break
    echo "qzhou-follow: no run on $(hostname), or it ended without an exit status (its VM restarted?)" >&2
    kill "$t"
    exit 70
  fi
  sleep 5
done
sleep 2
kill "$t"
exit "$(cat ~/qzhou-run/exit_code)"
EOF
}

check_training_config() {  # before a slice is created or a run started: what the workers will read
  [[ -n "$config" ]] || die "--config is required to train"
  [[ "$config" == /* ]] && return 0  # a path on the workers (a shared mount): not checked here
  [[ -f "$root/$config" ]] || die "--config $config: no such file under $root (the workers read it from the \
shipped copy of this tree, relative to its root)"
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1 && git -C "$root" check-ignore -q -- "$config"; then
    die "--config $config: ignored by git, so not shipped to the workers"
  fi
  [[ $check_config -eq 1 ]] || return 0
  local cli rc=0
  cli="$(command -v qzhou-jax || true)"
  [[ -n "$cli" ]] || return 0
  # every key and --set value, by the shipped tree's code, with the workers' --env variables
  (cd "$root" && env ${envs[@]+"${envs[@]}"} PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$cli" train \
     --config "$config" ${sets[@]+"${sets[@]}"} --print-config >/dev/null) || rc=$?
  if [[ $rc -eq 2 ]]; then
    die "--config $config ${sets[*]+${sets[*]}}: refused (above); if it names a path that exists only on the \
workers, pass --skip-config-check"
  elif [[ $rc -ne 0 ]]; then
    say "warning: could not check --config locally (qzhou-jax exited with $rc); the workers will"
  fi
}

start_training() {  # start_training RESUME(0|1); the caller checked the config (check_training_config)
  local coordinator args=(train --config "$config" ${sets[@]+"${sets[@]}"} ${extra[@]+"${extra[@]}"})
  [[ "$1" -eq 1 ]] && args+=(--resume)
  if [[ $dry_run -eq 1 ]]; then
    coordinator="WORKER0_IP:$port"
  else
    coordinator="$(describe tpu-vm 'value(networkEndpoints[0].ipAddress)')"
    [[ "$coordinator" != NONE && "$coordinator" != UNKNOWN ]] || die "could not read worker 0's address on $name"
    coordinator="$coordinator:$port"
  fi
  {
    echo 'set -euo pipefail'
    # jax.distributed: coordinator on worker 0; process ids and count come from the TPU metadata.
    printf 'export JAX_COORDINATOR_ADDRESS=%q\n' "$coordinator"
    local kv
    for kv in ${envs[@]+"${envs[@]}"}; do
      printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
    printf 'ARGS=(%s)\n' "$(printf '%q ' "${args[@]}")"
    stop_previous_run
    cat <<'EOF'
mkdir -p ~/qzhou-run
rm -f ~/qzhou-run/exit_code
cd ~/qzhou-jax
# the wrapper outlives a SIGTERM to the process group (a shutdown, `kill -- -PGID`) to record the status
setsid bash -c 'trap : TERM HUP; "$HOME/qzhou-venv/bin/qzhou-jax" "$@"; echo $? > "$HOME/qzhou-run/exit_code"' qzhou-train "${ARGS[@]}" \
  > ~/qzhou-run/train.log 2>&1 < /dev/null &
echo $! > ~/qzhou-run/pid
EOF
  } >"$work/qzhou-start.sh"
  write_follow_script
  say "starting: qzhou-jax ${args[*]} on every worker (coordinator $coordinator)"
  retrying "copying to the workers" any \
    gc compute tpus tpu-vm scp "$work/qzhou-start.sh" "$work/qzhou-follow.sh" "$name:" --zone "$zone" --worker all \
    || die "could not copy the start script to the workers of $name (above)"
  retrying "ssh to the workers" 255 ssh_workers all 'bash ~/qzhou-start.sh' \
    || die "starting the training on the workers of $name failed (above)"
}

follow() {  # follow [LAST_LINES]: worker 0's log, whole or its end, until the run ends
  write_follow_script
  gc compute tpus tpu-vm scp "$work/qzhou-follow.sh" "$name:" --zone "$zone" --worker 0 >/dev/null
  ssh_workers 0 "bash ~/qzhou-follow.sh ${1:-}"
}

run_exit_status() {  # the exit status worker 0's run wrote; fails while it runs (or is unreachable)
  local status
  status="$(ssh_workers 0 'cat ~/qzhou-run/exit_code' 2>/dev/null)" || return 1
  [[ "$status" =~ ^[0-9]+$ ]] || return 1
  echo "$status"
}

GONE=70  # the follow script's status for a run that is gone without an exit status
rc=0
state=READY
follow_run() {  # sets rc (the run's exit status) and state (the slice's, READY unless it is gone)
  local from="" finished
  while true; do
    rc=0
    follow ${from:+"$from"} || rc=$?
    state=READY
    [[ $rc -eq 0 || $dry_run -eq 1 ]] && break
    [[ $rc -eq $GONE ]] && break
    # A dropped connection to a healthy slice: follow again while the run goes on; when it
    # ended meanwhile, its own exit status counts, not the connection's.
    state="$(node_state)"
    case "$state" in
      READY)
        if finished="$(run_exit_status)"; then
          [[ "$finished" != "$rc" ]] && say "lost the log stream (status $rc); the run ended with status $finished"
          rc=$finished
          break
        fi
        say "lost the log stream (status $rc); the run goes on, reconnecting (from its last 20 lines)" ;;
      UNKNOWN) say "lost the log stream (status $rc) and could not read the slice's state; trying again" ;;
      *) break ;;
    esac
    from=20
    sleep 10
  done
  if [[ $rc -eq $GONE ]]; then
    say "the run on worker 0 is gone without an exit status (its VM restarted, or it was killed)"
  elif [[ $rc -ne 0 && $rc -ne 75 && $rc -ne 69 && "$state" == READY && $dry_run -eq 0 ]]; then
    # a preemption's SIGTERM reaches the trainer before the API shows the slice as gone
    local s
    for _ in 1 2 3 4 5 6; do
      sleep 20
      s="$(node_state)"
      [[ "$s" == READY || "$s" == UNKNOWN ]] || { state=$s; break; }
    done
  fi
}

cmd_run() {
  local attempt=0 in_a_row=0 step started want_resume=$resume
  check_training_config
  while true; do
    # a step that fails (dies) while the slice goes away is a preemption, not the end of the run
    set +e
    (
      set -e
      cmd_up
      if [[ "$up_result" == created || $attempt -eq 0 ]]; then
        cmd_setup
      fi
      start_training "$want_resume"
    )
    step=$?
    set -e
    if [[ $step -ne 0 ]]; then
      state="$(node_state)"
      [[ "$state" != READY && "$state" != UNKNOWN ]] || return "$step"
      rc=$step
    else
      started=$SECONDS
      follow_run
    fi
    if [[ $rc -eq 0 ]]; then
      if [[ $dry_run -eq 1 ]]; then say "dry run: nothing was created or started"; else say "training finished"; fi
      return 0
    fi
    if [[ $rc -eq 75 || $rc -eq 69 || $rc -eq $GONE || "$state" != READY ]]; then
      attempt=$((attempt + 1))
      # a run that trained for a while (QZ_RESTART_RESET_S, default an hour) made progress: the
      # count of restarts in a row starts again, so a week of spot preemptions does not use it up
      if [[ $step -eq 0 ]] && (( SECONDS - started >= restart_reset_s )); then in_a_row=0; fi
      in_a_row=$((in_a_row + 1))
      if [[ $in_a_row -gt $max_restarts ]]; then
        say "preempted again after $max_restarts restarts in a row; giving up (status $rc, slice $state)"
        return "$rc"
      fi
      say "preempted (status $rc, slice $state): restart $in_a_row of $max_restarts, resuming from the last checkpoint"
      want_resume=1
      [[ $step -eq 0 ]] || sleep 60
      continue
    fi
    say "training failed with status $rc"
    return "$rc"
  done
}

case "$command" in
  up) cmd_up ;;
  setup) cmd_setup ;;
  train) check_training_config; start_training "$resume"; follow_run; exit "$rc" ;;
  logs) follow_run; exit "$rc" ;;
  run) cmd_run ;;
  status)
    echo "slice: $(node_state)"
    echo "queued resource: $(queued_state)"
    ;;
  down) cmd_down ;;
esac
