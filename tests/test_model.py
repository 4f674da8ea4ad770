"""The Flax encoder against transformers' Qwen2Model (float32, CPU), and its sharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_utils import hf_hidden, params_from_torch, random_batch, tiny_hf_model
from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import embed, forward, param_count
from qzhou_jax.model.embedder import finish, pool

GQA = {1: dict(heads=4, kv_heads=4, hidden=32), 2: dict(heads=4, kv_heads=2, hidden=32),
       7: dict(heads=7, kv_heads=1, hidden=56)}


def _mean_pool_np(h, mask):
    m = mask[..., None].astype(np.float64)
    v = (h * m).sum(1) / m.sum(1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _check_parity(hf_model, cfg, params, side, seq=16, lengths=(16, 9, 3, 12)):
    ids, mask = random_batch(np.random.default_rng(1), hf_model.config.vocab_size, lengths, seq, side)
    ref = hf_hidden(hf_model, ids, mask)
    got = np.asarray(jax.jit(lambda p, i, m: forward(p, cfg, i, m))(params, ids, mask))
    valid = mask.astype(bool)
    err = np.abs(ref - got)[valid].max()
    assert err <= 1e-5 * np.abs(ref[valid]).max() + 1e-6, err
    emb = np.asarray(embed(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    cos = np.sum(emb * _mean_pool_np(ref, mask), axis=-1)
    assert cos.min() >= 0.999999, cos


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("gqa", [1, 2, 7])
def test_parity_attention_padding_gqa(causal, side, gqa):
    hf = tiny_hf_model(causal=causal, **GQA[gqa])
    cfg, params = params_from_torch(hf, compute_dtype="float32")
    assert cfg.attention == ("causal" if causal else "bidirectional")
    _check_parity(hf, cfg, params, side)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("remat", ["none", "full", "attn"])
def test_parity_tied_scan_remat(tied, scan, remat):
    hf = tiny_hf_model(tied=tied, layers=3)
    cfg, params = params_from_torch(hf, compute_dtype="float32", scan_layers=scan, remat=remat)
    _check_parity(hf, cfg, params, "right")


def test_remat_and_scan_do_not_change_gradients():
    hf = tiny_hf_model(layers=3)
    ids, mask = random_batch(np.random.default_rng(2), 97, [10, 6, 8], 10)
    grads = {}
    for scan, remat in [(True, "none"), (False, "none"), (True, "full"), (True, "dots"), (False, "attn")]:
        cfg, params = params_from_torch(hf, compute_dtype="float32", scan_layers=scan, remat=remat)
        loss = lambda p: jnp.sum(embed(p, cfg, ids, mask) ** 3)  # noqa: E731
        grads[(scan, remat)] = jax.jit(jax.grad(loss))(params)
    base = jax.tree.leaves(grads[(True, "none")])
    for key, g in grads.items():
        for a, b in zip(base, jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=str(key))


def test_bfloat16_compute_against_float32_reference():
    hf = tiny_hf_model(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2)
    cfg, params = params_from_torch(hf, compute_dtype="bfloat16")
    ids, mask = random_batch(np.random.default_rng(3), 97, [16, 11, 5], 16)
    ref = hf_hidden(hf, ids, mask)
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    valid = mask.astype(bool)
    rel = np.linalg.norm((got - ref)[valid]) / np.linalg.norm(ref[valid])
    assert rel <= 2e-2, rel


def test_padding_side_and_last_token_pooling():
    hf = tiny_hf_model()
    cfg, params = params_from_torch(hf, compute_dtype="float32", pooling="last")
    ids_r, mask_r = random_batch(np.random.default_rng(4), 97, [5, 9], 9, "right")
    ids_l = np.zeros_like(ids_r)
    mask_l = np.zeros_like(mask_r)
    for b in range(2):  # the same tokens, left padded
        n = mask_r[b].sum()
        ids_l[b, 9 - n:], mask_l[b, 9 - n:] = ids_r[b, :n], 1
    for pooling in ("last", "mean"):
        c = cfg.replace(pooling=pooling)
        a = np.asarray(embed(params, c, ids_r, mask_r))
        b = np.asarray(embed(params, c, ids_l, mask_l))
        np.testing.assert_allclose(a, b, atol=2e-6)
    ref = hf_hidden(hf, ids_r, mask_r)
    last = ref[np.arange(2), mask_r.sum(1) - 1]
    last = last / np.linalg.norm(last, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(embed(params, cfg, ids_r, mask_r)), last, atol=1e-5)


def test_matryoshka_truncation_and_normalization():
    h = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 16)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    cfg = ModelConfig.preset("tiny", embedding_dim=8)
    out = finish(pool(h, mask, "mean"), cfg)
    assert out.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
    expected = np.asarray(h[1, :2].mean(0))[:8]
    np.testing.assert_allclose(out[1], expected / np.linalg.norm(expected), rtol=1e-5)


@pytest.mark.parametrize("name,count", [("qwen2.5-7b", 7_070_619_136), ("qwen2.5-1.5b", 1_543_714_304),
                                        ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-3b", 3_085_938_688)])
def test_parameter_counts_from_abstract_shapes(name, count):
    cfg = ModelConfig.preset(name)
    assert param_count(cfg) == count
    assert cfg.num_params() == count


@pytest.mark.parametrize("mesh_shape,expect_q,expect_down", [
    ({"data": 2, "fsdp": 4}, P(None, "fsdp"), P(None, None, "fsdp")),
    ({"fsdp": 2, "tensor": 4}, P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")),
])
def test_sharded_forward_equals_single_device(mesh_shape, expect_q, expect_down):
    hf = tiny_hf_model(hidden=64, heads=8, kv_heads=4, mlp=128, layers=2, vocab=128)
    cfg, params = params_from_torch(hf, compute_dtype="float32")
    ids, mask = random_batch(np.random.default_rng(6), 128, [16, 3, 9, 12, 16, 1, 7, 5], 16)
    single = np.asarray(jax.jit(lambda p: embed(p, cfg, ids, mask))(params))

    mesh = sharding.make_mesh(mesh_shape)
    _, sharded_params = params_from_torch(hf, mesh=mesh, compute_dtype="float32")
    layers = sharded_params["layers"]
    assert layers["q_kernel"].sharding.spec == expect_q
    assert layers["down_kernel"].sharding.spec == expect_down
    assert sharded_params["embed_tokens"].sharding.spec == (
        P("tensor", "fsdp") if mesh_shape.get("tensor", 1) > 1 else P(None, "fsdp"))
    shard_shape = layers["gate_kernel"].addressable_shards[0].data.shape
    assert np.prod(shard_shape) < np.prod(layers["gate_kernel"].shape), "parameters must really be sharded"

    batch = sharding.batch_sharding(mesh, 2)
    ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
    with sharding.use_mesh(mesh):
        fn = jax.jit(lambda p, i, m: embed(p, cfg, i, m))
        out = fn(sharded_params, ids_s, mask_s)
    np.testing.assert_allclose(np.asarray(out), single, atol=2e-6)
