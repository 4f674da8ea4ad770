"""Accelerator facts used for MFU and memory plans: memory per chip and dense bf16 peak.

Vendor figures (dense, no sparsity): NVIDIA H100 SXM / H200 SXM datasheets (989 TFLOP/s
bf16, 80 / 141 GB HBM), A100 datasheet (312 TFLOP/s, 40 / 80 GB); Google Cloud TPU system
architecture pages (per chip: v4 275 TFLOP/s, 32 GiB; v5e 197, 16 GiB; v5p 459, 95 GiB;
v6e (Trillium) 918, 32 GiB). The H100 peak measured with a large bf16 matmul on the
project's benchmark machine was 795 TFLOP/s (bench/RESULTS.md); MFU figures in the
benchmarks state which peak they use.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    memory_gib: float
    bf16_tflops: float


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("H100", 80 * 1e9 / 2**30, 989.0),
    Chip("H200", 141 * 1e9 / 2**30, 989.0),
    Chip("A100-40GB", 40 * 1e9 / 2**30, 312.0),
    Chip("A100-80GB", 80 * 1e9 / 2**30, 312.0),
    Chip("v4", 32.0, 275.0),
    Chip("v5e", 16.0, 197.0),
    Chip("v5p", 95.0, 459.0),
    Chip("v6e", 32.0, 918.0),
)}


def chip_for_device(device) -> Chip | None:
    """The Chip of a jax device, from its device_kind ("NVIDIA H100 80GB HBM3", "TPU v5p",
    "TPU v5 lite" ...); None for CPUs and unknown kinds."""
    kind = getattr(device, "device_kind", "").lower()
    if getattr(device, "platform", "") == "cpu":
        return None
    if "h200" in kind:
        return CHIPS["H200"]
    if "h100" in kind:
        return CHIPS["H100"]
    if "a100" in kind:
        return CHIPS["A100-80GB" if "80" in kind else "A100-40GB"]
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return CHIPS["v5e"]
    if "v6" in kind:
        return CHIPS["v6e"]
    if "v5" in kind:
        return CHIPS["v5p"]
    if "v4" in kind:
        return CHIPS["v4"]
    return None


def peak_flops(device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device (override in TFLOP/s wins); None if unknown."""
    if override_tflops:
        return float(override_tflops) * 1e12
    chip = chip_for_device(device)
    return chip.bf16_tflops * 1e12 if chip else None
