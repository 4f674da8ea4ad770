"""bench/hlo_liveness.py: live buffers at the peak of a scheduled HLO program."""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import hlo_liveness  # noqa: E402

HLO = """HloModule m, is_scheduled=true

%fused (p0: f32[256]) -> f32[1024] {
  %p0 = f32[256]{0} parameter(0)
  ROOT %b = f32[1024]{0} broadcast(%p0), dimensions={}
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0), metadata={op_name="a"}
  %big = f32[1024]{0} fusion(%a), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/layer3/big"}
  %pair = (f32[512]{0}, s8[4096]{0}) custom-call(%big), custom_call_target="gemm", metadata={op_name="jit(f)/gemm"}
  %g = f32[512]{0} get-tuple-element(%pair), index=0
  %v = f32[512]{0} bitcast(%g)
  %small = f32[16]{0} fusion(%v, %big), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/small"}
  ROOT %out = f32[256]{0} fusion(%small), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/out"}
}
"""


def test_peak_follows_definitions_aliases_and_last_uses():
    r = hlo_liveness.peak_live(HLO)
    assert r["argument_bytes"] == 256 * 4
    # at the custom call: `big`, its output and its workspace (used by nothing, freed at once)
    assert r["at"] == "pair" and r["peak_bytes"] == 1024 * 4 + 512 * 4 + 4096
    assert r["live"] == [(4096, "jit(f)/layerN/big", "f32[1024]"), (4096, "jit(f)/gemm", "s8[4096]"),
                         (2048, "jit(f)/gemm", "f32[512]")]
    text = hlo_liveness.format_live(r, top=2)
    assert "other live buffers at the peak (pair)" in text and len(text.splitlines()) == 3


def test_reads_a_compiled_program():
    def f(x):
        y = jnp.sin(x) @ x
        return jnp.cos(y) @ y + x

    x = jnp.ones((256, 256), jnp.float32)
    r = hlo_liveness.peak_live(jax.jit(f).lower(x).compile().as_text())
    assert r["argument_bytes"] == 256 * 256 * 4
    assert r["peak_bytes"] >= 256 * 256 * 4 and r["live"]
    assert sum(b for b, _, _ in r["live"]) == r["peak_bytes"]


COND = """HloModule m, is_scheduled=true

ENTRY %main (p: pred[], w: f32[1024]) -> (f32[1024], f32[64]) {
  %p = pred[] parameter(0)
  %w = f32[1024]{0} parameter(1)
  %g = f32[1024]{0} fusion(%w), kind=kLoop, calls=%f, metadata={op_name="jit(f)/grad"}
  %ops = (f32[1024]{0}, f32[1024]{0}) tuple(%w, %g)
  %c = (f32[1024]{0}, f32[16]{0}) conditional(%p, %ops, %ops), true_computation=%t, false_computation=%e
  %new_w = f32[1024]{0} get-tuple-element(%c), index=0
  %stat = f32[16]{0} get-tuple-element(%c), index=1
  %nest = ((f32[256]{0}, f32[64]{0}), f32[8]{0}) custom-call(%stat), custom_call_target="x", metadata={op_name="jit(f)/nest"}
  %inner = (f32[256]{0}, f32[64]{0}) get-tuple-element(%nest), index=0
  %last = f32[64]{0} get-tuple-element(%inner), index=1
  %twice = f32[64]{0} fusion(%last, %new_w), kind=kLoop, calls=%f, metadata={op_name="jit(f)/twice"}
  ROOT %out = (f32[1024]{0}, f32[64]{0}) tuple(%new_w, %twice)
}
"""


def test_conditional_results_update_in_place_and_nested_tuples_are_indexed():
    r = hlo_liveness.peak_live(COND)
    assert r["argument_bytes"] == 1 + 1024 * 4
    # the branch's f32[1024] result reuses the operand buffer of that shape (the argument:
    # not a new buffer), its f32[16] result is new, and the gradient lives up to the branch
    assert r["at"] == "c" and r["peak_bytes"] == (1024 + 16) * 4
    assert sorted(s for _, _, s in r["live"]) == ["f32[1024]", "f32[16]"]
    # the nested f32[64], read through two get-tuple-elements, lives until `twice` reads it;
    # the custom call's other arrays die at once
    big = hlo_liveness.peak_live(COND.replace("%twice = f32[64]{0}", "%twice = f32[4096]{0}").replace(
        "-> (f32[1024], f32[64])", "-> (f32[1024], f32[4096])").replace(
        "(f32[1024]{0}, f32[64]{0}) tuple(%new_w, %twice)", "(f32[1024]{0}, f32[4096]{0}) tuple(%new_w, %twice)"))
    assert big["at"] == "twice"
    assert sorted(s for _, _, s in big["live"]) == ["f32[4096]", "f32[64]"]
