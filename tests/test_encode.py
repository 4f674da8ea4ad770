"""Tokenizer bucketing, the Encoder, and `qzhou-jax encode` on a local HF checkpoint."""

import json
import os

import numpy as np
import pytest

from qzhou_jax import cli, sharding
from qzhou_jax.checkpoint import load_pretrained
from qzhou_jax.eval.encoder import Encoder
from qzhou_jax.model import embed
from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer, default_buckets, format_prompt

TEXTS = ["a short one", "The Quiet Tides are a 4-piece band featuring a cellist and two singers.",
         "南屿银狼队的主场能容纳多少人？", "x", "What spice is used in the lemony lentil broth? " * 3]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_buckets_and_truncation():
    assert default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert default_buckets(100) == (16, 32, 64, 100)
    tok = Tokenizer(DEMO_TOKENIZER, max_length=20)
    seqs = tok.encode(["word " * 100, "hi"])
    assert len(seqs[0]) == 20 and 0 < len(seqs[1]) < 20
    ids, mask = tok.pad(seqs, rows=4)
    assert ids.shape == (4, 20) and mask[2:].sum() == 0 and mask[1].sum() == len(seqs[1])
    assert tok.bucket(3) == 16 and tok.bucket(17) == 20
    assert format_prompt("q", "Find it") == "Instruct: Find it\nQuery: q"
    assert format_prompt("q", None) == "q"


def test_a_tokenizer_that_cuts_from_the_start_cuts_from_the_end(tmp_path, caplog):
    """The instruction comes first: every path cuts texts from the end, and exports say so to
    sentence-transformers and transformers (which read truncation_side from tokenizer_config.json)."""
    import shutil

    from qzhou_jax.checkpoint.export import copy_tokenizer

    src = tmp_path / "left"
    shutil.copytree(DEMO_TOKENIZER, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left"}))
    with caplog.at_level("WARNING"):
        tok = Tokenizer(src, max_length=12)
    assert "truncation_side is 'left'" in caplog.text
    right = Tokenizer(DEMO_TOKENIZER, max_length=12)
    long = [format_prompt("word " * 50, "Find the passage")]
    assert tok.encode(long) == right.encode(long)
    assert tok.hf.decode(tok.encode(long)[0]).startswith("Instruct: Find")
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer(src, str(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["truncation_side"] == "right"
    # the side can also come from tokenizer.json when tokenizer_config.json does not say
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    fast = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").write_text(json.dumps({**fast, "truncation": {
        "direction": "Left", "max_length": 16, "strategy": "LongestFirst", "stride": 0}}))
    copy_tokenizer(src, str(out))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(src).truncation_side == "left"
    assert AutoTokenizer.from_pretrained(out).truncation_side == "right"
    # a tokenizer that cuts from the end is copied as it is
    copy_tokenizer(DEMO_TOKENIZER, str(out))
    for name in os.listdir(DEMO_TOKENIZER):
        assert (out / name).read_bytes() == open(os.path.join(DEMO_TOKENIZER, name), "rb").read(), name


def test_encoder_order_bucketing_and_sharding(model_dir):
    cfg, params, tok_path = load_pretrained(model_dir, compute_dtype="float32")
    tok = Tokenizer(tok_path, max_length=64)
    ref = []
    for t in TEXTS:  # one at a time, no batching, no sorting
        ids, mask = tok([t], instruction="Find it")
        ref.append(np.asarray(embed(params, cfg, ids, mask))[0])
    ref = np.stack(ref)
    got = Encoder(params, cfg, tok, batch_size=2).encode(TEXTS, instruction="Find it")
    np.testing.assert_allclose(got, ref, atol=2e-6)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    cfg_s, params_s, _ = load_pretrained(model_dir, mesh=mesh, compute_dtype="float32")
    enc = Encoder(params_s, cfg_s, tok, batch_size=3)
    assert enc.batch_size == 8  # rounded up to the data-parallel size
    np.testing.assert_allclose(enc.encode(TEXTS, instruction="Find it"), ref, atol=2e-6)
    assert 0.0 <= enc.padding_fraction < 1.0
    with pytest.raises(ValueError, match=r"tokenizer: the tokenizer in .* has 2000 tokens, the model's vocabulary "
                                         r"1000: is it the model's tokenizer\?"):
        Encoder(params, cfg.replace(vocab_size=1000), tok)  # ids past 1000 would embed to NaN


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_encode_cli_writes_float32_in_input_order(model_dir, tmp_path):
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    out = tmp_path / "emb.npy"
    rc = cli.main(["encode", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
                   "--dtype", "float32", "--batch-size", "2", "--quiet", "--instruction", "Find it"])
    assert rc == 0
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), 32)
    cfg, params, tok_path = load_pretrained(model_dir, compute_dtype="float32")
    ids, mask = Tokenizer(tok_path, max_length=1024)(TEXTS, instruction="Find it")
    np.testing.assert_allclose(emb, np.asarray(embed(params, cfg, ids, mask)), atol=2e-6)
    assert list(tmp_path.iterdir()) == [inp, out] or sorted(tmp_path.iterdir()) == sorted([inp, out])
    # the TPU kernel (Pallas's interpreter here) gives the same embeddings
    rc = cli.main(["encode", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "s.npy"),
                   "--dtype", "float32", "--attention-impl", "splash", "--quiet", "--instruction", "Find it"])
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), emb, atol=2e-6)


def test_encode_warns_about_empty_texts(model_dir, tmp_path, caplog):
    inp = _write(tmp_path / "in.jsonl", ['{"text": "a"}', "", '{"text": ""}'])  # the blank line is no row
    with caplog.at_level("WARNING"):
        assert cli.main(["encode", "--model", str(model_dir), "--input", str(inp), "--output",
                         str(tmp_path / "e.npy"), "--quiet"]) == 0
    assert "1 of the 2 texts are empty: their rows are zeros" in caplog.text
    # the default --max-length 1024 is past this model's 256 positions (eval and mining say it too)
    assert "max length 1024 exceeds the model's max_position_embeddings (256)" in caplog.text
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape[0] == 2 and not emb[1].any() and emb[0].any()


@pytest.mark.parametrize("lines,message", [
    ([], "no records"),
    (['{"text": "ok"}', "{not json"], ":2: not valid JSON"),
    (['{"text": "ok"}', '{"body": "x"}'], ":2: missing field 'text'"),
    (['{"text": 3}'], ":1: field 'text' must be a string"),
    (['{"text": "ok"}', '["a", "b"]'], ":2: expected a JSON object with a 'text' field or a JSON string, got list"),
])
def test_encode_bad_input_names_file_and_line_and_writes_nothing(model_dir, tmp_path, capsys, lines, message):
    inp = _write(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "emb.npy"
    rc = cli.main(["encode", "--model", str(model_dir), "--input", str(inp), "--output", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(inp) in err and message in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_encode_missing_model_folder(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", ['"plain string"'])
    rc = cli.main(["encode", "--model", str(tmp_path / "nope"), "--input", str(inp),
                   "--output", str(tmp_path / "o.npy")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = cli.main(["encode", "--model", str(tmp_path / "nope"), "--input", str(inp), "--attention-impl", "cudnn",
                   "--output", str(tmp_path / "o.npy")])  # a GPU kernel on this CPU: said before any loading
    assert rc == 2 and "--attention-impl: 'cudnn' is a GPU kernel" in capsys.readouterr().err


def test_encode_hf_folder_without_config_json_says_so(model_dir, tmp_path, capsys):
    """A folder with HF weights but no config.json is a HF folder missing its config (as `convert
    hf-to-orbax` says), not an unfinished Orbax checkpoint."""
    import shutil

    inp = _write(tmp_path / "in.jsonl", ['"plain string"'])
    for weights in ("model.safetensors", "model.safetensors.index.json"):
        folder = tmp_path / weights
        shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("config.json"))
        if weights.endswith("index.json"):
            os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
            (folder / weights).write_text(json.dumps({"metadata": {}, "weight_map": {}}))
        rc = cli.main(["encode", "--model", str(folder), "--input", str(inp), "--output", str(tmp_path / "o.npy")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{folder / 'config.json'}: no config.json found" in err, err
        assert "_METADATA" not in err and not (tmp_path / "o.npy").exists()


def test_encode_missing_output_folder_stops_before_loading_the_model(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", ['"plain string"'])
    rc = cli.main(["encode", "--model", str(tmp_path / "nope"), "--input", str(inp),
                   "--output", str(tmp_path / "missing" / "o.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--output {tmp_path / 'missing' / 'o.npy'}: no such folder" in err and "nope" not in err
