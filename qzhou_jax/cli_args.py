"""argparse pieces shared by the command-line tools: numbers checked where they are read, so a
bad value is a usage error naming the flag, and the flags that choose how a saved model runs."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_model_run_args(parser) -> None:
    """--dtype, --attention-impl, --attention and --pooling: how a loaded model computes (its
    saved config otherwise)."""
    from qzhou_jax.config import ATTENTION_IMPLS, ATTENTION_KINDS

    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default=None,
                        help="attention kernel: xla, cudnn (GPU) or splash (TPU; long texts in linear memory); "
                             "default: the model config's")
    parser.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                        help="attention direction (default: the model config's; config.json's is_causal)")
    parser.add_argument("--pooling", choices=["mean", "last"], default=None,
                        help="pooling (default: the model config's, or its sentence-transformers Pooling module)")


def model_run_overrides(args: argparse.Namespace) -> dict:
    """ModelConfig overrides from `add_model_run_args`' flags."""
    out = {}
    if args.dtype:
        out["compute_dtype"] = args.dtype
    if args.attention_impl:
        from qzhou_jax.sharding import check_kernel_platform

        check_kernel_platform(args.attention_impl, "--attention-impl")
        out["attention_impl"] = args.attention_impl
    if getattr(args, "attention", None):
        out["attention"] = args.attention
    if getattr(args, "pooling", None):
        out["pooling"] = args.pooling
    return out
