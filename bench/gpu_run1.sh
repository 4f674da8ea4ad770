#!/usr/bin/env bash
# One device session: numerical checks, then the encoding benchmarks of bench/RESULTS.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 150 python3 gpu_check.py 2>&1 | grep -v Warning | tee "$OUT/gpu_check.txt"
timeout 150 python3 encode.py --preset qwen2.5-1.5b --batch 128 --seq 512 --attention-impl xla,cudnn 2>&1 | grep -v Warning | tee "$OUT/encode_1.5b.txt"
timeout 200 python3 encode.py --preset qwen2.5-7b --batch 64 --seq 512 --attention-impl xla,cudnn 2>&1 | grep -v Warning | tee "$OUT/encode_7b.txt"
