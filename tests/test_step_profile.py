"""bench/step_profile.py: a traced train step is broken down by kind of work and phase."""

import pathlib
import sys

import jax
import numpy as np
import pytest

from qzhou_jax import sharding
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import create_model
from qzhou_jax.train import TrainConfig, Trainer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import step_profile  # noqa: E402


def test_traced_train_step_is_attributed(tmp_path):
    cfg = ModelConfig.preset("tiny", compute_dtype="float32", vocab_size=256, remat="full")
    params = create_model(cfg, seed=0).encoder.params()
    trainer = Trainer(cfg, TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10), params,
                      mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    batch = {"q_ids": rng.integers(1, 256, (4, 16)).astype(np.int32), "q_mask": np.ones((4, 16), np.int32),
             "p_ids": rng.integers(1, 256, (8, 16)).astype(np.int32), "p_mask": np.ones((8, 16), np.int32)}
    sharded = trainer.prepare(batch, "retrieval")
    with sharding.use_mesh(trainer.mesh, trainer.rules):
        compiled = step_profile.compile_for_trace(trainer.step_fn("retrieval").jitted.lower(trainer.state, sharded))
    state = trainer.state

    def run():
        nonlocal state
        state, metrics = compiled(state, sharded)
        jax.block_until_ready((state, metrics))

    run()  # warm
    s = step_profile.profile_call(run, compiled.as_text(), str(tmp_path))
    assert s["unmatched_ops"] == 0, "every traced instruction is found in the program's HLO"
    assert s["busy_s"] > 0 and s["busy_s"] == pytest.approx(sum(s["by_kind"].values()))
    for phase in ("forward", "recompute", "backward", "optimizer"):
        assert s["by_phase"][phase] > 0, phase
    assert s["by_kind"]["matmul"] > 0 and s["table"].get("optimizer/matmul", 0) == 0
    assert (tmp_path / "summary.json").exists() and (tmp_path / "step.hlo.txt").exists()
    assert sum(t["seconds"] for t in s["by_op"]) == pytest.approx(s["busy_s"])
    assert len({(t["op_name"], t["kind"], t["phase"]) for t in s["by_op"]}) == len(s["by_op"])
    assert any(t["kernels"] > 1 and "checkpoint" in t["op_name"] for t in s["by_op"]), \
        "the instructions of one JAX op are summed"
    text = step_profile.format_summary(s)
    assert "| forward |" in text and "top instructions" in text and "top JAX ops" in text


def test_kinds_of_gpu_instructions():
    hlo = step_profile.parse_hlo("""HloModule jit_step, entry_computation_layout={()->()}

%fused_dus (p0: bf16[4,8], p1: bf16[1,8], p2: s32[]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[1,8]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[4,8]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c)
}

%fused_silu (p0: bf16[8]) -> bf16[8] {
  %p0 = bf16[8]{0} parameter(0)
  %logistic.1 = bf16[8]{0} logistic(%p0)
  ROOT %multiply.1 = bf16[8]{0} multiply(%p0, %logistic.1)
}

%fused_norm_reduce (p0: f32[4,8], p1: f32[4,8]) -> (f32[4], f32[4]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  %c = f32[] constant(0)
  %sq = f32[4,8]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/transpose(jvp())/checkpoint/rematted_computation/mul"}
  %r0 = f32[4]{0} reduce(%sq, %c), dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/checkpoint/rematted_computation/reduce_sum"}
  %xg = f32[4,8]{1,0} multiply(%p0, %p1), metadata={op_name="jit(step)/transpose(jvp())/checkpoint/mul"}
  %r1 = f32[4]{0} reduce(%xg, %c), dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/checkpoint/reduce_sum"}
  ROOT %t = (f32[4]{0}, f32[4]{0}) tuple(%r0, %r1)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%dynamic-slice-fusion (p0: bf16[4,8,8], p1: bf16[8,8], p2: s32[]) -> bf16[8,8] {
  %p0 = bf16[4,8,8]{2,1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  %ds = bf16[1,8,8]{2,1,0} dynamic-slice(%p0, %p2, %c, %c), dynamic_slice_sizes={1,8,8}
  %bc = bf16[8,8]{1,0} bitcast(%ds)
  %gemm = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%bc, %p1), custom_call_target="__cublas$gemm"
  ROOT %gte = bf16[8,8]{1,0} get-tuple-element(%gemm), index=0
}

ENTRY %main (a: bf16[4,8], b: bf16[1,8], i: s32[], x: bf16[8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = bf16[1,8]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %x = bf16[8]{0} parameter(3)
  %custom-call.3 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%a, %a), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp())/while/body/mlp/dot_general"}
  %custom-call.4 = (bf16[4,8]{1,0}, f32[4]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp()/while/body/attention/dot_product_attention"}
  %fusion.7 = bf16[8]{0} fusion(%x), kind=kLoop, calls=%fused_silu, metadata={op_name="jit(step)/cond/branch_1_fun/add"}
  %all-reduce-start.2 = bf16[8]{0} all-reduce-start(%x), replica_groups={}, to_apply=%fused_silu
  %w = bf16[4,8,8]{2,1,0} parameter(4)
  %fusion.11 = bf16[8,8]{1,0} fusion(%w, %a, %i), kind=kCustom, calls=%dynamic-slice-fusion
  %custom-call.5 = bf16[4,8]{1,0} custom-call(%a, %x), custom_call_target="__cudnn$norm"
  %f = f32[4,8]{1,0} parameter(5)
  %fusion.12 = (f32[4]{0}, f32[4]{0}) fusion(%f, %f), kind=kInput, calls=%fused_norm_reduce, metadata={op_name="jit(step)/transpose(jvp())/checkpoint/rematted_computation/reduce_sum"}
  ROOT %fusion.9 = bf16[4,8]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%fused_dus, metadata={op_name="jit(step)/transpose(jvp())/while/body/checkpoint/rematted_computation/mlp/dot_general"}
}
""")
    names = ("custom-call.3", "custom-call.4", "fusion.7", "all-reduce-start.2", "fusion.9", "fusion.11",
             "custom-call.5")
    kinds = {n: step_profile.kind_of(hlo[n], n) for n in names}
    assert kinds == {"custom-call.3": "matmul", "custom-call.4": "attention", "fusion.7": "elementwise",
                     "all-reduce-start.2": "collective", "fusion.9": "copy/slice",
                     "fusion.11": "matmul",  # a cuBLAS GEMM reading its operand through a dynamic slice
                     "custom-call.5": "other"}
    phases = {n: step_profile.phase_of(hlo[n])
              for n in ("custom-call.3", "custom-call.4", "fusion.7", "fusion.9", "fusion.12")}
    assert phases == {"custom-call.3": "backward", "custom-call.4": "forward", "fusion.7": "optimizer",
                      "fusion.9": "recompute",
                      # named after its recomputed sum of squares, but also the norm backward's row sum
                      "fusion.12": "backward"}
    assert step_profile.kind_of(hlo["fusion.12"], "fusion.12") == "reduction"
    assert step_profile.kind_of(None, "gemm_fusion_dot.3") == "matmul"
    # kernels of asynchronous fusions, named at run time after no instruction of the HLO text
    assert step_profile.kind_of(None, "loop_dynamic_slice_fusion.10") == "copy/slice"
    assert step_profile.kind_of(None, "loop_dynamic_update_slice_fusion.20") == "copy/slice"
    assert step_profile.kind_of(None, "input_reduce_fusion.4") == "reduction"
    assert step_profile.kind_of(None, "loop_multiply_fusion.3") == "elementwise"
    assert step_profile.kind_of(None, "command_buffer_121") == "other"
