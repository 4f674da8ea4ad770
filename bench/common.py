"""Shared pieces of the benchmarks: device peak, timing, torch/HF side, results formatting."""

from __future__ import annotations

import os
import platform
import sys
import time

# JAX must not grab most of the GPU up front: the PyTorch reference shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# ... but may grow past the default cap of 75% of the device when a workload needs it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()} ({platform.node()})"


def time_fn(fn, *args, steps: int = 10, warmup: int = 2) -> float:
    """Median seconds per call of a function returning jax arrays."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# (rows of the left operand and of the chained right operand, columns of the right one):
# square and wide products; the best of them is taken as the device's peak
PEAK_SHAPES = ((8192, 8192), (16384, 8192), (8192, 16384))


def matmul_rate_tflops(m: int, n: int, dtype=None, chain: int = 10) -> float:
    """Measured rate of `chain` chained [m, m] @ [m, n] products inside one program (x <- a @ x,
    `a` scaled so values stay bounded): per-call dispatch and output allocation, which depend
    on the allocator, are paid once per chain rather than once per product."""
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = dtype or (jnp.float32 if on_cpu else jnp.bfloat16)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, m)) / np.sqrt(m), dtype)
    x = jnp.asarray(rng.standard_normal((m, n)), dtype)
    f = jax.jit(lambda a, x: jax.lax.fori_loop(0, chain, lambda _, y: a @ y, x))
    dt = time_fn(f, a, x, steps=5 if on_cpu else 10)
    return 2 * m * m * n * chain / dt / 1e12


def matmul_peak_tflops(dtype=None) -> float:
    """Measured dense matmul peak of device 0 (bf16 on accelerators, f32 on CPU): the best rate
    over `PEAK_SHAPES` (one 1024 x 1024 product chain on CPU).

    A single 8192^3 shape is not enough: on an H200 (jax 0.11.2) it measured 653-669 TFLOP/s
    in JAX while the 1.5b train step's own GEMMs ran at about 800 (bench/RESULTS.md)."""
    if jax.devices()[0].platform == "cpu":
        return matmul_rate_tflops(1024, 1024, dtype, chain=2)
    return max(matmul_rate_tflops(m, n, dtype) for m, n in PEAK_SHAPES)


# bf16 matmul rate that the reference figures (bench/RESULTS.md) measured on an H100 (the H200 has the same compute).
# JAX's own measurement (`matmul_peak_tflops`) comes out lower on these chips, 647-728 TFLOP/s
# on an H200 depending on the shape, while the 1.5b train step's GEMMs ran at up to 800 and
# PyTorch's 8192^3 product at 791 (bench/RESULTS.md): MFU against the measured peak flatters.
REFERENCE_PEAKS = {"H100": 795.0, "H200": 795.0}


def reference_peak_tflops() -> float | None:
    """The reference figures' bf16 peak for device 0's kind, None where it gives none."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((v for k, v in REFERENCE_PEAKS.items() if k in kind), None)


def torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_time(fn, steps: int = 10, warmup: int = 2) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def jax_peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def hf_random_model(cfg, dtype: str, attn: str = "sdpa", seed: int = 0):
    """transformers.Qwen2Model with random weights and our config's shapes, on the torch device."""
    import torch
    import transformers

    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf().items()
                                         if k not in ("architectures", "model_type", "qzhou_jax", "dtype")})
    hf_cfg.is_causal = cfg.attention == "causal"
    torch.manual_seed(seed)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(torch_device()):
        model = transformers.Qwen2Model._from_config(hf_cfg, attn_implementation=attn, dtype=tdtype)
    return model.eval()


def torch_state_to_numpy(model) -> dict:
    """Host numpy copies of a torch model's weights; bf16 stays bf16 (no float32 blow-up)."""
    import ml_dtypes
    import torch

    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
