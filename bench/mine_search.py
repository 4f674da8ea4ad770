"""Hard-negative mining search: `synth.mine.search` (blocked, on the default device) against the
exact float64 numpy search evaluation uses (`eval.metrics.top_k`), same inputs, same run.

    python bench/mine_search.py                                  # CPU: 4k queries x 64k passages x 256
    python bench/mine_search.py --queries 65536 --docs 1048576 --dim 1536 --skip-numpy   # GPU

Prints queries/s of each and their ratio, and how many of the device search's top-k indices the
exact search also returns (ties and float32 rounding may swap neighbours at the cut).
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets env, sys.path)
import numpy as np

from qzhou_jax.eval.metrics import id_order, top_k
from qzhou_jax.synth.mine import search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--docs", type=int, default=65536)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=40, help="top-k kept per query (mining at ranks 10-30 asks ~30+)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--query-block", type=int, default=1024)
    p.add_argument("--doc-block", type=int, default=65536)
    p.add_argument("--skip-numpy", action="store_true", help="only the device search (large corpora)")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    d = rng.standard_normal((args.docs, args.dim), dtype=np.float32)
    print(f"device: {common.device_name()}; {args.queries} queries x {args.docs} passages x {args.dim} dims, "
          f"k={args.k}, {args.dtype}")

    search(q[: args.query_block], d, args.k, query_block=args.query_block, doc_block=args.doc_block,
           dtype=args.dtype)  # compile
    t0 = time.perf_counter()
    idx, _ = search(q, d, args.k, query_block=args.query_block, doc_block=args.doc_block, dtype=args.dtype)
    t_dev = time.perf_counter() - t0
    flops = 2.0 * args.queries * args.docs * args.dim
    print(f"synth.mine.search: {t_dev:.2f} s, {args.queries / t_dev:,.0f} queries/s, {flops / t_dev / 1e12:.2f} TFLOP/s")
    if args.skip_numpy:
        return
    t0 = time.perf_counter()
    ref, _ = top_k(q, d, args.k, id_order([str(i) for i in range(args.docs)]))
    t_np = time.perf_counter() - t0
    overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx, ref)])
    print(f"eval.metrics.top_k (numpy float64): {t_np:.2f} s, {args.queries / t_np:,.0f} queries/s")
    print(f"speed-up {t_np / t_dev:.1f}x; top-{args.k} overlap with the exact search {overlap:.4f}")


if __name__ == "__main__":
    main()
