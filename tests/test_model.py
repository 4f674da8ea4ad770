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


REMAT_CASES = [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
               dict(scan_layers=False, remat="attn"), dict(remat="mlp"), dict(scan_layers=False, remat="mlp"),
               dict(remat="full", remat_layers=3), dict(remat="full", remat_layers=2),
               dict(remat="mlp", remat_layers=1), dict(scan_layers=False, remat="full", remat_layers=2),
               dict(remat="full", remat_layers=0), dict(remat="full", remat_layers=4)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_cudnn_length_masking_takes_either_padding_side(monkeypatch, causal):
    """cuDNN masks keys by sequence length (right padding); left-padded rows are rotated to
    the front and back. Here the same `dot_product_attention` call runs with XLA's
    implementation, which applies the lengths the same way (no cuDNN on CPU)."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: real(*a, **{**k, "implementation": "xla"}))
    hf = tiny_hf_model(causal=causal)
    cfg, params = params_from_torch(hf, compute_dtype="float32", attention_impl="cudnn")
    _check_parity(hf, cfg, params, "left")
    if causal:
        return
    ids, mask = random_batch(np.random.default_rng(3), 97, [16, 9, 3, 12], 16, "left")
    ref_cfg = params_from_torch(hf, compute_dtype="float32")[0]

    def grads(c):
        return jax.jit(jax.grad(lambda p: jnp.sum(embed(p, c, jnp.asarray(ids), jnp.asarray(mask)) ** 3)))(params)

    for a, b in zip(jax.tree.leaves(grads(ref_cfg)), jax.tree.leaves(grads(cfg))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal, side", [(False, "left"), (False, "right"), (True, "left")])
def test_splash_attention_parity(causal, side):
    """The Pallas splash kernel (TPU; here in Pallas's interpreter) against transformers, with
    padding on either side masked by segment ids and a sequence padded to the kernel's blocks."""
    hf = tiny_hf_model(causal=causal, **GQA[2])
    cfg, params = params_from_torch(hf, compute_dtype="float32", attention_impl="splash")
    _check_parity(hf, cfg, params, side)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_splash_attention_gradients_equal_xla_on_meshes(mesh_shape):
    """Under a mesh the kernel runs in shard_map over rows and heads; with tensor=4 the 2 KV heads
    do not split, so each query head gets a copy of its KV head. Values and gradients equal
    XLA attention's (a single-token row and left padding included)."""
    hf = tiny_hf_model(**GQA[2])
    cfg, params = params_from_torch(hf, compute_dtype="float32")
    ids, mask = random_batch(np.random.default_rng(4), 97, [16, 9, 1, 12, 5, 16, 2, 7], 16, "left")
    proj = jnp.asarray(np.random.default_rng(5).normal(size=(8, cfg.hidden_size)), jnp.float32)
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), jax.devices()[:int(np.prod(mesh_shape))])
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
    out = {}
    for impl in ("xla", "splash"):
        c = cfg.replace(attention_impl=impl)
        loss = lambda p: jnp.sum(embed(p, c, jnp.asarray(ids), jnp.asarray(mask)) * proj)  # noqa: E731
        with sharding.use_mesh(mesh):
            out[impl] = jax.jit(jax.value_and_grad(loss))(params)
    (l0, g0), (l1, g1) = out["xla"], out["splash"]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(g0))
    assert (num / den) ** 0.5 < 1e-5


def test_remat_and_scan_do_not_change_gradients():
    hf = tiny_hf_model(layers=4)
    ids, mask = random_batch(np.random.default_rng(2), 97, [10, 6, 8], 10)
    grads = []
    for case in [dict(remat="none")] + REMAT_CASES:
        cfg, params = params_from_torch(hf, compute_dtype="float32", **case)
        loss = lambda p: jnp.sum(embed(p, cfg, ids, mask) ** 3)  # noqa: E731
        grads.append((case, jax.jit(jax.grad(loss))(params)))
    base = jax.tree.leaves(grads[0][1])
    for case, g in grads[1:]:
        for a, b in zip(base, jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=str(case))


def test_unrolled_layer_gradients_are_not_padded_to_the_stack():
    """Unrolled layers take their weights from one split of each stacked array, so the backward
    pass concatenates the layers' gradients: indexing the stack in every layer made each
    layer's gradient a zero-padded, stack-sized array (28 of them summed at 1.5b widths cost
    about 30% of a train step on an H200, bench/RESULTS.md)."""
    hf = tiny_hf_model(layers=4)
    ids, mask = random_batch(np.random.default_rng(2), 97, [10, 6], 10)
    cfg, params = params_from_torch(hf, compute_dtype="float32", scan_layers=False, remat="full", remat_layers=2)
    loss = lambda p: jnp.sum(embed(p, cfg, ids, mask) ** 3)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)

    def subjaxprs(v):
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(getattr(v, "jaxpr", None), "eqns"):  # a ClosedJaxpr
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            for x in v:
                yield from subjaxprs(x)

    def eqns(j):
        for e in j.eqns:
            yield e
            for v in e.params.values():
                for sub in subjaxprs(v):
                    yield from eqns(sub)

    prims = [e.primitive.name for e in eqns(jaxpr.jaxpr)]
    assert "split" in prims and "concatenate" in prims
    stacked = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "pad"
               and e.outvars[0].aval.shape[:1] == (cfg.num_hidden_layers,)]
    assert not stacked, "a layer's gradient is padded to the size of the stack"


def test_unrolled_layers_keep_no_copies_of_their_weights_for_the_backward_pass():
    """Unrolled layers read their weights from the stacked arrays inside their checkpoints, so
    the remat residuals are the parameters themselves: slicing each layer's weights outside
    made XLA keep a float32 copy of all of them from the forward to the backward pass (4.7 GiB
    at Qwen2.5-1.5B's size, live at the step's peak in the H200 profiles' programs)."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    hf = tiny_hf_model(layers=4)
    ids, mask = random_batch(np.random.default_rng(2), 97, [10, 6], 10)
    for remat, remat_layers in (("full", 2), ("mlp", None)):  # full and dots layers; a names policy
        cfg, params = params_from_torch(hf, compute_dtype="float32", scan_layers=False, remat=remat,
                                        remat_layers=remat_layers)
        layer_shapes = {s for t in params["layers"].values() for s in (tuple(t.shape[1:]), (1,) + t.shape[1:])}
        loss = lambda p: jnp.sum(embed(p, cfg, ids, mask) ** 3)  # noqa: E731
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss, params)
        saved = re.findall(r"^\w+\[([\d,]*)\] (.*)$", out.getvalue(), re.M)
        assert saved, out.getvalue()
        copies = [(s, why) for s, why in saved if tuple(int(d) for d in s.split(",") if d) in layer_shapes]
        assert not copies, f"{remat}/{remat_layers}: per-layer weight copies kept: {copies[:3]}"
        grads = jax.eval_shape(jax.grad(loss), params)
        assert all(g.shape == params["layers"][k].shape for k, g in grads["layers"].items())
    # forward mode works on this path too (jvp of a per-layer weight's tangent)
    tangents = jax.tree.map(jnp.ones_like, params)
    jax.eval_shape(lambda p, t: jax.jvp(loss, (p,), (t,)), params, tangents)


def test_float32_weight_gradients_sum_exactly_and_change_nothing_else():
    """`weight_grad_dtype: float32` under bfloat16 compute: a projection's weight and bias
    gradients are float32 sums of the bfloat16 products (against float64: < 1e-6; in bfloat16
    they miss by > 1e-4), the input gradient and the forward are unchanged bit for bit, and
    under every remat policy the layers keep exactly the residuals they keep without it (the
    "dots" policy must still see these matmuls)."""
    import contextlib
    import io
    import re
    from collections import Counter

    from jax.ad_checkpoint import print_saved_residuals

    from qzhou_jax.model.qwen2 import project

    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (16, 64, 32)).astype(jnp.bfloat16)
    w = 0.1 * jax.random.normal(ks[1], (32, 4, 8))
    b = jax.random.normal(ks[2], (4, 8))
    g = jax.random.normal(ks[3], (16, 64, 4, 8)).astype(jnp.bfloat16)
    narrow = ModelConfig.preset("tiny", compute_dtype="bfloat16")
    wide = narrow.replace(weight_grad_dtype="float32")
    out = {}
    for name, cfg in (("narrow", narrow), ("wide", wide)):
        y, pull = jax.vjp(lambda x, w, b: project("bse,ehd->bshd", x, w, b, cfg), x, w, b)  # noqa: B023
        out[name] = (y, *pull(g))
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    refs = {2: np.einsum("bse,bshd->ehd", x64, g64), 3: g64.sum((0, 1))}

    def rel(a, ref):
        return np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref)

    for i, ref in refs.items():
        assert out["wide"][i].dtype == jnp.float32
        assert rel(out["wide"][i], ref) < 1e-6, (i, rel(out["wide"][i], ref))
        assert rel(out["narrow"][i], ref) > 1e-4, (i, rel(out["narrow"][i], ref))
    for i in (0, 1):  # output, input gradient
        np.testing.assert_array_equal(np.asarray(out["wide"][i], np.float32), np.asarray(out["narrow"][i], np.float32))

    hf = tiny_hf_model(layers=4)
    ids, mask = random_batch(np.random.default_rng(2), 97, [10, 6], 10)
    for scan, remat, remat_layers in ((True, "dots", None), (True, "full", 2), (False, "full", 2), (False, "mlp", None),
                                      (True, "none", None)):
        saved, grads = {}, {}
        for wg in (None, "float32"):
            cfg, params = params_from_torch(hf, compute_dtype="bfloat16", scan_layers=scan, remat=remat,
                                            remat_layers=remat_layers, weight_grad_dtype=wg)
            loss = lambda p: jnp.sum(embed(p, cfg, ids, mask) ** 3)  # noqa: E731
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                print_saved_residuals(loss, params)
            # activations only: the default path may also list bias parameters (free residuals)
            saved[wg] = Counter(s for s in re.findall(r"^(\w+\[[\d,]*\])", buf.getvalue(), re.M)
                                if s.startswith("bf16"))
            grads[wg] = jax.grad(loss)(params)
        where = f"scan={scan} remat={remat}/{remat_layers}"
        assert saved[None] and saved[None] == saved["float32"], (where, saved)
        for k, a in grads[None]["layers"].items():
            b_ = grads["float32"]["layers"][k]
            err = float(jnp.linalg.norm(a - b_) / jnp.linalg.norm(a))
            assert err < 2e-2, (where, k, err)


@pytest.mark.parametrize("layers,remat_layers,expect", [
    (28, None, (1, 0)), (28, 28, (1, 0)), (28, 0, (1, 1)), (28, 21, (4, 1)), (28, 14, (2, 1)),
    (28, 18, (14, 5)), (28, 19, (28, 9)), (4, 2, (2, 1))])
def test_remat_layers_spread_the_kept_layers_evenly(layers, remat_layers, expect):
    from qzhou_jax.model.qwen2 import remat_groups

    cfg = ModelConfig.preset("tiny", num_hidden_layers=layers, remat="full", remat_layers=remat_layers)
    assert remat_groups(cfg) == expect
    assert remat_groups(cfg.replace(remat="none", remat_layers=None)) == (1, 0)
    with pytest.raises(ValueError, match="remat_layers"):
        cfg.replace(remat_layers=layers + 1)
    with pytest.raises(ValueError, match="remat_layers.*'dots'"):
        cfg.replace(remat="none", remat_layers=0)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 4}])
def test_forward_many_equals_separate_forwards(mesh_shape):
    """Queries and passages in one pass over the layers (equal lengths concatenated, other
    lengths side by side) give each batch's own forward, with and without a mesh, whether
    the rows divide over the data-parallel devices or not."""
    from qzhou_jax.model.qwen2 import forward_many, merge_rows, split_rows

    hf = tiny_hf_model(layers=2)
    cfg, params = params_from_torch(hf, compute_dtype="float32", remat="full")
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, 97, rng.integers(1, seq + 1, size=rows), seq)
               for rows, seq in [(8, 12), (16, 12), (8, 7), (3, 7)]]
    single = [np.asarray(forward(params, cfg, i, m)) for i, m in batches]
    for parts in (1, 4):
        x = [np.arange(r * 2).reshape(r, 2) for r in (8, 16)]
        back = split_rows(merge_rows([jnp.asarray(a) for a in x], parts), [8, 16], parts)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(x, back))
    if mesh_shape is None:
        outs = jax.jit(lambda p: forward_many(p, cfg, batches))(params)
    else:
        mesh = sharding.make_mesh(mesh_shape)
        _, params = params_from_torch(hf, mesh=mesh, compute_dtype="float32", remat="full")
        with sharding.use_mesh(mesh):
            outs = jax.jit(lambda p: forward_many(p, cfg, batches))(params)
    for got, want in zip(outs, single):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


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


def test_mean_pooling_of_bfloat16_states_sums_in_float32():
    """A bfloat16 sum over thousands of tokens keeps 8 bits: pooling casts before it sums."""
    rng = np.random.default_rng(21)
    h = jnp.asarray(rng.standard_normal((2, 4096, 8)) + 3.0, jnp.bfloat16)
    mask = np.ones((2, 4096), np.int32)
    mask[1, 3000:] = 0
    exact = np.stack([np.asarray(h[0], np.float64).mean(0), np.asarray(h[1, :3000], np.float64).mean(0)])
    got = jax.jit(lambda h, m: pool(h, m, "mean"))(h, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-5)


def test_pooling_never_reads_padded_positions():
    """NaN at pad positions (what a fused attention kernel may leave there) does not reach either
    pooling: pad rows are selected out, not multiplied by zero."""
    rng = np.random.default_rng(22)
    h = rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.int32)
    h[mask == 0] = np.nan
    mean = np.stack([h[0, :3].mean(0), h[1, 1:].mean(0)])
    np.testing.assert_allclose(np.asarray(pool(jnp.asarray(h), mask, "mean")), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pool(jnp.asarray(h), mask, "last")), np.stack([h[0, 2], h[1, 4]]))
