"""Train step, GradCache, optimizer and their checks (CPU, 8 simulated devices)."""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import create_model, embed
from qzhou_jax.train import (LossConfig, TrainConfig, Trainer, check_batch, learning_rate_schedule,
                             loss_and_grads, make_optimizer, param_shardings, shard_batch, single_device_mesh,
                             train_state_shardings, weight_decay_mask)

CFG = ModelConfig.preset("tiny", compute_dtype="float32", vocab_size=256)  # 4 q heads, 2 kv heads
MESHES = {
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
}


def _params(cfg=CFG, seed=0):
    """Random weights with non-trivial norms and biases, as numpy (placed by each test)."""
    params = jax.tree.map(np.array, create_model(cfg, seed).encoder.params())
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        if "bias" in name:
            return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


def _tokens(rng, rows, length, vocab=CFG.vocab_size):
    ids = rng.integers(1, vocab, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    left = rng.random(rows) < 0.25  # some rows left-padded: pooling must not care
    mask[left] = mask[left][:, ::-1]
    return np.where(mask, ids, 0).astype(np.int32), mask


def _batch(task="retrieval", n=8, k=2, lq=12, lp=16, seed=0):
    rng = np.random.default_rng(seed)
    g = 1 if task == "sts" else 1 + k
    q_ids, q_mask = _tokens(rng, n, lq)
    p_ids, p_mask = _tokens(rng, n * g, lp)
    batch = dict(q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask)
    if task == "sts":
        batch["scores"] = rng.integers(0, 6, size=n).astype(np.float32)
    if task == "classification":
        batch["q_labels"] = rng.integers(0, 3, size=n).astype(np.int32)
        labels = rng.integers(0, 3, size=(n, g)).astype(np.int32)
        labels[:, 0] = batch["q_labels"]
        batch["p_labels"] = labels.reshape(-1)
    return batch


def _grads_on(mesh, params, batch, task="retrieval", chunk_size=0, cfg=CFG, loss_cfg=LossConfig(), keep_chunks=0):
    placed = jax.device_put(params, param_shardings(cfg, mesh))
    sharded = shard_batch(batch, mesh)
    fn = jax.jit(lambda p, b: loss_and_grads(p, b, cfg, task, loss_cfg, chunk_size, keep_chunks)[::2])
    with sharding.use_mesh(mesh):
        loss, grads = fn(placed, sharded)
    return float(loss), jax.tree.map(np.asarray, grads)


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_grads_close(got, ref, tol=1e-5):
    errs = {jax.tree_util.keystr(p): _rel_l2(g, r) for (p, g), r in
            zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref))}
    bad = {k: f"{v:.1e}" for k, v in errs.items() if v > tol}
    assert not bad, bad


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the retrieval batch on one device, full batch."""
    params, batch = _params(), _batch()
    return params, batch, _grads_on(single_device_mesh(), params, batch)


# ----------------------------------------------------------- global negatives
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_loss_and_grads_do_not_depend_on_the_mesh(mesh_name, reference):
    params, batch, (ref_loss, ref_grads) = reference
    assert ref_loss > 0.1
    loss, grads = _grads_on(sharding.make_mesh(MESHES[mesh_name]), params, batch)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
    _assert_grads_close(grads, ref_grads)


def test_sharded_trainer_step_matches_single_device_and_shards_optimizer_state():
    params, batch = _params(), _batch(seed=1)
    # Adam's first step is lr * g / (|g| + eps): with a tiny eps it turns rounding noise in
    # near-zero gradient entries into full-size updates. A larger eps keeps the comparison
    # about the mesh (the gradients themselves are compared at 1e-5 above).
    tcfg = TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, eps=1e-3)
    mesh = sharding.make_mesh(MESHES["fsdp4_tensor2"])
    single = Trainer(CFG, tcfg, params)
    sharded = Trainer(CFG, tcfg, params, mesh=mesh)

    p_sh = param_shardings(CFG, mesh)
    adam = sharded.state.opt_state[1][0]  # chain(clip, adamw): adamw = (scale_by_adam, decay, lr)
    for moments in (adam.mu, adam.nu):
        specs = jax.tree.map(lambda x: x.sharding.spec, moments)
        assert specs == jax.tree.map(lambda s: s.spec, p_sh)
    assert sharded.state.params["layers"]["gate_kernel"].sharding.spec == p_sh["layers"]["gate_kernel"].spec
    gate = sharded.state.params["layers"]["gate_kernel"]
    assert np.prod(gate.addressable_shards[0].data.shape) * 8 == np.prod(gate.shape)

    m1, m2 = single.step(batch), sharded.step(batch)
    assert abs(m1["loss"] - m2["loss"]) <= 1e-6 * abs(m1["loss"])
    assert abs(m1["grad_norm"] - m2["grad_norm"]) <= 1e-5 * m1["grad_norm"]
    assert m2["step"] == 0 and int(sharded.state.step) == 1
    _assert_grads_close(jax.tree.map(np.asarray, sharded.params), jax.tree.map(np.asarray, single.params))
    # moments keep their sharding after a (donating) step
    mu = sharded.state.opt_state[1][0].mu
    assert mu["layers"]["q_kernel"].sharding.spec == p_sh["layers"]["q_kernel"].spec


# ------------------------------------------------------------------ GradCache
def test_the_embedding_gradient_is_not_gathered_whole_on_a_data_by_fsdp_mesh():
    """On a mesh whose batch spans `data` and `fsdp`, the embedding table's gradient used to be
    scattered from the whole [rows, seq, hidden] activation gradient, gathered on every device
    (XLA: "Involuntary full rematerialization"); the lookup now gathers rows only over the
    axes that do not shard the table, so no collective moves a global activation."""
    import re

    params, batch = _params(), _batch()
    mesh = sharding.make_mesh(MESHES["data2_fsdp4"])
    placed = jax.device_put(params, param_shardings(CFG, mesh))
    fn = jax.jit(lambda p, b: loss_and_grads(p, b, CFG, "retrieval")[::2])
    with sharding.use_mesh(mesh):
        hlo = fn.lower(placed, shard_batch(batch, mesh)).compile().as_text()
    whole = [f"[{batch[k].shape[0]},{batch[k].shape[1]}," for k in ("q_ids", "p_ids")]  # a side's rows, all of them
    gathered = re.findall(r"= \(?(f32\[[\d,]+\])[^=]*? all-gather(?:-start)?\(", hlo)
    assert gathered, "no all-gather found: the pattern no longer matches XLA's HLO text"
    assert not [g for g in gathered if any(w in g for w in whole)], gathered


def test_a_mesh_that_leaves_large_parameters_whole_fails_with_the_numbers():
    """A mesh axis that does not divide the dimension the rules split over it is dropped from
    that array's spec: fine for 2 KV heads over tensor=4, an out-of-memory for a 3584-wide
    7B model over fsdp=6 (every device would hold all of it). Abstract: nothing is allocated."""
    tx = make_optimizer(TrainConfig())
    seven_b, one_5b = ModelConfig.preset("qwen2.5-7b"), ModelConfig.preset("qwen2.5-1.5b")
    with pytest.raises(ValueError, match=r"(?s)105\.36 GiB per device instead of 17\.56 GiB.*"
                                         r"embed_tokens \[152064, 3584\].*dim 1 \('embed', 3584\) is not "
                                         r"divisible by fsdp=6"):
        train_state_shardings(seven_b, tx, sharding.make_mesh({"fsdp": 6}, jax.devices()[:6]))
    with pytest.raises(ValueError, match=r"layers/q_kernel .*dim 2 \('q_heads', 12\) is not divisible by tensor=8"):
        train_state_shardings(one_5b, tx, sharding.make_mesh({"fsdp": 1, "tensor": 8}))
    # dividing meshes, and KV heads (2) replicated over tensor=4, pass
    train_state_shardings(seven_b, tx, sharding.make_mesh({"fsdp": 8}))
    train_state_shardings(one_5b, tx, sharding.make_mesh({"fsdp": 2, "tensor": 4}))
    # replicating on purpose through the rules passes
    rules = dict(sharding.DEFAULT_RULES, q_heads=None, kv_heads=None)
    train_state_shardings(one_5b, tx, sharding.make_mesh({"fsdp": 1, "tensor": 8}), rules)
    # a rule naming a mesh axis that does not exist is an error, not a silent replication
    with pytest.raises(ValueError, match=r"sharding rule 'embed' -> 'fsdpp': not a mesh axis"):
        param_shardings(CFG, sharding.make_mesh(MESHES["fsdp8"]), dict(sharding.DEFAULT_RULES, embed="fsdpp"))
    # creating or loading the model alone is refused alike (bfloat16 weights: 13.2 GiB per device),
    # before anything is allocated
    with pytest.raises(ValueError, match=r"model parameters: 13\.17 GiB per device instead of 2\.20 GiB"):
        create_model(seven_b.replace(param_dtype="bfloat16"), mesh=sharding.make_mesh({"fsdp": 6}, jax.devices()[:6]))


def test_a_trainer_places_a_given_state_on_its_mesh():
    """A state from one device (or host arrays) is put into the Trainer's shardings; a state of
    another optimizer is refused by name."""
    one = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5), _params())
    one.step(_batch())
    mesh = sharding.make_mesh(MESHES["data2_fsdp4"])
    moved = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5), None, state=one.state, mesh=mesh)
    assert moved.state.params["embed_tokens"].sharding == param_shardings(CFG, mesh)["embed_tokens"]
    assert np.isfinite(moved.step(_batch())["loss"])
    with pytest.raises(ValueError, match="optimizer state does not have the structure"):
        Trainer(CFG, TrainConfig(clip_norm=0.0, warmup_steps=0, total_steps=5), None, state=moved.state, mesh=mesh)


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_gradcache_equals_full_batch(chunk_size, reference):
    params, batch, (ref_loss, ref_grads) = reference
    loss, grads = _grads_on(single_device_mesh(), params, batch, chunk_size=chunk_size)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("task", ["sts", "classification"])
def test_gradcache_equals_full_batch_other_tasks(task):
    params, batch = _params(seed=2), _batch(task, seed=2)
    mesh = single_device_mesh()
    ref_loss, ref_grads = _grads_on(mesh, params, batch, task)
    loss, grads = _grads_on(mesh, params, batch, task, chunk_size=2)
    assert ref_loss > 0.01
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("remat", [dict(remat="full", remat_layers=1), dict(remat="mlp"), dict(remat="dots"),
                                   dict(remat="full", remat_layers=1, scan_layers=False)])
def test_remat_settings_give_the_same_step(remat, reference):
    """Layer-wise remat (with and without GradCache, on a sharded mesh, scanned and unrolled)
    changes what the backward pass recomputes, not the gradients."""
    params, batch, (ref_loss, ref_grads) = reference
    cfg = CFG.replace(**remat)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    for chunk_size in (0, 4):
        loss, grads = _grads_on(mesh, params, batch, chunk_size=chunk_size, cfg=cfg)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("chunk_size,keep_chunks", [(1, 3), (2, -1), (4, 1), (2, 100)])
def test_gradcache_kept_chunks_equal_full_batch(chunk_size, keep_chunks, reference):
    """Chunks that keep their layer inputs run only their backward in the second pass
    (some chunks kept, all, more than there are): the same gradients."""
    params, batch, (ref_loss, ref_grads) = reference
    loss, grads = _grads_on(single_device_mesh(), params, batch, chunk_size=chunk_size, keep_chunks=keep_chunks,
                            cfg=CFG.replace(remat="full"))
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("task", ["sts", "classification"])
def test_gradcache_kept_chunks_other_tasks_on_a_sharded_mesh(task):
    params, batch = _params(seed=3), _batch(task, seed=3, lq=8, lp=16)
    ref_loss, ref_grads = _grads_on(single_device_mesh(), params, batch, task)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loss, grads = _grads_on(mesh, params, batch, task, chunk_size=2, keep_chunks=2,
                            cfg=CFG.replace(remat="full", remat_layers=1))
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


def test_gradcache_kept_chunks_equal_lengths_last_pooling_matryoshka_unrolled():
    """Queries and passages of one length share the layer pass (merged rows); last-token
    pooling, a truncated embedding and unrolled layers go through the same saved backward."""
    cfg = CFG.replace(pooling="last", embedding_dim=16, scan_layers=False, remat="full")
    params, batch = _params(seed=4), _batch(seed=4, lq=16, lp=16)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    ref_loss, ref_grads = _grads_on(single_device_mesh(), params, batch, cfg=cfg)
    loss, grads = _grads_on(mesh, params, batch, chunk_size=4, keep_chunks=1, cfg=cfg)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


def test_keep_chunks_needs_remat_full():
    params, batch = _params(), _batch()
    with pytest.raises(ValueError, match=r"train.keep_chunks: 2 saves work only with model.remat 'full'"):
        loss_and_grads(params, batch, CFG.replace(remat="dots"), "retrieval", LossConfig(), 2, 2)
    with pytest.raises(ValueError, match=r"train.keep_chunks: 1 saves work only with model.remat 'full'"):
        Trainer(CFG, TrainConfig(chunk_size=2, keep_chunks=1), params)  # before anything is compiled


def test_keep_chunks_needs_gradcache():
    with pytest.raises(ValueError, match=r"train.keep_chunks: 2 needs GradCache \(train.chunk_size > 0\)"):
        TrainConfig(keep_chunks=2)
    with pytest.raises(ValueError, match="train.keep_chunks: expected an integer >= -1"):
        TrainConfig(chunk_size=2, keep_chunks=-2)


def test_gradcache_on_a_sharded_mesh(reference):
    params, batch, (ref_loss, ref_grads) = reference
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loss, grads = _grads_on(mesh, params, batch, chunk_size=4)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


# ------------------------------------------------------------------ bad input
def test_batch_that_does_not_divide_over_data_parallel_devices():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = _batch(n=6)
    with pytest.raises(ValueError, match=r"batch of 6 queries does not divide over the 4 data-parallel "
                                         r"devices \(data=2 x fsdp=2\)"):
        check_batch(batch, "retrieval", mesh)
    trainer = Trainer(CFG, TrainConfig(), _params(), mesh=mesh)
    with pytest.raises(ValueError, match="batch of 6 queries"):
        trainer.step(batch)


def test_chunk_size_that_does_not_divide_the_batch():
    with pytest.raises(ValueError, match="chunk_size 3 does not divide the batch of 8 queries"):
        check_batch(_batch(), "retrieval", chunk_size=3)
    trainer = Trainer(CFG, TrainConfig(chunk_size=3), _params())
    with pytest.raises(ValueError, match="chunk_size 3 does not divide the batch of 8 queries"):
        trainer.step(_batch())
    # a chunk of the whole batch or more is no GradCache (config validation and the plan agree)
    assert check_batch(_batch(), "retrieval", chunk_size=12)["n"] == 8


def test_malformed_batches():
    batch = _batch()
    with pytest.raises(ValueError, match="missing"):
        check_batch({k: v for k, v in batch.items() if k != "p_mask"}, "retrieval")
    with pytest.raises(ValueError, match="not a whole number per query"):
        check_batch(dict(batch, p_ids=batch["p_ids"][:-1], p_mask=batch["p_mask"][:-1]), "retrieval")
    with pytest.raises(ValueError, match="sts batch: expected one second text"):
        check_batch(dict(batch, scores=np.zeros(8, np.float32)), "sts")
    with pytest.raises(ValueError, match="task"):
        check_batch(batch, "ranking")
    # keys the task does not read are errors, not silently dropped: a retrieval batch padded
    # with valid=0 rows would train on them, and a misspelt key loses its data
    with pytest.raises(ValueError, match=r"retrieval batch: 'valid' \(rows to ignore\) is only supported for sts"):
        check_batch(dict(batch, valid=np.ones(8, bool)), "retrieval")
    with pytest.raises(ValueError, match=r"sts batch: unknown keys \['vaild'\]"):
        check_batch(dict(_batch("sts"), vaild=np.ones(8, bool)), "sts")
    check_batch(dict(_batch("sts"), valid=np.ones(8, bool)), "sts")
    labels = _batch("classification")
    mesh = single_device_mesh()
    with pytest.raises(ValueError, match=r"batch\['q_labels'\]: expected numbers, got an array of <U1"):
        shard_batch(dict(labels, q_labels=np.array(list("abcdefgh"))), mesh, task="classification")


def test_values_and_params_that_would_train_silently_are_refused(tmp_path):
    """Token ids past the vocabulary (NaN embeddings: another model's tokenizer), empty rows,
    float ids, params of another model size and mis-shaped inputs to `embed` each stop with the
    argument named; numpy scalars from a sweep are plain numbers in the configs."""
    trainer = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5), _params())
    batch = _batch()
    with pytest.raises(ValueError, match=r"retrieval batch: q_ids holds ids from \d+ to 300, outside the model's "
                                         r"vocabulary \[0, 256\): is the tokenizer the model's\?"):
        trainer.step(dict(batch, q_ids=np.where(batch["q_mask"], 300, 0).astype(np.int32)))
    with pytest.raises(ValueError, match="p_ids must hold integer token ids, got dtype float32"):
        trainer.step(dict(batch, p_ids=batch["p_ids"].astype(np.float32)))
    empty = batch["p_mask"].copy()
    empty[4] = 0
    with pytest.raises(ValueError, match=r"retrieval batch: p_mask row 4 has no token \(1 such rows\)"):
        trainer.step(dict(batch, p_mask=empty))
    sts = _batch("sts")
    sts["q_mask"][3] = 0  # a padded pair, marked invalid, is allowed
    trainer.step(dict(sts, valid=np.arange(8) != 3), "sts")
    trainer.step(dict(sts, valid=jnp.arange(8) != 3), "sts")  # a device array as well
    assert int(trainer.state.step) == 2
    # params of another size: three layers declared, two given
    bigger = CFG.replace(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"params: parameter 'layers/input_norm' has shape \(2, 64\), config "
                                         r"implies \(3, 64\)"):
        Trainer(bigger, TrainConfig(warmup_steps=0, total_steps=5), _params())
    with pytest.raises(ValueError, match=r"params: parameter 'layers/input_norm' has shape"):
        Trainer(bigger, TrainConfig(warmup_steps=0, total_steps=5), None, state=trainer.state)
    from qzhou_jax.checkpoint import save_hf

    with pytest.raises(ValueError, match=r"params: parameter 'layers/input_norm' has shape"):
        save_hf(_params(), bigger, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    ids, mask = _tokens(np.random.default_rng(0), 2, 8)
    for args, message in (((ids, mask[:, :7]), r"attention_mask: shape \(2, 7\) differs from input_ids' \(2, 8\)"),
                          ((ids[0], mask[0]), r"input_ids: expected a \[batch, length\] array, got shape \(8,\)"),
                          ((ids.astype(np.float32), mask), "input_ids: expected integer token ids")):
        with pytest.raises(ValueError, match=message):
            embed(_params(), CFG, *args)
    for dim in (0, -5, 100, 2.5):  # not silently the full width, a slice from the end, or 64 of 100
        with pytest.raises(ValueError, match=f"dim: expected an integer from 1 to the hidden size 64, got {dim}"):
            embed(_params(), CFG, ids, mask, dim=dim)
    assert embed(_params(), CFG, ids, mask, dim=16).shape == (2, 16)
    assert LossConfig(temperature=np.float32(0.25)).temperature == 0.25
    assert type(TrainConfig(chunk_size=np.int64(4), warmup_steps=0, total_steps=8).chunk_size) is int


def test_a_custom_loss_replaces_the_task_loss_with_and_without_gradcache():
    """`loss_fn` (same signature as task_loss) is what the step differentiates: the built-in loss
    plus a term, with its own metric, gives the same step through GradCache as on the full batch,
    and a term that does not depend on the embeddings changes the loss, not the gradients."""
    from qzhou_jax.train import task_loss

    def with_spread(q, p, batch, task, loss_cfg):  # plus a term on a key of its own (teacher scores)
        loss, metrics = task_loss(q, p, batch, task, loss_cfg)
        spread = jnp.mean(jnp.square(q @ q.T - batch["teacher"][:, None]))
        return loss + 0.5 * spread, {**metrics, "spread": spread}

    teacher = np.linspace(0.0, 1.0, 8).astype(np.float32)
    runs = {}
    for chunk in (0, 4):
        trainer = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5, chunk_size=chunk), _params(),
                          loss_fn=with_spread, extra_keys=("teacher",))
        runs[chunk] = [trainer.step(dict(_batch(), teacher=teacher))]
    with pytest.raises(ValueError, match=r"teacher must have one row per query \(8\) or per passage \(24\)"):
        trainer.step(dict(_batch(), teacher=teacher[:5]))
    with pytest.raises(ValueError, match=r"unknown keys \['teacher'\]"):
        Trainer(CFG, TrainConfig(warmup_steps=0, total_steps=5), _params()).step(dict(_batch(), teacher=teacher))
    with pytest.raises(KeyError, match=r"reads batch\['teacher'\], which this retrieval batch lacks .*extra_keys"):
        trainer.step(_batch())  # declared, but this batch does not carry it

    def weighted(q, p, batch, task, loss_cfg):  # the batch is a pytree as a dict is; its own KeyError stays its own
        assert sorted(jax.tree.map(jnp.shape, batch)) == sorted(batch)
        loss, metrics = task_loss(q, p, batch, task, loss_cfg)
        return loss * {"sts": 2.0}[task], metrics

    with pytest.raises(KeyError) as raised:
        Trainer(CFG, TrainConfig(warmup_steps=0, total_steps=5), _params(), loss_fn=weighted).step(_batch())
    assert raised.value.args == ("retrieval",)
    for a, b in zip(runs[0], runs[4]):
        np.testing.assert_allclose([a["loss"], a["grad_norm"], a["spread"]], [b["loss"], b["grad_norm"], b["spread"]],
                                   rtol=1e-5)
    plain = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5), _params()).step(_batch())
    assert "spread" not in plain and runs[0][0]["loss"] > plain["loss"]

    def shifted(q, p, batch, task, loss_cfg):
        loss, metrics = task_loss(q, p, batch, task, loss_cfg)
        return loss + 1.0, metrics

    moved = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=5), _params(), loss_fn=shifted).step(_batch())
    np.testing.assert_allclose([moved["loss"], moved["grad_norm"]], [plain["loss"] + 1.0, plain["grad_norm"]],
                               rtol=1e-6)


def _batch_with_copies():
    """Rows 0 and 1 share a positive (same tokens, same key); row 2's first hard negative
    repeats row 3's positive; row 5's query repeats row 4's."""
    batch = _batch()
    p_ids, p_mask = batch["p_ids"].reshape(8, 3, -1), batch["p_mask"].reshape(8, 3, -1)
    p_ids[1, 0], p_mask[1, 0] = p_ids[0, 0], p_mask[0, 0]
    p_ids[2, 1], p_mask[2, 1] = p_ids[3, 0], p_mask[3, 0]
    batch["q_ids"][5], batch["q_mask"][5] = batch["q_ids"][4], batch["q_mask"][4]
    p_keys = np.arange(24, dtype=np.int32).reshape(8, 3) + 100
    p_keys[1, 0], p_keys[2, 1] = p_keys[0, 0], p_keys[3, 0]
    q_keys = np.arange(8, dtype=np.int32)
    q_keys[5] = q_keys[4]
    return dict(batch, q_keys=q_keys, p_keys=p_keys.reshape(-1))


def test_identical_texts_are_left_out_on_every_mesh_and_with_gradcache():
    params, batch = _params(), _batch_with_copies()
    check_batch(batch, "retrieval")
    ref_loss, ref_grads = _grads_on(single_device_mesh(), params, batch)
    off = LossConfig(mask_duplicate_texts=False)
    plain_loss, _ = _grads_on(single_device_mesh(), params, batch, loss_cfg=off)
    without_keys, _ = _grads_on(single_device_mesh(), params, {k: v for k, v in batch.items() if "keys" not in k})
    assert plain_loss == without_keys and ref_loss < plain_loss - 0.01
    loss, grads = _grads_on(sharding.make_mesh(MESHES["data2_fsdp4"]), params, batch, chunk_size=2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_grads_close(grads, ref_grads)
    with pytest.raises(ValueError, match="q_keys and p_keys"):
        check_batch({k: v for k, v in batch.items() if k != "p_keys"}, "retrieval")
    with pytest.raises(ValueError, match=r"p_keys must have shape \(24,\)"):
        check_batch(dict(batch, p_keys=batch["p_keys"][:8]), "retrieval")


def test_nan_loss_stops_before_the_parameters_change():
    params, batch = _params(), _batch()
    params["embed_tokens"][batch["q_ids"][0, 0]] = np.nan  # a token of the batch embeds to NaN
    trainer = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10), params)
    before = jax.tree.map(np.array, trainer.state)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0.*parameters not updated"):
        trainer.step(batch)
    after = jax.tree.map(np.array, trainer.state)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert int(trainer.state.step) == 0


def test_the_logged_learning_rate_is_the_one_applied_after_a_skipped_step():
    """A non-finite step applies no update, so the optimizer's schedule does not advance; the
    training loop still counts the step (checkpoints match the data). The logged rate is the
    applied one: the optimizer's count, not the step count."""
    params, batch = _params(), _batch()
    used = set(np.concatenate([batch["q_ids"].ravel(), batch["p_ids"].ravel()]).tolist())
    bad_token = next(t for t in range(CFG.vocab_size) if t not in used)
    params["embed_tokens"][bad_token] = np.nan
    bad = dict(batch, q_ids=batch["q_ids"].copy())
    bad["q_ids"][0, 0] = bad_token
    train_cfg = TrainConfig(lr=1e-3, warmup_steps=4, total_steps=10)
    trainer = Trainer(CFG, train_cfg, params)
    step = trainer.step_fn("retrieval")
    lrs, finite = [], []
    for b in (batch, bad, batch):
        trainer.state, m = step(trainer.state, trainer.prepare(b, "retrieval"))
        lrs.append(float(m["lr"]))
        finite.append(float(m["finite"]))
        if not m["finite"]:
            trainer.state = trainer.state._replace(step=trainer.state.step + 1)  # as the loop counts it
    schedule = learning_rate_schedule(train_cfg)
    assert finite == [1, 0, 1] and int(trainer.state.step) == 3
    np.testing.assert_allclose(lrs, [float(schedule(0)), float(schedule(1)), float(schedule(1))], rtol=1e-6)


def test_task_loss_passes_every_setting_and_the_batch_layout_to_the_losses():
    """task_loss against the losses called directly on the layout the data pipeline writes
    (passages grouped per query: positive first), with no setting at its default."""
    from qzhou_jax import losses
    from qzhou_jax.train.step import task_loss

    rng = np.random.default_rng(31)
    n, g, d = 6, 3, 8

    def unit(*shape):
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    q, p = unit(n, d), unit(n * g, d)
    pos = np.stack([p[i * g] for i in range(n)])
    neg = np.stack([p[i * g + 1:(i + 1) * g] for i in range(n)])
    cfg = LossConfig(temperature=0.03, cosent_temperature=0.07, false_negative_margin=0.1,
                     query_negatives=False, classification_other_positives=True)
    q_keys = np.arange(n, dtype=np.int32)
    p_keys = 100 + np.arange(n * g, dtype=np.int32)
    p_keys[4] = p_keys[0]  # a duplicate of row 0's positive among row 1's negatives
    batch = {"q_keys": q_keys, "p_keys": p_keys}
    got = task_loss(q, p, batch, "retrieval", cfg)[0]
    want = losses.infonce_retrieval(q, pos, neg, temperature=0.03, query_negatives=False, false_negative_margin=0.1,
                                    q_keys=q_keys, pos_keys=p_keys[::g], neg_keys=p_keys.reshape(n, g)[:, 1:])[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert abs(float(got) - float(task_loss(q, p, batch, "retrieval", LossConfig())[0])) > 1e-3
    # sts: one passage per query, the CoSENT temperature, padded rows masked
    scores, valid = rng.integers(0, 5, n).astype(np.float32), np.arange(n) < 4
    got = task_loss(q, p[:n], {"scores": scores, "valid": valid}, "sts", cfg)[0]
    want = losses.cosent(q, p[:n], scores, temperature=0.07, valid=valid)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert abs(float(got) - float(losses.cosent(q, p[:n], scores, temperature=0.07)[0])) > 1e-3
    # classification: negative labels differ from row to row
    q_labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    p_labels = rng.integers(0, 3, n * g).astype(np.int32)
    p_labels[::g] = q_labels
    got = task_loss(q, p, {"q_labels": q_labels, "p_labels": p_labels}, "classification", cfg)[0]
    want = losses.infonce_classification(q, pos, neg, q_labels, p_labels[::g],
                                         np.stack([p_labels[i * g + 1:(i + 1) * g] for i in range(n)]),
                                         temperature=0.03, other_positives=True)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_non_finite_gradient_with_a_finite_loss_leaves_the_state_unchanged(monkeypatch):
    from qzhou_jax.train import step as step_mod

    params, batch = _params(), _batch()
    real = step_mod.loss_and_grads

    def inf_grads(*args, **kwargs):
        loss, metrics, grads = real(*args, **kwargs)
        grads = dict(grads, final_norm=grads["final_norm"].at[0].set(jnp.inf))
        return loss, metrics, grads

    monkeypatch.setattr(step_mod, "loss_and_grads", inf_grads)
    trainer = Trainer(CFG, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10), params)
    before = jax.tree.map(np.array, trainer.state)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.step(batch)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.array, trainer.state)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_two_sharded_steps_equal_plain_jax_grad_and_optax():
    """An absolute reference for the whole step: gradients from jax.grad of the model and the
    loss written out on one device (no GradCache, no mesh), then optax's clip_by_global_norm +
    adamw. Adam is nearly blind to a constant factor on the gradients, so eps is set near the
    gradients' size and the clip threshold is one the gradients exceed: a gradient summed
    instead of averaged over devices, or a wrong norm given to the clip, changes the result."""
    import optax

    from qzhou_jax import losses
    from qzhou_jax.train.step import global_norm

    train_cfg = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=10, clip_norm=0.5, eps=1e-3, weight_decay=0.1)
    params = _params()
    batches = [_batch(seed=1), _batch(seed=2)]

    def plain_loss(p, b):
        q = embed(p, CFG, b["q_ids"], b["q_mask"])
        d = embed(p, CFG, b["p_ids"], b["p_mask"]).reshape(8, 3, -1)
        return losses.infonce_retrieval(q, d[:, 0], d[:, 1:])[0]

    ref_tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(
        learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-3, weight_decay=0.1,
        mask=weight_decay_mask))
    ref_params = jax.tree.map(jnp.asarray, params)
    ref_state = ref_tx.init(ref_params)
    trainer = Trainer(CFG, train_cfg, params, mesh=sharding.make_mesh(MESHES["data2_fsdp4"]))
    for b in batches:
        loss, grads = jax.jit(jax.value_and_grad(plain_loss))(ref_params, b)
        norm = float(global_norm(grads))
        assert norm > 1.0  # above the clip threshold
        updates, ref_state = ref_tx.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        metrics = trainer.step(b)
        np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    start = jax.tree.leaves(params)
    for (path, got), want, p0 in zip(jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, trainer.params)),
                                     jax.tree.leaves(ref_params), start):
        moved = np.asarray(want) - p0
        err = np.linalg.norm((got - p0) - moved) / max(np.linalg.norm(moved), 1e-30)
        assert err < 1e-3, (jax.tree_util.keystr(path), err)


# ---------------------------------------------------------- optimizer, dtype
def test_schedules_and_weight_decay_mask():
    cos = learning_rate_schedule(TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine"))
    lin = learning_rate_schedule(TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="linear",
                                             final_lr_ratio=0.1))
    const = learning_rate_schedule(TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, schedule="constant"))
    cos_floor = learning_rate_schedule(TrainConfig(lr=2.0, warmup_steps=4, total_steps=14, schedule="cosine",
                                                   final_lr_ratio=0.1))
    np.testing.assert_allclose([float(cos_floor(s)) for s in (4, 9, 14, 30)], [2, 1.1, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose([float(cos(s)) for s in (0, 3, 4, 9, 14, 20)], [0.25, 1, 1, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose([float(lin(s)) for s in (1, 4, 9, 14)], [0.5, 1, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose([float(const(s)) for s in (0, 4, 100)], [0.25, 1, 1], atol=1e-6)
    mask = weight_decay_mask(_params())
    assert mask["embed_tokens"] and mask["layers"]["q_kernel"] and mask["layers"]["down_kernel"]
    assert not mask["final_norm"] and not mask["layers"]["input_norm"] and not mask["layers"]["q_bias"]
    with pytest.raises(ValueError, match="train.schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, total_steps=5)
    # a NaN or inf setting would write NaN into the parameters on the first step, past the
    # step's finiteness check (which looks at the loss and the gradient norm)
    for name, value in [("weight_decay", float("nan")), ("weight_decay", float("inf")), ("eps", float("nan")),
                        ("clip_norm", float("nan")), ("lr", float("inf")), ("b1", "0.9")]:
        with pytest.raises(ValueError, match=f"train.{name}: expected a finite number"):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="loss.false_negative_margin: expected a finite number or None"):
        LossConfig(false_negative_margin=float("nan"))


def test_weight_decay_skips_norms_and_biases():
    params = jax.tree.map(jnp.asarray, _params())
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.5))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), jax.jit(tx.init)(params), params)
    assert not np.any(np.asarray(updates["final_norm"])) and not np.any(np.asarray(updates["layers"]["q_bias"]))
    np.testing.assert_allclose(updates["layers"]["up_kernel"], -0.5 * 1e-2 * params["layers"]["up_kernel"],
                               rtol=1e-6)


def test_clipping_takes_the_steps_gradient_norm_and_matches_optax():
    """make_optimizer's clipping reuses the norm the step computed (`grad_norm=`); the result
    and the state's structure (checkpoints) are optax's clip_by_global_norm + adamw's."""
    import optax

    from qzhou_jax.train.optim import clip_by_global_norm
    from qzhou_jax.train.step import global_norm

    cfg = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=10, clip_norm=1.0)
    params = jax.tree.map(jnp.asarray, _params())
    ours = make_optimizer(cfg)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask, mu_dtype=jnp.float32))
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(ref.init(params))
    for scale in (1e-4, 10.0):  # below and above the clipping threshold
        grads = jax.tree.map(lambda p: scale * jnp.cos(p), params)
        expected, _ = ref.update(grads, ref.init(params), params)
        for kwargs in ({"grad_norm": global_norm(grads)}, {}):
            got, _ = jax.jit(functools.partial(ours.update, **kwargs))(grads, ours.init(params), params)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    # The norm it is given is the one it uses.
    clip = clip_by_global_norm(1.0)
    grads = jax.tree.map(lambda p: 10.0 * jnp.cos(p), params)
    norm = global_norm(grads)
    clipped, _ = clip.update(grads, clip.init(params), grad_norm=2 * norm)
    np.testing.assert_allclose(clipped["layers"]["up_kernel"], grads["layers"]["up_kernel"] / (2 * norm), rtol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights_and_optimizer_state():
    cfg = CFG.replace(compute_dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    trainer = Trainer(cfg, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10), params)
    metrics = trainer.step(_batch())
    adam = trainer.state.opt_state[1][0]
    assert np.isfinite(metrics["loss"]) and metrics["lr"] == pytest.approx(1e-3)
    for tree in (trainer.params, adam.mu, adam.nu):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
    # train.mu_dtype: the first moment alone in bfloat16, sharded like the parameters
    mesh = sharding.make_mesh(MESHES["fsdp8"])
    trainer = Trainer(cfg, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10, mu_dtype="bfloat16"), params, mesh=mesh)
    metrics = trainer.step(_batch())
    adam = trainer.state.opt_state[1][0]
    assert np.isfinite(metrics["loss"])
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert adam.mu["layers"]["up_kernel"].sharding == trainer.params["layers"]["up_kernel"].sharding


def test_float32_weight_gradients_through_gradcache_and_kept_chunks_on_a_mesh():
    """bfloat16 compute with `weight_grad_dtype: float32`, full batch on one device and GradCache
    (kept chunks too) on a sharded mesh: every gradient within bfloat16's noise (2%) of the
    float32 step's."""
    params, batch = _params(seed=5), _batch(seed=5)
    f32 = CFG.replace(remat="full", remat_layers=1)
    wide = f32.replace(compute_dtype="bfloat16", weight_grad_dtype="float32")
    ref_loss, ref = _grads_on(single_device_mesh(), params, batch, cfg=f32)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    for on, chunk_size, keep in ((single_device_mesh(), 0, 0), (mesh, 4, 0), (mesh, 2, 1)):
        loss, grads = _grads_on(on, params, batch, chunk_size=chunk_size, keep_chunks=keep, cfg=wide)
        assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss)
        assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads))
        _assert_grads_close(grads, ref, tol=2e-2)


# ------------------------------------------------------------ SNLI training
def _read_triplets(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rank1(embed_fn, tok, rows):
    q = embed_fn(*tok([r["anchor"] for r in rows], length=32))
    cands = embed_fn(*tok([r["positive"] for r in rows] + [r["negative"] for r in rows], length=32))
    best = np.argmax(np.asarray(q) @ np.asarray(cands).T, axis=1)
    return float(np.mean(best == np.arange(len(rows))))


def test_tiny_model_learns_snli_triplets(shared_data):
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    path = shared_data / "training" / "snli" / "triplets.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tok = Tokenizer(DEMO_TOKENIZER, max_length=32)
    rows = _read_triplets(path)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    heldout, train = [rows[i] for i in order[:200]], [rows[i] for i in order[200:]]

    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    assert len(tok) <= cfg.vocab_size
    params = create_model(cfg, seed=0).encoder.params()
    steps, n = 200, 32
    tcfg = TrainConfig(lr=1e-3, warmup_steps=10, total_steps=steps, schedule="cosine", final_lr_ratio=0.1)
    trainer = Trainer(cfg, tcfg, params, loss_cfg=LossConfig(temperature=0.05))
    encode = jax.jit(lambda p, i, m: embed(p, cfg, i, m))
    before = _rank1(lambda i, m: encode(trainer.params, i, m), tok, heldout)

    q_ids_all, q_mask_all = tok([r["anchor"] for r in train], length=32)
    p_texts = [t for r in train for t in (r["positive"], r["negative"])]
    p_ids_all, p_mask_all = tok(p_texts, length=32)
    losses = []
    t0 = time.time()
    for step in range(steps):
        idx = rng.choice(len(train), size=n, replace=False)
        p_idx = np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)
        batch = dict(q_ids=q_ids_all[idx], q_mask=q_mask_all[idx], p_ids=p_ids_all[p_idx], p_mask=p_mask_all[p_idx])
        losses.append(trainer.step(batch)["loss"])
    elapsed = time.time() - t0
    after = _rank1(lambda i, m: encode(trainer.params, i, m), tok, heldout)
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    print(f"SNLI: loss {first:.3f} -> {last:.3f}, held-out rank-1 {before:.3f} -> {after:.3f}, {elapsed:.1f}s")
    assert last <= 0.5 * first, (first, last)
    assert after > before, (before, after)
