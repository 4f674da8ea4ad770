#!/usr/bin/env bash
# One device session: the train-step anchors of bench/RESULTS.md's reference figures and the GradCache paper batch.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd bench
t() { local s=$1; shift; echo "### $*"; timeout "$s" python3 train_step.py "$@" 2>&1 | grep -v -i warning; }
{
t 210 --preset qwen2.5-1.5b --queries 16 --hard-negatives 3 --seq 256 --attention-impl cudnn --remat full --no-eager
t 170 --preset qwen2.5-1.5b --queries 256 --hard-negatives 4 --seq 512 --chunk-size 16 --attention-impl cudnn --remat full --no-torch --steps 2
t 60 --preset qwen2.5-1.5b --queries 16 --hard-negatives 3 --seq 256 --attention-impl cudnn --remat attn --no-torch
t 80 --preset qwen2.5-0.5b --queries 32 --hard-negatives 3 --seq 256 --attention-impl cudnn --remat full --no-compile
} 2>&1 | tee "$OUT/train_step.txt"
