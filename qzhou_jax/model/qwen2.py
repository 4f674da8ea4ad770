"""The Qwen2/Qwen2.5 decoder as a text encoder, in Flax NNX.

One table, `param_specs`, declares every weight once: its shape, logical axes, initializer
and HuggingFace name. The module builds its parameters from that table; sharding
(`sharding.state_shardings`) and checkpoint conversion (`checkpoint/`) read the same table.

Layer weights are stacked along a leading `layers` axis. With `scan_layers` the forward
runs `lax.scan` over them (compile time independent of depth); without, it unrolls a
Python loop over the same arrays, so checkpoints do not depend on the choice.

Remat (`cfg.remat`): "full" keeps only each layer's input and recomputes the layer in the
backward pass; "mlp" also keeps the MLP's gate and up projections (the largest matmuls),
"attn" the attention inputs and output, "dots" every matmul output (the backward pass then
recomputes only elementwise work and attention). `cfg.remat_layers` applies the policy to
that many layers only and "dots" to the others, trading memory for recomputation layer by
layer (see `remat_groups`).

The math is a pure function of a params dict (`forward`), so train steps can call it
on `nnx.split` state without graph traversal.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qzhou_jax.config import ModelConfig
from qzhou_jax.sharding import check_split, constrain, current_data_parallel_size, lookup


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: shape, logical axes, initializer, and its HuggingFace tensor name.

    `hf` is the name under `model.` in a Qwen2ForCausalLM checkpoint ("{i}" is the layer
    index for stacked weights). `fan_in` is the number of leading (non-layer) dimensions
    that form a Linear's input: HF stores `weight` as [out, in], here it is [in..., out...].
    `fan_in = 0` flattens (biases: [heads, head_dim] here, [heads * head_dim] in HF);
    `fan_in = None` stores the tensor as is.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal", "zeros" or "ones"
    hf: str
    fan_in: int | None = None

    @property
    def stacked(self) -> bool:
        return bool(self.axes) and self.axes[0] == "layers"


def check_param_split(cfg: ModelConfig, mesh: Any, rules: Mapping[str, Any] | None = None, *,
                      bytes_per_element: int | None = None, what: str = "model parameters",
                      strict: bool = True) -> None:
    """`sharding.check_split` over every weight of `cfg` (bytes: param_dtype's by default): an error
    with the numbers when `mesh` would leave large weights whole on every device; a warning with
    `strict=False` (loading a model for inference or conversion, which may fit replicated)."""
    if mesh is None:
        return
    try:
        check_split({p: (s.shape, s.axes) for p, s in param_specs(cfg).items()}, mesh, rules,
                    bytes_per_element=bytes_per_element or jnp.dtype(cfg.param_dtype).itemsize, what=what)
    except ValueError as e:
        if strict:
            raise
        import logging

        logging.getLogger(__name__).warning("%s", e)


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every encoder weight, keyed by its path in the NNX module ("layers/q_kernel", ...)."""
    E, V, L, F = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = "layers.{i}.self_attn."
    m = "layers.{i}.mlp."
    return {
        "embed_tokens": ParamSpec((V, E), ("vocab", "embed"), "normal", "embed_tokens.weight"),
        "layers/input_norm": ParamSpec((L, E), ("layers", "norm"), "ones", "layers.{i}.input_layernorm.weight"),
        "layers/q_kernel": ParamSpec((L, E, H, D), ("layers", "embed", "q_heads", "head_dim"), "normal",
                                     a + "q_proj.weight", 1),
        "layers/q_bias": ParamSpec((L, H, D), ("layers", "q_heads", "head_dim"), "zeros", a + "q_proj.bias", 0),
        "layers/k_kernel": ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), "normal",
                                     a + "k_proj.weight", 1),
        "layers/k_bias": ParamSpec((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "k_proj.bias", 0),
        "layers/v_kernel": ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), "normal",
                                     a + "v_proj.weight", 1),
        "layers/v_bias": ParamSpec((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "v_proj.bias", 0),
        "layers/o_kernel": ParamSpec((L, H, D, E), ("layers", "q_heads", "head_dim", "embed"), "normal",
                                     a + "o_proj.weight", 2),
        "layers/post_norm": ParamSpec((L, E), ("layers", "norm"), "ones",
                                      "layers.{i}.post_attention_layernorm.weight"),
        "layers/gate_kernel": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal", m + "gate_proj.weight", 1),
        "layers/up_kernel": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal", m + "up_proj.weight", 1),
        "layers/down_kernel": ParamSpec((L, F, E), ("layers", "mlp", "embed"), "normal", m + "down_proj.weight", 1),
        "final_norm": ParamSpec((E,), ("norm",), "ones", "norm.weight"),
    }


def check_params(params: Mapping[str, Any], cfg: ModelConfig) -> list[tuple[str, Any]]:
    """(path, array) of every weight `param_specs(cfg)` declares, in its order; ValueError naming
    the first weight that is missing or whose shape is not the config's (params of another
    model size would otherwise export or train silently: a missing layer index is clamped)."""
    out = []
    for path, spec in param_specs(cfg).items():
        node: Any = params
        for part in path.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"params: missing parameter {path!r}")
            node = node[part]
        if tuple(node.shape) != spec.shape:
            raise ValueError(f"params: parameter {path!r} has shape {tuple(node.shape)}, config implies {spec.shape}")
        out.append((path, node))
    return out


def _dtype(name: str):
    return jnp.dtype(name)


def _init(spec: ParamSpec, key: jax.Array, cfg: ModelConfig) -> jax.Array:
    dtype = _dtype(cfg.param_dtype)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (cfg.initializer_range * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


class _Group(nnx.Module):
    """A namespace for parameters (e.g. `layers`)."""


class Qwen2Encoder(nnx.Module):
    """Token ids + attention mask -> last hidden states [batch, seq, hidden]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        for path, spec in param_specs(cfg).items():
            owner: nnx.Module = self
            *groups, name = path.split("/")
            for g in groups:
                if not hasattr(owner, g):
                    setattr(owner, g, _Group())
                owner = getattr(owner, g)
            setattr(owner, name, nnx.Param(_init(spec, rngs.params(), cfg), axes=spec.axes))

    def params(self) -> dict[str, Any]:
        """The weights as a plain nested dict of arrays (what `forward` takes)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        return forward(self.params(), self.cfg, input_ids, attention_mask, positions)


# --------------------------------------------------------------------- math
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, as HF's Qwen2RMSNorm (normalize in f32, scale, then cast back)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x32


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, seq, head_dim] (rotate-half layout), float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; rotate-half RoPE as in HF Qwen2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Grouped-query attention. q: [B,S,H,D], k/v: [B,S,K,D], mask: [B,S] (1 = token).

    Bidirectional or causal per `cfg.attention`; padded keys are always masked.
    """
    B, S, H, D = q.shape
    K = k.shape[2]
    causal = cfg.attention == "causal"
    valid = mask.astype(bool)
    if cfg.attention_impl == "splash":
        from qzhou_jax.model.splash import splash_attention

        return splash_attention(q, k, v, mask, causal)
    if cfg.attention_impl == "cudnn":
        # cuDNN masks padding by sequence length, which assumes right padding: the model's
        # entry points right-align every row first (`_right_align`); padded query rows are
        # ignored by pooling.
        lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, scale=D ** -0.5, is_causal=causal, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn")
    G = H // K
    qg = q.reshape(B, S, K, G, D)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * (D ** -0.5)
    allowed = valid[:, None, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((S, S), bool))[None, None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).reshape(B, S, H, D)


def _norm_cast(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    return rms_norm(x, weight, eps).astype(dtype)


def _swiglu_down(g: jax.Array, u: jax.Array, down: jax.Array, cfg: ModelConfig) -> jax.Array:
    return project("bsf,fe->bse", jax.nn.silu(g) * u, down, None, cfg)


def _weight_grad_spec(spec: str) -> str:
    """For an einsum "x,w->y" (no index repeated within an operand): its weight gradient's, "x,y->w"."""
    ins, y = spec.split("->")
    x, w = ins.split(",")
    return f"{x},{y}->{w}"


def _add_bias(y: jax.Array, b: jax.Array | None) -> jax.Array:
    """y + b, the bias cast to y's dtype. Differentiated, the bias gradient is a sum over the
    tokens in y's dtype; summing it in float32 instead costs temporaries (0.26 GiB per chip for
    Qwen2.5-0.5B stage 1 on v5p-16), so it comes with `weight_grad_dtype: float32` only."""
    return y if b is None else y + b.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _project_wide_grads(spec: str, x: jax.Array, w: jax.Array, b: jax.Array | None, dtypes: tuple) -> jax.Array:
    return _add_bias(jnp.einsum(spec, x, w.astype(x.dtype)), b)


def _project_wide_grads_fwd(spec, x, w, b, dtypes):
    # residuals as the plain einsum's transpose would keep them: the input and the weight cast
    # to the compute dtype (recomputed from the parameter under remat, kept under none)
    return _project_wide_grads(spec, x, w, b, dtypes), (x, w.astype(x.dtype))


def _project_wide_grads_bwd(spec, dtypes, res, g):
    grad_dtype, w_dtype, bias = dtypes  # bias: None or (its dtype, its number of dimensions)
    x, w = res
    _, pull = jax.vjp(lambda x_: jnp.einsum(spec, x_, w), x)  # the input gradient as without
    (dx,) = pull(g)
    dw = jnp.einsum(_weight_grad_spec(spec), x, g, preferred_element_type=grad_dtype).astype(w_dtype)
    db = None
    if bias is not None:
        db = jnp.sum(g.astype(grad_dtype), axis=tuple(range(g.ndim - bias[1]))).astype(bias[0])
    return dx, dw, db


_project_wide_grads.defvjp(_project_wide_grads_fwd, _project_wide_grads_bwd)


def project(spec: str, x: jax.Array, w: jax.Array, b: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """einsum(spec, x, w) (+ b): x in the compute dtype, the weight and bias cast to it.

    Differentiated, the weight-gradient matmul writes the compute dtype, and the bias gradient
    is summed in it, so data-parallel devices sum their partial gradients in it. With
    `cfg.weight_grad_dtype` wider than the compute dtype ("float32" under bfloat16), that
    matmul (still bfloat16 operands, float32 accumulation) writes float32 instead, and the bias
    gradient is summed in float32: the reduction over devices is then float32 (twice the
    bytes), as Megatron's float32 gradient all-reduce and PyTorch FSDP's `reduce_dtype` do.
    That path is a custom VJP: reverse mode only (`jax.jvp` refuses it)."""
    if cfg.weight_grad_dtype is None:  # the compute dtype (ModelConfig stores it as None)
        return _add_bias(jnp.einsum(spec, x, w.astype(x.dtype)), b)
    # named for the "dots" policy, which looks for dot_general and would not see this one
    dtypes = (jnp.dtype(cfg.weight_grad_dtype), w.dtype, None if b is None else (b.dtype, b.ndim))
    return checkpoint_name(_project_wide_grads(spec, x, w, b, dtypes), "projection")


def decoder_layer(x: jax.Array, p: Mapping[str, jax.Array], cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x: [B,S,E] compute dtype.

    The norms and the SwiGLU activation are recomputed in the backward pass whatever the
    remat policy (`jax.checkpoint` around them): they are elementwise and cheap to redo,
    while keeping their intermediates (float32 norms, three silu temporaries) took 88 of
    the 142 KiB per token that a Qwen2.5-1.5B layer without remat kept for its backward.
    """
    cdt = _dtype(cfg.compute_dtype)
    norm = jax.checkpoint(functools.partial(_norm_cast, eps=cfg.rms_norm_eps, dtype=cdt))
    proj = functools.partial(project, cfg=cfg)
    with jax.named_scope("attention"):
        h = norm(x, p["input_norm"])
        q = proj("bse,ehd->bshd", h, p["q_kernel"], p["q_bias"])
        k = proj("bse,ehd->bshd", h, p["k_kernel"], p["k_bias"])
        v = proj("bse,ehd->bshd", h, p["v_kernel"], p["v_bias"])
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")
        a = checkpoint_name(attention(q, k, v, mask, cfg), "attn_out")
        x = x + proj("bshd,hde->bse", a, p["o_kernel"], None)
        x = constrain(x, ("batch", "seq", "act_embed"))
    with jax.named_scope("mlp"):
        h = norm(x, p["post_norm"])
        g = checkpoint_name(constrain(proj("bse,ef->bsf", h, p["gate_kernel"], None), ("batch", "seq", "act_mlp")),
                            "mlp_gate")
        u = checkpoint_name(constrain(proj("bse,ef->bsf", h, p["up_kernel"], None), ("batch", "seq", "act_mlp")),
                            "mlp_up")
        x = x + jax.checkpoint(functools.partial(_swiglu_down, cfg=cfg))(g, u, p["down_kernel"])
        x = constrain(x, ("batch", "seq", "act_embed"))
    return x


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("projection")),  # `project` with wide gradients
    "attn": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
    "mlp": jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"),
}


def remat_groups(cfg: ModelConfig) -> tuple[int, int]:
    """(layers per scan step, how many of them are kept: run under "dots", not `cfg.remat`).

    `cfg.remat_layers` of the `num_hidden_layers` layers run under the remat policy; the
    others keep every matmul output and recompute only elementwise work and attention (the
    "dots" policy), which trades memory for most of the recomputation. The kept layers are
    spread evenly: the scan runs over groups of consecutive layers, the last `kept` of each
    group kept (28 layers, 21 rematted: 7 steps of 4 layers, the 4th of each kept).
    """
    n = cfg.num_hidden_layers
    kept = 0 if cfg.remat_layers is None else n - cfg.remat_layers
    if kept in (0, n):
        return 1, int(kept == n)
    groups = math.gcd(n, kept)
    return n // groups, kept // groups


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """0, 1, 2, ... over the real tokens of each row, whichever side the padding is on."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _align_offsets(mask: jax.Array) -> jax.Array:
    """Per row, the index of the first real token (0 for an empty row)."""
    return jnp.argmax(mask.astype(bool), axis=-1).astype(jnp.int32)


def _right_align(x: jax.Array, offsets: jax.Array, undo: bool = False) -> jax.Array:
    """Rotate each row of x [batch, seq, ...] left by its offset, so that a left-padded row's
    tokens start at 0 (`undo`: rotate back). Right-padded rows (offset 0) are unchanged."""
    S = x.shape[1]
    idx = (jnp.arange(S, dtype=jnp.int32)[None, :] + (-offsets if undo else offsets)[:, None]) % S
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def merge_rows(arrays: Sequence[jax.Array], parts: int) -> jax.Array:
    """Concatenate batch-major arrays so that the i-th of `parts` equal row blocks of the
    result holds the i-th row block of every input: rows stay on their data-parallel device
    (a plain concatenation would move them). Plain concatenation when a size does not divide."""
    if len(arrays) == 1:
        return arrays[0]
    if parts > 1 and all(a.shape[0] % parts == 0 for a in arrays):
        blocks = [a.reshape((parts, a.shape[0] // parts) + a.shape[1:]) for a in arrays]
        out = jnp.concatenate(blocks, axis=1)
        return out.reshape((-1,) + out.shape[2:])
    return jnp.concatenate(arrays, axis=0)


def split_rows(x: jax.Array, sizes: Sequence[int], parts: int) -> list[jax.Array]:
    """Inverse of `merge_rows` for inputs of `sizes` rows."""
    if len(sizes) == 1:
        return [x]
    if parts > 1 and all(s % parts == 0 for s in sizes):
        blocks = x.reshape((parts, -1) + x.shape[1:])
        offsets = np.cumsum([0] + [s // parts for s in sizes])
        return [blocks[:, a:b].reshape((-1,) + x.shape[1:]) for a, b in zip(offsets[:-1], offsets[1:])]
    offsets = np.cumsum([0] + list(sizes))
    return [x[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


@jax.custom_jvp
def _value_with_gradient_to(target: jax.Array, value: jax.Array) -> jax.Array:
    """`value`, differentiated as if it were `target` (same shape and dtype): its tangent is
    `target`'s, so reverse mode sends the cotangent to `target` and none to `value`. Lets a
    layer read its weights from the stacked parameter (a free remat residual) while its
    gradient flows to a per-layer slice (whose transpose is a concatenation)."""
    return value


@_value_with_gradient_to.defjvp
def _value_with_gradient_to_jvp(primals, tangents):
    return primals[1], tangents[0]


def run_layers(layer: Callable[[Any, Mapping[str, jax.Array]], Any], carry: Any,
               stacked: Mapping[str, jax.Array], cfg: ModelConfig) -> Any:
    """carry -> layer(carry, weights of layer i) for every layer, under the remat settings."""
    n = cfg.num_hidden_layers
    group, keep = remat_groups(cfg)

    def policy(j: int) -> str:
        return "dots" if j >= group - keep else cfg.remat

    def checkpointed(fn: Callable, j: int) -> Callable:
        name = policy(j)
        return fn if name == "none" else jax.checkpoint(fn, policy=_REMAT[name], prevent_cse=not cfg.scan_layers)

    if not cfg.scan_layers:
        # Each layer reads its weights from the stacked arrays inside its checkpoint, so its
        # remat residuals are the stacked parameters themselves; taking the layer's slice
        # outside made XLA keep a float32 copy of every layer's weights from the forward
        # to the backward pass (the size of the parameters). The gradient goes to one
        # `lax.split` of each stacked weight, whose transpose concatenates the layers'
        # gradients: differentiating the slice taken inside the layer instead made every
        # layer's gradient a stack-sized, zero-padded array that the backward pass added up.
        parts = {k: jax.lax.split(t, [1] * n) for k, t in stacked.items()}
        frozen = jax.lax.stop_gradient(stacked)

        def unrolled(i: int) -> Callable:
            def fn(c, p, w):
                return layer(c, {k: _value_with_gradient_to(p[k].reshape(p[k].shape[1:]), w[k][i]) for k in p})
            return checkpointed(fn, i % group)

        for i in range(n):
            carry = unrolled(i)(carry, {k: v[i] for k, v in parts.items()}, frozen)
        return carry

    def step(j: int, sliced: bool = True) -> Callable:
        """(carry, weights) -> carry for the layer at position j of a group, under that
        position's remat policy; `sliced`: the weights are the group's, stacked. The slice is
        taken inside the checkpoint, so the residuals are the stacked weights themselves, not
        per-layer copies of them."""
        def fn(c, p):
            return layer(c, jax.tree.map(lambda t: t[j], p) if sliced else p)

        return checkpointed(fn, j)

    if group == 1:
        return jax.lax.scan(lambda c, p: (step(0, sliced=False)(c, p), None), carry, stacked)[0]
    steps = [step(j) for j in range(group)]

    def body(c, p):
        for fn in steps:
            c = fn(c, p)
        return c, None

    grouped = jax.tree.map(lambda t: t.reshape((n // group, group) + t.shape[1:]), stacked)
    return jax.lax.scan(body, carry, grouped)[0]


def _embed_tokens(embed_tokens: jax.Array, cfg: ModelConfig, inputs: Sequence[tuple]):
    """(groups, inputs of the first layer, per-group (cos, sin, mask)): the inputs grouped by
    length (row indices into `inputs`), each group's rows merged (`merge_rows`)."""
    cdt = _dtype(cfg.compute_dtype)
    parts = current_data_parallel_size()
    by_len: dict[int, list[int]] = {}
    for i, (ids, *_) in enumerate(inputs):
        by_len.setdefault(ids.shape[1], []).append(i)
    groups = list(by_len.values())

    def positions(inp) -> jax.Array:
        return inp[2] if len(inp) > 2 and inp[2] is not None else positions_from_mask(inp[1])

    if cfg.attention_impl == "cudnn":  # cuDNN's length masks need each row's tokens first
        aligned = []
        for inp in inputs:
            off = _align_offsets(inp[1])
            aligned.append((_right_align(inp[0], off), _right_align(inp[1], off), _right_align(positions(inp), off)))
        inputs = aligned

    xs, ctx = [], []
    for idx in groups:
        ids = merge_rows([inputs[i][0] for i in idx], parts)
        mask = merge_rows([inputs[i][1] for i in idx], parts)
        cos, sin = rope_tables(merge_rows([positions(inputs[i]) for i in idx], parts), cfg.head_dim, cfg.rope_theta)
        x = lookup(embed_tokens, ids).astype(cdt)
        xs.append(constrain(x, ("batch", "seq", "act_embed")))
        ctx.append((cos, sin, mask))
    return groups, tuple(xs), ctx


def _layer_fn(ctx, cfg: ModelConfig) -> Callable:
    def layer(carry, p):
        return tuple(decoder_layer(x, p, cos, sin, mask, cfg) for x, (cos, sin, mask) in zip(carry, ctx))
    return layer


def _final(final_norm: jax.Array, cfg: ModelConfig, inputs: Sequence[tuple], groups, xs) -> list[jax.Array]:
    """The last layer's outputs (per group) -> normed hidden states, one per input."""
    parts = current_data_parallel_size()
    out: list[Any] = [None] * len(inputs)
    for idx, x in zip(groups, xs):
        h = rms_norm(x, final_norm, cfg.rms_norm_eps)
        for i, part in zip(idx, split_rows(h, [inputs[i][0].shape[0] for i in idx], parts)):
            out[i] = _right_align(part, _align_offsets(inputs[i][1]), undo=True) \
                if cfg.attention_impl == "cudnn" else part
    return out


def forward_many(params: Mapping[str, Any], cfg: ModelConfig, inputs: Sequence[tuple]) -> list[jax.Array]:
    """Last hidden states of several token batches, [(input_ids, attention_mask), ...] or
    (input_ids, attention_mask, positions) triples, in one pass over the layers; each output
    is [batch, seq, hidden], float32, after the final norm.

    Batches of equal length are concatenated (larger matmuls); batches of different lengths
    share the pass, so each layer's weights are read, cast and differentiated once for all
    of them (one gradient buffer instead of one per batch).
    """
    groups, xs, ctx = _embed_tokens(params["embed_tokens"], cfg, inputs)
    xs = run_layers(_layer_fn(ctx, cfg), xs, params["layers"], cfg)
    return _final(params["final_norm"], cfg, inputs, groups, xs)


def forward_saving(params: Mapping[str, Any], cfg: ModelConfig, inputs: Sequence[tuple],
                   head: Callable[[list[jax.Array]], Any]) -> tuple[Any, Any]:
    """(head(forward_many(...)), saved): a forward pass, not differentiated, that also returns
    every layer's input and the last layer's output (`saved`: per length group, [layers,
    rows, seq, hidden] and [rows, seq, hidden] in the compute dtype), from which
    `backward_saved` computes the gradient later without running this forward again: the
    backward of remat "full", split from its forward.
    """
    groups, xs, ctx = _embed_tokens(params["embed_tokens"], cfg, inputs)
    layer = _layer_fn(ctx, cfg)
    last, ins = jax.lax.scan(lambda c, p: (layer(c, p), c), xs, params["layers"])
    ins = tuple(constrain(i, (None, "batch", "seq", "act_embed")) for i in ins)
    return head(_final(params["final_norm"], cfg, inputs, groups, last)), (ins, last)


def backward_saved(params: Mapping[str, Any], cfg: ModelConfig, inputs: Sequence[tuple],
                   head: Callable[[list[jax.Array]], Any], saved: Any, d_out: Any) -> dict[str, Any]:
    """The gradient with respect to `params` of `head(forward_many(params, cfg, inputs))`
    pulled back from the cotangent `d_out`, given `saved` from `forward_saving` with the
    same params and inputs: a reverse scan over the layers, each re-run from its saved
    input under `jax.vjp` (one layer's activations alive at a time)."""
    if set(params) != {"embed_tokens", "layers", "final_norm"}:
        raise ValueError(f"backward_saved: unexpected parameter groups {sorted(params)}")
    groups, _, ctx = _embed_tokens(jax.lax.stop_gradient(params["embed_tokens"]), cfg, inputs)
    ins, last = saved
    _, pull = jax.vjp(lambda x, w: head(_final(w, cfg, inputs, groups, x)), last, params["final_norm"])
    d_last, d_final_norm = pull(d_out)
    layer = _layer_fn(ctx, cfg)

    def body(dx, xp):
        _, pull_layer = jax.vjp(layer, *xp)
        dx, dp = pull_layer(dx)
        return dx, dp

    d_first, d_layers = jax.lax.scan(body, d_last, (ins, params["layers"]), reverse=True)
    _, pull = jax.vjp(lambda e: _embed_tokens(e, cfg, inputs)[1], params["embed_tokens"])
    (d_embed,) = pull(d_first)
    return {"embed_tokens": d_embed, "layers": d_layers, "final_norm": d_final_norm}


def forward(params: Mapping[str, Any], cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
            positions: jax.Array | None = None) -> jax.Array:
    """Last hidden state [batch, seq, hidden] after the final norm, in float32."""
    return forward_many(params, cfg, [(input_ids, attention_mask, positions)])[0]
