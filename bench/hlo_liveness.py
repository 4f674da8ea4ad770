"""Which buffers are live at the peak of a compiled program: an estimate read from its
scheduled HLO text (`bench/step_profile.py` writes it as `step.hlo.txt`).

    python bench/hlo_liveness.py /tmp/prof/rl14_unrolled/step.hlo.txt --top 20

Walks the entry computation in its scheduled order. Every array an instruction defines (each
element of a tuple-valued one) is a buffer from its definition to the last use of it or of
an alias of it: `get-tuple-element`, `bitcast` and `tuple` define no buffer, and the outputs
of `while` and `conditional` alias their operands (loops and branches update their state in
place). Parameters are the program's arguments and are reported apart. At the instruction
where the live bytes peak, the live buffers are grouped by the JAX operation that made them
(`op_name` metadata, layer numbers folded) and shape.

An estimate, not XLA's buffer assignment: it does not model outputs written into a dead
operand's buffer (in-place fusions), the temporaries inside loop bodies and branches, or
nested tuples (flattened).
On the Qwen2.5-1.5B L=256 train steps compiled for one H200 (bench/RESULTS.md, "One
H200"), arguments + live buffers came to 36.8 GiB against 36.9 GiB measured (remat on 14 of
28 unrolled layers) and 48.3 against 48.3 ("dots", unrolled); scanned programs come out low
(37.1 against 39.3), their loop bodies' temporaries not counted. In both unrolled programs
it showed a float32 copy of every layer's weights (4.7 GiB) live at the peak.
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$")
_ALIASING = {"get-tuple-element", "bitcast", "tuple", "while", "conditional"}


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(text, bytes) of each array in a shape (one for an array, one per element of a tuple)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append((f"{dtype}[{dims}]", n * _DTYPE_BYTES[dtype]))
    return out


def _entry(text: str) -> list[str]:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ENTRY"):
            body = []
            for line2 in lines[i + 1:]:
                if line2.startswith("}"):
                    return body
                body.append(line2)
    raise ValueError("no ENTRY computation in the HLO text")


def _operands(rest: str) -> list[str]:
    """The %names in an instruction's operand list (up to its closing parenthesis)."""
    depth, end = 1, len(rest)
    for i, c in enumerate(rest):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def peak_live(text: str) -> dict[str, Any]:
    """{"argument_bytes", "peak_bytes" (live buffers other than arguments at the peak),
    "at" (the instruction), "live": [(bytes, op_name, shape), ...] largest first}."""
    buffers: dict[str, list[tuple[str, int, str, str]]] = {}  # name -> [(buffer id, bytes, op_name, shape)]
    order: list[tuple[str, list[str], list[tuple[str, int, str, str]]]] = []
    args = 0
    for line in _entry(text):
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        op_name = meta.group(1) if meta else ""
        ops = _operands(rest)
        if op == "get-tuple-element":
            k = int(re.search(r"index=(\d+)", rest).group(1))
            src = buffers.get(ops[0], [])
            buffers[name] = src[k:k + 1] if len(src) > k else src
        elif op in _ALIASING:
            buffers[name] = [b for o in ops for b in buffers.get(o, [])]
        else:
            own = [(f"{name}#{i}", size, op_name, s) for i, (s, size) in enumerate(_arrays(shape))]
            buffers[name] = own
            if op == "parameter":
                args += sum(b[1] for b in own)
                own = []
            order.append((name, ops, own))
            continue
        order.append((name, ops, []))
    last_use: dict[str, int] = {}
    for i, (_, ops, own) in enumerate(order):
        for b in own:
            last_use.setdefault(b[0], i)
        for o in ops:
            for b in buffers.get(o, []):
                last_use[b[0]] = i
    frees = collections.defaultdict(list)
    for bid, i in last_use.items():
        frees[i].append(bid)
    live: dict[str, tuple[int, str, str]] = {}
    total, best = 0, (-1, 0, {}, "")
    for i, (name, _, own) in enumerate(order):
        for bid, size, op_name, s in own:
            live[bid] = (size, op_name, s)
            total += size
        if total > best[0]:
            best = (total, i, dict(live), name)
        for bid in frees.get(i, []):
            if bid in live:
                total -= live.pop(bid)[0]
    groups: collections.Counter = collections.Counter()
    for size, op_name, s in best[2].values():
        groups[(re.sub(r"\d+", "N", op_name), s)] += size
    return {"argument_bytes": args, "peak_bytes": max(best[0], 0), "at": best[3],
            "live": [(b, op_name, s) for (op_name, s), b in groups.most_common()]}


def format_live(r: dict[str, Any], top: int = 20) -> str:
    unit, div = ("GiB", 2 ** 30) if r["argument_bytes"] + r["peak_bytes"] >= 2 ** 30 else ("MiB", 2 ** 20)
    lines = [f"arguments {r['argument_bytes'] / div:.2f} {unit}; other live buffers at the peak "
             f"({r['at']}): {r['peak_bytes'] / div:.2f} {unit}"]
    for b, op_name, s in r["live"][:top]:
        lines.append(f"  {b / div:8.3f} {unit}  {s:<28} {op_name or '(no op_name)'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hlo", help="scheduled HLO text (step_profile's step.hlo.txt, or compiled.as_text())")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with open(args.hlo) as f:
        print(format_live(peak_live(f.read()), args.top))


if __name__ == "__main__":
    main()
