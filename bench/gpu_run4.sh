#!/usr/bin/env bash
# One device session: the GradCache paper batch (Qwen2.5-1.5B, 256 x (1+1+4) x 512, one
# optimizer step) with some chunks keeping their layer inputs between GradCache's passes,
# then the L=256 step against torch.compile in the same process with whatever time is left.
# train_step.py --no-torch keeps JAX's preallocation, so the kept chunks should fit with the
# default (BFC) allocator; the first run of this script had it off, and 16 and 20 did not.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-570}   # seconds for the whole script
cd bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)" | tee -a "$OUT/gpu.txt"
t() { local s=$1; shift; echo "### $*"; timeout "$s" python3 train_step.py "$@" 2>&1 | grep -v -i warning; }
GC="--preset qwen2.5-1.5b --queries 256 --hard-negatives 4 --seq 512 --attention-impl cudnn --no-torch --steps 1 --warmup 0"
{
for k in ${KEEP:-16 20 12}; do t 95 $GC --chunk-size 8 --remat full --keep-chunks "$k"; done
} 2>&1 | tee "$OUT/gradcache_keep.txt"
left=$((BUDGET - SECONDS))
echo "### $left s left for the torch.compile comparison" | tee "$OUT/l256_torch_compile.txt"
if [ "$left" -gt 200 ]; then
  t "$left" --preset qwen2.5-1.5b --queries 16 --hard-negatives 3 --seq 256 --attention-impl cudnn \
    --remat full --remat-layers 14 --no-eager 2>&1 | tee -a "$OUT/l256_torch_compile.txt"
fi
