"""`qzhou-jax plan` (target names, input checks before any compilation, compiled and estimated
plans) and the launchers in launch/ (local processes for real; SLURM with stub commands; the
TPU launcher as a dry run).

The TPU tests compile for abstract TPU devices through libtpu (the `tpu` extra, also in the
`test` extra on Linux x86-64); without a usable libtpu they are skipped with the reason.
"""

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
from collections import Counter

import pytest

from qzhou_jax import plan as plan_mod
from qzhou_jax.cli import main
from qzhou_jax.topology import parse_oom, parse_target
from qzhou_jax.train.config import load_run_config

TINY = {
    "model": {"preset": "tiny", "remat": "full"},
    "train": {"chunk_size": 8},
    "data": {"batch_size": 32, "hard_negatives": 3, "query_max_length": 32, "passage_max_length": 64,
             "datasets": [{"name": "ret", "task": "retrieval", "path": "/nonexistent/never-read.jsonl"}]},
}


def _yaml(tmp_path, data=None, name="run.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data or TINY))
    return str(path)


@pytest.fixture
def no_device_work(monkeypatch):
    """Fail the test if the planner gets as far as devices or compilation."""
    def refuse(*_a, **_k):
        raise AssertionError("bad input must be rejected before any device work or compilation")

    monkeypatch.setattr(plan_mod, "_local_devices", refuse)


def _tpu_or_skip():
    """Abstract v5p devices from libtpu, or skip with the reason."""
    from qzhou_jax.topology import libtpu_available, tpu_devices

    if not libtpu_available():
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): TPU compile tests skipped")
    try:
        return tpu_devices(parse_target("v5p-8"))
    except ValueError as e:
        pytest.skip(f"libtpu is installed but unusable here: {e}")


# ----------------------------------------------------------------- targets
@pytest.mark.parametrize("name, chips, hosts, topology, hbm, peak", [
    ("v5p-8", 4, 1, "v5p:2x2x1", 95, 459),      # v5p/v4: the number counts TensorCores, 2 per chip
    ("v5p-16", 8, 2, "v5p:2x2x2", 95, 459),
    ("v5p-64", 32, 8, "v5p:2x4x4", 95, 459),
    ("v4-32", 16, 4, "v4:2x2x4", 32, 275),
    ("v5e-32", 32, 8, "v5e:4x8", 16, 197),      # v5e/v6e: the number counts chips
    ("v5litepod-32", 32, 8, "v5e:4x8", 16, 197),
    ("v5e-8", 8, 1, "v5e:2x4", 16, 197),
    ("v6e-32", 32, 8, "v6e:4x8", 32, 918),
    ("V5P:2x2x2", 8, 2, "v5p:2x2x2", 95, 459),
])
def test_tpu_names(name, chips, hosts, topology, hbm, peak):
    t = parse_target(name)
    assert (t.num_devices, t.hosts, t.topology, t.hbm_gib, t.peak_tflops, t.platform) == \
        (chips, hosts, topology, hbm, peak, "tpu")


def test_v4_is_one_device_per_chip():
    assert ("chip_config_name", "megacore") in parse_target("v4-32").topology_kwargs


def test_gpu_and_cpu_names():
    t = parse_target("gpu:16xH100")
    assert (t.num_devices, t.hosts, t.hbm_gib, t.peak_tflops, t.platform) == (16, 2, 80, 989, "gpu")
    t = parse_target("gpu:8xh200", peak_tflops=795)
    assert (t.num_devices, t.hosts, t.peak_tflops) == (8, 1, 795)
    t = parse_target(None, devices=4, memory_gib=24)
    assert (t.num_devices, t.hbm_gib, t.peak_tflops) == (4, 24, None)
    assert parse_target("cpu:8").num_devices == 8


@pytest.mark.parametrize("name, words", [
    ("v9-8", ["unknown topology", "v5p-16"]),
    ("tpu", ["unknown topology"]),
    ("v5p-7", ["TensorCores", "even"]),
    ("v5p-12", ["no standard v5p slice of 6 chips", "v5p-16"]),
    ("v5e-3", ["no standard v5e slice"]),
    ("v5p:2x2", ["3 dimensions"]),
    ("gpu:8xB300", ["unknown GPU", "h100"]),
])
def test_unknown_topology(name, words):
    with pytest.raises(ValueError) as e:
        parse_target(name)
    for w in words:
        assert w in str(e.value)


# ------------------------------------------------------- bad input, early
def test_cli_bad_topology(tmp_path, capsys, no_device_work):
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "v7z-8"]) == 2
    err = capsys.readouterr().err
    assert "unknown topology 'v7z-8'" in err and "v5p-16" in err


@pytest.mark.parametrize("sets, words", [
    (["mesh.data=3", "mesh.fsdp=1"], ["multiply to 3", "4 devices", "v5p-8"]),
    (["mesh.data=3"], ["do not divide", "4 devices"]),
    (["data.batch_size=30", "train.chunk_size=0"], ["30 queries does not divide over the 4 data-parallel devices",
                                                    "fsdp=4"]),
])
def test_cli_bad_mesh_or_batch(tmp_path, capsys, no_device_work, sets, words):
    argv = ["plan", "--config", _yaml(tmp_path), "--topology", "v5p-8"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_batch_must_divide_over_hosts(no_device_work):
    # tensor=8 on v5p-16 (8 chips, 2 hosts): one data-parallel group, but each host loads n / 2 rows.
    run = load_run_config(data={**TINY, "mesh": {"data": 1, "fsdp": 1, "tensor": 8},
                                "train": {"chunk_size": 0}, "data": {**TINY["data"], "batch_size": 3}})
    with pytest.raises(ValueError, match="batch of 3 does not divide over the 2 hosts"):
        plan_mod.make_plan(run, parse_target("v5p-16"))


def test_bad_chunk_and_numbers(tmp_path, capsys, no_device_work):
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "cpu:8", "--set", "train.chunk_size=6"]) == 2
    assert "chunk_size (from --set train.chunk_size=6): 6 does not divide" in capsys.readouterr().err
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "cpu:8", "--mfu", "0"]) == 2
    assert "--mfu" in capsys.readouterr().err
    assert main(["plan", "--config", _yaml(tmp_path), "--devices", "8"]) == 2
    assert "--memory-gib" in capsys.readouterr().err
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "v5p-8", "--devices", "8"]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_small_chunk_warns():
    run = load_run_config(data={**TINY, "train": {"chunk_size": 4}})
    _, _, warnings = plan_mod.check_inputs(run, parse_target("cpu:8"))
    assert any("4 queries and 16 passages does not divide over the 8 data-parallel devices: each device embeds "
               "4 queries and 2 passages" in w for w in warnings), warnings


# ------------------------------------------------------ plans on this CPU
def test_cpu_compiled_plan_matches_state_shards(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "cpu:8", "--memory-gib", "4",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compiled" in text and "verdict  fits" in text
    d = json.loads(out.read_text())
    (step,) = d["steps"]
    assert d["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and d["fits"]
    assert step["method"] == "compiled" and step["fit"] == "yes"
    # XLA:CPU does not pad: the compiled arguments are exactly the train state shard
    # (computed from the shardings) plus this device's batch rows (int32 ids and masks, and the
    # text keys: one per query and per passage).
    batch = (4 * 2 * (32 * 32 + 32 * 4 * 64) + 4 * (32 + 32 * 4)) // 8
    assert step["argument_bytes"] == step["state_bytes"] + batch
    assert step["peak_bytes"] == (step["argument_bytes"] + step["output_bytes"] - step["alias_bytes"]
                                  + step["temp_bytes"] + step["code_bytes"])
    assert step["model_flops"] > 0 and step["estimate"]["peak"] > 0


def test_estimate_holds_heads_that_tensor_does_not_split(tmp_path):
    """6 heads over tensor=4 stay whole on each device (the rules leave a dimension the axis
    does not divide unsplit), and so do their float32 attention scores: the estimate counted
    a quarter of them and came out at a third of the compiled program's peak."""
    for heads, kv in ((6, 2), (8, 4)):
        model = dict(preset="tiny", hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, compute_dtype="float32", remat="full")
        run = dict(TINY, model=model, mesh={"data": 1, "fsdp": 1, "tensor": 4}, train={"chunk_size": 0},
                   data=dict(TINY["data"], batch_size=4, hard_negatives=1, query_max_length=16,
                             passage_max_length=512))
        (step,) = plan_mod.make_plan(load_run_config(_yaml(tmp_path, run)), parse_target("cpu:4", memory_gib=64)).steps
        assert 0.85 < step.estimate["peak"] / step.peak_bytes < 1.2, (heads, step.estimate, step.peak_bytes)


def test_does_not_fit_suggests(tmp_path, capsys):
    cfg = _yaml(tmp_path, {**TINY, "model": {"preset": "tiny", "remat": "none"}, "train": {"chunk_size": 0},
                           "mesh": {"data": 2, "fsdp": -1, "tensor": 1}})
    assert main(["plan", "--config", cfg, "--topology", "cpu:8", "--memory-gib", "0.0001", "--estimate"]) == 1
    out = capsys.readouterr().out
    assert "verdict  does not fit" in out
    for hint in ("--set model.remat=full", "--set train.chunk_size=8", "--set mesh.data=1 --set mesh.fsdp=-1",
                 "--set train.mu_dtype=bfloat16"):
        assert hint in out, out
    assert main(["plan", "--config", cfg, "--topology", "cpu:8", "--memory-gib", "0.0001", "--estimate",
                 "--set", "train.mu_dtype=bfloat16"]) == 1
    assert "train.mu_dtype" not in capsys.readouterr().out


def test_the_chunk_suggestion_is_the_largest_chunk_that_fits():
    """Paper stage 1 at 1.5B on one H100 needs 103% of the memory with GradCache chunks of 32;
    the suggestion is the largest smaller chunk that fits (fewest passes), not a chunk of 1."""
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "stage1-qwen2.5-1.5b.yaml")

    def plan(*sets):
        run = load_run_config(config, ["model.attention_impl=cudnn", *sets])
        return plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True)

    p = plan()
    assert not p.fits and p.chunk_size == 32
    (hint,) = [h for h in p.suggestions if "train.chunk_size" in h]
    chunk = int(re.match(r"--set train.chunk_size=(\d+) ", hint).group(1))
    assert chunk == 16 and "the largest that fits" in hint
    assert plan(f"train.chunk_size={chunk}").verdict == "fits"


def test_chunk_fit_with_datasets_of_other_batch_sizes():
    """A dataset whose batch is not above the chunk runs without GradCache: it does not rule the
    chunk out."""
    data = {**TINY["data"], "datasets": [{"name": "big", "task": "retrieval", "path": "/nonexistent/a.jsonl"},
                                         {"name": "small", "task": "retrieval", "path": "/nonexistent/b.jsonl",
                                          "batch_size": 8}]}
    run = load_run_config(data={**TINY, "train": {"chunk_size": 0}, "data": data})
    plan = plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True)
    assert sorted(sp.shape.n for sp in plan.steps) == [8, 32]
    assert plan_mod._fits_with_chunk(run, plan, 16) and not plan_mod._fits_with_chunk(run, plan, 12)


def test_tensor_suggestion_keeps_the_rows_per_device(tmp_path, capsys):
    """Splitting heads over 2 devices halves the data-parallel devices; the suggestion halves the
    GradCache chunk with it, or each device would embed twice the rows per chunk."""
    cfg = _yaml(tmp_path, {**TINY, "train": {"chunk_size": 16}, "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    assert main(["plan", "--config", cfg, "--topology", "cpu:8", "--memory-gib", "0.0001", "--estimate"]) == 1
    assert "--set mesh.tensor=2 --set mesh.fsdp=-1 --set train.chunk_size=8  (" in capsys.readouterr().out


@pytest.mark.parametrize("kept, per_chunk_gib, compiled_gib", [(2, 1.315, 4.49), (4, 1.315, 7.34), (8, 1.3175, 13.44)])
def test_kept_chunk_cost_covers_compiled_tpu_programs(kept, per_chunk_gib, compiled_gib):
    """What `plan`'s keep_chunks suggestion budgets covers what the TPU compiler needed (stage-1
    1.5b: v5e-16 with 2 and 4 kept chunks, v5p-32 with 8), without doubling it; an estimate
    (GPU) plan budgets the saved inputs alone, as measured on an H100."""
    gib = 2**30
    cost = plan_mod._kept_cost(kept, 0, per_chunk_gib * gib, compiled=True) / gib
    assert compiled_gib <= cost < 1.3 * compiled_gib
    assert plan_mod._kept_cost(kept, 0, gib, compiled=False) == kept * gib


def test_gpu_target_without_gpus_is_an_estimate(tmp_path, capsys):
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "gpu:8xH100"]) == 0
    out = capsys.readouterr().out
    assert "estimate" in out and "cannot be compiled on this machine" in out
    assert "989 TFLOP/s" in out and "step @ MFU 0.5" in out


def test_estimate_parts():
    run = load_run_config(data={**TINY, "model": {"preset": "qwen2.5-7b", "remat": "full"},
                                "train": {"chunk_size": 32},
                                "data": {**TINY["data"], "batch_size": 256, "hard_negatives": 4,
                                         "query_max_length": 256, "passage_max_length": 1536}})
    p = plan_mod.make_plan(run, parse_target("v5p-64"), estimate=True)
    (s,) = p.steps
    params = run.model_config.num_params()
    # float32 params + two AdamW moments, over 32 chips (a few small leaves replicated).
    assert s.state_bytes == pytest.approx(12 * params / 32, rel=0.01)
    assert s.estimate["peak"] == s.peak_bytes and s.method == "estimate"
    assert s.model_flops == pytest.approx(256 * (256 + 5 * 1536) * 6 * run.model_config.num_params(False), rel=0.1)
    assert s.step_seconds == pytest.approx(s.model_flops / (32 * 459e12 * 0.5))


def test_parse_oom():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(597.14G) exceeds available HBM (15.75G).")
    assert parse_oom(msg) == {"required_gib": 597.14, "available_gib": 15.75, "temporaries_only": 1.0}
    assert parse_oom(msg.replace("597.14G", "2.5T"))["required_gib"] == 2560
    assert parse_oom("something else") is None


# ------------------------------------------------------- TPU, via libtpu
def test_tiny_plan_on_v5p_8_compiles(tmp_path, capsys):
    devices = _tpu_or_skip()
    from qzhou_jax.topology import compiler_hbm_gib

    assert 90 < compiler_hbm_gib(devices[0]) <= 96  # the compiler's own limit for a v5p chip
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", _yaml(tmp_path), "--topology", "v5p-8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "v5p-8: 4 x TPU v5p" in text and "compiled" in text and "TPU compiler's limit" in text
    d = json.loads(out.read_text())
    (step,) = d["steps"]
    assert d["target"]["topology"] == "v5p:2x2x1" and d["mesh"]["fsdp"] == 4
    assert step["method"] == "compiled" and step["compile_seconds"] > 0 and 0 < step["peak_gib"] < 1
    assert step["step_seconds"] > 0 and d["verdict"] == "fits"


_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = \(?(.+?)\)? (all-gather|all-reduce|reduce-scatter)(?:-start)?\("
                         r".*?op_name=\"([^\"]*)\"")


def _layer_loop_collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, dtype) of each multi-dimensional collective inside a loop of a compiled program."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if m and "/while/body/" in m.group(3):
            out += [(m.group(2), dt) for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)) if "," in dims]
    return out


def _compile_tpu_step(mesh_shape, chunk_size=0, rows=16, length=64, **model):
    """The train step of a small model compiled for abstract v5p-8 devices (skips without libtpu)."""
    import jax
    import jax.numpy as jnp

    from qzhou_jax import sharding
    from qzhou_jax.config import ModelConfig
    from qzhou_jax.train.optim import TrainConfig, make_optimizer
    from qzhou_jax.train.step import make_train_step

    devices = _tpu_or_skip()
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), devices)
    cfg = ModelConfig.preset("tiny", **{"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
                                        "remat": "full", **model})
    tx = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=1, total_steps=10, chunk_size=chunk_size))
    state = plan_mod.abstract_train_state(cfg, tx, mesh)
    batch = {k: jax.ShapeDtypeStruct((n, length), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
             for k, n in (("q_ids", rows), ("q_mask", rows), ("p_ids", 2 * rows), ("p_mask", 2 * rows))}
    step = make_train_step(cfg, tx, "retrieval", mesh=mesh, chunk_size=chunk_size)
    with sharding.use_mesh(mesh):
        return step.jitted.lower(state, batch).compile()


@pytest.mark.parametrize("compute_dtype, chunk_size", [("bfloat16", 0), ("bfloat16", 4), ("float32", 0)])
def test_fsdp_gathers_layer_weights_in_the_compute_dtype_on_tpu(compute_dtype, chunk_size):
    """The float32 master weights are cast before they cross the network: XLA moves the cast
    ahead of the FSDP all-gather (its CollectiveQuantizer pass, which the TPU and GPU compilers
    run and the CPU compiler does not), so every layer's weights travel in bfloat16, GradCache's
    passes included. A float32 step (full matmul precision, as in these tests) gathers float32,
    which shows the check reads the dtypes."""
    hlo = _compile_tpu_step((1, 4, 1), chunk_size, compute_dtype=compute_dtype).as_text()
    gathers = [dt for kind, dt in _layer_loop_collectives(hlo) if kind == "all-gather" and dt[0] in "bf"]
    assert len(gathers) >= 7, "every layer weight matrix is gathered inside the layer scan"
    assert set(gathers) == {"bf16" if compute_dtype == "bfloat16" else "f32"}


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_float32_weight_gradients_are_summed_over_devices_in_float32_on_tpu(chunk_size):
    """Without the option, the layers' weight and bias gradients are summed over the
    data-parallel devices in bfloat16 (the dtype the weight-gradient matmuls write); with
    `weight_grad_dtype: float32` every reduction of the layer loop is float32, the biases'
    too, and the weights are still gathered in bfloat16."""
    reductions = {"all-reduce", "reduce-scatter"}
    programs = {}

    def loop_collectives(**model):
        hlo = _compile_tpu_step((2, 2, 1), chunk_size, compute_dtype="bfloat16", **model).as_text()
        programs[bool(model)] = hlo
        return [(kind, dt) for kind, dt in _layer_loop_collectives(hlo) if dt[0] in "bf"]

    narrow, wide = loop_collectives(), loop_collectives(weight_grad_dtype="float32")
    # 2 layers, 8 query and 2 key/value heads of 16: the q, k, v biases, stacked or one layer's
    bias_shapes = {f"{lead}{h},16" for lead in ("", "1,", "2,") for h in (8, 2)}
    for wide_grads, want in ((False, "bf16"), (True, "f32")):
        summed = [(dt, dims) for line in programs[wide_grads].splitlines() if (m := _COLLECTIVE.match(line))
                  and m.group(2) in reductions for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
        biases = {dt for dt, dims in summed if dims in bias_shapes}
        assert biases == {want}, (wide_grads, summed)
    assert sum(k in reductions and dt == "bf16" for k, dt in narrow) >= 7, narrow
    assert [dt for k, dt in wide if k in reductions] and all(dt == "f32" for k, dt in wide if k in reductions), wide
    gathers = [Counter(dt for k, dt in c if k == "all-gather") for c in (narrow, wide)]
    assert gathers[0]["bf16"] >= 7 and gathers[0] == gathers[1], gathers


def test_splash_attention_compiles_for_tpu_and_keeps_no_score_matrix():
    """attention_impl 'splash' lowers to the Pallas TPU kernel (Mosaic custom calls, forward and
    backward) inside shard_map over rows and heads, and drops the [rows, heads, seq, seq] float32
    scores that XLA attention keeps (8 rows x 1 head x 1024^2 x 4 bytes = 32 MiB per chip here)."""
    import jax

    shape = dict(mesh_shape=(1, 2, 2), rows=4, length=1024, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="rejects float32 contraction of 16-bit operands"):
        _compile_tpu_step(attention_impl="splash", **shape)  # these tests' 'highest' default precision
    with jax.default_matmul_precision("default"):
        splash = _compile_tpu_step(attention_impl="splash", **shape)
        xla = _compile_tpu_step(attention_impl="xla", **shape)
    assert 'custom_call_target="tpu_custom_call"' in splash.as_text()
    saved = xla.memory_analysis().temp_size_in_bytes - splash.memory_analysis().temp_size_in_bytes
    assert saved > 12 << 20, saved  # 15.2 MiB as compiled by libtpu with jax 0.10.2


def test_tpu_compiler_refusal_is_does_not_fit(tmp_path, capsys):
    _tpu_or_skip()
    # No remat, no GradCache: 512 x 6 sequences of up to 2048 tokens on one 16 GiB v5e chip.
    cfg = _yaml(tmp_path, {"model": {"preset": "tiny", "remat": "none"},
                           "data": {"batch_size": 512, "hard_negatives": 4, "query_max_length": 256,
                                    "passage_max_length": 2048,
                                    "datasets": [{"name": "r", "task": "retrieval", "path": "/nonexistent"}]}})
    assert main(["plan", "--config", cfg, "--topology", "v5e:1x1", "--json", str(tmp_path / "p.json")]) == 1
    out = capsys.readouterr().out
    assert "the compiler refused it" in out and "does not fit" in out
    assert "--set model.remat=full" in out and "--set model.attention_impl=splash" in out
    # the largest chunk that fits by the compiled peak scaled with the chunk, not a chunk of 1
    # (outside pytest's 8 CPU devices, chunk 8 compiles to 82% of this chip and chunk 16 to 132%)
    chunk = int(re.search(r"--set train.chunk_size=(\d+)  \(GradCache: .* the largest that fits", out).group(1))
    assert 4 <= chunk <= 16
    # the compiler's figure counts temporaries alone; the peak adds the train state and the batch
    (step,) = json.loads((tmp_path / "p.json").read_text())["steps"]
    assert step["temp_bytes"] == int(parse_oom(step["error"])["required_gib"] * 2**30)
    assert step["argument_bytes"] > step["state_bytes"] > 0
    assert step["peak_bytes"] == step["temp_bytes"] + step["argument_bytes"]


def test_tpu_missing_libtpu_message(monkeypatch):
    import qzhou_jax.topology as topo

    monkeypatch.setattr(topo, "libtpu_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs libtpu: pip install 'qzhou-jax\[tpu\]'"):
        topo.tpu_devices(parse_target("v5p-8"))


# ------------------------------------------------------------- launchers
LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _sh(args, env=None, cwd=None, timeout=120):
    full = {**os.environ, **(env or {})}
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=timeout)


@needs_bash
@pytest.mark.parametrize("script", ["local.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_launcher_help(script):
    r = _sh([LAUNCH / script, "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout


@needs_bash
def test_local_launcher_joins_processes(tmp_path):
    check = tmp_path / "check.py"
    check.write_text(
        "import os, jax\n"
        "jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], int(os.environ['JAX_NUM_PROCESSES']),\n"
        "                           int(os.environ['JAX_PROCESS_ID']))\n"
        "from jax.experimental import multihost_utils\n"
        "import jax.numpy as jnp\n"
        "ids = multihost_utils.process_allgather(jnp.array([jax.process_index()])).ravel().tolist()\n"
        "print(f'process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, '\n"
        "      f'{jax.local_device_count()} local, ids {ids}')\n")
    port = 20000 + os.getpid() % 20000
    r = _sh([LAUNCH / "local.sh", "-n", 2, "-d", 2, "-p", port, "--logs", tmp_path / "logs", "--python",
             sys.executable, "--exec", "--", sys.executable, check], timeout=180)
    assert r.returncode == 0, r.stderr
    for i in range(2):
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 2: 4 devices, 2 local, ids [0, 1]" in log, log
    bad = _sh([LAUNCH / "local.sh", "-n", 2, "--logs", tmp_path / "bad", "--exec", "--", "false"])
    # both fail at once: whichever the launcher sees first is named
    assert bad.returncode == 1 and re.search(r"process [01] exited with status 1", bad.stderr), bad.stderr


@needs_bash
def test_local_launcher_passes_sigterm_on_and_stops_stuck_processes(tmp_path):
    """SIGTERM to the launcher reaches every process, and the launcher returns their status
    (75, a preemption) once they have finished saving; a process whose peer crashed and that
    does not stop on SIGTERM (stuck in a collective) is killed after LOCAL_SH_GRACE seconds."""
    import signal
    import time

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys, time\n"
        "mode, out, i = sys.argv[1], sys.argv[2], int(os.environ['JAX_PROCESS_ID'])\n"
        "def save(signum, _):\n"
        "    time.sleep(1.0)\n"
        "    open(os.path.join(out, f'saved_{i}'), 'w').close()\n"
        "    os._exit(75 if signum == signal.SIGTERM else 130)\n"
        "if mode == 'term':\n"
        "    signal.signal(signal.SIGTERM, save)\n"
        "    signal.signal(signal.SIGINT, save)\n"
        "else:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(os.path.join(out, f'started_{i}'), 'w').close()\n"
        "if mode == 'crash' and i == 0:\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(3)\n"
        "time.sleep(60)\n")
    base = ["bash", str(LAUNCH / "local.sh"), "-n", "2", "--logs", str(tmp_path / "logs"), "--exec", "--",
            sys.executable, str(worker)]
    # the launcher only (`kill <pid>`), then the whole process group (Slurm, a VM shutdown, Ctrl-C):
    # every process saves before the launcher returns their status
    for how, sig, status in (("pid", signal.SIGTERM, 75), ("group", signal.SIGTERM, 75),
                             ("group", signal.SIGINT, 130)):
        out = tmp_path / f"{how}_{sig.name}"
        out.mkdir()
        proc = subprocess.Popen(base + ["term", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        deadline = time.time() + 30
        while not all((out / f"started_{i}").exists() for i in range(2)) and time.time() < deadline:
            time.sleep(0.1)
        if how == "pid":
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == status, (how, sig, err)
        assert all((out / f"saved_{i}").exists() for i in range(2)), (how, sig, err)
    start = time.time()
    r = subprocess.run(base + ["crash", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LOCAL_SH_GRACE": "1"})
    assert r.returncode == 3 and "process 0 exited with status 3" in r.stderr, r.stderr
    assert time.time() - start < 20


@needs_bash
def test_slurm_script_environment(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    files = {
        # srun: run the task once per SLURM task, in parallel, like a one-node allocation.
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\npids=()\n'
                'for ((i=0;i<SLURM_NTASKS;i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done\n'
                'rc=0; for p in "${pids[@]}"; do wait $p || rc=$?; done; exit $rc\n',
        "scontrol": '#!/usr/bin/env bash\nif [[ $1 == show ]]; then printf "nodeA\\nnodeB\\n"; '
                    'else echo "scontrol $*" >> "$STUB_LOG"; fi\n',
        "nvidia-smi": '#!/usr/bin/env bash\nfor i in 0 1; do echo "GPU $i"; done\n',
        "qzhou-jax": '#!/usr/bin/env bash\necho "id=$JAX_PROCESS_ID n=$JAX_NUM_PROCESSES '
                     'coord=$JAX_COORDINATOR_ADDRESS local=$JAX_LOCAL_DEVICE_IDS cpus=$SRUN_CPUS_PER_TASK '
                     'args=$*" >> "$STUB_LOG"\n'
                     '[[ -n "${STUB_MARK:-}" ]] && touch "$QZ_PREEMPTED_MARKER"\n'
                     '[[ $JAX_PROCESS_ID == 0 ]] && exit ${STUB_RC:-0}; exit 0\n',
    }
    for name, text in files.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(stat.S_IRWXU)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "node[A-B]", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(tmp_path)}
    r = _sh([LAUNCH / "slurm_gpu.sbatch", "--config", "c.yaml"], env=env)
    assert r.returncode == 0, r.stderr
    lines = sorted(log.read_text().splitlines())
    assert lines == [f"id={i} n=2 coord=nodeA:24321 local={i} cpus=8 args=train --config c.yaml" for i in range(2)]

    # One process per node; stopped for the time limit (75): requeued, and the rerun resumes.
    log.unlink()
    env.update(SLURM_NTASKS_PER_NODE="1", STUB_RC="75")
    r = _sh([LAUNCH / "slurm_gpu.sbatch", "--config", "c.yaml"], env=env)
    assert r.returncode == 0 and "scontrol requeue 4321" in log.read_text()
    assert "local=0,1 cpus=8 args=train --config c.yaml" in log.read_text()
    # the trainer saved for a preemption but srun reports a killed task's 137: still requeued
    log.unlink()
    env.update(STUB_RC="137", STUB_MARK="1", TMPDIR=str(tmp_path))
    r = _sh([LAUNCH / "slurm_gpu.sbatch", "--config", "c.yaml"], env=env)
    assert r.returncode == 0 and "scontrol requeue 4321" in log.read_text(), r.stderr
    assert not list(tmp_path.glob("qzhou-preempted-*"))
    log.unlink()
    env.update(SLURM_RESTART_COUNT="1", STUB_RC="3", STUB_MARK="")
    r = _sh([LAUNCH / "slurm_gpu.sbatch", "--config", "c.yaml"], env=env)
    assert r.returncode == 3 and "args=train --config c.yaml --resume" in log.read_text()


def test_a_one_task_slurm_step_is_one_process_with_all_its_gpus(monkeypatch, caplog):
    """`srun --gres=gpu:8 --pty bash`, then a command: JAX's SLURM detection would make it process
    0 of 1 with only SLURM_LOCALID's GPU; it stays an ordinary single process."""
    import jax

    from qzhou_jax import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID",
              "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    sharding.maybe_initialize_distributed()
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # the batch script itself, run without srun
    sharding.maybe_initialize_distributed()
    assert calls == []
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # the same, where Slurm sets no step variables
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    with caplog.at_level("WARNING", logger="qzhou_jax.sharding"):
        sharding.maybe_initialize_distributed()
    assert calls == [] and "not started by srun (SLURM_STEP_NODELIST unset)" in caplog.text
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # an srun step of 8 tasks: JAX's detection
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02]")
    sharding.maybe_initialize_distributed()
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


@needs_bash
def test_tpu_launcher_dry_run(tmp_path):
    r = _sh([LAUNCH / "tpu_pod.sh", "run", "--dry-run", "--name", "qz", "--zone", "us-east5-a", "--type", "v5e-32",
             "--provisioning", "queued-spot", "--config", "configs/stage1-qwen2.5-7b.yaml", "--set",
             "out_dir=/mnt/gcs/r", "--env", "QZHOU_DATA=/mnt/my data"],
            env={"QZ_KEEP_WORK": "1", "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert ("gcloud compute tpus queued-resources create qz --zone us-east5-a --node-id qz --accelerator-type "
            "v5litepod-32 --runtime-version v2-alpha-tpuv5-lite --spot") in r.stderr
    assert "--worker all --command bash\\ ~/qzhou-start.sh" in r.stderr
    (work,) = tmp_path.glob("qzhou-tpu.*")
    start = (work / "qzhou-start.sh").read_text()
    assert "ARGS=(train --config configs/stage1-qwen2.5-7b.yaml --set out_dir=/mnt/gcs/r )" in start
    assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in start
    assert "export QZHOU_DATA=/mnt/my\\ data\n" in start  # the configs' $QZHOU_DATA on every worker
    r = _sh([LAUNCH / "tpu_pod.sh", "run", "--dry-run", "--name", "qz", "--zone", "z", "--env", "no value"])
    assert r.returncode == 2 and "--env: expected NAME=VALUE" in r.stderr
    names = subprocess.run(["tar", "-tzf", str(work / "qzhou-jax.tgz")], capture_output=True, text=True).stdout
    assert "qzhou_jax/plan.py" in names.split()
    r = _sh([LAUNCH / "tpu_pod.sh", "up", "--name", "qz"])
    assert r.returncode == 2 and "--zone is required" in r.stderr
    # the config is checked before a slice is created: given, shipped, and accepted by `train`
    run = [LAUNCH / "tpu_pod.sh", "run", "--dry-run", "--name", "qz", "--zone", "z", "--type", "v5e-32"]
    bindir = os.path.dirname(sys.executable)
    cases = [([], "--config is required"), (["--config", "configs/nope.yaml"], "no such file")]
    if os.path.isfile(os.path.join(bindir, "qzhou-jax")):  # the local check runs where the command is installed
        cases.append((["--config", "configs/stage1-qwen2.5-7b.yaml", "--set", "out_dir=gs://b/r"],
                      "out_dir (from --set out_dir=gs://b/r): 'gs://b/r' is a URL"))
    for extra, words in cases:
        r = _sh(run + extra, env={"PATH": f"{bindir}:{os.environ.get('PATH', '')}"})
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert "create" not in r.stderr
    r = _sh(run + ["--config", "configs/stage1-qwen2.5-7b.yaml", "--set", "out_dir=gs://b/r", "--skip-config-check"],
            env={"PATH": f"{bindir}:{os.environ.get('PATH', '')}", "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and "queued-resources create" in r.stderr, r.stderr


def test_executed_flops_count_the_rematted_share():
    from qzhou_jax.config import ModelConfig

    cfg = ModelConfig.preset("qwen2.5-1.5b", remat="full")
    assert plan_mod._executed_flops(6.0, cfg, gradcache=False) == pytest.approx(8.0)
    assert plan_mod._executed_flops(6.0, cfg.replace(remat_layers=14), gradcache=False) == pytest.approx(7.0)
    assert plan_mod._executed_flops(6.0, cfg.replace(remat_layers=0), gradcache=True) == pytest.approx(8.0)
    assert plan_mod._executed_flops(6.0, cfg.replace(remat="mlp"), gradcache=False) == pytest.approx(6.0)
    # GradCache chunks that keep their layer inputs skip the second forward, whatever the remat.
    assert plan_mod._executed_flops(6.0, cfg, gradcache=True, kept=0.5) == pytest.approx(9.0)
    assert plan_mod._executed_flops(6.0, cfg.replace(remat="dots"), gradcache=True, kept=1.0) == pytest.approx(8.0)


def test_estimate_counts_kept_chunks():
    """Each kept GradCache chunk holds (layers + 1) hidden states per token until the second pass."""
    data = {**TINY["data"], "batch_size": 256, "hard_negatives": 4, "query_max_length": 512,
            "passage_max_length": 512}
    plans = {}
    for keep in (0, 12, -1, 100):
        run = load_run_config(data={**TINY, "model": {"preset": "qwen2.5-1.5b", "remat": "full"},
                                    "train": {"chunk_size": 8, "keep_chunks": keep}, "data": data})
        plans[keep] = plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True)
    cfg = run.model_config
    per_chunk = 8 * 6 * 512 * (cfg.num_hidden_layers + 1) * cfg.hidden_size * 2
    base = plans[0].steps[0]
    assert base.estimate["kept_chunks"] == 0
    assert plans[12].steps[0].estimate["kept_chunks"] == 12 * per_chunk
    assert plans[-1].steps[0].estimate["kept_chunks"] == 32 * per_chunk
    assert plans[12].steps[0].peak_bytes - base.peak_bytes == 12 * per_chunk
    assert plans[12].steps[0].executed_flops < base.executed_flops
    assert "12 of 32 chunks keep their layer inputs" in plans[12].format()
    assert "32 of 32 chunks keep" in plans[-1].format() and "32 of 32 chunks keep" in plans[100].format()
    assert not plans[-1].fits
    assert any("train.keep_chunks=0" in s for s in plans[-1].suggestions) and not plans[-1].speedups
    # A plan that fits offers its unused memory (below the 5% headroom) as kept chunks: 20 of
    # 32 on one H100 (the setting measured at 73.7 GiB, bench/RESULTS.md).
    for keep in (0, 12):
        (hint,) = plans[keep].speedups
        assert hint.startswith("--set train.keep_chunks=20  (GradCache: 20 of 32 chunks")
        peak = plans[keep].steps[0].peak_bytes + (20 - keep) * per_chunk
        assert peak <= 0.95 * plans[keep].limit_gib * 2**30 < peak + per_chunk
    assert "to make it faster, try" in plans[0].format()


@pytest.mark.parametrize("preset,queries,negatives,length,model,train,measured_gib", [
    ("qwen2.5-0.5b", 32, 3, 256, {}, {}, 11.6),
    ("qwen2.5-1.5b", 16, 3, 256, {}, {}, 26.4),
    ("qwen2.5-1.5b", 16, 3, 256, {"remat_layers": 14}, {}, 39.3),
    ("qwen2.5-1.5b", 16, 3, 256, {"remat_layers": 16}, {}, 44.6),
    ("qwen2.5-1.5b", 256, 4, 512, {"remat_layers": 14}, {"chunk_size": 8}, 48.5),
    ("qwen2.5-1.5b", 256, 4, 512, {}, {"chunk_size": 8, "keep_chunks": 20}, 73.7),
    # unrolled layers, measured on one H200 (the same compiler as the H100's), less the
    # float32 copy of the layer weights live at those programs' peaks (4.7 GiB by
    # bench/hlo_liveness.py), which unrolled layers no longer make
    ("qwen2.5-1.5b", 16, 3, 256, {"remat_layers": 14, "scan_layers": False}, {}, 36.9 - 4.7),
    ("qwen2.5-1.5b", 16, 3, 256, {"remat_layers": 12, "scan_layers": False}, {}, 38.5 - 4.7),
    ("qwen2.5-1.5b", 16, 3, 256, {"remat_layers": 10, "scan_layers": False}, {}, 40.1 - 4.7),
    ("qwen2.5-1.5b", 16, 3, 256, {"remat": "dots", "scan_layers": False}, {}, 48.3 - 4.7),  # before the split
])
def test_gpu_estimate_against_h100_measurements(preset, queries, negatives, length, model, train, measured_gib):
    """The analytic GPU estimate against peaks measured on one H100 or H200 (bench/RESULTS.md,
    "Train step"); for unrolled layers, those peaks less the weight copy the current code no
    longer makes (derived figures, see the parameter list)."""
    data = {**TINY["data"], "batch_size": queries, "hard_negatives": negatives, "query_max_length": length,
            "passage_max_length": length}
    run = load_run_config(data={**TINY, "model": {"preset": preset, "remat": "full", "attention_impl": "cudnn",
                                                  **model},
                                "train": train, "data": data})
    (step,) = plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True).steps
    assert step.method == "estimate"
    assert step.peak_bytes / 2**30 == pytest.approx(measured_gib, rel=0.05)


def test_gpu_plans_offer_unrolled_layers_when_some_keep_their_matmul_outputs():
    data = {**TINY["data"], "batch_size": 16, "hard_negatives": 3, "query_max_length": 256,
            "passage_max_length": 256}

    def plan(target, **model):
        run = load_run_config(data={**TINY, "model": {"preset": "qwen2.5-1.5b", "remat": "full",
                                                      "attention_impl": "cudnn", **model}, "data": data})
        return plan_mod.make_plan(run, parse_target(target), estimate=True)

    hint = "--set model.scan_layers=false"
    p = plan("gpu:1xH100", remat_layers=14)
    assert p.fits and p.speedups[0].startswith(hint)
    p = plan("gpu:1xH100", remat_layers=12, scan_layers=True)
    assert p.fits and p.speedups[0].startswith(hint)
    p = plan("gpu:1xH100", remat_layers=12, scan_layers=False)
    assert not any(s.startswith(hint) for s in p.speedups)
    p = plan("gpu:1xH100")  # every layer rematted: nothing is copied through the scan
    assert not any(s.startswith(hint) for s in p.speedups)
    p = plan("gpu:1xH100", remat_layers=0, scan_layers=True)  # 28 "dots" layers: 49 GiB measured
    assert any(s.startswith(hint) for s in p.speedups + p.suggestions)
    p = plan("cpu:1", remat_layers=14)
    assert not any(s.startswith(hint) for s in p.speedups + p.suggestions)


def test_no_speedup_hint_without_remat_full_or_gradcache():
    for model, train in (({"remat": "dots"}, {"chunk_size": 8}), ({"remat": "full"}, {"chunk_size": 0})):
        run = load_run_config(data={**TINY, "model": {"preset": "tiny", **model}, "train": train})
        plan = plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True)
        assert plan.fits and not [s for s in plan.speedups if "keep_chunks" in s]
        # remat "dots" keeps every layer's matmul outputs: on GPU, unrolled layers are the hint
        assert [s.split()[1] for s in plan.speedups] == (["model.scan_layers=false"] if model["remat"] == "dots"
                                                         else [])


def test_keep_chunks_config_needs_remat_full():
    from qzhou_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.keep_chunks: 2 saves work only with model.remat 'full'.*'dots'"):
        load_run_config(data={**TINY, "model": {"preset": "tiny", "remat": "dots"},
                              "train": {"chunk_size": 8, "keep_chunks": 2}})


def test_gpu_estimate_for_unrolled_layers_holds_the_joined_gradient():
    """Unrolled layers' gradients join into one float32 gradient before the update: however
    small the batch, the estimate is at least the state and that gradient."""
    data = {**TINY["data"], "batch_size": 8, "hard_negatives": 1, "query_max_length": 32, "passage_max_length": 32}
    run = load_run_config(data={**TINY, "model": {"preset": "qwen2.5-1.5b", "remat": "full",
                                                  "attention_impl": "cudnn", "scan_layers": False},
                                "data": data})
    (step,) = plan_mod.make_plan(run, parse_target("gpu:1xH100"), estimate=True).steps
    gradient = run.model_config.num_params() * 4
    assert step.peak_bytes >= step.estimate["state"] + gradient
    assert step.estimate["gradients"] < gradient  # during the backward pass: the embedding's only
    # float32 weight gradients: one float32 layer gradient more at the backward pass's peak
    run32 = load_run_config(data={**TINY, "model": {"preset": "qwen2.5-1.5b", "remat": "full",
                                                    "attention_impl": "cudnn", "scan_layers": False,
                                                    "weight_grad_dtype": "float32"},
                                  "data": data})
    (step32,) = plan_mod.make_plan(run32, parse_target("gpu:1xH100"), estimate=True).steps
    cfg = run.model_config
    layer = (cfg.num_params(include_embedding=False) - cfg.hidden_size) * 4 / cfg.num_hidden_layers
    assert step32.estimate["gradients"] - step.estimate["gradients"] == pytest.approx(layer, abs=2)


@pytest.mark.parametrize("target,mesh_cfg", [("v5e-32", dict(data=1, fsdp=-1, tensor=1)),
                                             ("v5e-32", dict(data=1, fsdp=-1, tensor=8)),
                                             ("v5p-64", dict(data=2, fsdp=-1, tensor=4))])
def test_host_rows_are_the_rows_each_hosts_devices_hold(target, mesh_cfg):
    """On a pod slice, each host builds exactly the batch rows its devices hold, in global order,
    also when a tensor axis spans hosts (hosts then share rows) or the rows are not one block."""
    from qzhou_jax import sharding
    from qzhou_jax.data.pipeline import HostRows
    from qzhou_jax.topology import libtpu_available, tpu_devices

    if not libtpu_available():
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): TPU layout test skipped")
    try:
        devices = tpu_devices(parse_target(target))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"libtpu is installed but unusable here: {e}")
    mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_cfg), devices)
    n = 512
    held = sharding.batch_sharding(mesh, 1).devices_indices_map((n,))
    covered = set()
    for p in sorted({d.process_index for d in devices}):
        host = HostRows.from_mesh(mesh, process_index=p)
        want = sorted({r for d, idx in held.items() if d.process_index == p for r in range(*idx[0].indices(n))})
        assert host.rows(n).tolist() == want and host.global_rows(len(want)) == n
        covered.update(want)
    assert covered == set(range(n))
