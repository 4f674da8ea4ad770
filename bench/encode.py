"""Encoding throughput and MFU: qzhou-jax vs HF transformers (PyTorch SDPA), same weights, same run.

    python bench/encode.py --preset tiny --batch 8 --seq 128            # CPU smoke run
    python bench/encode.py --preset qwen2.5-1.5b --batch 128 --seq 512  # GPU
    python bench/encode.py --preset qwen2.5-7b --batch 64 --seq 512 --attention-impl cudnn

MFU = (2 x non-embedding params + full-attention FLOPs) x tokens / time / measured bf16 matmul peak.

Corpus case: a whole BEIR corpus through `Encoder` (random weights), with and without length
bucketing, reporting documents/s, tokens/s and the fraction of padding tokens processed:

    python bench/encode.py --corpus ../shared/data/retrieval/scifact_beir/corpus.jsonl \
        --preset tiny --max-length 1024 --batch 32 [--tokenizer MODEL_DIR]
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


def _corpus_texts(path: str) -> list[str]:
    import json

    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                title = d.get("title") or ""
                texts.append((title + " " + d["text"]).strip() if title else d["text"])
    return texts


def padding_fraction(lengths: np.ndarray, buckets, batch: int, sort: bool) -> tuple[float, int]:
    """Padding fraction and number of shapes of Encoder's batching, computed from token counts."""
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    padded, shapes = 0, set()
    for i in range(0, len(order), batch):
        longest = int(lengths[order[i:i + batch]].max())
        length = next((b for b in buckets if b >= longest), buckets[-1])
        shapes.add(length)
        padded += batch * length
    return 1.0 - float(lengths.sum()) / padded, len(shapes)


def corpus_case(args: argparse.Namespace) -> None:
    """Encode a corpus three ways: input order padded to max_length (no bucketing), length-sorted
    with powers-of-two buckets, length-sorted with 4 buckets per doubling. Tokenization is done
    once up front (and timed on its own); every configuration compiles its shapes before timing.
    The padding of the whole corpus is always printed; `--time-docs N` times the model on the
    first N documents only (slow CPUs)."""
    import time

    from qzhou_jax.eval.encoder import Encoder, length_buckets
    from qzhou_jax.model import create_model
    from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = ModelConfig.preset(args.preset, compute_dtype=dtype, param_dtype=dtype,
                             attention_impl=args.attention_impl.split(",")[0])
    texts = _corpus_texts(args.corpus)
    tok_dir = args.tokenizer or DEMO_TOKENIZER
    tok = Tokenizer(tok_dir, max_length=args.max_length)
    t0 = time.perf_counter()
    ids = tok.encode(texts)
    t_tok = time.perf_counter() - t0
    memo = dict(zip(texts, ids))

    class Pretokenized(Tokenizer):  # token ids from the pass above: the timings below are the model's
        def encode(self, batch):
            return [memo[t] for t in batch]

    ptok = Pretokenized(tok_dir, max_length=args.max_length)
    params = create_model(cfg, seed=0).encoder.params()
    lengths = np.array([len(x) for x in ids])
    print(f"device {common.device_name()}")
    print(f"corpus {args.corpus}: {len(texts):,} documents, {int(lengths.sum()):,} tokens after truncation at "
          f"{args.max_length} (mean {lengths.mean():.0f}, {np.mean(lengths == args.max_length):.1%} truncated); "
          f"tokenizer {tok_dir}: {len(texts) / t_tok:,.0f} documents/s")
    configs = [
        ("no bucketing (input order, pad to max_length)", (args.max_length,), False),
        ("sorted, powers-of-two buckets", length_buckets(args.max_length, 1), True),
        ("sorted, 4 buckets per doubling", length_buckets(args.max_length, 4), True),
    ]
    print(f"padding over the whole corpus, batch {args.batch}:")
    print(common.row(["configuration", "padding", "shapes"]))
    print(common.row(["---"] * 3))
    for name, buckets, sort in configs:
        frac, n_shapes = padding_fraction(lengths, buckets, args.batch, sort)
        print(common.row([name, f"{frac:.1%}", n_shapes]))
    all_lengths = lengths
    if args.time_docs:
        texts, ids, lengths = texts[: args.time_docs], ids[: args.time_docs], lengths[: args.time_docs]
    print(f"timing: model {args.preset} ({dtype}, random weights), batch {args.batch}, {len(texts):,} documents, "
          f"{int(lengths.sum()):,} tokens")
    rows = []
    for name, buckets, sort in configs:
        enc = Encoder(params, cfg, ptok, batch_size=args.batch, buckets=buckets)
        order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(ids))
        shapes = sorted({enc._bucket(int(lengths[order[i:i + enc.batch_size]].max()))
                         for i in range(0, len(ids), enc.batch_size)})
        for length in shapes:  # compile every shape this configuration will use
            z = np.zeros((enc.batch_size, length), np.int32)
            enc._run(z, np.ones_like(z))
        enc.stats = {k: 0 for k in enc.stats}
        t0 = time.perf_counter()
        enc.encode(texts, sort_by_length=sort)
        dt = time.perf_counter() - t0
        rows.append((name, len(texts) / dt, enc.stats["tokens"] / dt, enc.stats["padded_tokens"] / dt,
                     enc.padding_fraction, len(shapes), dt))
    print(common.row(["configuration", "documents/s", "tokens/s", "tokens/s incl. padding", "padding",
                      "shapes", "seconds"]))
    print(common.row(["---"] * 7))
    for name, dps, tps, pps, pad, n_shapes, dt in rows:
        print(common.row([name, f"{dps:,.1f}", f"{tps:,.0f}", f"{pps:,.0f}", f"{pad:.1%}", n_shapes, f"{dt:.1f}"]))
    full = padding_fraction(all_lengths, configs[2][1], args.batch, True)[0]
    print(f"padding tokens processed with 4 buckets per doubling: {full:.1%} over the whole corpus (goal: under 15%)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, f32 on CPU)")
    ap.add_argument("--attention-impl", default="xla", help="xla, cudnn (GPU), splash (TPU), or several: xla,cudnn")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--corpus", default=None, help="BEIR corpus.jsonl: run the corpus case instead")
    ap.add_argument("--max-length", type=int, default=1024, help="corpus case: tokens per document")
    ap.add_argument("--tokenizer", default=None, help="corpus case: tokenizer folder (default: the demo tokenizer)")
    ap.add_argument("--time-docs", type=int, default=None,
                    help="corpus case: time the model on the first N documents only (padding: whole corpus)")
    args = ap.parse_args()
    if args.corpus:
        corpus_case(args)
        return

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    impls = args.attention_impl.split(",")
    cfg = ModelConfig.preset(args.preset, compute_dtype=dtype, param_dtype=dtype)
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    peak = common.matmul_peak_tflops()
    print(f"device {common.device_name()}; measured matmul peak {peak:.3g} TFLOP/s")
    print(f"encode {args.preset} {dtype}, batch {args.batch} x {args.seq} tokens, "
          f"{cfg.num_params(False):,} non-embedding params")
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

    ref = common.reference_peak_tflops()
    print(common.row(["implementation", "tokens/s", "MFU", *([f"MFU (vs {ref:.0f})"] if ref else []),
                      "peak GiB", "ms/batch"]))
    print(common.row(["---"] * (6 if ref else 5)))
    for name, dt, mem in results:
        rate = flops / dt / 1e12
        print(common.row([name, f"{tokens / dt:,.0f}", f"{rate / peak:.3f}", *([f"{rate / ref:.3f}"] if ref else []),
                          f"{mem:.1f}", f"{dt * 1e3:.1f}"]))
    if not args.no_torch:
        for name, dt, _ in results[1:]:
            print(f"speed ratio {name} / PyTorch: {results[0][1] / dt:.2f}")


if __name__ == "__main__":
    main()
