"""The Qwen2/Qwen2.5 decoder as a text encoder, in Flax NNX.

One table, `param_specs`, declares every weight once: its shape, logical axes, initializer
and HuggingFace name. The module builds its parameters from that table; sharding
(`sharding.state_shardings`) and checkpoint conversion (`checkpoint/`) read the same table.

Layer weights are stacked along a leading `layers` axis. With `scan_layers` the forward
runs `lax.scan` over them (compile time independent of depth); without, it unrolls a
Python loop over the same arrays, so checkpoints do not depend on the choice.

The math is a pure function of a params dict (`forward`), so train steps can call it
on `nnx.split` state without graph traversal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qzhou_jax.config import ModelConfig
from qzhou_jax.sharding import constrain


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
    if cfg.attention_impl == "cudnn":
        # cuDNN masks padding by sequence length, which assumes right padding (the
        # tokenizer's default); padded query rows are ignored by pooling.
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


def decoder_layer(x: jax.Array, p: Mapping[str, jax.Array], cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x: [B,S,E] compute dtype."""
    cdt = _dtype(cfg.compute_dtype)
    w = {k: v.astype(cdt) for k, v in p.items()}
    with jax.named_scope("attention"):
        h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps).astype(cdt)
        q = jnp.einsum("bse,ehd->bshd", h, w["q_kernel"]) + w["q_bias"]
        k = jnp.einsum("bse,ehd->bshd", h, w["k_kernel"]) + w["k_bias"]
        v = jnp.einsum("bse,ehd->bshd", h, w["v_kernel"]) + w["v_bias"]
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")
        a = checkpoint_name(attention(q, k, v, mask, cfg), "attn_out")
        x = x + jnp.einsum("bshd,hde->bse", a, w["o_kernel"])
        x = constrain(x, ("batch", "seq", "act_embed"))
    with jax.named_scope("mlp"):
        h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps).astype(cdt)
        g = constrain(h @ w["gate_kernel"], ("batch", "seq", "act_mlp"))
        u = constrain(h @ w["up_kernel"], ("batch", "seq", "act_mlp"))
        x = x + (jax.nn.silu(g) * u) @ w["down_kernel"]
        x = constrain(x, ("batch", "seq", "act_embed"))
    return x


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
}


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """0, 1, 2, ... over the real tokens of each row, whichever side the padding is on."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Mapping[str, Any], cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
            positions: jax.Array | None = None) -> jax.Array:
    """Last hidden state [batch, seq, hidden] after the final norm, in float32."""
    cdt = _dtype(cfg.compute_dtype)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = jnp.take(params["embed_tokens"], input_ids, axis=0).astype(cdt)
    x = constrain(x, ("batch", "seq", "act_embed"))

    def layer(carry, p):
        return decoder_layer(carry, p, cos, sin, attention_mask, cfg), None

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    stacked = params["layers"]
    if cfg.scan_layers:
        x, _ = jax.lax.scan(layer, x, stacked)
    else:
        for i in range(cfg.num_hidden_layers):
            x, _ = layer(x, jax.tree.map(lambda t: t[i], stacked))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
