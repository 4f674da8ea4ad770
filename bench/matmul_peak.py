"""Measured bf16 matmul rates of device 0, per shape, in JAX and (where it sees a GPU) PyTorch.

    python bench/matmul_peak.py

The benchmarks' MFU divides by `common.matmul_peak_tflops()`, the best JAX rate over
`common.PEAK_SHAPES`; this prints every rate that goes into it, the same shapes dispatched
one product per call, and PyTorch's cuBLAS rate for the same products, to check that peak.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets env, sys.path)
import jax
import jax.numpy as jnp
import numpy as np


def single_dispatch_tflops(m: int, n: int) -> float:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, m)) / np.sqrt(m), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    dt = common.time_fn(jax.jit(lambda a, x: a @ x), a, x, steps=20)
    return 2 * m * m * n / dt / 1e12


def torch_tflops(m: int, n: int) -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16) / m ** 0.5
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ x
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ x
    end.record()
    torch.cuda.synchronize()
    return 2 * m * m * n * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"device {common.device_name()}")
    print(common.row(["[m, m] @ [m, n]", "JAX chain of 10 (TFLOP/s)", "JAX one per call", "PyTorch"]))
    print(common.row(["---"] * 4))
    rows = []
    for m, n in common.PEAK_SHAPES:
        rows.append((m, n, common.matmul_rate_tflops(m, n), single_dispatch_tflops(m, n)))
    try:
        torch_rates = [torch_tflops(m, n) for m, n in common.PEAK_SHAPES]
    except ImportError:
        torch_rates = [float("nan")] * len(rows)
    for (m, n, chain, single), t in zip(rows, torch_rates):
        print(common.row([f"{m} x {m} @ {m} x {n}", f"{chain:.0f}", f"{single:.0f}", f"{t:.0f}"]))
    print(f"peak used for MFU: {max(r[2] for r in rows):.0f} TFLOP/s")


if __name__ == "__main__":
    main()
