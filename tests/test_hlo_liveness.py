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
