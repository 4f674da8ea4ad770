"""`qzhou-jax plan`: does a training config fit a TPU slice or a GPU cluster, and how fast could it go?

    qzhou-jax plan --config configs/stage1-qwen2.5-7b.yaml --topology v5p-16
    qzhou-jax plan --config run.yaml --topology v5e-32 --set train.chunk_size=32 --mfu 0.45 --json plan.json
    qzhou-jax plan --config run.yaml --topology gpu:8xH100          # an estimate unless run on those GPUs
    qzhou-jax plan --config run.yaml --devices 16 --memory-gib 80 --peak-tflops 989

For each distinct batch shape of the config at its maximum lengths (task, queries, passages
per query, query and passage lengths, `DataConfig.resolved`; shorter `length_buckets` shapes
need less memory and time, so the maximum is the one that must fit), the real train step
(`make_train_step(...).jitted`: GradCache, remat, AdamW, shardings from the logical-axis
rules) is lowered with abstract inputs (`jax.ShapeDtypeStruct` with `NamedSharding`s on a
mesh of the target's devices) and compiled. No data is read and no device memory is used.

What a plan reports, per device and per batch shape:
  * memory from the compiler's `memory_analysis()`: arguments (the train state and the
    batch shard), temporaries, generated code; peak = arguments + outputs - aliased
    (the state is donated) + temporaries + code. It is compared with the memory the
    compiler allows (TPU: read from the TPU compiler, a little under the vendor figure).
  * model FLOPs per step (`ModelConfig.flops_per_token`, training: 6 x non-embedding
    params + attention, over every padded token of the step) and the step time at a given
    MFU against the chip's bf16 peak; XLA's own `cost_analysis()` count is kept in the
    JSON output only, since XLA counts the body of each loop once (the layer scan and the
    GradCache chunk loop), which undercounts a scanned model by orders of magnitude.
  * when it does not fit, `--set` overrides to try; when it fits, overrides that make it
    faster (`speedups`): a `train.keep_chunks` that spends the memory left below the
    headroom on speed, and on GPU unrolled layers where some keep their matmul outputs.

How each target is compiled:
  * TPU slices (`v5p-16`, `v5e-32`, ...): for the slice's abstract devices via libtpu
    (`pip install "qzhou-jax[tpu]"`), on any machine. Exact for that libtpu version.
  * `cpu:N`: on this machine's CPU devices (a check of the planner; CPU numbers).
  * GPUs: compiled when this machine has exactly those GPUs. Otherwise a GPU program
    cannot be compiled here, and the plan is an analytic estimate (`estimate_step_bytes`:
    exact train-state shards plus a model of gradients, gathered layers and activations),
    marked as such. Against the compiler, on the stage-1 7b TPU programs of
    bench/plan_7b.py, it came out between 5% below and 18% above; against the 11 train steps
    measured on one H100 (bench/RESULTS.md, "Train step"), to which its single-device terms
    were fitted, within -0.1 to +0.9 GiB. A first answer, not a guarantee.
    `--estimate` gives the same estimate for any target without compiling.

Every input check (topology name, mesh sizes against the device count, batch sizes against
the data-parallel devices and hosts, GradCache chunk) runs before anything is compiled.
Exit status: 0 fits (or tight: over 1 - headroom of the memory), 1 does not fit (with
suggestions: `--set` overrides to try), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

from qzhou_jax.topology import GIB, Target, compiler_hbm_gib, parse_oom, parse_target, tpu_devices

DEFAULT_MFU = 0.5
DEFAULT_HEADROOM = 0.05
_TOKEN_KEYS = ("q_ids", "q_mask", "p_ids", "p_mask")


# ------------------------------------------------------------ batch shapes
@dataclasses.dataclass(frozen=True)
class StepShape:
    """One compiled step: a task and its global batch shape (see `train/step.py`)."""

    task: str
    n: int           # queries / anchors / pairs per step (global)
    group: int       # passages per query (1 + hard negatives; 1 for sts)
    q_len: int
    p_len: int
    datasets: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.task == "sts":
            return f"sts {self.n} pairs, L {self.q_len}/{self.p_len}"
        return f"{self.task} {self.n} x (1+{self.group - 1}), Lq {self.q_len}, Lp {self.p_len}"

    @property
    def tokens(self) -> int:
        return self.n * self.q_len + self.n * self.group * self.p_len

    def abstract_batch(self, sharding_for: Callable[[int], Any] | None = None) -> dict:
        """`jax.ShapeDtypeStruct`s in the format of `check_batch`, sharded by `sharding_for(ndim)`."""
        import jax
        import jax.numpy as jnp

        shapes = {"q_ids": (self.n, self.q_len), "q_mask": (self.n, self.q_len),
                  "p_ids": (self.n * self.group, self.p_len), "p_mask": (self.n * self.group, self.p_len)}
        dtypes = dict.fromkeys(shapes, jnp.int32)
        if self.task == "sts":
            shapes["scores"], dtypes["scores"] = (self.n,), jnp.float32
        elif self.task == "retrieval":  # text keys, as the data pipeline writes them
            shapes["q_keys"], dtypes["q_keys"] = (self.n,), jnp.int32
            shapes["p_keys"], dtypes["p_keys"] = (self.n * self.group,), jnp.int32
        elif self.task == "classification":
            shapes["q_labels"], dtypes["q_labels"] = (self.n,), jnp.int32
            shapes["p_labels"], dtypes["p_labels"] = (self.n * self.group,), jnp.int32
        return {k: jax.ShapeDtypeStruct(s, dtypes[k], sharding=sharding_for(len(s)) if sharding_for else None)
                for k, s in shapes.items()}

    def model_flops(self, cfg) -> float:
        """Model FLOPs of one training step over every (padded) token of the batch."""
        q = self.n * self.q_len * cfg.flops_per_token(self.q_len, training=True)
        p = self.n * self.group * self.p_len * cfg.flops_per_token(self.p_len, training=True)
        return float(q + p)


def step_shapes(run) -> list[StepShape]:
    """The distinct largest batch shapes of a RunConfig's datasets (their maximum lengths)."""
    found: dict[tuple, list[str]] = {}
    for ds in run.data.datasets:
        r = run.data.resolved(ds)
        key = (ds.task, r["batch_size"], r["group"], r["query_max_length"], r["passage_max_length"])
        found.setdefault(key, []).append(ds.name)
    return [StepShape(*key, datasets=tuple(names)) for key, names in found.items()]


# ------------------------------------------------------------------ checks
def _mesh_desc(mesh_shape: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh_shape.items())


def rows_per_device(rows: int, mesh, rules: Mapping[str, Any] | None = None) -> int:
    """Rows of a batch-major array of `rows` rows that each device holds: split over the
    data-parallel axes that divide it (`sharding.logical_to_spec`), whole where none does."""
    from qzhou_jax import sharding

    spec = sharding.logical_to_spec(("batch",), mesh, rules, (rows,))
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return rows // math.prod(mesh.shape[a] for a in axes)


def check_inputs(run, target: Target,
                 rules: Mapping[str, Any] | None = None) -> tuple[dict, list[StepShape], list[str]]:
    """Every check that needs no device: mesh sizes against the target's device count,
    each batch shape against the data-parallel devices, the hosts and the GradCache chunk.
    Returns (mesh shape, batch shapes, warnings); raises ValueError with the numbers."""
    from jax.sharding import AbstractMesh

    from qzhou_jax import sharding
    from qzhou_jax.train.step import check_batch

    try:
        sizes = run.mesh.shape(target.num_devices)
    except ValueError as e:
        raise ValueError(f"{e} ({target.name} has {target.num_devices} devices)") from None
    mesh_shape = dict(zip(sharding.MESH_AXES, sizes))
    mesh = AbstractMesh(tuple(sizes), sharding.MESH_AXES)
    dp = sharding.data_parallel_size(mesh, rules)
    chunk = run.train.chunk_size
    shapes = step_shapes(run)
    warnings: list[str] = []
    for s in shapes:
        where = f"{s.label} ({', '.join(s.datasets)})"
        try:
            check_batch(s.abstract_batch(), s.task, mesh, rules, chunk if 0 < chunk < s.n else 0)
        except ValueError as e:
            raise ValueError(f"{where}: {e} on {target.name}") from None
        if s.n % target.hosts:
            raise ValueError(f"{where}: the global batch of {s.n} does not divide over the {target.hosts} hosts "
                             f"(processes) of {target.name}; each host loads n / hosts rows")
        per_pass = chunk if 0 < chunk < s.n else s.n
        q_rows, p_rows = per_pass, per_pass * s.group
        q_held, p_held = rows_per_device(q_rows, mesh, rules), rows_per_device(p_rows, mesh, rules)
        if q_held * dp != q_rows or p_held * dp != p_rows:
            what = "GradCache chunk" if per_pass < s.n else "step"
            warnings.append(f"{where}: a {what} of {q_rows} queries and {p_rows} passages does not divide over "
                            f"the {dp} data-parallel devices: each device embeds {q_held} queries and {p_held} "
                            f"passages (rows that do not divide are replicated, with their work and activation "
                            f"memory); use a multiple of {dp} queries")
    return mesh_shape, shapes, warnings


# ------------------------------------------------------------------- state
def abstract_train_state(cfg, tx, mesh, rules: Mapping[str, Any] | None = None):
    """The TrainState as `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s."""
    import jax
    import jax.numpy as jnp

    from qzhou_jax.train.step import TrainState, abstract_params, train_state_shardings

    shardings = train_state_shardings(cfg, tx, mesh, rules)

    def init(p):
        return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))

    shapes = jax.eval_shape(init, abstract_params(cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def shard_bytes(tree) -> int:
    """Bytes per device of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------- estimate
def estimate_step_bytes(cfg, shape: StepShape, mesh, chunk: int, state_bytes: int, param_bytes: int,
                        rules: Mapping[str, Any] | None = None, kept_chunks: int = 0) -> dict[str, int]:
    """An analytic per-device memory model of one train step (bytes), for targets that
    cannot be compiled here. `state_bytes` / `param_bytes` are exact (from the shardings);
    the rest is a model:

      gradients   the gradient, and GradCache's accumulator: 2 x the float32 parameter
                  shard (1 x without GradCache), one more with fsdp > 1 (the TPU compiler's
                  programs for the 7b pod plans hold it: bench/RESULTS.md); unrolled layers
                  without GradCache make their gradients one layer at a time in the compute
                  dtype and join them into a float32 gradient after the backward pass,
                  so of the 1 x only the parameters outside the layers count during it
                  (with `weight_grad_dtype: float32` they are float32: one layer's
                  gradient counts, the backward pass's peak being at its first layers;
                  derived, not measured on a GPU);
                  the peak is at least the state and that float32 gradient (the join)
      layers      with fsdp > 1: one layer's weights gathered in float32 and its compute-dtype
                  copy, double-buffered, and that layer's float32 gradient before the
                  reduce-scatter (all divided by tensor)
      activations one pass (a GradCache chunk, or the whole batch) of queries and passages,
                  split over the data-parallel devices as the sharding rules split it
                  (`rows_per_device`: whole on every device when the rows do not divide);
                  kept across layers per the remat policy (full: each layer's input;
                  `remat_layers`: the other layers as "dots"), plus
                  one layer's working set forward and backward, with XLA attention's float32
                  scores [rows, heads, L, L] (none with cuDNN attention), plus one layer's
                  inputs and outputs for every further layer in a scan step (`remat_groups`);
                  unrolled layers (`scan_layers: false`) have no scan step and one layer's
                  inputs and outputs less in the working set
      kept        the `kept_chunks` GradCache chunks that keep their layer inputs
                  (`train.keep_chunks`): layers + 1 hidden states per token of each
      batch/loss  token arrays, embeddings and the similarity matrix

    The gradient and scan-step terms were set against 11 train steps measured on one H100
    (bench/RESULTS.md: Qwen2.5-0.5B/1.5B, cuDNN attention, with and without GradCache,
    remat_layers and keep_chunks), which the model then matches within -0.1 to +0.9 GiB;
    the unrolled terms against 4 unrolled steps measured on one H200 (remat_layers 10, 12,
    14 of Qwen2.5-1.5B at L=256, and "dots" before the split of the stacked weights), less
    the float32 copy of the layer weights that those programs kept at their peak (4.7 GiB,
    estimated with bench/hlo_liveness.py from the compiled programs) and that unrolled
    layers no longer make (`qwen2.run_layers`): within +0.3 GiB of those differences,
    which are derived, not measured.
    """
    from qzhou_jax import sharding

    mesh_shape = dict(mesh.shape)
    dp = mesh_shape["data"] * mesh_shape["fsdp"]

    def split(shape, axes, over=("tensor",)) -> int:
        """How many ways the rules split an array over the mesh axes `over` (a dimension a
        mesh axis does not divide stays whole: 12 heads over tensor=8 are not split)."""
        used = sharding.spec_axes(sharding.logical_to_spec(axes, mesh, rules, shape))
        return math.prod(mesh_shape[a] for a in used if a in over)

    E, F, Lr = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    D = cfg.head_dim
    H = cfg.num_attention_heads / split((cfg.num_attention_heads,), ("act_heads",))
    K = cfg.num_key_value_heads / split((cfg.num_key_value_heads,), ("act_kv_heads",))
    tp = split((F,), ("act_mlp",))  # the MLP's split (F / tp per device)
    b = 2 if cfg.compute_dtype in ("bfloat16", "float16") else 4
    gradcache = 0 < chunk < shape.n
    n_pass = chunk if gradcache else shape.n
    from qzhou_jax.model.qwen2 import remat_groups

    group = remat_groups(cfg)[0] if cfg.scan_layers else 1
    working = 2 if cfg.scan_layers else 1  # layers' inputs and outputs live while one runs

    def rows(r: int) -> int:
        return rows_per_device(r, mesh, rules)

    def side(r: int, length: int) -> tuple[float, float]:
        t = rows(r) * length  # tokens per device
        attn = 0.0 if cfg.attention_impl in ("cudnn", "splash") else rows(r) * H * length * length * (4 + 4 + b)
        layer_io = t * (3 * E + (3 * H + 2 * K) * D + 3 * F / tp) * b
        per_layer = {"full": t * E * b,
                     "attn": t * (E + (2 * H + 2 * K) * D) * b,
                     "mlp": t * (E + 2 * F / tp) * b,
                     "dots": t * (2 * E + (H + 2 * K) * D + 2 * F / tp) * b,
                     "none": layer_io + attn}
        rematted = Lr if cfg.remat_layers is None else cfg.remat_layers
        kept = rematted * per_layer[cfg.remat] + (Lr - rematted) * per_layer["dots"]
        return kept + (group - 1) * layer_io, working * layer_io + attn

    q_kept, q_work = side(n_pass, shape.q_len)
    p_kept, p_work = side(n_pass * shape.group, shape.p_len)
    activations = q_kept + p_kept + max(q_work, p_work)
    from qzhou_jax.model.qwen2 import param_specs

    layer_params = sum(math.prod(p.shape) / split(p.shape, p.axes) for name, p in param_specs(cfg).items()
                       if name.startswith("layers/")) / Lr  # gathered over fsdp, split over tensor
    layers = (2 * layer_params * (4 + b) + layer_params * 4) if mesh_shape["fsdp"] > 1 else 0.0
    gradients = (1 + gradcache + (mesh_shape["fsdp"] > 1)) * param_bytes
    if not cfg.scan_layers and not gradcache:  # the layers' share of the parameters
        layer_share = param_bytes * (cfg.num_params(include_embedding=False) - E) / cfg.num_params()
        gradients -= layer_share
        if cfg.weight_grad_dtype == "float32":
            gradients += layer_share / Lr
    out_dim = cfg.output_dim
    loss = (shape.n * (1 + shape.group) * out_dim * 4 * 4
            + shape.n * shape.n * (1 + shape.group) * 4 * 3
            + 4 * 2 * (shape.n * shape.q_len + shape.n * shape.group * shape.p_len) / dp)
    kept = kept_chunks * kept_chunk_bytes(cfg, shape, mesh, chunk, rules) if gradcache else 0
    parts = {"state": state_bytes, "gradients": gradients, "layers": layers, "activations": activations,
             "kept_chunks": kept, "batch_and_loss": loss}
    parts = {k: int(v) for k, v in parts.items()}
    parts["peak"] = sum(parts.values())
    if not cfg.scan_layers and not gradcache:
        # at the step's end the layers' gradients are joined into one float32 gradient
        # before the update, whatever the activations were
        end = state_bytes + (1 + (mesh_shape["fsdp"] > 1)) * param_bytes + parts["batch_and_loss"]
        parts["peak"] = max(parts["peak"], int(end))
    return parts


def kept_chunk_bytes(cfg, shape: StepShape, mesh, chunk: int, rules: Mapping[str, Any] | None = None) -> int:
    """Per-device bytes one kept GradCache chunk (`train.keep_chunks`) holds between the
    passes: layers + 1 hidden states per token, its rows split as the sharding rules split them."""
    b = 2 if cfg.compute_dtype in ("bfloat16", "float16") else 4
    tokens = (rows_per_device(chunk, mesh, rules) * shape.q_len
              + rows_per_device(chunk * shape.group, mesh, rules) * shape.p_len)
    return int((cfg.num_hidden_layers + 1) * cfg.hidden_size * b * tokens)


# -------------------------------------------------------------------- plan
@dataclasses.dataclass
class StepPlan:
    """The plan of one batch shape; byte counts are per device."""

    shape: StepShape
    method: str                        # "compiled" or "estimate"
    peak_bytes: int
    state_bytes: int                   # the train state's shard (exact, from the shardings)
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    estimate: dict[str, int] | None = None
    compile_seconds: float | None = None
    model_flops: float = 0.0           # global, per step
    executed_flops: float = 0.0        # model FLOPs plus GradCache's and remat's recomputation
    kept_chunks: int = 0               # GradCache chunks keeping their layer inputs (of n / chunk)
    xla_flops: float | None = None     # per device, XLA cost analysis (loop bodies counted once)
    step_seconds: float | None = None  # at the plan's MFU
    error: str | None = None           # the compiler refused the program (out of memory)
    fit: str = "yes"                   # "yes", "tight" or "no"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = dataclasses.asdict(self.shape) | {"label": self.shape.label, "tokens": self.shape.tokens}
        d["peak_gib"] = self.peak_bytes / GIB
        d["tokens_per_second"] = self.shape.tokens / self.step_seconds if self.step_seconds else None
        return d


@dataclasses.dataclass
class Plan:
    target: Target
    model: dict[str, Any]
    mesh: dict[str, int]
    chunk_size: int
    limit_gib: float              # memory a program may use per device
    limit_source: str
    mfu: float
    headroom: float
    steps: list[StepPlan]
    warnings: list[str]
    suggestions: list[str]
    speedups: list[str] = dataclasses.field(default_factory=list)
    param_bytes: int = 0          # the parameters' shard per device (float32 master weights)

    @property
    def verdict(self) -> str:
        fits = {s.fit for s in self.steps}
        return "does not fit" if "no" in fits else "tight" if "tight" in fits else "fits"

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    @property
    def worst(self) -> StepPlan:
        return max(self.steps, key=lambda s: s.peak_bytes)

    def to_dict(self) -> dict:
        t = self.target
        return {"target": {"name": t.name, "chip": t.chip.name, "platform": t.platform, "devices": t.num_devices,
                           "hosts": t.hosts, "hbm_gib": t.hbm_gib, "peak_tflops": t.peak_tflops,
                           "topology": t.topology, "chip_source": t.chip.source},
                "model": self.model, "mesh": self.mesh, "chunk_size": self.chunk_size,
                "limit_gib": self.limit_gib, "limit_source": self.limit_source, "mfu": self.mfu,
                "headroom": self.headroom, "verdict": self.verdict, "fits": self.fits,
                "steps": [s.to_dict() for s in self.steps], "warnings": self.warnings,
                "suggestions": self.suggestions, "speedups": self.speedups}

    def format(self) -> str:
        t = self.target
        m = self.model
        remat = m["remat"] if m.get("remat_layers") is None else f"{m['remat']} on {m['remat_layers']} layers"
        extras = "".join([f", {m['weight_grad_dtype']} weight gradients" if m["weight_grad_dtype"] != m["compute_dtype"]
                          else "", f", {m['mu_dtype']} Adam first moment" if m["mu_dtype"] != "float32" else ""])
        lines = [f"target   {t.describe()}",
                 f"model    {m['name']}: {_count(m['params'])} params, remat {remat}, "
                 f"{'scanned' if m['scan_layers'] else 'unrolled'} layers, {m['attention_impl']} attention, "
                 f"{m['compute_dtype']} compute{extras}",
                 f"mesh     {_mesh_desc(self.mesh)}; GradCache chunk "
                 f"{self.chunk_size if self.chunk_size else 'off (whole batch at once)'}"
                 f"{_keep_desc(self.worst, self.chunk_size)}",
                 f"memory   limit {self.limit_gib:.2f} GiB per device ({self.limit_source}); "
                 f"train state {_size(self.steps[0].state_bytes)} per device",
                 ""]
        head = ["batch shape", "how", "compile", "args", "temp", "code", "peak", "of limit", "fits",
                "model TFLOP", f"step @ MFU {self.mfu:g}", "tokens/s"]
        rows = []
        for s in self.steps:
            args = s.argument_bytes if s.argument_bytes is not None else s.state_bytes
            temp = s.temp_bytes if s.temp_bytes is not None else max(0, s.peak_bytes - s.state_bytes)
            compile_s = f"{s.compile_seconds:.1f} s" if s.compile_seconds is not None else "-"
            rows.append([s.shape.label, s.method, compile_s,
                         _size(args) if not s.error or s.temp_bytes is not None else "-",
                         _size(temp) if not s.error or s.temp_bytes is not None else "-",
                         _size(s.code_bytes) if s.code_bytes is not None else "-",
                         _size(s.peak_bytes), f"{s.peak_bytes / GIB / self.limit_gib:.0%}", s.fit,
                         f"{s.model_flops / 1e12:,.1f}", _seconds(s.step_seconds),
                         f"{s.shape.tokens / s.step_seconds:,.0f}" if s.step_seconds else "-"])
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for s in self.steps:
            if s.error:
                lines.append(f"  {s.shape.label}: the compiler refused it: {s.error}")
        lines.append("")
        w = self.worst
        lines.append(f"verdict  {self.verdict}: largest step {_size(w.peak_bytes)} of {self.limit_gib:.2f} GiB "
                     f"per device ({w.peak_bytes / GIB / self.limit_gib:.0%}"
                     f"{', estimate' if w.method == 'estimate' else ''})")
        if any(s.step_seconds for s in self.steps) and t.peak_tflops:
            lines.append(f"speed    at MFU {self.mfu:g} of {t.peak_tflops:g} TFLOP/s x {t.num_devices} devices "
                         f"(model FLOPs over padded tokens)")
        lines += [f"warning  {x}" for x in self.warnings]
        if self.suggestions:
            lines.append("to make it fit, try:")
            lines += [f"  {x}" for x in self.suggestions]
        if self.speedups:
            lines.append("to make it faster, try (then plan again with it):")
            lines += [f"  {x}" for x in self.speedups]
        return "\n".join(lines)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / (1 << 20):.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _seconds(s: float | None) -> str:
    if not s:
        return "-"
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.2f} ms"


def _keep_desc(step: StepPlan, chunk: int) -> str:
    if not step.kept_chunks:
        return ""
    return f", {step.kept_chunks} of {step.shape.n // chunk} chunks keep their layer inputs between the passes"


def _model_summary(run) -> dict[str, Any]:
    cfg = run.model_config
    name = (run.model or {}).get("preset") or run.init_from or "custom"
    return {"name": name, "params": cfg.num_params(), "non_embedding_params": cfg.num_params(False),
            "remat": cfg.remat, "remat_layers": cfg.remat_layers, "scan_layers": cfg.scan_layers,
            "attention_impl": cfg.attention_impl,
            "compute_dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype,
            "weight_grad_dtype": cfg.weight_grad_dtype or cfg.compute_dtype, "mu_dtype": run.train.mu_dtype}


def _executed_flops(model_flops: float, cfg, gradcache: bool, kept: float = 0.0) -> float:
    """Model FLOPs (6 per parameter-token) plus GradCache's extra forward (2) and full
    remat's recomputed forward (2, times the share of layers under it); the policies that
    keep matmul outputs are counted as no recomputation. `kept`: the share of GradCache
    chunks that keep their layer inputs (remat "full" only); they execute 8: the forward,
    its recomputation in the backward, and the backward."""
    n = cfg.num_hidden_layers
    full = (n if cfg.remat_layers is None else cfg.remat_layers) / n if cfg.remat == "full" else 0.0
    rest = 6 + 2 * gradcache + 2 * full
    return model_flops * ((1 - kept) * rest + kept * 8) / 6


def _local_devices(target: Target, estimate: bool) -> list | None:
    """Devices to compile on, or None for an estimate."""
    import jax

    if estimate:
        return None
    if target.platform == "tpu":
        return tpu_devices(target)
    if target.platform == "cpu":
        cpus = jax.devices("cpu")
        if len(cpus) < target.num_devices:
            raise ValueError(f"{target.name}: only {len(cpus)} CPU devices here (start with XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={target.num_devices})")
        return cpus[:target.num_devices]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    if len(gpus) == target.num_devices and target.chip.name.split()[0].lower() in gpus[0].device_kind.lower():
        return gpus
    return None


def make_plan(run, target: Target, *, mfu: float = DEFAULT_MFU, headroom: float = DEFAULT_HEADROOM,
              estimate: bool = False, rules: Mapping[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> Plan:
    """Plan `run` (a RunConfig) on `target`: compile (or estimate) each batch shape's train step.

    Raises ValueError for bad input, before compiling anything.
    """
    if not (0 < mfu <= 1):
        raise ValueError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    if not (0 <= headroom < 1):
        raise ValueError(f"--headroom: expected a fraction in [0, 1), got {headroom}")
    mesh_shape, shapes, warnings = check_inputs(run, target, rules)
    devices = _local_devices(target, estimate)

    from jax.sharding import AbstractMesh

    from qzhou_jax import sharding
    from qzhou_jax.train.optim import learning_rate_schedule, make_optimizer
    from qzhou_jax.train.step import kept_chunks, make_train_step

    say = progress or (lambda _msg: None)
    cfg = run.model_config
    tx = make_optimizer(run.train)
    chunk, keep = run.train.chunk_size, run.train.keep_chunks
    if devices is not None:
        mesh = sharding.make_mesh(run.mesh, devices)
        processes = len({d.process_index for d in devices})
        if processes != target.hosts:
            target = dataclasses.replace(target, hosts=processes)
            for s in shapes:
                if s.n % processes:
                    raise ValueError(f"{s.label}: the global batch of {s.n} does not divide over the {processes} "
                                     f"hosts (processes) of {target.name}")
    else:
        mesh = AbstractMesh(tuple(mesh_shape.values()), sharding.MESH_AXES)
        if target.platform == "gpu":
            warnings.append(f"{target.name}: a GPU program cannot be compiled on this machine; memory figures are "
                            f"an analytic estimate (exact train state, modelled gradients and activations)")
    state = abstract_train_state(cfg, tx, mesh, rules)
    state_bytes = shard_bytes(state)
    param_bytes = shard_bytes(state.params)

    limit_gib, limit_source = target.hbm_gib, f"{target.chip.name} {target.hbm_gib:g} GiB"
    if target.platform == "tpu" and devices is not None and target.hbm_gib == target.chip.hbm_gib:
        allowed = compiler_hbm_gib(devices[0])
        if allowed:
            limit_gib, limit_source = allowed, f"the TPU compiler's limit; vendor figure {target.chip.hbm_gib:g} GiB"
    elif target.platform == "cpu":
        limit_source = "--memory-gib"

    schedule = learning_rate_schedule(run.train)
    plans: list[StepPlan] = []
    for s in shapes:
        flops = s.model_flops(cfg)
        gradcache = 0 < chunk < s.n
        n_kept = kept_chunks(s.n, chunk, keep) if gradcache and keep else 0
        sp = StepPlan(shape=s, method="estimate", peak_bytes=0, state_bytes=state_bytes, model_flops=flops,
                      executed_flops=_executed_flops(flops, cfg, gradcache, n_kept / (s.n // chunk) if n_kept else 0.0),
                      kept_chunks=n_kept)
        if devices is None:
            est = estimate_step_bytes(cfg, s, mesh, chunk, state_bytes, param_bytes, rules, n_kept)
            sp.estimate, sp.peak_bytes = est, est["peak"]
        else:
            sp.method = "compiled"
            step = make_train_step(cfg, tx, s.task, mesh=mesh, rules=rules, loss_cfg=run.loss,
                                   chunk_size=chunk, keep_chunks=keep, schedule=schedule)
            batch = s.abstract_batch(lambda ndim: sharding.batch_sharding(mesh, ndim, rules))
            say(f"compiling {s.label} for {target.name} ({target.num_devices} devices, mesh {_mesh_desc(mesh_shape)})")
            t0 = time.perf_counter()
            try:
                with sharding.use_mesh(mesh, rules):
                    compiled = step.jitted.lower(state, batch).compile()
            except Exception as e:  # the TPU compiler rejects programs that exceed HBM
                oom = parse_oom(str(e))
                if oom is None:
                    raise
                sp.compile_seconds = time.perf_counter() - t0
                sp.error = str(e).splitlines()[0][:400]
                sp.peak_bytes = int(oom["required_gib"] * GIB)
                if oom["temporaries_only"]:  # the compiler's figure leaves out the arguments
                    sp.temp_bytes = sp.peak_bytes
                    sp.argument_bytes = state_bytes + shard_bytes(batch)
                    sp.peak_bytes += sp.argument_bytes
                limit_gib = oom["available_gib"]
            else:
                sp.compile_seconds = time.perf_counter() - t0
                ma = compiled.memory_analysis()  # device memory (host-offloaded buffers not counted)
                sp.argument_bytes = ma.argument_size_in_bytes
                sp.output_bytes = ma.output_size_in_bytes
                sp.alias_bytes = ma.alias_size_in_bytes
                sp.temp_bytes = ma.temp_size_in_bytes
                sp.code_bytes = ma.generated_code_size_in_bytes
                sp.peak_bytes = sp.argument_bytes + sp.output_bytes - sp.alias_bytes + sp.temp_bytes + sp.code_bytes
                sp.xla_flops = _xla_flops(compiled)
                sp.estimate = estimate_step_bytes(cfg, s, mesh, chunk, state_bytes, param_bytes, rules, n_kept)
            say(f"  {sp.compile_seconds:.1f} s")
        if target.peak_tflops:
            sp.step_seconds = flops / (target.num_devices * target.peak_tflops * 1e12 * mfu)
        plans.append(sp)

    for sp in plans:
        gib = sp.peak_bytes / GIB
        sp.fit = "no" if sp.error or gib > limit_gib else "tight" if gib > limit_gib * (1 - headroom) else "yes"
    plan = Plan(target=target, model=_model_summary(run), mesh=mesh_shape, chunk_size=chunk, limit_gib=limit_gib,
                limit_source=limit_source, mfu=mfu, headroom=headroom, steps=plans, warnings=warnings,
                suggestions=[], param_bytes=param_bytes)
    if not plan.fits:
        plan.suggestions = suggest(run, plan)
    else:
        plan.speedups = speedups(run, plan, mesh, rules)
    return plan


def _unrolled_hint(cfg, target: Target) -> list[str]:
    """On GPU, scanned layers that keep their matmul outputs ("dots") copy them into and out
    of the scan's stacked buffers; unrolled layers do not (bench/RESULTS.md, "One H200")."""
    kept = cfg.remat == "dots" or (cfg.remat_layers is not None and cfg.remat_layers < cfg.num_hidden_layers)
    if target.platform != "gpu" or not cfg.scan_layers or not kept:
        return []
    return ["--set model.scan_layers=false  (GPU: the layers that keep their matmul outputs stop copying them "
            "through the scan's stacked buffers; Qwen2.5-1.5B with remat on 14 of 28 layers ran 3% faster in "
            "2.4 GiB less on one H200; compiles take about twice as long)"]


def speedups(run, plan: Plan, mesh, rules: Mapping[str, Any] | None = None) -> list[str]:
    """`--set` overrides that make a fitting plan faster: on GPU, unrolled layers when some keep
    their matmul outputs; GradCache chunks that keep their layer inputs (one forward pass less
    each, remat "full") in the memory the plan leaves below its headroom."""
    return _unrolled_hint(run.model_config, plan.target) + _keep_chunks_hint(run, plan, mesh, rules)


def _keep_chunks_hint(run, plan: Plan, mesh, rules: Mapping[str, Any] | None = None) -> list[str]:
    cfg, chunk = run.model_config, plan.chunk_size
    if cfg.remat != "full" or not chunk:
        return []
    budget = plan.limit_gib * GIB * (1 - plan.headroom)
    # Compiled (TPU) programs spend more than the saved inputs (`_kept_cost`); the estimate's own
    # figure was fitted to measured H100 steps.
    compiled = any(sp.method == "compiled" for sp in plan.steps)
    best = None
    for sp in plan.steps:
        n_chunks = sp.shape.n // chunk if chunk < sp.shape.n else 0
        if not n_chunks:
            return []
        per_chunk = kept_chunk_bytes(cfg, sp.shape, mesh, chunk, rules)
        k = sp.kept_chunks
        while k < n_chunks and sp.peak_bytes + _kept_cost(k + 1, sp.kept_chunks, per_chunk, compiled) <= budget:
            k += 1
        best = k if best is None else min(best, k)
    worst = plan.worst
    if not best or best <= worst.kept_chunks:
        return []
    n_chunks = worst.shape.n // chunk
    extra = _kept_cost(best, worst.kept_chunks, kept_chunk_bytes(cfg, worst.shape, mesh, chunk, rules), compiled)
    return [f"--set train.keep_chunks={best}  (GradCache: {best} of {n_chunks} chunks keep their layer inputs "
            f"between the passes, one forward pass less each; about {_size(extra)} more per device)"]


def _kept_cost(k: int, k0: int, per_chunk: float, compiled: bool) -> float:
    """Bytes per device that keeping k chunks instead of k0 adds. In compiled TPU programs the first
    kept chunk also brings working buffers: stage-1 1.5b compiled to +4.49 GiB with 2 kept chunks
    on v5e-16, +7.34 with 4 (1.31 GiB of saved inputs per chunk) and +13.44 with 8 on v5p-32 (1.32),
    which 1.1 x (k + 1.5) chunks covers."""
    if not compiled:
        return (k - k0) * per_chunk
    fixed = 1.5 if k0 == 0 else 0.0
    return 1.1 * (k - k0 + fixed) * per_chunk


def _xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def _abstract_mesh(mesh_shape: Mapping[str, int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))


def suggest(run, plan: Plan) -> list[str]:
    """`--set` overrides likely to make the plan fit, most effective first."""
    cfg = run.model_config
    mesh = plan.mesh
    dp = mesh["data"] * mesh["fsdp"]
    worst = plan.worst
    limit = plan.limit_gib * GIB
    n = worst.shape.n
    chunk = plan.chunk_size
    out = []
    if worst.state_bytes > 0.6 * limit:
        need = math.ceil(worst.state_bytes * plan.target.num_devices / (0.6 * limit))
        out.append(f"the train state alone takes {worst.state_bytes / GIB:.1f} GiB per device "
                   f"({worst.state_bytes / limit:.0%} of the limit): use at least {need} devices of this kind "
                   f"(a larger slice), or a chip with more memory")
    if worst.kept_chunks:
        out.append(f"--set train.keep_chunks=0  (or fewer than {worst.kept_chunks}: each kept GradCache chunk "
                   f"holds its layer inputs until the second pass)")
    if mesh["data"] > 1:
        out.append(f"--set mesh.data=1 --set mesh.fsdp=-1  (shard parameters and optimizer state over all "
                   f"{plan.target.num_devices} devices instead of replicating them {mesh['data']} times)")
    fused = {"tpu": "splash", "gpu": "cudnn"}.get(plan.target.platform)
    if fused and cfg.attention_impl == "xla":
        out.append(f"--set model.attention_impl={fused}  (a fused attention kernel: no float32 [rows, heads, seq, seq] "
                   f"scores per layer)")
    out += _unrolled_hint(cfg, plan.target)
    if cfg.remat != "full":
        out.append(f"--set model.remat=full  (keep only each layer's input, recompute the rest; now {cfg.remat!r})")
    elif cfg.remat_layers is not None:
        out.append(f"--set model.remat_layers=null  (remat every layer; now {cfg.remat_layers} of "
                   f"{cfg.num_hidden_layers}, the others keep their matmul outputs)")
    if run.train.mu_dtype == "float32" and worst.state_bytes > 0.15 * limit:
        # float32 master weights and two float32 moments: 12 bytes per parameter, 2 of them saved
        out.append(f"--set train.mu_dtype=bfloat16  (Adam's first moment in bfloat16: "
                   f"{worst.state_bytes / 6 / GIB:.2f} GiB less state per device)")
    per_pass = chunk if 0 < chunk < n else n
    if per_pass % dp and n % dp == 0:
        held = rows_per_device(per_pass * worst.shape.group, _abstract_mesh(mesh))
        out.append(f"--set train.chunk_size={dp}  (a multiple of the {dp} data-parallel devices; now each device "
                   f"embeds {held} of the {per_pass * worst.shape.group} passages of a chunk)")
    elif per_pass > dp:
        smaller = [c for c in range(dp, per_pass, dp) if n % c == 0]
        if smaller:
            fitting = [c for c in smaller if _fits_with_chunk(run, plan, c)]
            c = fitting[-1] if fitting else smaller[0]  # the largest chunk that fits: fewest passes
            how = ("the largest that fits by the estimate" if fitting
                   else "the smallest; even it does not fit by the estimate")
            out.append(f"--set train.chunk_size={c}  (GradCache: embed {c} queries at a time, "
                       f"{c // dp} per data-parallel device instead of {per_pass // dp}, {how}; same gradient)")
    heads_split = cfg.num_key_value_heads % (2 * mesh["tensor"]) == 0
    if heads_split and plan.target.num_devices % (2 * mesh["tensor"]) == 0 and mesh["fsdp"] > 1:
        t = 2 * mesh["tensor"]
        new_dp = plan.target.num_devices // t
        # keep the rows each device embeds per pass: fewer data-parallel devices, a smaller chunk
        same_rows = per_pass * new_dp // dp if per_pass * new_dp % dp == 0 else 0
        chunk_set = (f" --set train.chunk_size={same_rows}" if 0 < chunk < n and same_rows and n % same_rows == 0
                     else "")
        out.append(f"--set mesh.tensor={t} --set mesh.fsdp=-1{chunk_set}  (split attention heads and "
                   f"MLP columns over {t} devices: less activation memory per device"
                   f"{', the same rows per device per chunk' if chunk_set else ''})")
    if not out or per_pass <= dp:
        out.append("shorter data.passage_max_length / query_max_length, or more devices")
    return out


def _fits_with_chunk(run, plan: Plan, chunk: int, rules: Mapping[str, Any] | None = None) -> bool:
    """Whether every step of `plan` would fit (within the headroom) with GradCache chunk `chunk`.

    A step's peak (compiled or estimated) is split into what does not depend on the chunk
    (train state, gradients and GradCache's accumulator, gathered layer weights: the analytic
    model's terms) and the rest, which is scaled by the analytic model's ratio of the two
    chunks' activations, kept chunks and batch buffers: a compiled peak the model
    underestimates (a TPU program with XLA attention) scales with the chunk all the same."""
    from qzhou_jax.train.step import kept_chunks

    cfg, mesh, keep = run.model_config, _abstract_mesh(plan.mesh), run.train.keep_chunks
    fixed_parts = ("state", "gradients", "layers")
    for sp in plan.steps:
        n = sp.shape.n
        if chunk < n and n % chunk:  # a batch not above the chunk runs without GradCache
            return False
        now = estimate_step_bytes(cfg, sp.shape, mesh, plan.chunk_size, sp.state_bytes, plan.param_bytes, rules,
                                  sp.kept_chunks)
        kept = kept_chunks(n, chunk, keep) if keep and chunk < n else 0
        then = estimate_step_bytes(cfg, sp.shape, mesh, chunk, sp.state_bytes, plan.param_bytes, rules, kept)
        fixed_now, fixed_then = (sum(e[k] for k in fixed_parts) for e in (now, then))
        varying_now, varying_then = now["peak"] - fixed_now, then["peak"] - fixed_then
        varying = max(sp.peak_bytes - fixed_now, 0)
        peak = fixed_then + (varying * varying_then / varying_now if varying_now > 0 else varying)
        if peak > plan.limit_gib * GIB * (1 - plan.headroom):
            return False
    return True


# --------------------------------------------------------------------- CLI
def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `plan` to a CLI's subparsers."""
    p = subparsers.add_parser("plan", help="compile a training config for a TPU slice / GPU cluster: memory, "
                                           "FLOPs, step time", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config (YAML); its data is not read")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.chunk_size=32")
    p.add_argument("--topology", default=None,
                   help="v5p-16, v4-32, v5e-32, v6e-32, v5p:2x2x2, gpu:8xH100, cpu:8 (see qzhou_jax/topology.py)")
    p.add_argument("--devices", type=int, default=None, help="number of devices (without --topology: a generic GPU "
                                                             "cluster, with --memory-gib)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per device (overrides the chip's figure)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 peak per device (default: the vendor figure of the chip)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"model FLOPs utilization for the step time estimate (default {DEFAULT_MFU})")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"report 'tight' above 1 - headroom of the memory limit (default {DEFAULT_HEADROOM})")
    p.add_argument("--estimate", action="store_true", help="analytic estimate only, compile nothing")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the plan as JSON ('-': JSON on stdout, the table on stderr)")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from qzhou_jax.config import write_json
    from qzhou_jax.train.config import load_run_config

    target = parse_target(args.topology, devices=args.devices, memory_gib=args.memory_gib,
                          peak_tflops=args.peak_tflops)
    run = load_run_config(args.config, args.overrides)
    if args.json and args.json != "-":  # before minutes of compiling
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or os.path.isdir(args.json):
            raise ValueError(f"--json {args.json}: cannot write there ({folder} is not a folder)"
                             if not os.path.isdir(folder) else f"--json {args.json}: is a folder")
    plan = make_plan(run, target, mfu=args.mfu, headroom=args.headroom, estimate=args.estimate,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(plan.format(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.json:
        write_json(args.json, plan.to_dict())
    return 0 if plan.fits else 1
