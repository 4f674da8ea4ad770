"""Tokenization to a few fixed bucket lengths, and QZhou's instruction prompt.

XLA compiles one program per input shape; padding every batch to one of a handful of
bucket lengths (and a fixed batch size) keeps the number of programs small.
"""

from __future__ import annotations

import bisect
import importlib.util
import logging
import os
from typing import Sequence

import numpy as np

PROMPT_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEMO_TOKENIZER = os.path.join(ASSETS, "tokenizer")
# a folder holding none of these holds no tokenizer (transformers would build an empty one from
# config.json alone, which turns every text into no tokens)
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
log = logging.getLogger(__name__)


def format_prompt(text: str, instruction: str | None) -> str:
    """QZhou's template; no instruction (None, empty or blank) leaves the text unchanged."""
    if not instruction or not instruction.strip():
        return text
    return PROMPT_TEMPLATE.format(instruction=instruction, text=text)


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length`, plus `max_length` itself."""
    buckets, b = [], smallest
    while b < max_length:
        buckets.append(b)
        b *= 2
    buckets.append(max_length)
    return tuple(buckets)


class Tokenizer:
    """A HuggingFace tokenizer loaded from a local folder, truncating and bucketing."""

    def __init__(self, path: str | os.PathLike, max_length: int = 512, buckets: Sequence[int] | None = None):
        if importlib.util.find_spec("torch") is None:  # transformers' "PyTorch was not found" advice does
            os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # not concern a tokenizer
        from transformers import AutoTokenizer

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: tokenizer folder not found")
        if not any(os.path.isfile(os.path.join(self.path, n)) for n in VOCABULARY_FILES):
            raise FileNotFoundError(f"{self.path}: no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
                                    "copy the base model's tokenizer files into it")
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if len(self.hf) < 2:
            raise ValueError(f"{self.path}: the tokenizer has an empty vocabulary")
        if self.hf.truncation_side != "right":  # the instruction comes first: cutting the start would drop it
            log.warning("%s: the tokenizer's truncation_side is %r; texts are cut from the end here, as in "
                        "training, so that the instruction survives (exports write truncation_side 'right')",
                        self.path, self.hf.truncation_side)
            self.hf.truncation_side = "right"
        pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id
        if pad is None:
            raise ValueError(f"{self.path}: tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)
        self.max_length = int(max_length)
        self.buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ValueError(f"buckets: the largest bucket {self.buckets[-1]} is below max_length {self.max_length}")

    def __len__(self) -> int:
        return len(self.hf)

    def check_fits(self, vocab_size: int, where: str) -> None:
        """Every id this tokenizer can produce must index the model's embedding table (an id past it
        gives NaN embeddings): a tokenizer of another model is refused before any work."""
        if len(self) > vocab_size:
            raise ValueError(f"{where}: the tokenizer in {self.path} has {len(self)} tokens, the model's vocabulary "
                             f"{vocab_size}: is it the model's tokenizer?")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (the tokenizer's own special tokens), truncated to max_length."""
        out = self.hf(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length,
                      padding=False, return_attention_mask=False)
        return [list(x) for x in out["input_ids"]]

    def bucket(self, length: int) -> int:
        return self.buckets[min(bisect.bisect_left(self.buckets, length), len(self.buckets) - 1)]

    def pad(self, seqs: Sequence[Sequence[int]], rows: int | None = None,
            length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to `length` (default: the bucket of the longest) and `rows` rows.

        Extra rows are all padding (mask 0); they pool to zero and are dropped by callers.
        """
        rows = len(seqs) if rows is None else rows
        length = self.bucket(max((len(s) for s in seqs), default=1)) if length is None else length
        ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for i, s in enumerate(seqs):
            n = min(len(s), length)
            ids[i, :n] = s[:n]
            mask[i, :n] = 1
        return ids, mask

    def __call__(self, texts: Sequence[str], instruction: str | None = None,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.encode([format_prompt(t, instruction) for t in texts]), length=length)
