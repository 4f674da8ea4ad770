"""Checkpoint conversion: wall time and peak host memory of HF -> Orbax and Orbax -> HF.

    python bench/convert.py                         # qwen2.5-1.5b, bf16, about 3 GB on disk
    python bench/convert.py --preset tiny           # seconds; a smoke run
    python bench/convert.py --workdir /big/disk --keep

Builds a random bf16 HF checkpoint of the preset (two safetensors shards + index, written
one tensor at a time), then runs each direction in a fresh Python process, so each peak
is its own. Peak RSS is /proc/self/status VmHWM; the baseline is the RSS after importing
jax, orbax and qzhou_jax and starting the backend, at which point the high-water mark is
reset (/proc/self/clear_refs) when the kernel allows it. The goal: peak minus baseline
under 1 GiB + 2 x the largest single tensor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ building
def build_checkpoint(preset: str, folder: str, seed: int = 0) -> dict:
    """A random bf16 HF checkpoint (bare Qwen2Model names) in two shards + index."""
    import ml_dtypes
    import numpy as np

    from qzhou_jax.checkpoint import export, safetensors_io
    from qzhou_jax.config import ModelConfig
    from qzhou_jax.tokenizer import DEMO_TOKENIZER

    cfg = ModelConfig.preset(preset, param_dtype="bfloat16")
    layout = export.hf_layout(cfg, "bfloat16")
    sizes = [math.prod(shape) * 2 for _, _, shape in layout]
    rng = np.random.default_rng(seed)

    def tensors():
        for name, _, shape in layout:
            if name.endswith("norm.weight"):
                x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:
                x = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            yield name, x.astype(ml_dtypes.bfloat16)
            del x

    os.makedirs(folder)
    cut = next(i for i in range(1, len(sizes) + 1) if 2 * sum(sizes[:i]) >= sum(sizes))
    cut = min(cut, len(layout) - 1)
    shards = [layout[:cut], layout[cut:]]
    files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    stream = tensors()
    for fname, shard in zip(files, shards):
        safetensors_io.write(os.path.join(folder, fname), itertools.islice(stream, len(shard)),
                             metadata={"format": "pt"}, layout=shard)
    export.write_json(os.path.join(folder, export.INDEX_FILE), {
        "metadata": {"total_size": sum(sizes)},
        "weight_map": {name: fname for fname, shard in zip(files, shards) for name, _, _ in shard}})
    export.write_json(os.path.join(folder, "config.json"), cfg.to_hf("bfloat16"))
    export.copy_tokenizer(DEMO_TOKENIZER, folder)
    return {"files": len(files), "bytes": sum(sizes), "largest": max(sizes), "params": cfg.num_params()}


# -------------------------------------------------------------- one direction
def child(direction: str, src: str, dst: str) -> None:
    """Run one conversion in this (fresh) process and print a JSON line of measurements."""
    start = _status_kib("VmRSS")  # the bare interpreter
    import jax

    from qzhou_jax.checkpoint import convert
    from qzhou_jax.sharding import make_mesh

    import orbax.checkpoint  # noqa: F401  (imported before the baseline)

    mesh = make_mesh()
    jax.block_until_ready(jax.numpy.zeros(8))
    reset = _reset_peak()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if direction == "hf-to-orbax":
        convert.hf_to_orbax(src, dst, mesh=mesh)
    else:
        convert.orbax_to_hf(src, dst, mesh=mesh)
    wall = time.perf_counter() - t0
    print(json.dumps({"direction": direction, "wall_s": wall, "start_kib": start, "baseline_kib": base, "peak_kib": _status_kib("VmHWM"),
                      "peak_reset": reset, "devices": jax.device_count(), "platform": jax.devices()[0].platform}))


def run_child(direction: str, src: str, dst: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", direction, src, dst]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{direction} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(src: str, dst: str) -> str:
    """Compare the exported tensors with the source, one tensor at a time."""
    from qzhou_jax.checkpoint.safetensors_io import TensorStore

    a, b = TensorStore(src), TensorStore(dst)
    if sorted(a.names()) != sorted(b.names()):
        raise SystemExit(f"round trip: tensor names differ: {sorted(set(a.names()) ^ set(b.names()))[:5]}")
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            raise SystemExit(f"round trip: tensor {name!r} differs")
    return f"all {len(a.names())} tensors bit-identical (same dtype and shape)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip comparing the exported tensors with the source")
    ap.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="qzhou-convert-bench-")
    os.makedirs(work, exist_ok=True)
    hf, orbax, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf_export"))
    for d in (hf, orbax, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        built = build_checkpoint(args.preset, hf)
        print(f"built {args.preset} bf16 checkpoint in {time.perf_counter() - t0:.0f}s: {built['params']:,} params, "
              f"{built['bytes'] / 1e9:.2f} GB in {built['files']} files, largest tensor "
              f"{built['largest'] / 2**20:.0f} MiB", file=sys.stderr)
        limit = GiB + 2 * built["largest"]
        rows = [run_child("hf-to-orbax", hf, orbax), run_child("orbax-to-hf", orbax, back)]
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.0f} GiB RAM, "
              f"jax {rows[0]['platform']} x{rows[0]['devices']}")
        print(f"checkpoint: {args.preset}, bf16, {built['bytes'] / 1e9:.2f} GB, largest tensor "
              f"{built['largest'] / 2**20:.0f} MiB, goal: peak - baseline < {limit / 2**20:.0f} MiB")
        print("| direction | wall (s) | bare interpreter RSS (MiB) | baseline RSS after imports (MiB) | "
              "peak RSS (MiB) | peak - baseline (MiB) | peak - bare interpreter (MiB) | goal (MiB) | ok |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            above = (r["peak_kib"] - r["baseline_kib"]) * 1024
            above_start = (r["peak_kib"] - r["start_kib"]) * 1024
            print(f"| {r['direction']} | {r['wall_s']:.1f} | {r['start_kib'] / 1024:.0f} | "
                  f"{r['baseline_kib'] / 1024:.0f} | {r['peak_kib'] / 1024:.0f} | {above / 2**20:.0f} | "
                  f"{above_start / 2**20:.0f} | {limit / 2**20:.0f} | {'yes' if above < limit else 'NO'} |")
        if args.verify:
            t0 = time.perf_counter()
            print(f"round trip: {verify(hf, back)} in {time.perf_counter() - t0:.0f}s")
        if not rows[0]["peak_reset"]:
            print("(VmHWM could not be reset after imports: peaks include the import phase)")
    finally:
        if not args.keep:
            for d in (hf, orbax, back):
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
