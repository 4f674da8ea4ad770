"""Train-step throughput, MFU and peak memory: qzhou-jax vs HF transformers (eager, torch.compile).

    python bench/train_step.py --preset tiny --queries 4 --hard-negatives 1 --seq 32           # CPU smoke run
    python bench/train_step.py --preset qwen2.5-0.5b --queries 32 --hard-negatives 3 --seq 256  # the reference figures' anchors
    python bench/train_step.py --preset qwen2.5-1.5b --queries 16 --hard-negatives 3 --seq 256 --attention-impl cudnn
    python bench/train_step.py --preset qwen2.5-1.5b --queries 256 --hard-negatives 4 --seq 512 \\
        --chunk-size 16 --no-torch                                                               # GradCache, paper batch
    python bench/train_step.py --preset qwen2.5-1.5b --queries 256 --hard-negatives 4 --seq 512 \\
        --chunk-size 8 --keep-chunks 16 --attention-impl cudnn --no-torch       # half the chunks skip the 2nd forward

Workload: `queries` queries, each with 1 positive and `hard-negatives` hard negatives, all
`seq` tokens; half the rows have their last quarter padded. One step = embed queries and
passages, InfoNCE with in-batch + hard (+ query-query for qzhou-jax) negatives, backward,
clip, AdamW. Tokens = queries x (1 + 1 + k) x seq.
MFU = tokens x (6 x non-embedding params + full-attention FLOPs) / time / measured bf16 matmul
peak (model FLOPs only: remat and GradCache's extra forward are not counted); on H100/H200
also against the reference figures' 795 TFLOP/s, which JAX's measurement falls short of on these chips
(`common.REFERENCE_PEAKS`).
The PyTorch reference keeps float32 master weights under bfloat16 autocast with fused AdamW
(bench/RESULTS.md, reference figures); it runs first, then frees the GPU for JAX.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

if "--no-torch" in sys.argv:
    # JAX alone on the device: take the memory pool up front (JAX's default), which leaves
    # one contiguous region for the step's temporaries. common.py turns preallocation off
    # for runs that share the device with the PyTorch reference.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")

import common  # noqa: E402,F401  (sets env, sys.path)
import jax
import numpy as np

from qzhou_jax.config import ModelConfig
from qzhou_jax.train import LossConfig, TrainConfig, Trainer


def workload(cfg: ModelConfig, queries: int, group: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def side(rows):
        ids = rng.integers(1, min(cfg.vocab_size, 150000), size=(rows, seq)).astype(np.int32)
        mask = np.ones((rows, seq), np.int32)
        mask[rows // 2:, seq - seq // 4:] = 0  # half the rows: last quarter is padding
        return ids, mask

    q_ids, q_mask = side(queries)
    p_ids, p_mask = side(queries * group)
    # text keys as the data pipeline writes them (all distinct: random rows), so the timed
    # step includes the duplicate masks; the PyTorch side reads only ids and masks
    keys = np.arange(queries * (1 + group), dtype=np.int32)
    return dict(q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask, q_keys=keys[:queries], p_keys=keys[queries:])


def torch_step_fn(model, batch, group: int, temperature: float, compile_model: bool, lr: float):
    """One HF/PyTorch train step as a closure (fp32 master weights, bf16 autocast, fused AdamW)."""
    import torch
    import torch.nn.functional as F

    dev = common.torch_device()
    cuda = dev == "cuda"
    t = {k: torch.tensor(v, dtype=torch.long, device=dev) for k, v in batch.items() if k.endswith(("_ids", "_mask"))}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if compile_model else model

    def embed(ids, mask):
        h = fwd(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return F.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            q = embed(t["q_ids"], t["q_mask"])
            p = embed(t["p_ids"], t["p_mask"])
        n = q.shape[0]
        scores = (q @ p.T) / temperature  # positives at column i * group, all other passages negatives
        loss = F.cross_entropy(scores, torch.arange(n, device=dev) * group)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_torch(cfg, batch, group, args, compile_model: bool):
    import torch

    model = common.hf_random_model(cfg, "float32")
    model.train()
    if args.torch_checkpointing:
        model.gradient_checkpointing_enable()
    if common.torch_device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = torch_step_fn(model, batch, group, 0.02, compile_model, args.lr)
    try:
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        dt = common.torch_time(step, steps=args.steps, warmup=1)
        out = (dt, common.torch_peak_gib(), compile_s, "")
    except torch.OutOfMemoryError:
        out = (float("nan"), common.torch_peak_gib(), float("nan"), "out of memory")
    del step, model
    gc.collect()
    if common.torch_device() == "cuda":
        torch.cuda.empty_cache()
    return out


def run_jax(cfg, batch, args):
    from qzhou_jax import sharding
    from qzhou_jax.model import create_model

    params = create_model(cfg, seed=0).encoder.params()
    tcfg = TrainConfig(lr=args.lr, warmup_steps=10, total_steps=1000, chunk_size=args.chunk_size,
                       keep_chunks=args.keep_chunks, mu_dtype=args.mu_dtype)
    trainer = Trainer(cfg, tcfg, params, loss_cfg=LossConfig(), donate_params=True)
    del params
    gc.collect()
    sharded = trainer.prepare(batch, "retrieval")
    step = trainer.step_fn("retrieval")
    state = trainer.state
    trainer.state = None
    t0 = time.perf_counter()
    state, metrics = step(state, sharded)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = step(state, sharded)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, sharded)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    assert np.isfinite(loss), f"non-finite loss {loss}"
    if args.profile:
        import step_profile

        try:  # the program as timed, but without CUDA graphs: their trace names no kernel
            with sharding.use_mesh(trainer.mesh, trainer.rules):
                traced = step_profile.compile_for_trace(trainer.step_fn("retrieval").jitted.lower(state, sharded))

            def run():
                nonlocal state, metrics
                state, metrics = traced(state, sharded)
                jax.block_until_ready((state, metrics))

            print(step_profile.format_summary(step_profile.profile_call(run, traced.as_text(), args.profile)))
            import hlo_liveness  # what the program holds at its memory peak, by JAX operation

            print(hlo_liveness.format_live(hlo_liveness.peak_live(traced.as_text()), top=12))
        except Exception as e:  # the timing above stands without the profile
            print(f"profile failed: {type(e).__name__}: {e}")
    return float(np.median(times)), common.jax_peak_gib(), compile_s, f"loss {loss:.3f}"


def remat_desc(cfg: ModelConfig) -> str:
    layers = "" if cfg.scan_layers else ", unrolled"
    if cfg.remat == "none" or cfg.remat_layers in (None, cfg.num_hidden_layers):
        return cfg.remat + layers
    return f"{cfg.remat} on {cfg.remat_layers} of {cfg.num_hidden_layers} layers{layers}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--hard-negatives", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=0, help="GradCache chunk (queries); 0: off")
    ap.add_argument("--keep-chunks", type=int, default=0,
                    help="GradCache chunks that keep their layer inputs between the passes (-1: all)")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "attn", "mlp"])
    ap.add_argument("--remat-layers", type=int, default=None,
                    help="apply the remat policy to this many layers; the others keep their activations")
    ap.add_argument("--no-scan", action="store_true", help="unroll the layers instead of lax.scan")
    ap.add_argument("--attention-impl", default="xla", choices=["xla", "cudnn", "splash"])
    ap.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, f32 on CPU)")
    ap.add_argument("--mu-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of Adam's first moment (train.mu_dtype)")
    ap.add_argument("--weight-grad-dtype", default=None, choices=["float32", "bfloat16"],
                    help="dtype the weight-gradient matmuls write (model.weight_grad_dtype; default: compute dtype)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="skip PyTorch eager")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--torch-checkpointing", action="store_true", help="HF gradient checkpointing")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, trace one more step into DIR and print where its device time went "
                         "(bench/step_profile.py)")
    args = ap.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = ModelConfig.preset(args.preset, compute_dtype=dtype, param_dtype="float32", remat=args.remat,
                             remat_layers=args.remat_layers, scan_layers=not args.no_scan,
                             attention_impl=args.attention_impl, weight_grad_dtype=args.weight_grad_dtype)
    group = 1 + args.hard_negatives
    tokens = args.queries * (1 + group) * args.seq
    flops = cfg.flops_per_token(args.seq, training=True) * tokens
    peak = common.matmul_peak_tflops()
    print(f"device {common.device_name()}; measured matmul peak {peak:.3g} TFLOP/s "
          f"({'f32' if on_cpu else 'bf16'})")
    print(f"train step {args.preset}: {args.queries} queries x (1 + 1 + {args.hard_negatives}) x {args.seq} tokens "
          f"= {tokens:,} tokens, {cfg.num_params(False):,} non-embedding params, compute {dtype}, "
          f"remat {remat_desc(cfg)}, GradCache chunk {args.chunk_size or 'off'}"
          f"{f', {args.keep_chunks} chunks kept' if args.chunk_size and args.keep_chunks else ''}"
          f"{f', Adam first moment {args.mu_dtype}' if args.mu_dtype != 'float32' else ''}"
          f"{f', weight gradients {args.weight_grad_dtype}' if args.weight_grad_dtype else ''}")
    batch = workload(cfg, args.queries, group, args.seq)
    results = []
    if not args.no_torch:
        extra = " + grad ckpt" if args.torch_checkpointing else ""
        if not args.no_eager:
            results.append((f"HF PyTorch eager{extra}",) + run_torch(cfg, batch, group, args, False))
        if not args.no_compile:
            results.append((f"HF PyTorch torch.compile{extra}",) + run_torch(cfg, batch, group, args, True))
    chunk = f", GradCache {args.chunk_size}" if args.chunk_size else ""
    if args.chunk_size and args.keep_chunks:
        n_chunks = args.queries // args.chunk_size
        chunk += f" keeping {n_chunks if args.keep_chunks < 0 else min(args.keep_chunks, n_chunks)} of {n_chunks}"
    results.append((f"qzhou-jax ({args.attention_impl}, remat {remat_desc(cfg)}{chunk})",) + run_jax(cfg, batch, args))

    ref = common.reference_peak_tflops()
    print(common.row(["implementation", "tokens/s", "MFU", *([f"MFU (vs {ref:.0f})"] if ref else []),
                      "peak GiB", "s/step", "first step s", "note"]))
    print(common.row(["---"] * (8 if ref else 7)))
    for name, dt, mem, first, note in results:
        rate = flops / dt / 1e12
        print(common.row([name, f"{tokens / dt:,.0f}", f"{rate / peak:.3f}", *([f"{rate / ref:.3f}"] if ref else []),
                          f"{mem:.1f}", f"{dt:.3f}", f"{first:.1f}", note]))


if __name__ == "__main__":
    main()
