#!/usr/bin/env bash
# Device calls (BUDGET seconds each, RUNS picks the runs) that profile the 1.5b L=256 step and
# test unrolled layers; bench/RESULTS.md ("One H200") has what they found: under lax.scan the
# layers that keep their matmul outputs ("dots") copy them into and out of the stacked
# per-layer buffers, and unrolled layers (split once, so their gradients concatenate) do not.
# The profiles split the device time into matmul / attention / copy+slice / elementwise / ...
# by forward, recompute, backward and optimizer (bench/step_profile.py). Also: the matmul
# peak per shape (bench/matmul_peak.py), the reference figures' third anchor (1.5b at L=512 against
# PyTorch eager with gradient checkpointing), and the GradCache paper batch with 20 kept
# chunks under the default allocator, which failed from fragmentation when preallocation
# was off (not yet rerun).
# Next (a session's 15 minutes of device time leave about 560 s of runs after the machine
# starts): BUDGET=560 RUNS="check rl6up mu2up mu0u rl4u dotmerge tritonany wg6u". mu2up / mu0u:
# Adam's first moment in bfloat16 (train.mu_dtype; 2.9 GiB less state at 1.5b, `plan`: 39.3 GiB
# with 2 rematted layers, 41.0 with none), so all but 2 layers keep their matmul outputs; wg6u:
# rl6u with float32 weight gradients (model.weight_grad_dtype), its cost on one GPU, where no
# reduction crosses devices (expected: about none). Unrolled layers no longer
# keep a float32 copy of every layer's weights for the backward pass (4.7 GiB at 1.5b in the
# H200 programs; `plan` now estimates 38.9 GiB with 6 rematted layers, 40.6 with 4, 43.9
# with none), so fewer layers need remat within 40 GiB. rl6up: 6 rematted layers, profiled;
# rl4u (4) and dotsu (none): not profiled. dotmerge (gate and up as one GEMM, through XLA's
# dot merger) and tritonany: 6 rematted layers, profiled. Then, if time is left: gc8dotsu,
# the GradCache paper batch with unrolled "dots" layers in the second pass, which then runs
# each layer forward and backward once, as kept chunks do, without their 2 GiB each (`plan`
# estimate 59.7 GiB, which counts a float32 gradient per chunk besides the accumulator that
# the program may not hold; gc4dotsu if it does not fit). Later: fusedgemm (tritonany with
# cuDNN GEMM fusions as a third candidate for the autotuner; Hopper, cuDNN 9) and compile
# (torch.compile on the same card, up to 7 minutes).
# Run on 2026-11-26 (H200): RUNS="rl14 dots full unrolled dsfusion dotsunrolled", the same
# with XLA_FLAGS=--xla_gpu_enable_command_buffer= (before profiles compiled that way
# themselves), then RUNS="peak rl14 unrolled anchor512 rl12u rl10u".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$ROOT/bench" || exit 1
W=/tmp/qzhou_gpu_run5; rm -rf "$W"   # scratch: nothing left over from an earlier run on a warm machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)" | tee -a "$OUT/gpu.txt"
BUDGET=${BUDGET:-580}   # seconds for the whole script; a run starts only if its limit fits
t() { local s=$1; shift; if [ $((SECONDS + s)) -gt "$BUDGET" ]; then echo "### skipped (time): $*"; return; fi
      echo "### $*"; timeout -k 10 "$s" python3 train_step.py "$@" 2>&1 | grep --line-buffered -v -i warning; }
# keep the summaries and the optimized HLO, not the traces; packed into one file at the end
# (a device call returns at most 8 files)
keep() { [ -f "$W/prof/$1/summary.json" ] || return 0; mkdir -p "$W/keep/$1"
         cp "$W/prof/$1/summary.json" "$W/prof/$1/step.hlo.txt" "$W/keep/$1/"; }
M="--preset ${PRESET:-qwen2.5-1.5b} --attention-impl cudnn"
L256="$M --queries 16 --hard-negatives 3 --seq 256 --no-torch --steps 5 --warmup 1"
GC="$M --queries 256 --hard-negatives 4 --seq 512 --no-torch --steps 1 --warmup 0"
# Runs in priority order; RUNS picks a subset.
RUNS=${RUNS:-rl14 dots full anchor512 unrolled dsfusion keep20}
for r in $RUNS; do
  case $r in
    peak) echo "### matmul_peak.py"; timeout -k 10 60 python3 matmul_peak.py 2>&1 | grep -v -i warning ;;
    # numerical checks: cuDNN vs XLA attention, HF parity, and cuDNN on left-padded rows
    # (right-aligned around cuDNN's length masks since 2026-11-27; not yet run on a GPU)
    check) echo "### gpu_check.py"; timeout -k 10 120 python3 gpu_check.py 2 2>&1 | grep -v -i warning ;;
    rl14) t 90 $L256 --remat full --remat-layers 14 --profile $W/prof/rl14; keep rl14 ;;
    dots) t 90 $L256 --remat dots --profile $W/prof/dots; keep dots ;;
    full) t 90 $L256 --remat full --profile $W/prof/full; keep full ;;
    # The reference figures' third anchor, not yet recorded: 1.5b 16 x (1+3) x 512 against
    # PyTorch eager with HF gradient checkpointing (reference: 32.2k tokens/s, 78 GiB).
    anchor512) t 170 $M --queries 16 --hard-negatives 3 --seq 512 --remat full --torch-checkpointing \
                 --no-compile --steps 3 --warmup 1 ;;
    unrolled) t 140 $L256 --remat full --remat-layers 14 --no-scan --profile $W/prof/rl14_unrolled
              keep rl14_unrolled ;;
    # XLA may pick Triton GEMMs that read silu(gate) * up in their prologue (no [tokens, 8960]
    # product written and read back: up to about 7 ms of the 22 ms SwiGLU takes per step)
    tritonany) echo "### XLA_FLAGS=--xla_gpu_triton_gemm_any=true"
               XLA_FLAGS=--xla_gpu_triton_gemm_any=true t 120 $L256 --remat full --remat-layers 6 --no-scan \
                 --profile $W/prof/rl6u_tritonany; keep rl6u_tritonany ;;
    fusedgemm) echo "### XLA_FLAGS=--xla_gpu_triton_gemm_any=true --xla_gpu_cudnn_gemm_fusion_level=2"
               XLA_FLAGS="--xla_gpu_triton_gemm_any=true --xla_gpu_cudnn_gemm_fusion_level=2" t 240 $L256 --remat full \
                 --remat-layers 6 --no-scan --profile $W/prof/rl6u_fusedgemm; keep rl6u_fusedgemm ;;
    # XLA's dot merger joins GEMMs that share an operand only when one of them is small (its
    # operands and result under --xla_gpu_dot_merger_threshold_mb, 32 by default), so gate and
    # up stay two GEMMs in each direction: their weight-gradient GEMMs
    # (a [1536, 8960] result, contracting 20480 tokens) ran at 727 TFLOP/s on the H200, the
    # forward ones at 767 (profile of full on 14 of 28, unrolled)
    dotmerge) echo "### XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=2048"
              XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=2048 t 120 $L256 --remat full --remat-layers 6 --no-scan \
                --profile $W/prof/rl6u_dotmerge; keep rl6u_dotmerge ;;
    gc[0-9]*dotsu) c=${r#gc}; t 170 $GC --chunk-size "${c%dotsu}" --remat dots --no-scan ;;
    # the goal's reference on the same card: torch.compile's first step took 221 s on an H100
    compile) t 420 $M --queries 16 --hard-negatives 3 --seq 256 --remat full --remat-layers 14 --no-scan \
               --no-eager --steps 5 --warmup 1 ;;
    rl[0-9]*u) n=${r#rl}; t 90 $L256 --remat full --remat-layers "${n%u}" --no-scan ;;
    rl[0-9]*up) n=${r#rl}; n=${n%up}; t 140 $L256 --remat full --remat-layers "$n" --no-scan \
                  --profile "$W/prof/rl${n}_unrolled"; keep "rl${n}_unrolled" ;;
    dsfusion) echo "### XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true"
              XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true t 90 $L256 --remat full --remat-layers 14 \
                --profile $W/prof/rl14_dsfusion; keep rl14_dsfusion ;;
    dotsu) t 90 $L256 --remat dots --no-scan ;;
    mu[0-9]*u) n=${r#mu}; t 90 $L256 --remat full --remat-layers "${n%u}" --no-scan --mu-dtype bfloat16 ;;
    mu[0-9]*up) n=${r#mu}; n=${n%up}; t 140 $L256 --remat full --remat-layers "$n" --no-scan --mu-dtype bfloat16 \
                  --profile "$W/prof/mu${n}_unrolled"; keep "mu${n}_unrolled" ;;
    wg[0-9]*u) n=${r#wg}; t 90 $L256 --remat full --remat-layers "${n%u}" --no-scan --weight-grad-dtype float32 ;;
    dotsunrolled) t 140 $L256 --remat dots --no-scan --profile $W/prof/dots_unrolled; keep dots_unrolled ;;
    keep20) t 100 $GC --chunk-size 8 --remat full --keep-chunks 20 ;;
    *) echo "### unknown run $r" ;;
  esac 2>&1 | tee -a "$OUT/runs.txt"
done
[ -d "$W/keep" ] && tar -C "$W/keep" -czf "$OUT/profiles.tar.gz" .
echo "### done in $SECONDS s" | tee -a "$OUT/gpu.txt"
