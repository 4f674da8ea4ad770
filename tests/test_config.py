"""ModelConfig: HF config.json reading/writing and validation errors that name the field; the
writes of whole files and folders (synced to disk, then renamed into place)."""

import json

import pytest

from hf_utils import tiny_hf_config
from qzhou_jax.config import ModelConfig


def _hf_dict(**changes):
    d = tiny_hf_config().to_dict()
    d.update(changes)
    return d


def test_from_hf_reads_qwen25_style_config(tmp_path):
    raw = {"architectures": ["QZhouModel"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "max_position_embeddings": 32768, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg == ModelConfig.preset("qwen2.5-7b")
    assert cfg.attention == "bidirectional" and cfg.head_dim == 128


def test_rope_parameters_and_is_causal():
    d = _hf_dict(is_causal=True)
    d.pop("rope_theta", None)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 12345.0 and cfg.attention == "causal"
    assert ModelConfig.from_hf(_hf_dict(is_causal=False)).attention == "bidirectional"


def test_rope_theta_given_twice_follows_transformers(caplog):
    """transformers 5 takes rope_parameters' rope_theta over a top-level one that differs (it
    builds the rotary frequencies from that dict), and so does qzhou-jax, with a warning."""
    d = _hf_dict(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with caplog.at_level("WARNING"):
        assert ModelConfig.from_hf(d).rope_theta == 500000.0
    assert "rope_theta 10000.0" in caplog.text and "500000.0" in caplog.text
    import transformers

    model = transformers.Qwen2Model(transformers.Qwen2Config(**d))
    assert model.config.rope_parameters["rope_theta"] == 500000.0  # what transformers runs
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same value twice, or only one of them: nothing to say
        assert ModelConfig.from_hf(_hf_dict(rope_theta=500000.0, rope_parameters={
            "rope_type": "default", "rope_theta": 500000.0})).rope_theta == 500000.0
        assert ModelConfig.from_hf(_hf_dict(rope_theta=20000.0, rope_parameters={
            "rope_type": "default"})).rope_theta == 20000.0
    assert caplog.text == ""


def test_absent_is_causal_follows_the_kind_of_folder(tmp_path, caplog):
    """Without is_causal, transformers (and so sentence-transformers) attends causally: a
    sentence-transformers folder of another library embeds so; a base LM folder (an init_from)
    gets QZhou's bidirectional attention; a model with its own code (auto_map) cannot be known."""
    d = _hf_dict()
    del d["is_causal"]

    def folder(name, modules=False, **changes):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**d, **changes}))
        if modules:
            (path / "modules.json").write_text(json.dumps(
                [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
        return path

    def attention(path, **overrides):
        caplog.clear()
        with caplog.at_level("INFO", logger="qzhou_jax.config"):
            return ModelConfig.from_hf(path, **overrides).attention

    assert attention(folder("lm")) == "bidirectional"
    assert [r.levelname for r in caplog.records] == ["INFO"] and "bidirectional" in caplog.text
    st = folder("st", modules=True)
    assert attention(st) == "causal"
    assert [r.levelname for r in caplog.records] == ["INFO"] and "sentence-transformers" in caplog.text
    assert attention(st, attention="bidirectional") == "bidirectional" and caplog.records == []
    assert attention(folder("st_false", modules=True, is_causal=False)) == "bidirectional"
    assert caplog.records == []
    for path in (folder("custom", auto_map={"AutoModel": "modeling_x.XModel"}),
                 folder("st_custom", modules=True, auto_map={"AutoModel": "modeling_x.XModel"})):
        assert attention(path) == "bidirectional"
        assert [r.levelname for r in caplog.records] == ["WARNING"] and "auto_map" in caplog.text
        assert "--attention" in caplog.text and "model.attention" in caplog.text
        assert attention(path, attention="causal") == "causal" and caplog.records == []
    # this package's exports always say; a config without a folder keeps the embedding default
    assert attention(folder("export", modules=True, qzhou_jax={"pooling": "mean"})) == "bidirectional"
    assert ModelConfig.from_hf(d).attention == "bidirectional"


def test_to_hf_round_trip():
    cfg = ModelConfig.preset("qwen2.5-1.5b", pooling="last", embedding_dim=256)
    hf = cfg.to_hf()
    assert hf["architectures"] == ["Qwen2Model"] and hf["is_causal"] is False
    assert ModelConfig.from_hf(hf).replace() == cfg
    # a model trained in float32 embeds in float32 from its HF export too, as from its checkpoints
    cfg32 = cfg.replace(compute_dtype="float32")
    assert ModelConfig.from_hf(cfg32.to_hf()) == cfg32
    # special-token ids: absent stays absent, an eos list stays a list
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(hf)
    ids = cfg.replace(bos_token_id=151643, eos_token_id=(151645, 151643), pad_token_id=151643)
    assert ids.to_hf()["eos_token_id"] == [151645, 151643]
    assert ModelConfig.from_hf(json.loads(json.dumps(ids.to_hf()))) == ids
    # a config.json's unusable ids are left out (transformers tolerates them); a run's own are checked
    assert ModelConfig.from_hf({**hf, "eos_token_id": "</s>", "pad_token_id": -1}) == cfg
    with pytest.raises(ValueError, match="eos_token_id"):
        cfg.replace(eos_token_id=())


@pytest.mark.parametrize("changes,field", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 3, "head_dim": None}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    # a field of the wrong type is named, not a bare float() error or a traceback
    ({"rms_norm_eps": "abc"}, "rms_norm_eps: expected a number"),
    ({"rope_theta": [10000.0]}, "rope_theta: expected a number"),
    ({"initializer_range": "x"}, "initializer_range: expected a number"),
    ({"rope_scaling": "linear"}, "rope_scaling: expected a JSON object"),
    ({"rope_parameters": "default"}, "rope_parameters: expected a JSON object"),
    ({"qzhou_jax": ["mean"]}, "qzhou_jax: expected a JSON object"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings: expected true or false"),  # bool("false") is True
    ({"max_position_embeddings": -1}, "max_position_embeddings: expected a positive integer"),
    ({"max_position_embeddings": "256"}, "max_position_embeddings: expected a positive integer"),
])
def test_bad_config_names_the_field(tmp_path, changes, field):
    d = _hf_dict(**changes)
    d = {k: v for k, v in d.items() if v is not None or k not in ("hidden_size", "head_dim")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field) as err:
        ModelConfig.from_hf(path)
    assert str(path) in str(err.value)


def test_config_json_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got a JSON list"):
        ModelConfig.from_hf(tmp_path)


def test_a_short_write_without_errno_names_the_file(tmp_path):
    """numpy's tofile reports a full disk as OSError("96000 requested and 4064 written"), with no
    errno and no file name; the error then names the file it was writing."""
    from qzhou_jax.config import naming_the_file

    path = tmp_path / "emb.npy"
    with pytest.raises(OSError, match=rf"{path}: 96000 requested and 4064 written \(a short write"):
        with naming_the_file(path):
            raise OSError("96000 requested and 4064 written")


def test_invalid_values_and_presets():
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig.preset("tiny", pooling="max")
    with pytest.raises(ValueError, match="embedding_dim"):
        ModelConfig.preset("tiny", embedding_dim=65)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("qwen9")
    # weight gradients may be written wider than the compute dtype, never narrower
    ModelConfig.preset("tiny", compute_dtype="bfloat16", weight_grad_dtype="float32")
    # the compute dtype itself is kept as null, so a saved config follows a later compute dtype
    same = ModelConfig.preset("tiny", compute_dtype="bfloat16", weight_grad_dtype="bfloat16")
    assert same.weight_grad_dtype is None and same.replace(compute_dtype="float32").weight_grad_dtype is None
    for compute, grads in (("float32", "bfloat16"), ("bfloat16", "float16"), ("bfloat16", "f32")):
        with pytest.raises(ValueError, match=r"weight_grad_dtype: expected null \(the compute dtype\), float32"):
            ModelConfig.preset("tiny", compute_dtype=compute, weight_grad_dtype=grads)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.preset("tiny").replace(hidden=3)
    with pytest.raises(ValueError, match="not valid JSON"):
        import tempfile, os  # noqa: E401
        d = tempfile.mkdtemp()
        open(os.path.join(d, "config.json"), "w").write("{oops")
        ModelConfig.from_hf(d)


def test_set_reaches_an_empty_yaml_section(tmp_path):
    """`checkpoint:` with nothing under it is None in YAML; --set checkpoint.every=7 must land."""
    from qzhou_jax.config import apply_overrides

    data = {"checkpoint": None, "train": {"lr": 1e-3}}
    out = apply_overrides(data, ["checkpoint.every=7", "checkpoint.keep=5", "log.every=2", "train.lr=0.5"])
    assert out["checkpoint"] == {"every": 7, "keep": 5} and out["log"] == {"every": 2} and out["train"]["lr"] == 0.5
    # values are YAML, but a mapping or list only in flow style: "Query: find it" is a text
    out = apply_overrides({"data": {"datasets": [{"name": "a"}]}},
                          ["data.datasets.0.instruction=Query: find it", "data.length_buckets=[16, 32]",
                           "model={preset: tiny}", "eval.tasks=null", "data.datasets.0.path=- x"])
    assert out["data"]["datasets"][0] == {"name": "a", "instruction": "Query: find it", "path": "- x"}
    assert out["data"]["length_buckets"] == [16, 32] and out["model"] == {"preset": "tiny"}
    assert out["eval"]["tasks"] is None


def test_init_from_takes_execution_fields_and_refuses_architecture_ones(tmp_path):
    from qzhou_jax.config import ConfigError
    from qzhou_jax.train.config import model_config

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
    cfg = model_config({"compute_dtype": "bfloat16", "weight_grad_dtype": "float32", "remat": "full"}, str(tmp_path))
    assert (cfg.weight_grad_dtype, cfg.compute_dtype, cfg.hidden_size) == ("float32", "bfloat16", 64)
    with pytest.raises(ConfigError, match="model.hidden_size: the architecture comes from init_from"):
        model_config({"hidden_size": 32}, str(tmp_path))


def test_yaml_key_given_twice_is_refused_with_both_lines(tmp_path, caplog):
    from qzhou_jax.config import ConfigError, load_yaml
    from qzhou_jax.eval.tasks import load_task_specs
    from qzhou_jax.train.config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  datasets:\n    - name: a\n      path: first.jsonl\n      path: second.jsonl\n")
    with pytest.raises(ConfigError, match=r"run.yaml:5: not valid YAML \(key 'path' appears twice in one mapping "
                                          r"\(lines 4 and 5\)\)"):
        load_yaml(path)
    # YAML merge keys may still be overridden
    path.write_text("a: &base\n  x: 1\n  y: 2\nb:\n  <<: *base\n  x: 3\n")
    assert load_yaml(path)["b"] == {"x": 3, "y": 2}
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("- name: t\n  type: sts\n  path: a.jsonl\n  type: retrieval\n")
    with pytest.raises(ValueError, match=r"tasks.yaml:4: not valid YAML \(key 'type' appears twice"):
        load_task_specs(str(tasks))
    # eta 1 with non-retrieval datasets trains them never: said at load time
    datasets = [{"name": "s", "task": "sts", "path": "x"}, {"name": "r", "task": "retrieval", "path": "y"}]
    with caplog.at_level("WARNING"):
        load_run_config(data={"model": {"preset": "tiny"}, "data": {"eta": 1.0, "datasets": datasets}})
    assert "data.eta: 1 gives the non-retrieval datasets no batches: s" in caplog.text


def test_run_config_errors_name_where_the_value_came_from(tmp_path):
    """A bad value from a `base:` file or a --set names it; mesh sizes are checked when the config
    loads (--print-config is the launchers' check); a config without a model is refused."""
    from qzhou_jax.config import ConfigError
    from qzhou_jax.train.config import load_run_config

    data = {"datasets": [{"name": "r", "task": "retrieval", "path": "r.jsonl"}]}
    (tmp_path / "base.yaml").write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"lr_typo": 1}}))
    (tmp_path / "mid.yaml").write_text(json.dumps({"base": "base.yaml", "data": data}))
    (tmp_path / "top.yaml").write_text(json.dumps({"base": "mid.yaml", "out_dir": str(tmp_path / "out")}))
    base = tmp_path / "base.yaml"
    with pytest.raises(ConfigError, match=rf"top.yaml: train.lr_typo \(set in {base}\): unknown key"):
        load_run_config(tmp_path / "top.yaml")
    (tmp_path / "base.yaml").write_text(json.dumps({"model": {"preset": "tiny"}}))
    with pytest.raises(ConfigError, match=r"top.yaml: mesh.data \(from --set mesh.data=0\): expected a positive "
                                          r"size or -1, got 0"):
        load_run_config(tmp_path / "top.yaml", ["mesh.data=0"])
    with pytest.raises(ConfigError, match=r"mesh \(from --set mesh.data=-1\): at most one axis may be -1"):
        load_run_config(tmp_path / "top.yaml", ["mesh.data=-1"])
    bad = {"datasets": [{"name": "r", "task": "ranking", "path": "r.jsonl"}]}
    (tmp_path / "mid.yaml").write_text(json.dumps({"base": "base.yaml", "data": bad}))
    with pytest.raises(ConfigError, match=r"top.yaml: data.datasets\[0\].task \(set in .*mid.yaml\): "):
        load_run_config(tmp_path / "top.yaml")
    (tmp_path / "base.yaml").write_text(json.dumps({"train": {"lr": 1e-4}}))
    (tmp_path / "mid.yaml").write_text(json.dumps({"base": "base.yaml", "data": data}))
    with pytest.raises(ConfigError, match=r"top.yaml: model.preset: required without init_from"):
        load_run_config(tmp_path / "top.yaml")
    # --set takes list items as errors name them; a $ in a text is not a variable
    (tmp_path / "base.yaml").write_text(json.dumps({"model": {"preset": "tiny"}}))
    cfg = load_run_config(tmp_path / "top.yaml", ["data.datasets[0].batch_size=4",
                                                  "data.datasets[0].instruction=Given a $5 budget, find it"])
    assert cfg.data.datasets[0].batch_size == 4


def test_unset_variables_in_paths_are_named(tmp_path, monkeypatch, caplog):
    from qzhou_jax.train.config import load_run_config

    monkeypatch.delenv("QZ_UNSET_DATA", raising=False)
    raw = {"model": {"preset": "tiny"}, "data": {"datasets": [
        {"name": "r", "task": "retrieval", "path": "$QZ_UNSET_DATA/r.jsonl", "instruction": "Spend $5 on it"}]}}
    with caplog.at_level("WARNING"):
        load_run_config(data=raw)
    assert "$QZ_UNSET_DATA is not set in this environment (used by data.datasets[0].path)" in caplog.text
    assert "$5" not in caplog.text



def test_atomic_write_syncs_before_the_rename_and_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    """Every file the project writes in place (configs, metrics, exports, results) goes through
    `atomic_write`: data synced, then renamed, then the folder synced, so that a host crash
    leaves the old file or the whole new one; a failing block leaves the old file and no
    temporary one."""
    import os

    from qzhou_jax import config

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    path = tmp_path / "out.json"
    config.write_json(path, {"a": 1})
    tmp_name = str(tmp_path / f".out.json.tmp{os.getpid()}")
    assert events == [("fsync", tmp_name), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert json.loads(path.read_text()) == {"a": 1}

    with pytest.raises(TypeError):  # fails half-way through writing
        config.write_json(path, {"b": 2, "c": object()})
    assert json.loads(path.read_text()) == {"a": 1} and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_an_output_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    import os

    from qzhou_jax.checkpoint.export import atomic_output_dir

    synced, renamed = set(), []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((sorted(synced), b)), real_rename(a, b))[1])
    out = tmp_path / "hf"
    with atomic_output_dir(out) as tmp:
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for name in ("model.safetensors", "tokenizer/vocab.json"):
            with open(os.path.join(tmp, name), "w") as f:  # written without a sync of its own
                f.write("x")
    ((synced_then, target),) = renamed
    assert target == str(out)
    assert {os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "tokenizer", "vocab.json"), tmp,
            os.path.join(tmp, "tokenizer")} <= set(synced_then)
    assert str(tmp_path) in synced  # the rename itself
