"""Numerical checks that need an accelerator: cuDNN attention vs the XLA default, and
parity with HF transformers on the same device. Prints one line per check; exits 1 on failure.

    python bench/gpu_check.py
"""

from __future__ import annotations

import argparse
import sys

import common  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np

from qzhou_jax.checkpoint.hf import DictStore, load_params
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import embed, forward


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layers", nargs="?", type=int, default=4, help="layers of the Qwen2.5-0.5B-shaped model")
    args = ap.parse_args()
    print(f"device {common.device_name()}, jax {jax.__version__}")
    failures = 0
    rng = np.random.default_rng(0)
    cfg = ModelConfig.preset("qwen2.5-0.5b", num_hidden_layers=args.layers, compute_dtype="bfloat16")
    hf = common.hf_random_model(cfg, "float32", attn="sdpa")
    weights = common.torch_state_to_numpy(hf)
    params = load_params(DictStore(weights), cfg)
    lengths = [256, 200, 17, 129]
    ids = rng.integers(1, 150000, size=(4, 256)).astype(np.int32)
    mask = (np.arange(256)[None] < np.array(lengths)[:, None]).astype(np.int32)
    valid = mask.astype(bool)

    import torch

    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long, device=common.torch_device()),
                 attention_mask=torch.tensor(mask, device=common.torch_device())).last_hidden_state.float().cpu().numpy()
    on_gpu = jax.devices()[0].platform == "gpu"
    impls = ("xla", "cudnn") if on_gpu else ("xla",)
    for impl in impls:
        for dtype in ("float32", "bfloat16") if impl == "xla" else ("bfloat16",):
            c = cfg.replace(attention_impl=impl, compute_dtype=dtype)
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                got = np.asarray(jax.jit(lambda p, i, m: forward(p, c, i, m))(params, ids, mask), np.float32)
            rel = np.linalg.norm((got - ref)[valid]) / np.linalg.norm(ref[valid])
            limit = 1e-4 if dtype == "float32" else 2e-2
            ok = rel <= limit
            failures += not ok
            print(f"{'ok ' if ok else 'FAIL'} forward vs HF fp32 on GPU: {impl}/{dtype} rel L2 {rel:.2e} (limit {limit})")

    if not on_gpu:
        return 1 if failures else 0
    # cuDNN and XLA attention agree on embeddings and on gradients (bf16).
    c_x, c_c = cfg.replace(attention_impl="xla"), cfg.replace(attention_impl="cudnn")
    e_x = np.asarray(jax.jit(lambda p: embed(p, c_x, ids, mask))(params))
    e_c = np.asarray(jax.jit(lambda p: embed(p, c_c, ids, mask))(params))
    cos = np.sum(e_x * e_c, -1).min()
    ok = cos >= 0.999
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} cudnn vs xla embeddings: min cosine {cos:.6f}")
    # left padding: cuDNN masks by length, so the model right-aligns each row around it
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for r, n in enumerate(lengths):
        left_ids[r, 256 - n:], left_mask[r, 256 - n:] = ids[r, :n], 1
    e_l = np.asarray(jax.jit(lambda p: embed(p, c_c, left_ids, left_mask))(params))
    cos = np.sum(e_x * e_l, -1).min()
    ok = cos >= 0.999
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} cudnn left-padded vs xla right-padded embeddings: min cosine {cos:.6f}")
    loss = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(embed(p, c, ids, mask)[:, :8] ** 2)))  # noqa: E731
    g_x = jax.tree.leaves(loss(c_x)(params))
    g_c = jax.tree.leaves(loss(c_c)(params))
    num = sum(float(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)) for a, b in zip(g_x, g_c))
    den = sum(float(jnp.sum(a.astype(jnp.float32) ** 2)) for a in g_x)
    rel = (num / den) ** 0.5
    ok = rel <= 5e-2
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} cudnn vs xla gradients: rel L2 {rel:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
