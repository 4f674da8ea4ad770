"""Which buffers are live at the peak of a compiled program: an estimate read from its
scheduled HLO text (`bench/step_profile.py` writes it as `step.hlo.txt`).

    python bench/hlo_liveness.py /tmp/prof/rl14_unrolled/step.hlo.txt --top 20

Walks the entry computation in its scheduled order. Every array an instruction defines (each
array of a tuple-valued one) is a buffer from its definition to the last use of it or of an
alias of it. `get-tuple-element`, `bitcast`, `tuple` and optimization barriers define no
buffer; a `while`'s results are its loop state (updated in place); an async op's `-done`
returns what its `-start` made; a `conditional`'s results (and an async `-start`'s tuple)
reuse an operand's buffer of the same shape where there is one (a branch updating state in
place), and are new buffers otherwise. Parameters are the program's arguments and are
reported apart. At the instruction where the live bytes peak, the live buffers are grouped
by the JAX operation that made them (`op_name` metadata, numbers folded) and shape.

An estimate, not XLA's buffer assignment: it does not model outputs written into a dead
operand's buffer (in-place fusions) or the temporaries inside loop bodies and branches (an
optimizer update inside a `lax.cond` counts its results, not its working buffers).

On the Qwen2.5-1.5B L=256 train steps compiled for one H200 (bench/RESULTS.md, "One
H200"), arguments + live buffers came to 36.8 GiB against 36.9 GiB measured (remat on 14 of
28 unrolled layers) and 48.3 against 48.3 ("dots", unrolled); scanned programs come out low
(37.1 against 39.3), their loop bodies' temporaries not counted. In both unrolled programs
it showed float32 copies of the layer weights (4.7 GiB, 27 of the 28 layers') live at the
peak.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
                "f8e3m4": 1, "f8e4m3": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1}
_TOKEN = re.compile(r"\(|\)|([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{[^}]*\})?|token\[\]|,|/\*[^*]*\*/|\s+")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$")
_ALIASING = {"bitcast", "tuple", "opt-barrier", "optimization-barrier"}


def _shape_tree(shape: str) -> Any:
    """A shape as a tree: (text, bytes) for an array, a list for a tuple."""
    stack: list[list] = [[]]
    for m in _TOKEN.finditer(shape):
        tok = m.group(0)
        if tok == "(":
            stack.append([])
        elif tok == ")":
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(1):
            dtype, dims = m.group(1), m.group(2)
            n = 1
            for d in dims.split(","):
                if d:
                    n *= int(d)
            stack[-1].append((f"{dtype}[{dims}]", int(n * _DTYPE_BYTES.get(dtype, 0))))
        elif tok == "token[]":
            stack[-1].append(("token[]", 0))
    top = stack[0]
    return top[0] if len(top) == 1 else top


def _leaves(tree: Any) -> list:
    return [tree] if not isinstance(tree, list) else [x for t in tree for x in _leaves(t)]


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


def _alias_by_shape(shape: Any, candidates: list) -> Any:
    """`shape`'s tree with each array taken from the first unused candidate buffer of the same
    shape text (a branch's state updated in place), or None where there is none."""
    used: set[int] = set()

    def pick(node):
        if isinstance(node, list):
            return [pick(x) for x in node]
        for i, b in enumerate(candidates):
            if i not in used and b[3] == node[0]:
                used.add(i)
                return b
        return None

    return pick(shape)


def peak_live(text: str) -> dict[str, Any]:
    """{"argument_bytes", "peak_bytes" (live buffers other than arguments at the peak),
    "at" (the instruction), "live": [(bytes, op_name, shape), ...] largest first}."""
    buffers: dict[str, Any] = {}  # name -> tree of (buffer id, bytes, op_name, shape text)
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
        tree = _shape_tree(shape)
        own: list[tuple[str, int, str, str]] = []
        if op == "get-tuple-element":
            k = int(re.search(r"index=(\d+)", rest).group(1))
            src = buffers.get(ops[0])
            buffers[name] = src[k] if isinstance(src, list) and len(src) > k else src
        elif op in _ALIASING or op == "while" or op.endswith("-done"):
            # while: one operand, the loop state, updated in place; an async op's -done
            # returns what its -start made
            found = [b for o in ops for b in _leaves(buffers.get(o)) if b is not None]
            buffers[name] = found if op != "while" else (buffers.get(ops[0]) if ops else found)
        else:
            if op == "conditional" or op.endswith("-start"):
                # a branch's results, an async op's operands: in place where an operand has the shape
                mapped = _alias_by_shape(tree, [b for o in ops[1:] for b in _leaves(buffers.get(o))
                                                if b is not None])
            else:
                mapped = None
            counter = itertools.count()

            def make(node, alias):
                if isinstance(node, list):
                    return [make(x, alias[j] if isinstance(alias, list) else None) for j, x in enumerate(node)]
                if alias is not None:
                    return alias
                b = (f"{name}#{next(counter)}", node[1], op_name, node[0])
                own.append(b)
                return b

            buffers[name] = make(tree, mapped)
            if op == "parameter":
                args += sum(b[1] for b in own)
                own = []
        order.append((name, ops, own))
    last_use: dict[str, int] = {}
    for i, (_, ops, own) in enumerate(order):
        for b in own:
            last_use.setdefault(b[0], i)
        for o in ops:
            for b in _leaves(buffers.get(o)):
                if b is not None:
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
        text = f.read()
    try:
        print(format_live(peak_live(text), args.top))
    except ValueError as e:
        raise SystemExit(f"{args.hlo}: {e}") from None


if __name__ == "__main__":
    main()
