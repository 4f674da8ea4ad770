"""Pallas splash attention (TPU) for the encoder: `ModelConfig(attention_impl="splash")`.

Splash attention never materialises the [heads, seq, seq] score matrix, so attention memory
grows linearly with the sequence (the 1,536-token passages of stage 2) instead of
quadratically. It is JAX's TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`):
bidirectional (or causal) masks, grouped-query heads natively, padding through segment ids
(1 for tokens, 0 for padding: a token never attends to padding, whichever side it is on).

Under a mesh (`sharding.use_mesh`) the kernel runs inside `shard_map`: each device attends
over its own rows and heads (the batch over the data-parallel axes, heads over `tensor`; the
sequence is whole on every device). Sequences are padded to a multiple of 128 (the kernel's
block granularity) and cut back after.

On other platforms the same kernel runs in Pallas's interpreter: slow, for tests and for
checking numerics on a CPU, with a warning.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qzhou_jax import sharding

log = logging.getLogger(__name__)

_LANES = 128  # the kernel's sequence blocks are multiples of this
# Default matmul precisions under which the kernel compiles with 16-bit inputs.
_KERNEL_PRECISIONS = (None, "default", "fastest", "bfloat16")


def _block(seq: int) -> int:
    """The largest of 512, 256, 128 that divides the (padded) sequence length."""
    return next(b for b in (512, 256, _LANES) if seq % b == 0)


def _kernel(heads: int, seq: int, causal: bool, interpret: bool):
    """A splash kernel for one sequence length. Built at each trace, not cached: it holds the
    mask's block tables as arrays, which a cached kernel would leak from one trace into the next."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((seq, seq)) if causal else sm.FullMask((seq, seq))
    b = _block(seq)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


@functools.lru_cache(maxsize=8)
def _warn_interpreted(platform: str) -> None:
    log.warning("attention_impl 'splash' is a TPU kernel; on %s it runs in Pallas's interpreter (slow: "
                "for tests and numerics checks)", platform)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, causal: bool,
                     interpret: bool) -> jax.Array:
    """q [B,S,H,D], k/v [B,S,K,D] (K divides H), segments [B,S] int32 -> [B,S,H,D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    S, H, D = q.shape[1], q.shape[2], q.shape[3]
    kernel = _kernel(H, S, causal, interpret)
    qt = (q * jnp.asarray(D ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one(qi, ki, vi, si):
        return kernel(qi, ki, vi, segment_ids=SegmentIds(q=si, kv=si))

    return jax.vmap(one)(qt, kt, vt, segments).transpose(0, 2, 1, 3)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool) -> jax.Array:
    """Grouped-query attention through the splash kernel. q: [B,S,H,D], k/v: [B,S,K,D], mask: [B,S]
    (1 = token). Same contract as `qwen2.attention`."""
    B, S, H, D = q.shape
    K = k.shape[2]
    mesh = sharding.current_mesh()
    platform = sharding.platform(mesh)
    interpret = platform != "tpu"
    if interpret:
        _warn_interpreted(platform)
    elif q.dtype.itemsize < 4 and jax.config.jax_default_matmul_precision not in _KERNEL_PRECISIONS:
        raise ValueError(f"attention_impl 'splash' with {q.dtype} inputs cannot run under jax_default_matmul_precision="
                         f"{jax.config.jax_default_matmul_precision!r}: the TPU kernel compiler rejects float32 "
                         f"contraction of 16-bit operands; unset it, or use compute_dtype float32")
    pad = (-S) % _LANES
    segments = mask.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)))
    fn = functools.partial(_local_attention, causal=causal, interpret=interpret)
    if mesh is not None:
        rules = sharding.current_rules()
        q_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), mesh, rules, q.shape)
        kv_spec = sharding.logical_to_spec(("batch", None, "act_kv_heads", None), mesh, rules, k.shape)
        if _entry(kv_spec, 2) != _entry(q_spec, 2):
            # The KV heads do not split like the query heads (2 KV heads over tensor=4): give each
            # query head its own copy, so that every device holds the KV heads of its query heads.
            k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
            kv_spec = q_spec
        seg_spec = PartitionSpec(_entry(q_spec, 0))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                           check_vma=False)
    out = fn(q, k, v, segments)
    return out[:, :S] if pad else out


def _entry(spec: PartitionSpec, i: int):
    return spec[i] if i < len(spec) else None

