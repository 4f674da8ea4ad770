"""HF <-> Orbax conversion: bit-exact round trips, HF/sentence-transformers loading, mesh
changes, training checkpoints, and clear errors that leave nothing behind."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_utils import save_hf as save_torch_hf
from hf_utils import tiny_hf_model
from qzhou_jax.checkpoint import (is_orbax_checkpoint, load_hf_params, load_orbax_params, load_pretrained, save_hf,
                                  save_orbax_params)
from qzhou_jax.checkpoint import convert as conv
from qzhou_jax.checkpoint import safetensors_io
from qzhou_jax.checkpoint.export import OutputExistsError
from qzhou_jax.checkpoint.safetensors_io import TensorStore
from qzhou_jax.model import embed, forward, param_specs
from qzhou_jax.sharding import MeshConfig, make_mesh, named_sharding
from qzhou_jax.st_folder import DEFAULT_QUERY_INSTRUCTION
from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

VOCAB = 2048  # the demo tokenizer's vocabulary


def make_hf(path, tied=True, dtype=torch.float32, sharded=False, causal_lm=False, seed=0) -> str:
    """A tiny random Qwen2 checkpoint (+ the demo tokenizer) written by transformers."""
    model = tiny_hf_model(seed=seed, vocab=VOCAB, tied=tied)
    if causal_lm:
        lm = transformers.Qwen2ForCausalLM(model.config)
        lm.model.load_state_dict(model.state_dict())
        if not tied:
            torch.nn.init.normal_(lm.lm_head.weight)
        model = lm
    save_torch_hf(model, path, dtype=dtype, **({"max_shard_size": "100KB"} if sharded else {}))
    for name in os.listdir(DEMO_TOKENIZER):
        shutil.copy(os.path.join(DEMO_TOKENIZER, name), path)
    return str(path)


def tensors(folder) -> dict[str, np.ndarray]:
    store = TensorStore(folder)
    return {n: store.get(n) for n in store.names()}


def assert_bit_exact(src: dict, dst: dict) -> None:
    assert sorted(src) == sorted(dst)
    for name, a in src.items():
        b = dst[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


def assert_nothing_left(out) -> None:
    out = str(out)
    assert not os.path.exists(out), f"{out} exists"
    assert glob.glob(out + ".qzhou-tmp-*") == [], glob.glob(out + ".qzhou-tmp-*")


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))


# ------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied,sharded,dtype", [
    (True, False, torch.float32),
    (False, True, torch.bfloat16),
    (True, True, torch.bfloat16),
    (False, False, torch.float32),
])
def test_hf_orbax_hf_round_trip_is_bit_exact(tmp_path, mesh8, tied, sharded, dtype):
    src = make_hf(tmp_path / "hf", tied=tied, dtype=dtype, sharded=sharded)
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json")) == sharded
    ids = {"bos_token_id": 1, "eos_token_id": [2, 3] if tied else 2, "pad_token_id": 0}
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **ids}))
    summary = conv.hf_to_orbax(src, tmp_path / "orbax", mesh=mesh8)
    want = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert summary["source_dtype"] == want and summary["config"].param_dtype == want
    assert is_orbax_checkpoint(tmp_path / "orbax")
    marker = json.loads((tmp_path / "orbax" / "QZHOU_CHECKPOINT").read_text())
    assert marker["source_dtype"] == want and marker["tokenizer"] == "tokenizer"
    out = conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "back", mesh=mesh8,
                           max_shard_bytes=100_000 if sharded else 5 * 10**9)
    assert (len(out["files"]) > 1) == sharded
    assert os.path.exists(tmp_path / "back" / "model.safetensors.index.json") == sharded
    assert_bit_exact(tensors(src), tensors(tmp_path / "back"))
    cfg_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg_out["tie_word_embeddings"] == cfg_in["tie_word_embeddings"] == tied
    assert cfg_out["dtype"] == want and cfg_out["is_causal"] is False
    assert cfg_out["architectures"] == ["Qwen2Model"] and cfg_out["model_type"] == "qwen2"
    assert {k: cfg_out.get(k) for k in ids} == ids  # special-token ids are carried across
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")


def test_mixed_dtype_source_keeps_every_value(tmp_path, caplog):
    """float32 norms beside bfloat16 matrices: cast to bfloat16 the norms would be rounded."""
    from safetensors.torch import load_file, save_file

    src = make_hf(tmp_path / "hf", dtype=torch.bfloat16)
    weights = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in weights if "norm" in n]:
        weights[name] = 1 + 0.01 * torch.randn(weights[name].shape, generator=gen, dtype=torch.float32)
    save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        summary = conv.hf_to_orbax(src, tmp_path / "orbax")
    assert summary["source_dtype"] == "float32" and "mixes floating dtypes" in caplog.text
    conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    back = tensors(tmp_path / "back")
    for name, a in tensors(src).items():
        assert back[name].dtype == np.float32 and back[name].tobytes() == a.astype(np.float32).tobytes(), name


def test_causal_lm_source_with_lm_head_loads(tmp_path, caplog):
    src = make_hf(tmp_path / "hf", tied=False, causal_lm=True)
    names = TensorStore(src).names()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    with caplog.at_level(logging.WARNING):
        summary = conv.hf_to_orbax(src, tmp_path / "orbax")
    assert summary["ignored"] == ["lm_head.weight"]
    assert "lm_head.weight" in caplog.text
    conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    want = {k[len("model."):]: v for k, v in tensors(src).items() if k.startswith("model.")}
    assert_bit_exact(want, tensors(tmp_path / "back"))


# ------------------------------------------------------- HF / ST loading parity
def test_export_loads_in_transformers_and_sentence_transformers(tmp_path, mesh8):
    from sentence_transformers import SentenceTransformer

    src = make_hf(tmp_path / "hf", tied=True)
    conv.hf_to_orbax(src, tmp_path / "orbax", mesh=mesh8)
    conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "export", mesh=mesh8)
    export = str(tmp_path / "export")

    modules = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling = json.loads((tmp_path / "export" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"]
    st_cfg = json.loads((tmp_path / "export" / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"]["query"] == f"Instruct: {DEFAULT_QUERY_INSTRUCTION}\nQuery: "
    assert json.loads((tmp_path / "export" / "sentence_bert_config.json").read_text())["max_seq_length"] == 256

    cfg, params = load_orbax_params(tmp_path / "orbax", compute_dtype="float32")
    tok = Tokenizer(DEMO_TOKENIZER, max_length=256)
    texts = ["what is the capital of france", "jax shards arrays over a device mesh",
             "a much longer sentence about embedding models, pooling, and normalization of vectors"]

    # transformers: plain AutoModel, no remote code, bidirectional
    hf_model = transformers.AutoModel.from_pretrained(export, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "Qwen2Model" and hf_model.config.is_causal is False
    ids, mask = tok(texts)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    ours = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=2e-4, rtol=2e-4)

    # sentence-transformers with the query prompt vs qzhou-jax with the instruction
    st = SentenceTransformer(export, device="cpu", local_files_only=True)
    assert st.max_seq_length == 256
    st_emb = st.encode(texts, prompt_name="query", convert_to_numpy=True, batch_size=8)
    q_ids, q_mask = tok(texts, instruction=DEFAULT_QUERY_INSTRUCTION)
    our_emb = np.asarray(embed(params, cfg, jnp.asarray(q_ids), jnp.asarray(q_mask)))
    cos = np.sum(st_emb * our_emb, axis=1) / (np.linalg.norm(st_emb, axis=1) * np.linalg.norm(our_emb, axis=1))
    assert np.all(cos >= 0.99999), cos
    np.testing.assert_allclose(np.linalg.norm(st_emb, axis=1), 1.0, atol=1e-5)

    # Matryoshka: the export's truncate_dim gives sentence-transformers our embedding_dim
    from qzhou_jax import st_folder

    cfg16 = dataclasses.replace(cfg, embedding_dim=16)
    st_folder.write(export, cfg16, st_folder.Settings(max_seq_length=256))
    st16 = SentenceTransformer(export, device="cpu", local_files_only=True)
    st_emb = st16.encode(texts, prompt_name="query", convert_to_numpy=True, batch_size=8)
    our_emb = np.asarray(embed(params, cfg16, jnp.asarray(q_ids), jnp.asarray(q_mask)))
    assert st_emb.shape == our_emb.shape == (3, 16)
    cos = np.sum(st_emb * our_emb, axis=1) / (np.linalg.norm(st_emb, axis=1) * np.linalg.norm(our_emb, axis=1))
    assert np.all(cos >= 0.99999), cos


# ------------------------------------------------------------------ meshes
def test_restore_onto_declared_shardings_and_other_meshes(tmp_path, mesh8):
    src = make_hf(tmp_path / "hf", tied=False)
    conv.hf_to_orbax(src, tmp_path / "orbax", mesh=mesh8)  # saved from fsdp=8
    _, ref = load_hf_params(src)
    for mc in (MeshConfig(data=1, fsdp=2, tensor=4), MeshConfig(data=2, fsdp=4, tensor=1)):
        mesh = make_mesh(mc)
        cfg, params = load_orbax_params(tmp_path / "orbax", mesh=mesh)
        for path, spec in param_specs(cfg).items():
            leaf, want = params, ref
            for part in path.split("/"):
                leaf, want = leaf[part], want[part]
            assert leaf.sharding == named_sharding(spec.axes, mesh, None, spec.shape), path
            assert leaf.dtype == jnp.float32 and leaf.shape == spec.shape
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=path)
    # the (fsdp=2, tensor=4) mesh really splits: vocab over tensor, embed over fsdp
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    _, params = load_orbax_params(tmp_path / "orbax", mesh=mesh)
    assert params["embed_tokens"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(params["layers"]["gate_kernel"].addressable_shards[0].data.shape) == 3
    assert params["layers"]["gate_kernel"].addressable_shards[0].data.shape == (2, 16, 12)


def test_save_orbax_params_and_load_pretrained(tmp_path):
    src = make_hf(tmp_path / "hf")
    cfg, params = load_hf_params(src)
    out = save_orbax_params(params, cfg, tmp_path / "orbax", tokenizer_dir=src)
    pre = load_pretrained(out)
    assert pre.config == cfg and pre.tokenizer_path == os.path.join(out, "tokenizer")
    assert Tokenizer(pre.tokenizer_path)(["hello world"])[0].shape[0] == 1  # encode needs no HF folder
    jax.tree.map(np.testing.assert_array_equal, pre.params, params)
    save_hf(params, cfg, tmp_path / "hf2", tokenizer_dir=src)
    assert_bit_exact(tensors(src), tensors(tmp_path / "hf2"))
    pre_hf = load_pretrained(tmp_path / "hf2")
    assert pre_hf.tokenizer_path == str(tmp_path / "hf2")
    jax.tree.map(np.testing.assert_array_equal, pre_hf.params, params)
    # bf16 export of float32 params: dtype on disk and in config.json
    save_hf(params, cfg, tmp_path / "hf_bf16", dtype="bfloat16")
    assert {a.dtype for a in tensors(tmp_path / "hf_bf16").values()} == {np.dtype(jnp.bfloat16)}
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_saved_platform_kernel_falls_back_to_xla_attention_elsewhere(tmp_path):
    """A model trained with splash (TPU) or cudnn (GPU) attention loads for XLA attention on another
    platform (CPU here) unless the caller asks for the kernel."""
    src = make_hf(tmp_path / "hf")
    cfg, params = load_hf_params(src)
    for impl in ("splash", "cudnn"):
        out = save_orbax_params(params, cfg.replace(attention_impl=impl), tmp_path / impl, tokenizer_dir=src)
        assert load_pretrained(out).config.attention_impl == "xla"
        assert load_pretrained(out, attention_impl=impl).config.attention_impl == impl


def test_training_checkpoint_to_hf(tmp_path):
    import orbax.checkpoint as ocp

    src = make_hf(tmp_path / "hf", tied=False)
    cfg, params = load_hf_params(src)
    later = jax.tree.map(lambda x: x * 2, params)
    run = tmp_path / "run"
    mgr = ocp.CheckpointManager(run / "checkpoints")
    opt = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.zeros((), jnp.int32)}
    mgr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt)))
    # an NNX-style tree (module nesting, {"value": ...} wrappers) at the latest step
    wrapped = {"encoder": jax.tree.map(lambda x: {"value": x}, later)}
    mgr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(wrapped), opt_state=ocp.args.StandardSave(opt)))
    mgr.wait_until_finished()
    mgr.close()
    # no config next to the checkpoint: a clear error, nothing written
    with pytest.raises(FileNotFoundError, match="--config"):
        conv.orbax_to_hf(run / "checkpoints", tmp_path / "out")
    assert_nothing_left(tmp_path / "out")
    shutil.copy(tmp_path / "hf" / "config.json", run / "config.json")
    summary = conv.orbax_to_hf(run / "checkpoints", tmp_path / "out", dtype="float32", tokenizer_dir=src)
    assert summary["params"].endswith(os.path.join("7", "params"))
    got = tensors(tmp_path / "out")
    want = tensors(src)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name] * 2, err_msg=name)
    # a step folder and the item folder work too
    conv.orbax_to_hf(run / "checkpoints" / "3", tmp_path / "out3", config=src)
    assert_bit_exact(tensors(src), tensors(tmp_path / "out3"))


# ------------------------------------------------------------------ bad input
def _rewrite(folder, fn) -> None:
    t = tensors(folder)
    t = fn(dict(t))
    path = os.path.join(folder, "model.safetensors")
    safetensors_io.write(path, {k: np.array(v) for k, v in t.items()}, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("good") / "hf")


def _copy(good, tmp_path) -> str:
    dst = tmp_path / "bad"
    shutil.copytree(good, dst)
    return str(dst)


def test_missing_tensor(tmp_path, good_hf):
    src = _copy(good_hf, tmp_path)
    _rewrite(src, lambda t: {k: v for k, v in t.items() if k != "layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_unexpected_tensor(tmp_path, good_hf):
    src = _copy(good_hf, tmp_path)
    _rewrite(src, lambda t: {**t, "layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'layers\.0\.self_attn\.extra\.weight'"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_shape_disagrees_with_config(tmp_path, good_hf):
    src = _copy(good_hf, tmp_path)
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    cfg["intermediate_size"] = 64
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.mlp\.gate_proj\.weight' has shape \(48, 32\), "
                                         r"config\.json implies \(64, 32\)"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_integer_weights_are_refused(tmp_path, good_hf):
    """A weight stored as integers (a quantized file) is not cast into garbage floats."""
    src = _copy(good_hf, tmp_path)
    _rewrite(src, lambda t: {k: (v.astype(np.int8) if k.endswith("q_proj.weight") else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.self_attn\.q_proj\.weight' is stored as int8, not "
                                         r"floating point"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header", "empty", "list_header", "negative_offset"])
def test_corrupt_or_truncated_safetensors(tmp_path, good_hf, damage):
    src = _copy(good_hf, tmp_path)
    path = os.path.join(src, "model.safetensors")
    size = os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, size - 100)
    elif damage == "corrupt_header":
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage{{{")
    elif damage in ("list_header", "negative_offset"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header, data = json.loads(f.read(n)), f.read()
        if damage == "list_header":
            header = [header]
        else:
            name = next(k for k in header if k != "__metadata__")
            header[name]["data_offsets"] = [-4, header[name]["data_offsets"][1] - header[name]["data_offsets"][0] - 4]
        raw = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
    else:
        os.truncate(path, 3)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt|bad header entry)") as e:
        conv.hf_to_orbax(src, tmp_path / "out")
    assert path in str(e.value)
    assert_nothing_left(tmp_path / "out")


def test_float32_buffers_do_not_make_a_bfloat16_checkpoint_float32(tmp_path, caplog):
    """rotary_emb.inv_freq (float32 in checkpoints of any dtype, ignored on loading) is not counted
    as a parameter dtype: the bfloat16 checkpoint stays bfloat16, without a 'mixes' warning."""
    from safetensors.torch import load_file, save_file

    src = make_hf(tmp_path / "hf", dtype=torch.bfloat16, causal_lm=True)
    weights = load_file(os.path.join(src, "model.safetensors"))
    want = dict(weights)
    for i in range(2):
        weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        summary = conv.hf_to_orbax(src, tmp_path / "orbax")
    assert summary["source_dtype"] == "bfloat16" and summary["config"].param_dtype == "bfloat16"
    assert "mixes floating dtypes" not in caplog.text and "a buffer the model recomputes" in caplog.text
    conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    assert_bit_exact({k[len("model."):]: v.float().numpy().astype(jnp.bfloat16) for k, v in want.items()},
                     tensors(tmp_path / "back"))


def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, caplog):
    """transformers loads model.safetensors when a folder also holds a (stale) sharded index:
    qzhou-jax reads the same weights, with a warning."""
    src = make_hf(tmp_path / "hf", seed=1)
    other = make_hf(tmp_path / "other", seed=2, sharded=True)
    for name in os.listdir(other):
        if "safetensors" in name:
            shutil.copy(os.path.join(other, name), src)
    ref = transformers.AutoModel.from_pretrained(src).embed_tokens.weight.detach().numpy()
    with caplog.at_level(logging.WARNING):
        _, params = load_hf_params(src)
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), ref)
    assert "holds both model.safetensors and model.safetensors.index.json" in caplog.text


@pytest.mark.parametrize("index", [{"weight_map": [["embed_tokens.weight", "a.safetensors"]]}, [1],
                                   {"weight_map": {"embed_tokens.weight": 3}}])
def test_a_malformed_index_is_named(tmp_path, index):
    src = make_hf(tmp_path / "hf", sharded=True)
    path = os.path.join(src, "model.safetensors.index.json")
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_pytorch_weights_only_are_named(tmp_path, good_hf):
    src = _copy(good_hf, tmp_path)
    os.rename(os.path.join(src, "model.safetensors"), os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"found pytorch_model\.bin: convert PyTorch weights to safetensors"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_a_full_disk_while_orbax_writes_names_the_output(tmp_path, good_hf, monkeypatch):
    """Orbax reports a full disk as OSError(ENOSPC) without a file name: the error says where."""
    import errno

    from qzhou_jax.checkpoint import orbax_io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(orbax_io, "write_params", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        conv.hf_to_orbax(good_hf, tmp_path / "out")
    assert e.value.filename and e.value.filename.startswith(str(tmp_path / "out") + ".qzhou-tmp-")
    assert_nothing_left(tmp_path / "out")


def test_missing_shard_named(tmp_path):
    src = make_hf(tmp_path / "hf", sharded=True)
    os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        conv.hf_to_orbax(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_existing_output_and_overwrite(tmp_path, good_hf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="already exists"):
        conv.hf_to_orbax(good_hf, out)
    assert os.listdir(out) == ["config.json"] and glob.glob(str(out) + ".qzhou-tmp-*") == []
    conv.hf_to_orbax(good_hf, out, overwrite=True)
    assert is_orbax_checkpoint(out)
    with pytest.raises(OutputExistsError, match="already exists"):
        conv.orbax_to_hf(out, out)
    # --overwrite never replaces a folder that is not a model folder
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a model folder"):
        conv.orbax_to_hf(out, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"
    # ... nor a training run's checkpoints folder (it holds a qzhou_config.json too)
    run = tmp_path / "run_checkpoints"
    (run / "8").mkdir(parents=True)
    (run / "qzhou_config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"holds training checkpoints \(step folders 8\)"):
        conv.orbax_to_hf(out, run, overwrite=True)
    assert sorted(os.listdir(run)) == ["8", "qzhou_config.json"]
    # ... nor the input itself, or a folder holding it, or a file
    before = sorted(os.listdir(good_hf))
    with pytest.raises(OutputExistsError, match="is the input"):
        conv.hf_to_orbax(good_hf, good_hf, overwrite=True)
    with pytest.raises(OutputExistsError, match="is the input"):
        conv.orbax_to_hf(out, out, overwrite=True)
    with pytest.raises(OutputExistsError, match="holding the input"):
        conv.orbax_to_hf(out, tmp_path, overwrite=True)
    with pytest.raises(OutputExistsError, match="is the input"):
        conv.hf_to_orbax(good_hf, out, overwrite=True, tokenizer_dir=out)
    assert sorted(os.listdir(good_hf)) == before and is_orbax_checkpoint(out)
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a folder"):
        conv.hf_to_orbax(good_hf, note, overwrite=True)
    assert note.read_text() == "keep me" and glob.glob(str(tmp_path / "*.qzhou-tmp-*")) == []


def test_leftovers_of_killed_writes_are_removed_once_the_new_folder_is_in_place(tmp_path, caplog, request):
    """A killed write leaves `<out>.qzhou-tmp-<host>-<pid>-<id>` (or the replaced folder as
    `.qzhou-old-`). The next write of `out` removes this machine's whose process has ended; those
    of a running process or of another machine are named in a warning, and another machine's are
    removed when the caller owns the folder (a training run's out_dir). A running process's here,
    and every other name (a user's `out.old-run-1-20240115` too), are never touched."""
    import subprocess
    import sys

    from qzhou_jax.checkpoint.export import _host, atomic_output_dir

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    request.addfinalizer(sleeper.kill)
    out = tmp_path / "out"
    # this process's own pid, from a killed run in a container restarted in place, counts as ended
    dead = [f"out.qzhou-tmp-{_host()}-{ended.pid}-aaaaaaaa", f"out.qzhou-old-{_host()}-{ended.pid}-bbbbbbbb",
            f"out.qzhou-tmp-{_host()}-{os.getpid()}-abababab"]
    running = [f"out.qzhou-tmp-{_host()}-{sleeper.pid}-cccccccc"]
    elsewhere = ["out.qzhou-tmp-elsewhere-7-dddddddd", "out.qzhou-old-other.example.com-42-eeeeeeee"]
    unrelated = [f"out2.qzhou-tmp-{_host()}-{ended.pid}-ffffffff", f"out.v2.qzhou-tmp-{_host()}-{ended.pid}-ffffffff",
                 f"out.tmp-{_host()}-{ended.pid}-aaaaaaaa", "out.old-run-1-20240115", "out.qzhou-tmp-notes"]
    for name in dead + running + elsewhere + unrelated:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    with caplog.at_level("INFO"), atomic_output_dir(out) as tmp:
        assert os.path.basename(tmp).startswith(f"out.qzhou-tmp-{_host()}-{os.getpid()}-")
        open(os.path.join(tmp, "config.json"), "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + running + elsewhere + unrelated)
    assert f"removed {', '.join(sorted(dead))}, left by interrupted writes of out" in caplog.text
    assert f"{', '.join(sorted(elsewhere + running))} were left by writes of out that were interrupted on " \
           f"another machine" in caplog.text
    with atomic_output_dir(out, overwrite=True, owned=True) as tmp:
        open(os.path.join(tmp, "config.json"), "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + running + unrelated) and os.listdir(out) == ["config.json"]


def test_interrupted_conversion_leaves_nothing(tmp_path, good_hf, monkeypatch):
    from qzhou_jax.checkpoint import hf as hf_mod

    calls = {"n": 0}
    real = hf_mod.from_hf_layout

    def failing(spec, t):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(spec, t)

    monkeypatch.setattr(hf_mod, "from_hf_layout", failing)
    with pytest.raises(KeyboardInterrupt):
        conv.hf_to_orbax(good_hf, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")
    monkeypatch.setattr(hf_mod, "from_hf_layout", real)

    conv.hf_to_orbax(good_hf, tmp_path / "orbax")
    from qzhou_jax.checkpoint import export as export_mod

    real_tok = export_mod.copy_tokenizer
    monkeypatch.setattr(export_mod, "copy_tokenizer", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf_out")
    assert_nothing_left(tmp_path / "hf_out")
    monkeypatch.setattr(export_mod, "copy_tokenizer", real_tok)

    # a folder whose marker is missing (killed before the end, then renamed by hand) is refused
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "orbax", broken)
    os.remove(broken / "QZHOU_CHECKPOINT")
    with pytest.raises(ValueError, match="incomplete"):
        load_pretrained(broken)
    with pytest.raises(ValueError, match="incomplete"):
        conv.orbax_to_hf(broken, tmp_path / "x")
    assert_nothing_left(tmp_path / "x")
    # damaged data files: a short error naming the folder, not TensorStore's whole spec
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "orbax", damaged)
    data = glob.glob(str(damaged / "params" / "**" / "d" / "*"), recursive=True)
    assert data
    for f in data:
        os.remove(f)
    with pytest.raises(ValueError, match=rf"{damaged / 'params'}.*: cannot read .*damaged or incomplete") as e:
        conv.orbax_to_hf(damaged, tmp_path / "x")
    assert "tensorstore_spec" not in str(e.value)
    assert_nothing_left(tmp_path / "x")


def test_a_folder_without_tokenizer_files_is_refused_before_anything_is_written(tmp_path, good_hf, monkeypatch):
    """transformers builds an empty tokenizer from a bare config.json, which turns every text
    into no tokens (all-zero embeddings): a model folder without tokenizer files is an error
    where a tokenizer is needed, and a named tokenizer folder is checked before the weights
    are converted."""
    bare = _copy(good_hf, tmp_path)
    for name in os.listdir(bare):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(bare, name))
    with pytest.raises(FileNotFoundError, match=rf"{bare}: no tokenizer files \(none of tokenizer.json"):
        Tokenizer(load_pretrained(bare).tokenizer_path)
    from qzhou_jax.checkpoint import orbax_io

    written = []
    real = orbax_io.write_params
    monkeypatch.setattr(orbax_io, "write_params", lambda *a, **k: written.append(1) or real(*a, **k))
    for tok in (tmp_path / "nowhere", bare):
        with pytest.raises(FileNotFoundError, match="tokenizer"):
            conv.hf_to_orbax(good_hf, tmp_path / "out", tokenizer_dir=tok)
        assert_nothing_left(tmp_path / "out")
    broken = tmp_path / "broken"  # tokenizer files that transformers cannot load
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{broken}: its tokenizer files do not load"):
        conv.hf_to_orbax(good_hf, tmp_path / "out", tokenizer_dir=broken)
    assert_nothing_left(tmp_path / "out")
    assert written == []
    conv.hf_to_orbax(good_hf, tmp_path / "orbax")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        conv.orbax_to_hf(tmp_path / "orbax", tmp_path / "out", tokenizer_dir=tmp_path / "nowhere")
    assert_nothing_left(tmp_path / "out")
    # an HF folder without a tokenizer still converts (weights only), with a warning
    conv.hf_to_orbax(bare, tmp_path / "weights_only")
    assert not os.path.exists(tmp_path / "weights_only" / "tokenizer")


def _st_files(folder) -> dict:
    return {name: json.loads((folder / name).read_text())
            for name in ("sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
                         "modules.json")}


def test_sentence_transformers_settings_survive_conversions(tmp_path, good_hf):
    """max_seq_length and the prompts go HF -> Orbax -> HF unchanged, and a sentence-transformers
    folder of another library says how its model pools."""
    conv.hf_to_orbax(good_hf, tmp_path / "o1")
    conv.orbax_to_hf(tmp_path / "o1", tmp_path / "h1", max_seq_length=100, query_instruction="Find the thing")
    h1 = _st_files(tmp_path / "h1")
    assert h1["config_sentence_transformers.json"]["prompts"]["query"] == "Instruct: Find the thing\nQuery: "
    assert h1["sentence_bert_config.json"]["max_seq_length"] == 100
    conv.hf_to_orbax(tmp_path / "h1", tmp_path / "o2")
    conv.orbax_to_hf(tmp_path / "o2", tmp_path / "h2")
    assert _st_files(tmp_path / "h2") == h1
    # the flags still win over what the checkpoint keeps; other prompts stay
    conv.orbax_to_hf(tmp_path / "o2", tmp_path / "h3", query_instruction="Other")
    prompts = _st_files(tmp_path / "h3")["config_sentence_transformers.json"]["prompts"]
    assert prompts == {"query": "Instruct: Other\nQuery: ", "document": ""}
    assert _st_files(tmp_path / "h3")["sentence_bert_config.json"]["max_seq_length"] == 100

    # another library's folder: last-token pooling, no Normalize, no qzhou_jax key in config.json
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "h1", other)
    raw = json.loads((other / "config.json").read_text())
    del raw["qzhou_jax"]
    (other / "config.json").write_text(json.dumps(raw))
    pooling = json.loads((other / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((other / "modules.json").read_text()) if m["path"] != "2_Normalize"]
    (other / "modules.json").write_text(json.dumps(modules))
    cfg = load_pretrained(other).config
    assert (cfg.pooling, cfg.normalize) == ("last", False)
    conv.hf_to_orbax(other, tmp_path / "o3")
    conv.orbax_to_hf(tmp_path / "o3", tmp_path / "h4")
    got = _st_files(tmp_path / "h4")
    assert got["1_Pooling/config.json"]["pooling_mode_lasttoken"] and not got["1_Pooling/config.json"][
        "pooling_mode_mean_tokens"]
    assert [m["path"] for m in got["modules.json"]] == ["", "1_Pooling"]
    # pooling this package cannot compute is an error that names the file
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_cls_token=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling pooling_mode_cls_token is not supported"):
        load_pretrained(other)
    assert load_pretrained(other, pooling="mean").config.pooling == "mean"  # unless the caller chooses
    from qzhou_jax.train.config import model_config

    cfg = model_config({"pooling": "mean"}, str(other))  # a run's init_from, with its own pooling
    assert (cfg.pooling, cfg.normalize) == ("mean", False)  # the folder's other settings stay


def test_sentence_transformers_folder_without_is_causal_embeds_as_sentence_transformers(tmp_path):
    """transformers attends causally when config.json has no is_causal: another library's
    sentence-transformers folder embeds so here too, and keeps it through HF -> Orbax -> HF."""
    from sentence_transformers import SentenceTransformer, models

    from qzhou_jax import cli

    src = make_hf(tmp_path / "lm", causal_lm=True)
    raw = json.loads((tmp_path / "lm" / "config.json").read_text())
    del raw["is_causal"]  # as in every Qwen2 / Qwen2.5 checkpoint
    (tmp_path / "lm" / "config.json").write_text(json.dumps(raw))
    folder = str(tmp_path / "st")
    SentenceTransformer(modules=[models.Transformer(src), models.Pooling(32, pooling_mode="lasttoken"),
                                 models.Normalize()], device="cpu").save(folder)
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]
    want = SentenceTransformer(folder, device="cpu").encode(texts)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(t) + "\n" for t in texts))

    def encode(*flags):
        assert cli.main(["encode", "--model", folder, "--input", str(inp), "--output", str(tmp_path / "e.npy"),
                         "--dtype", "float32", "--quiet", *flags]) == 0
        return np.load(tmp_path / "e.npy")

    np.testing.assert_allclose(encode(), want, atol=1e-5)
    conv.hf_to_orbax(folder, tmp_path / "o")
    conv.orbax_to_hf(tmp_path / "o", tmp_path / "h")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["is_causal"] is True
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "h"), device="cpu").encode(texts), want, atol=1e-5)
    # --attention chooses the other: what sentence-transformers computes with is_causal: false
    bidirectional = encode("--attention", "bidirectional")
    (tmp_path / "st" / "config.json").write_text(json.dumps({**raw, "is_causal": False}))
    np.testing.assert_allclose(bidirectional, SentenceTransformer(folder, device="cpu").encode(texts), atol=1e-5)
    assert np.abs(bidirectional - want).max() > 1e-3


def test_max_seq_length_of_a_sentence_transformers_6_folder_survives_conversions(tmp_path, good_hf):
    """sentence-transformers 6 writes no max_seq_length into sentence_bert_config.json: it keeps it
    as the tokenizer's model_max_length and, on loading, caps that at max_position_embeddings."""
    from sentence_transformers import SentenceTransformer, models

    from qzhou_jax import st_folder

    st = SentenceTransformer(modules=[models.Transformer(good_hf, max_seq_length=100), models.Pooling(32),
                                      models.Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    assert "max_seq_length" not in json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())
    conv.hf_to_orbax(tmp_path / "st", tmp_path / "o")
    conv.orbax_to_hf(tmp_path / "o", tmp_path / "h")
    assert _st_files(tmp_path / "h")["sentence_bert_config.json"]["max_seq_length"] == 100
    assert SentenceTransformer(str(tmp_path / "h"), device="cpu").max_seq_length == 100
    # a tokenizer length beyond the model's positions (or none, transformers' 1e30) is capped as
    # sentence-transformers caps it (the tiny model has 256 positions)
    tok_config = tmp_path / "st" / "tokenizer_config.json"
    raw = json.loads(tok_config.read_text())
    for length in (131072, None):
        raw.pop("model_max_length", None)
        tok_config.write_text(json.dumps(raw if length is None else {**raw, "model_max_length": length}))
        assert SentenceTransformer(str(tmp_path / "st"), device="cpu").max_seq_length == 256
        assert st_folder.settings(str(tmp_path / "st")).max_seq_length == 256
    # a plain HF folder (no modules.json): its tokenizer's length says nothing about truncation
    assert json.loads(open(os.path.join(good_hf, "tokenizer_config.json")).read())["model_max_length"] == 32768
    assert st_folder.settings(good_hf).max_seq_length is None


# ---------------------------------------------------------------------- CLI
def test_cli(tmp_path, good_hf, capsys):
    parser = argparse.ArgumentParser(prog="qzhou-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    conv.add_convert_parser(sub)

    def run(*argv):
        args = parser.parse_args(["convert", *argv])
        return args.func(args)

    assert run("hf-to-orbax", "--hf", good_hf, "--out", str(tmp_path / "o"), "--mesh", "data=2,fsdp=4") == 0
    assert run("orbax-to-hf", "--orbax", str(tmp_path / "o"), "--out", str(tmp_path / "h"), "--dtype", "bfloat16",
               "--max-shard-size", "100KB", "--max-seq-length", "128", "--query-instruction", "Find X",
               "--mesh", "fsdp=2,tensor=4") == 0
    err = capsys.readouterr().err
    assert "wrote" in err and str(tmp_path / "h") in err
    with pytest.raises(SystemExit):  # 0 used to fall back to the default length silently
        run("orbax-to-hf", "--orbax", str(tmp_path / "o"), "--out", str(tmp_path / "z"), "--max-seq-length", "0")
    assert "--max-seq-length: expected a positive integer, got '0'" in capsys.readouterr().err
    h = tmp_path / "h"
    assert json.loads((h / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert json.loads((h / "config_sentence_transformers.json").read_text())["prompts"]["query"] == \
        "Instruct: Find X\nQuery: "
    assert json.loads((h / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((h / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TensorStore(good_hf).names())
    for fname in set(index["weight_map"].values()):  # at most 100 KB of data, or one bigger tensor
        store = safetensors_io.SafeFile(h / fname)
        sizes = [store.get(n).nbytes for n in store.names()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1, (fname, sizes)
    got = tensors(h)
    for name, a in tensors(good_hf).items():
        assert got[name].dtype == np.dtype(jnp.bfloat16)
        np.testing.assert_array_equal(got[name], a.astype(jnp.bfloat16), err_msg=name)
    with pytest.raises(OutputExistsError):
        run("hf-to-orbax", "--hf", good_hf, "--out", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--mesh"):
        run("hf-to-orbax", "--hf", good_hf, "--out", str(tmp_path / "o2"), "--mesh", "pipeline=2")


def test_parse_helpers():
    assert conv.parse_size("5GB") == 5 * 10**9 and conv.parse_size("200KB") == 200_000
    assert conv.parse_size("1GiB") == 2**30 and conv.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="size"):
        conv.parse_size("five")
    assert conv.parse_mesh("data=2,fsdp=-1") == MeshConfig(data=2, fsdp=-1, tensor=1)
    assert conv.parse_mesh(None) == MeshConfig()
