"""`qzhou-jax demo`: the tiny model on the bundled sample data, on CPU."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from qzhou_jax.tokenizer import ASSETS, DEMO_TOKENIZER

DEMO_DATA = os.path.join(ASSETS, "demo")


def _sample(n: int = 6) -> tuple[list[str], list[str], str]:
    rows = []
    with open(os.path.join(DEMO_DATA, "retrieval_heldout.jsonl"), encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
    step = max(1, len(rows) // n)
    picked = rows[::step][:n]
    return [r["query"] for r in picked], [r["pos"][0] for r in picked], picked[0]["instruction"]


def similarity_table(queries: list[str], passages: list[str], q: np.ndarray, p: np.ndarray) -> str:
    sims = q @ p.T
    lines = ["rows: queries, columns: passages (the matching passage has the same number)",
             "      " + " ".join(f"  p{j:<3d}" for j in range(len(passages)))]
    for i, row in enumerate(sims):
        cells = " ".join(("*" if j == int(np.argmax(row)) else " ") + f"{v:5.2f}" for j, v in enumerate(row))
        lines.append(f"q{i:<3d}  {cells}")
    hits = int(np.sum(np.argmax(sims, axis=1) == np.arange(len(queries))))
    lines.append(f"top-1 matches: {hits}/{len(queries)}")
    for i, (a, b) in enumerate(zip(queries, passages)):
        lines.append(f"  q{i}: {a[:70]}")
        lines.append(f"  p{i}: {b[:70]}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from qzhou_jax.config import ModelConfig
    from qzhou_jax.eval.encoder import Encoder
    from qzhou_jax.model import create_model
    from qzhou_jax.tokenizer import Tokenizer

    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    model = create_model(cfg, seed=0)
    tokenizer = Tokenizer(DEMO_TOKENIZER, max_length=128)
    encoder = Encoder(model.encoder.params(), cfg, tokenizer, batch_size=8)
    queries, passages, instruction = _sample()
    q = encoder.encode(queries, instruction=instruction)
    p = encoder.encode(passages)
    print(f"model: tiny Qwen2 ({cfg.num_params():,} parameters, random init), tokenizer: {DEMO_TOKENIZER}")
    print(similarity_table(queries, passages, q, p))
    return 0
