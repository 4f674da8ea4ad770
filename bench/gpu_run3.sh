#!/usr/bin/env bash
# One device session: the 1.5b train step at L=256 with layer-wise remat (remat full on
# some layers, "dots" on the rest), the best setting that fits 40 GiB against torch.compile
# in the same process, then the GradCache paper batch with lighter remat.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PRESET=${PRESET:-qwen2.5-1.5b}
SWEEP=${SWEEP:-"28 21 18 16 14"}
cd bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
t() { local s=$1; shift; echo "### $*"; timeout "$s" python3 train_step.py "$@" 2>&1 | grep -v -i warning; }
L256="--preset $PRESET --queries 16 --hard-negatives 3 --seq 256 --attention-impl ${ATTN:-cudnn}"
{
for rl in $SWEEP; do t 75 $L256 --remat full --remat-layers "$rl" --no-torch; done
} 2>&1 | tee "$OUT/l256_sweep.txt"
# The fastest setting whose peak is at most 40 GiB.
best=$(python3 - "$OUT/l256_sweep.txt" "${SWEEP%% *}" <<'PY'
import re, sys
best, arg = -1.0, sys.argv[2]
for line in open(sys.argv[1]):
    m = re.match(r"\| qzhou-jax \(.*remat full(?: on (\d+) of \d+ layers)?.*?\) \| ([\d,]+) \| [\d.]+ \| ([\w.]+) \|", line)
    if m and not float(m.group(3)) > 40.0 and float(m.group(2).replace(",", "")) > best:
        best, arg = float(m.group(2).replace(",", "")), m.group(1) or sys.argv[2]
print(arg)
PY
)
echo "best remat-layers within 40 GiB: $best" | tee -a "$OUT/l256_sweep.txt"
# torch.compile's first step alone takes about 160 s here, plus model creation.
t ${TORCH_S:-400} $L256 --remat full --remat-layers "$best" --no-eager 2>&1 | tee "$OUT/l256_torch_compile.txt"
GC="--preset $PRESET --queries ${GC_QUERIES:-256} --hard-negatives 4 --seq 512 --attention-impl ${ATTN:-cudnn} --no-torch --steps 1 --warmup 0"
{
t 100 $GC --chunk-size 8 --remat full --remat-layers ${GC_RL:-14}
t 100 $GC --chunk-size 4 --remat dots
t 100 $GC --chunk-size 8 --remat dots
t 100 $GC --chunk-size 16 --remat full --remat-layers ${GC_RL:-14}
} 2>&1 | tee "$OUT/gradcache.txt"
