"""Encoding throughput and MFU: qzhou-jax vs HF transformers (PyTorch SDPA), same weights, same run.

    python bench/encode.py --preset tiny --batch 8 --seq 128            # CPU smoke run
    python bench/encode.py --preset qwen2.5-1.5b --batch 128 --seq 512  # GPU
    python bench/encode.py --preset qwen2.5-7b --batch 64 --seq 512 --attention-impl cudnn

MFU = (2 x non-embedding params + full-attention FLOPs) x tokens / time / measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import gc

import common  # noqa: F401  (sets env, sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from qzhou_jax.checkpoint.hf import DictStore, load_params
from qzhou_jax.config import ModelConfig
from qzhou_jax.model import embed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, f32 on CPU)")
    ap.add_argument("--attention-impl", default="xla", help="xla, cudnn, or both: xla,cudnn")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    impls = args.attention_impl.split(",")
    cfg = ModelConfig.preset(args.preset, compute_dtype=dtype, param_dtype=dtype)
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    peak = common.matmul_peak_tflops()
    print(f"device {common.device_name()}; measured matmul peak {peak:.0f} TFLOP/s")
    print(f"encode {args.preset} {dtype}, batch {args.batch} x {args.seq} tokens, "
          f"{cfg.num_params(False) / 1e9:.3f}B non-embedding params")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, min(cfg.vocab_size, 150000), size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    results = []

    hf = common.hf_random_model(cfg, dtype)
    if not args.no_torch:
        import torch

        t_ids = torch.tensor(ids, dtype=torch.long, device=common.torch_device())
        t_mask = torch.tensor(mask, device=common.torch_device())

        def torch_encode():
            with torch.inference_mode():
                h = hf(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
                m = t_mask[..., None].to(h.dtype)
                e = (h * m).sum(1) / m.sum(1)
                return torch.nn.functional.normalize(e.float(), dim=-1)

        dt = common.torch_time(torch_encode, steps=args.steps)
        results.append(("HF PyTorch SDPA", dt, common.torch_peak_gib()))
    weights = common.torch_state_to_numpy(hf)
    del hf
    gc.collect()
    if not on_cpu and not args.no_torch:
        import torch

        torch.cuda.empty_cache()

    params = load_params(DictStore(weights), cfg)
    del weights
    ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)
    for impl in impls:
        c = cfg.replace(attention_impl=impl)
        fn = jax.jit(lambda p, i, m: embed(p, c, i, m))
        dt = common.time_fn(fn, params, ids_d, mask_d, steps=args.steps)
        results.append((f"qzhou-jax ({impl})", dt, common.jax_peak_gib()))

    print(common.row(["implementation", "tokens/s", "MFU", "peak GiB", "ms/batch"]))
    print(common.row(["---"] * 5))
    for name, dt, mem in results:
        print(common.row([name, f"{tokens / dt:,.0f}", f"{flops / dt / 1e12 / peak:.3f}", f"{mem:.1f}",
                          f"{dt * 1e3:.1f}"]))
    if not args.no_torch:
        for name, dt, _ in results[1:]:
            print(f"speed ratio {name} / PyTorch: {results[0][1] / dt:.2f}")


if __name__ == "__main__":
    main()
