"""Test helpers: tiny random HuggingFace Qwen2 models for parity tests (no hub, CPU torch),
and writing JSONL inputs."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from qzhou_jax.checkpoint.hf import DictStore, load_params
from qzhou_jax.config import ModelConfig


def tiny_hf_config(heads=4, kv_heads=2, hidden=32, layers=2, vocab=97, tied=True, causal=False,
                   head_dim=None, mlp=48, theta=10000.0):
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=theta, tie_word_embeddings=tied, use_sliding_window=False,
        head_dim=head_dim or hidden // heads,
    )
    cfg.is_causal = causal
    return cfg


def tiny_hf_model(seed=0, attn="eager", **kw) -> transformers.Qwen2Model:
    torch.manual_seed(seed)
    cfg = tiny_hf_config(**kw)
    model = transformers.Qwen2Model(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model


def save_hf(model: transformers.PreTrainedModel, path, dtype=torch.float32, **kw) -> None:
    model.to(dtype).save_pretrained(path, safe_serialization=True, **kw)
    model.to(torch.float32)


def params_from_torch(model, mesh=None, **overrides):
    """(ModelConfig, params) for a HF model held in memory."""
    cfg = ModelConfig.from_hf(model.config.to_dict(), **overrides)
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return cfg, load_params(DictStore(tensors), cfg, mesh)


def hf_hidden(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.last_hidden_state.float().numpy()


def random_batch(rng: np.random.Generator, vocab: int, lengths, seq: int, side: str = "right"):
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for b, n in enumerate(lengths):
        toks = rng.integers(1, vocab, size=n)
        if side == "right":
            ids[b, :n], mask[b, :n] = toks, 1
        else:
            ids[b, seq - n:], mask[b, seq - n:] = toks, 1
    return ids, mask


def write_jsonl(path, lines):
    """Lines are dicts (dumped) or raw strings (written as they are); returns the path."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return path
