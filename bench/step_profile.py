"""Where a compiled step spends its device time: one traced call, broken down by kind of work.

    compiled = compile_for_trace(jax.jit(f).lower(*args))
    summary = profile_call(lambda: jax.block_until_ready(compiled(*args)), compiled.as_text(), out_dir)
    print(format_summary(summary))

The call runs under `jax.profiler.trace` (the trace, `*.xplane.pb`, stays in `out_dir` for
TensorBoard / XProf). Every executed HLO instruction's device time is read back from the
trace (`jax.profiler.ProfileData`) and attributed with the compiled program's HLO text
(written to `out_dir/step.hlo.txt`), so the figures name what the time went to:

  * kind: matmul (GEMMs, whether cuBLAS calls or dot fusions), attention (cuDNN fused
    attention), copy/slice (copies, transposes, dynamic(-update)-slice: e.g. the stacking of
    a scanned layer's saved activations), reduction fusions, elementwise fusions,
    collectives, host transfers, other;
  * phase: forward (with GradCache, both of its passes' forwards; with kept chunks, their
    layers re-run from the saved inputs), backward (instructions JAX emitted for a
    transpose, i.e. a VJP), recompute (the forward of a rematerialised layer re-run for its
    backward; a fusion that also computes ops of the backward counts as backward), optimizer
    (the update branch of the step's `lax.cond`), other (the gradient norm, the finiteness
    check, metrics, and copies XLA inserted without a JAX op: read the copy/slice column over
    all phases). The loss and the embedding lookup are differentiated, so they count as
    forward and backward.

Sums are device busy time; with several streams (async collectives, host copies) they may
exceed the wall time. The wall time is that of the traced call, inside the trace; the gap
between busy and wall time is launch or host overhead. On GPU, `compile_for_trace` builds
the program without command buffers (CUDA graphs): XLA's are traced as one event per graph
(`command_buffer_N`), which names no instruction. That program launches its kernels one by
one, so compare the untraced step time that the benchmark prints.

`summary.json` (in `out_dir`) also sums the time by JAX op name (`by_op`): unrolled layers and
the steps of a scan share their op names, so one entry gathers, say, every layer's SwiGLU
backward.

Kernels that the trace names after no instruction of the HLO text (XLA names some of the
kernels of asynchronous fusions at run time) are classified by their name alone, with phase
"other"; the summary gives their share (`unmatched_s`).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax

KINDS = ("matmul", "attention", "copy/slice", "reduction", "elementwise", "collective", "host transfer", "other")
PHASES = ("forward", "recompute", "backward", "optimizer", "other")

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "send", "recv")
_COPY_OPS = {"copy", "transpose", "dynamic-slice", "dynamic-update-slice", "slice", "concatenate", "pad",
             "gather", "scatter", "bitcast-convert"}
_CONTROL = {"while", "conditional", "call", "async-start", "async-done"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """instruction name -> {opcode, ops (opcodes in the computations it calls, one nesting level
    deep), target (its custom-call target), inner_targets (custom-call targets in those
    computations), op_name (the JAX op from its metadata), inner_op_names (the JAX ops of the
    instructions in those computations)}."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            cur = m.group(1) if m else None
            if cur:
                comps[cur] = []
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            comps[cur].append(m.groups())
    out: dict[str, dict[str, Any]] = {}
    for instrs in comps.values():
        for name, opcode, rest in instrs:
            calls = re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", rest)
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            inner: set[str] = set()
            targets: set[str] = set()  # custom calls inside (e.g. a cuBLAS GEMM in a dynamic-slice fusion)
            inner_names: set[str] = set()
            bodies = list(calls)
            for c in calls:  # one level of nesting (fusions in fusions)
                for _, op, r in comps.get(c, ()):
                    if op in ("fusion", "call"):
                        bodies += re.findall(r"calls=%?([\w.\-]+)", r)
            for c in bodies:
                for _, op, r in comps.get(c, ()):
                    inner.add(op)
                    targets.update(re.findall(r'custom_call_target="([^"]+)"', r))
                    inner_names.update(re.findall(r'op_name="([^"]*)"', r))
            out[name] = {"opcode": opcode, "ops": inner, "target": target.group(1) if target else "",
                         "inner_targets": targets, "op_name": op_name.group(1) if op_name else "",
                         "inner_op_names": inner_names}
    return out


def compile_for_trace(lowered: Any) -> Any:
    """`lowered.compile()`, on GPU without command buffers, so that a trace shows each kernel."""
    if jax.devices()[0].platform == "gpu":
        return lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
    return lowered.compile()


def kind_of(info: dict[str, Any] | None, name: str) -> str:
    """One of KINDS for an HLO instruction (falls back on its name when it is unknown)."""
    if info is None:
        low = name.lower()
        if "gemm" in low or "dot" in low or "matmul" in low or "cublas" in low:
            return "matmul"
        if "fmha" in low or "flash" in low or "attention" in low:
            return "attention"
        if any(w in low for w in ("all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter",
                                  "reduce_scatter", "collective", "nccl")):
            return "collective"
        if any(w in low for w in ("slice", "copy", "transpose", "concatenate", "gather", "scatter", "pad")):
            return "copy/slice"
        if "reduce" in low:
            return "reduction"
        if "fusion" in low:
            return "elementwise"
        return "other"
    op, ops = info["opcode"], info["ops"]
    target = " ".join([info["target"], *sorted(info.get("inner_targets", ()))]).lower()
    base = op.removesuffix("-start").removesuffix("-done")
    if base in _COLLECTIVES or ops & set(_COLLECTIVES):
        return "collective"
    if op in ("copy-start", "copy-done") or "host" in target or ops & {"copy-start", "copy-done"}:
        return "host transfer"
    if "fmha" in target:  # cuDNN fused attention, forward or backward
        return "attention"
    if (op in ("dot", "convolution") or "gemm" in target or "cublas" in target or "conv" in target
            or ops & {"dot", "convolution"}):
        return "matmul"
    if op in _COPY_OPS or (op == "fusion" and ops and ops <= _COPY_OPS | {"parameter", "constant", "bitcast",
                                                                        "convert", "tuple", "get-tuple-element",
                                                                        "reshape", "broadcast", "iota", "add",
                                                                        "multiply", "compare", "select", "clamp",
                                                                        "subtract"}
                           and ops & {"dynamic-slice", "dynamic-update-slice", "copy", "transpose", "concatenate",
                                      "slice", "gather", "scatter", "pad"}):
        return "copy/slice"
    if op == "reduce" or "reduce" in ops or "reduce-window" in ops:
        return "reduction"
    if op == "fusion" or op in ("add", "multiply", "convert", "select", "exponential", "broadcast"):
        return "elementwise"
    return "other"


def _phase_of_name(n: str) -> str:
    if not n:
        return "other"
    if "/cond/branch_1" in n:  # the step's update branch (`lax.cond` on finite loss and gradients)
        return "optimizer"
    if "rematted_computation" in n:
        return "recompute"
    if "transpose(" in n:
        return "backward"
    if "jvp(" in n or "/while/" in n:  # differentiated, or in a loop (layers; GradCache's passes)
        return "forward"
    return "other"


_PASS_ORDER = ("forward", "recompute", "backward")


def phase_of(info: dict[str, Any] | None) -> str:
    """One of PHASES, from the JAX op name in the instruction's metadata.

    A fusion named after a forward or recomputed op that also computes a later pass's op
    counts as the latest of them (recompute after forward, backward after both): XLA fuses
    a norm's recomputed sum of squares into the kernel of the norm backward's own row sum,
    and that kernel's time is the backward pass's."""
    if info is None:
        return "other"
    phase = _phase_of_name(info["op_name"])
    if phase in _PASS_ORDER:
        inner = {_phase_of_name(n) for n in info.get("inner_op_names", ())} & set(_PASS_ORDER)
        phase = max(inner | {phase}, key=_PASS_ORDER.index)
    return phase


def _device_events(path: str, module: str | None) -> tuple[dict[str, float], str]:
    """HLO op name -> summed device time (s) of the events of one trace, and the source used."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    per_op: dict[str, float] = collections.defaultdict(float)
    xla_ops: dict[str, float] = collections.defaultdict(float)
    host_ops: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        device = plane.name.startswith("/device:") and "CUSTOM" not in plane.name
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                hlo_op, mod = stats.get("hlo_op"), stats.get("hlo_module")
                if hlo_op is not None:  # some profiler versions join nested annotations with "::"
                    hlo_op = str(hlo_op).split("::")[-1]
                if module and mod and module not in str(mod):
                    continue
                if device and line.name == "XLA Ops":
                    xla_ops[ev.name] += ev.duration_ns * 1e-9
                elif device and hlo_op:
                    per_op[str(hlo_op)] += ev.duration_ns * 1e-9
                elif not device and hlo_op and not ev.name.startswith("end:"):
                    host_ops[str(hlo_op)] += ev.duration_ns * 1e-9
    if per_op:
        return dict(per_op), "device kernels"
    if xla_ops:
        return dict(xla_ops), "device XLA Ops line"
    return dict(host_ops), "host (CPU) thunks"


def profile_call(run: Callable[[], Any], hlo_text: str, out_dir: str | None = None, *,
                 calls: int = 1) -> dict[str, Any]:
    """Trace `calls` calls of `run()` (one execution of the compiled program whose optimized HLO
    is `hlo_text`, blocking until it is done) and break its device time down."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="qzhou_profile_")
    os.makedirs(out_dir, exist_ok=True)
    _write(os.path.join(out_dir, "step.hlo.txt"), hlo_text)
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    module = module.group(1) if module else None
    hlo = parse_hlo(hlo_text)
    with jax.profiler.trace(out_dir):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - t0) / calls
    traces = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"no trace (*.xplane.pb) was written under {out_dir}")
    per_op, source = _device_events(traces[-1], module)
    table: dict[tuple[str, str], float] = collections.defaultdict(float)
    ops = []
    for name, sec in per_op.items():
        info = hlo.get(name)
        if info is not None and info["opcode"] in _CONTROL:  # its body's instructions are counted
            continue
        k, p = kind_of(info, name), phase_of(info)
        table[(p, k)] += sec / calls
        ops.append((sec / calls, name, k, p, (info or {}).get("op_name", "")))
    ops.sort(reverse=True)
    by_op: dict[tuple[str, str, str], list] = collections.defaultdict(lambda: [0.0, 0])
    for sec, _, k, p, o in ops:  # unrolled layers and scanned steps share their JAX op names
        by_op[(o, k, p)][0] += sec
        by_op[(o, k, p)][1] += 1
    busy = sum(table.values())
    summary = {
        "wall_s": wall, "busy_s": busy, "source": source, "module": module, "trace": traces[-1],
        "hlo": os.path.join(out_dir, "step.hlo.txt"), "unmatched_ops": sum(1 for n in per_op if n not in hlo),
        "unmatched_s": sum(sec for n, sec in per_op.items() if n not in hlo) / calls,
        "by_kind": {k: sum(v for (p, kk), v in table.items() if kk == k) for k in KINDS},
        "by_phase": {p: sum(v for (pp, k), v in table.items() if pp == p) for p in PHASES},
        "table": {f"{p}/{k}": v for (p, k), v in sorted(table.items())},
        "top": [dict(seconds=s, op=n, kind=k, phase=p, op_name=o[-120:]) for s, n, k, p, o in ops[:200]],
        "by_op": [dict(seconds=v[0], kernels=v[1], kind=k, phase=p, op_name=o)
                  for (o, k, p), v in sorted(by_op.items(), key=lambda item: -item[1][0])],
    }
    _write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _write(path: str, text: str) -> None:
    """Write through a temporary name, so an interrupted run leaves no half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def format_summary(s: dict[str, Any]) -> str:
    """The breakdown as text: kinds by phase (ms and % of busy time), the top instructions,
    then the JAX ops other than matmuls that took the most time over all their kernels."""
    busy = s["busy_s"] or 1e-30
    lines = [f"profile: wall {s['wall_s'] * 1e3:.1f} ms per traced call (tracing adds launch overhead), "
             f"device busy {s['busy_s'] * 1e3:.1f} ms "
             f"({s['source']}; {s['unmatched_ops']} op names not in the HLO, "
             f"{s.get('unmatched_s', 0.0) * 1e3:.1f} ms); trace {s['trace']}"]
    if any(t["op"].startswith("command_buffer") for t in s["top"]):
        lines.append("warning: the trace shows command buffers (CUDA graphs), not kernels: "
                     "compile the traced program with compile_for_trace")
    head = "| phase | " + " | ".join(KINDS) + " | total |"
    lines += [head, "|" + " --- |" * (len(KINDS) + 2)]
    for p in PHASES:
        cells = [s["table"].get(f"{p}/{k}", 0.0) for k in KINDS]
        if sum(cells) == 0:
            continue
        lines.append(f"| {p} | " + " | ".join(f"{c * 1e3:.1f}" if c else "-" for c in cells)
                     + f" | {sum(cells) * 1e3:.1f} ({sum(cells) / busy:.0%}) |")
    lines.append("| all | " + " | ".join(f"{s['by_kind'][k] * 1e3:.1f} ({s['by_kind'][k] / busy:.0%})"
                                         for k in KINDS) + f" | {busy * 1e3:.1f} |")
    lines.append("top instructions (ms per call, kind, phase, JAX op):")
    for t in s["top"][:15]:
        lines.append(f"  {t['seconds'] * 1e3:8.2f}  {t['op']:32s} {t['kind']:12s} {t['phase']:10s} {t['op_name']}")
    if s.get("by_op"):
        lines.append("top JAX ops other than matmuls (ms summed over their kernels, kernels, kind, phase, JAX op):")
        for t in [t for t in s["by_op"] if t["kind"] != "matmul"][:15]:
            lines.append(f"  {t['seconds'] * 1e3:8.2f}  {t['kernels']:5d}  {t['kind']:12s} {t['phase']:10s} "
                         f"{t['op_name'][-100:]}")
    return "\n".join(lines)
