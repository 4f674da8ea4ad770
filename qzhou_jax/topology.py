"""Accelerator targets for planning: TPU slices, GPU clusters, local CPU devices.

A target names the chips a run will use, how much memory each has and its bf16 peak.
TPU slices are compiled for here, on any machine, through libtpu's topology description
(`jax.experimental.topologies.get_topology_desc`): the devices are abstract, but
`jax.jit(...).lower(...).compile()` produces the real TPU program and its per-chip
memory analysis. libtpu is an optional extra (`pip install "qzhou-jax[tpu]"`).

Target names (`parse_target`)
-----------------------------
``v4-32``, ``v5p-16``, ``v5e-32`` / ``v5litepod-32``, ``v6e-32``
    Cloud TPU accelerator types. The number after the dash follows Google's naming: for
    v4 and v5p it counts TensorCores (2 per chip, so v5p-16 is 8 chips), for v5e and v6e
    it counts chips (1 TensorCore each). JAX sees one device per chip on all four (v4 and
    v5p run their two TensorCores as one "megacore" device).
``v5p:2x2x2``, ``v5e:4x8``
    a libtpu topology string: the chip grid itself (3D for v4/v5p, 2D for v5e/v6e).
``gpu:8xH100``, ``gpu:16xH200``, ``gpu:8xA100-80``
    NVIDIA GPUs (8 per host). Compiled only when this machine has exactly those GPUs;
    otherwise the plan is an analytic estimate (`plan.py`).
``cpu:8``
    this machine's CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8);
    compiles here, for testing the planner itself.

Chip figures are vendor numbers (sources next to each row); `compiler_hbm_gib` reads
the memory the TPU compiler itself allows per chip, which is what a program must fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind: memory per device (GiB) and dense bf16 peak (TFLOP/s)."""

    name: str
    platform: str  # "tpu", "gpu" or "cpu"
    hbm_gib: float
    peak_tflops: float | None
    source: str
    per_host: int = 4  # devices per host in multi-host slices / nodes


# Vendor figures. TPU: Google Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): per-chip HBM and "peak compute per
# chip (bf16)". GPU: NVIDIA datasheets, dense (non-sparse) BF16 Tensor Core peak of the
# SXM parts; their "80 GB" / "141 GB" are binary sizes in practice (an H100 80GB reports
# 79.6 GiB to the driver, an H200 about 140 GiB), so they are taken as GiB here.
# The reference figures (bench/RESULTS.md) measured 795 TFLOP/s for an 8192^3 bf16 matmul on one H100 80GB;
# pass --peak-tflops 795 to plan against that instead.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "tpu", 32, 275, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16"),
    "v5e": Chip("TPU v5e", "tpu", 16, 197, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16"),
    "v5p": Chip("TPU v5p", "tpu", 95, 459, "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16"),
    "v6e": Chip("TPU v6e", "tpu", 32, 918, "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16"),
    "h100": Chip("H100", "gpu", 80, 989, "NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 989 TFLOP/s dense bf16", 8),
    "h200": Chip("H200", "gpu", 140, 989, "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 989 TFLOP/s dense bf16", 8),
    "a100-40": Chip("A100 40GB", "gpu", 40, 312, "NVIDIA A100 datasheet: 40 GB HBM2, 312 TFLOP/s dense bf16", 8),
    "a100-80": Chip("A100 80GB", "gpu", 80, 312, "NVIDIA A100 datasheet: 80 GB HBM2e, 312 TFLOP/s dense bf16", 8),
}
GPU_ALIASES = {"a100": "a100-80", "h100-80": "h100", "h200-141": "h200"}


def chip_for_device(device) -> Chip | None:
    """The Chip of a jax device from its device_kind ("NVIDIA H100 80GB HBM3", "TPU v5p",
    "TPU v5 lite", ...); None for CPUs and unknown kinds."""
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = getattr(device, "device_kind", "").lower()
    for needle, key in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80" if "80" in kind else "a100-40"),
                        ("v5 lite", "v5e"), ("v5e", "v5e"), ("v6", "v6e"), ("v5", "v5p"), ("v4", "v4")):
        if needle in kind:
            return CHIPS[key]
    return None


def peak_flops(device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device (for MFU); `override_tflops` wins; None if unknown."""
    if override_tflops:
        return float(override_tflops) * 1e12
    chip = chip_for_device(device)
    return chip.peak_tflops * 1e12 if chip and chip.peak_tflops else None

# Chip grids of the common slice sizes (chips -> libtpu topology), from the
# configuration tables of the same Google pages: v4/v5p are 3D (4 chips per host),
# v5e/v6e 2D (1, 4 and 8 chips on one host; 4 per host beyond).
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TPU_FAMILIES = {  # family -> (chip key, TensorCores per name unit, grid table)
    "v4": ("v4", 2, _GRID_3D),
    "v5p": ("v5p", 2, _GRID_3D),
    "v5e": ("v5e", 1, _GRID_2D),
    "v5litepod": ("v5e", 1, _GRID_2D),
    "v6e": ("v6e", 1, _GRID_2D),
}

EXAMPLES = "v5p-8, v5p-16, v4-32, v5e-32 (or v5litepod-32), v6e-32, v5p:2x2x2, gpu:8xH100, cpu:8"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for.

    num_devices: JAX devices (TPU chips, GPUs, CPU devices); hosts: processes of a
    multi-host run (one per TPU VM worker / GPU node). topology + topology_kwargs:
    the libtpu topology description (TPU only). hbm_gib / peak_tflops: per device.
    """

    name: str
    chip: Chip
    num_devices: int
    hosts: int
    hbm_gib: float
    peak_tflops: float | None
    topology: str | None = None
    topology_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def platform(self) -> str:
        return self.chip.platform

    def describe(self) -> str:
        peak = f", {self.peak_tflops:g} TFLOP/s bf16" if self.peak_tflops else ""
        hosts = f", {self.hosts} host{'s' if self.hosts != 1 else ''}"
        kind = "chip" if self.platform == "tpu" else "device"
        return (f"{self.name}: {self.num_devices} x {self.chip.name}{hosts}; {self.hbm_gib:g} GiB "
                f"per {kind}{peak}")


def _tpu_hosts(chip_key: str, chips: int) -> int:
    if chip_key in ("v5e", "v6e") and chips <= 8:
        return 1
    return max(1, chips // 4)


def _tpu_kwargs(chip_key: str, chips: int) -> tuple[tuple[str, Any], ...]:
    kwargs: list[tuple[str, Any]] = []
    if chip_key == "v4":
        kwargs.append(("chip_config_name", "megacore"))  # one JAX device per chip, as on a real v4
    if chip_key in ("v5e", "v6e") and chips < 4:
        kwargs.append(("chips_per_host_bounds", (1, 1, 1) if chips == 1 else (1, 2, 1)))
    elif chip_key in ("v5e", "v6e") and chips == 8:
        kwargs.append(("chips_per_host_bounds", (2, 4, 1)))  # v5litepod-8 / v6e-8: one 8-chip host
    return tuple(kwargs)


def _tpu_target(name: str, chip_key: str, chips: int, grid: str, hbm_gib: float | None,
                peak_tflops: float | None) -> Target:
    chip = CHIPS[chip_key]
    return Target(name=name, chip=chip, num_devices=chips, hosts=_tpu_hosts(chip_key, chips),
                  hbm_gib=hbm_gib or chip.hbm_gib, peak_tflops=peak_tflops or chip.peak_tflops,
                  topology=f"{chip_key}:{grid}", topology_kwargs=_tpu_kwargs(chip_key, chips))


def parse_target(spec: str | None = None, *, devices: int | None = None, memory_gib: float | None = None,
                 peak_tflops: float | None = None) -> Target:
    """A `Target` from a name (see the module docstring), or from `devices` + `memory_gib`
    (a generic accelerator). `memory_gib` / `peak_tflops` override the chip's figures.
    Raises ValueError naming the accepted forms for anything else."""
    for what, v in (("--devices", devices), ("--memory-gib", memory_gib), ("--peak-tflops", peak_tflops)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{what}: expected a positive number, got {v}")
    if spec is None:
        if devices is None or memory_gib is None:
            raise ValueError(f"give a --topology ({EXAMPLES}) or both --devices and --memory-gib")
        chip = Chip("accelerator", "gpu", memory_gib, peak_tflops, "given on the command line", 8)
        return Target(f"{int(devices)} devices", chip, int(devices), max(1, math.ceil(devices / 8)),
                      memory_gib, peak_tflops)
    raw = spec.strip()
    s = raw.lower()

    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", s)
    if m:
        family, count = m.group(1), int(m.group(2))
        chip_key, cores_per_unit, grids = _TPU_FAMILIES[family]
        if count % cores_per_unit:
            raise ValueError(f"topology {raw!r}: the number after the dash counts TensorCores for {family} "
                             f"(2 per chip), so it must be even")
        chips = count // cores_per_unit
        if chips not in grids:
            sizes = ", ".join(f"{family}-{c * cores_per_unit}" for c in sorted(grids))
            raise ValueError(f"topology {raw!r}: no standard {family} slice of {chips} chips "
                             f"(known sizes: {sizes}; or give the chip grid, e.g. {chip_key}:{grids[8]})")
        _check_device_count(raw, chips, devices)
        return _tpu_target(f"{family}-{count}", chip_key, chips, grids[chips], memory_gib, peak_tflops)

    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+){1,2})", s)
    if m:
        chip_key, _, grids = _TPU_FAMILIES[m.group(1)]
        dims = [int(x) for x in m.group(2).split("x")]
        want = 3 if grids is _GRID_3D else 2
        if len(dims) != want or 0 in dims:
            raise ValueError(f"topology {raw!r}: {chip_key} grids have {want} dimensions (e.g. "
                             f"{chip_key}:{grids[8]})")
        chips = math.prod(dims)
        _check_device_count(raw, chips, devices)
        return _tpu_target(f"{chip_key}:{m.group(2)}", chip_key, chips, m.group(2), memory_gib, peak_tflops)

    m = re.fullmatch(r"gpu:(\d+)x([a-z0-9-]+)", s)
    if m:
        count, kind = int(m.group(1)), GPU_ALIASES.get(m.group(2), m.group(2))
        if kind not in CHIPS or CHIPS[kind].platform != "gpu":
            known = ", ".join(sorted(k for k, c in CHIPS.items() if c.platform == "gpu"))
            raise ValueError(f"topology {raw!r}: unknown GPU {m.group(2)!r} (known: {known}; or use "
                             f"--devices N --memory-gib G [--peak-tflops P])")
        if count < 1:
            raise ValueError(f"topology {raw!r}: expected at least one GPU")
        _check_device_count(raw, count, devices)
        chip = CHIPS[kind]
        return Target(f"gpu:{count}x{kind.upper()}", chip, count, max(1, math.ceil(count / chip.per_host)),
                      memory_gib or chip.hbm_gib, peak_tflops or chip.peak_tflops)

    m = re.fullmatch(r"cpu(?::(\d+))?", s)
    if m:
        count = int(m.group(1) or devices or 1)
        _check_device_count(raw, count, devices)
        chip = Chip("CPU device", "cpu", memory_gib or 16.0, peak_tflops, "this machine (memory: --memory-gib)", count)
        return Target(f"cpu:{count}", chip, count, 1, chip.hbm_gib, peak_tflops)

    raise ValueError(f"unknown topology {raw!r}; expected a TPU accelerator type, a libtpu chip grid, "
                     f"gpu:<count>x<kind> or cpu:<count> (e.g. {EXAMPLES})")


def _check_device_count(spec: str, count: int, devices: int | None) -> None:
    if devices is not None and int(devices) != count:
        raise ValueError(f"--devices {devices} contradicts topology {spec!r} ({count} devices)")


# ------------------------------------------------------------------ libtpu
def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


def tpu_devices(target: Target) -> list:
    """Abstract (compile-only) TPU devices of `target`'s slice, from libtpu.

    Raises ValueError with the install command when libtpu is missing or unusable.
    """
    if target.topology is None:
        raise ValueError(f"{target.name}: not a TPU topology")
    if not libtpu_available():
        raise ValueError(f"{target.name}: compiling for TPU needs libtpu: pip install 'qzhou-jax[tpu]' "
                         f"(or pass --estimate for an analytic estimate without compiling)")
    # Compile-only use opens no chip, so several processes may load libtpu at once. (On a
    # machine without TPUs libtpu logs that it cannot find the accelerator type and worker
    # hostnames: expected, harmless.)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in target.topology_kwargs}
    try:
        desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs)
    except Exception as e:  # libtpu / jaxlib mismatch, unknown grid, ...
        raise ValueError(f"{target.name}: libtpu could not describe topology {target.topology!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); libtpu must match jaxlib "
                         f"(libtpu 0.0.42.* for jax 0.10.2)") from None
    devices = list(desc.devices)
    if len(devices) != target.num_devices:
        raise ValueError(f"{target.name}: libtpu describes {len(devices)} devices for {target.topology!r}, "
                         f"expected {target.num_devices}")
    return devices


_UNITS = {"K": 1 / (1 << 20), "M": 1 / 1024, "G": 1.0, "T": 1024.0}
_SIZE = r"([\d.]+)([KMGT])"
_HBM_MESSAGE = re.compile(rf"exceeds available HBM \({_SIZE}\)")


def _gib(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def compiler_hbm_gib(device) -> float | None:
    """The HBM (GiB) the TPU compiler allows one program on `device`, or None if unknown.

    The compiler rejects programs larger than this (a little under the vendor figure: it
    keeps some memory for the runtime); compiling a deliberately oversized program and
    reading the number from its error takes well under a second.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    big = jax.ShapeDtypeStruct((1 << 17, 1 << 17), jnp.float32, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: a + 1).lower(big).compile()  # 64 GiB in, 64 GiB out
    except Exception as e:
        m = _HBM_MESSAGE.search(str(e))
        return _gib(*m.groups()) if m else None
    return None


def parse_oom(message: str) -> dict[str, float] | None:
    """{'required_gib', 'available_gib', 'temporaries_only'} from a TPU compiler out-of-memory error,
    else None. `temporaries_only` (1.0 or 0.0): the figure counts the program's temporaries
    alone, without its arguments (the train state and the batch), as one of the messages does."""
    m = re.search(rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", message)
    temporaries_only = m is not None
    if m is None:
        m = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
    if m is None:
        return None
    return {"required_gib": _gib(m.group(1), m.group(2)), "available_gib": _gib(m.group(3), m.group(4)),
            "temporaries_only": float(temporaries_only)}
