"""The `qzhou-jax` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from qzhou_jax.cli_args import add_model_run_args, model_run_overrides, positive_int


def _write_npy(path: str, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: no half-written output file."""
    from qzhou_jax.config import atomic_write

    with atomic_write(path, "wb") as f:
        np.save(f, array)


def cmd_encode(args: argparse.Namespace) -> int:
    from qzhou_jax.checkpoint import load_pretrained
    from qzhou_jax.data.jsonl import read_texts
    from qzhou_jax.eval.encoder import Encoder
    from qzhou_jax.tokenizer import Tokenizer

    texts = read_texts(args.input, args.field)  # validate input and output before loading the model
    empty = sum(not t for t in texts)
    if empty:
        logging.getLogger(__name__).warning(
            "%s: %d of the %d texts are empty: %s", args.input, empty, len(texts),
            "they embed the bare instruction" if args.instruction else "their rows are zeros")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {args.output}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--output {args.output}: folder {folder} is not writable")
    overrides = model_run_overrides(args)
    model = load_pretrained(args.model, **overrides)
    tokenizer = Tokenizer(model.tokenizer_path, max_length=args.max_length)
    encoder = Encoder(model.params, model.config, tokenizer, batch_size=args.batch_size)
    t0 = time.perf_counter()
    emb = encoder.encode(texts, instruction=args.instruction, progress=not args.quiet)
    dt = time.perf_counter() - t0
    _write_npy(args.output, emb.astype(np.float16 if args.output_dtype == "float16" else np.float32))
    print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} in {dt:.1f}s "
          f"({encoder.stats['tokens'] / dt:,.0f} tokens/s, {encoder.padding_fraction:.1%} padding)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qzhou-jax", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="embed the texts of a JSONL file with a saved model")
    e.add_argument("--model", required=True, help="model folder (HF safetensors + config.json + tokenizer)")
    e.add_argument("--input", required=True, help="JSONL file: objects with a text field, or JSON strings")
    e.add_argument("--output", required=True, help=".npy file to write (float32, input order)")
    e.add_argument("--field", default="text", help="field holding the text (default: text)")
    e.add_argument("--instruction", default=None, help="prepend QZhou's 'Instruct: ...\\nQuery: ' prompt")
    e.add_argument("--max-length", type=positive_int, default=1024)
    e.add_argument("--batch-size", type=positive_int, default=32)
    add_model_run_args(e)
    e.add_argument("--output-dtype", choices=["float32", "float16"], default="float32")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_encode)

    from qzhou_jax.checkpoint.convert import add_convert_parser

    add_convert_parser(sub)
    from qzhou_jax.data.cli import add_data_parser
    from qzhou_jax.eval.cli import add_eval_parser
    from qzhou_jax.plan import add_plan_parser
    from qzhou_jax.synth.cli import add_synth_parser
    from qzhou_jax.train.cli import add_train_parser

    add_eval_parser(sub)
    add_plan_parser(sub)
    add_data_parser(sub)
    add_synth_parser(sub)
    add_train_parser(sub)
    return p


def _skip_absent_tpu() -> None:
    """libtpu installed (the `tpu` or `test` extra) on a machine without TPUs: JAX would try
    the TPU backend first and print libtpu's initialization errors. Use the other platforms
    (JAX_PLATFORMS, when set, wins; `plan` keeps libtpu for its TPU compiles)."""
    import glob
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    import jax

    cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")


class Terminated(BaseException):
    """SIGTERM during a command that does not handle it itself (all but `train` and `demo`, which
    save a checkpoint): it unwinds as Ctrl-C does, so no half-written output is left behind."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "plan":
        _skip_absent_tpu()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import signal
    import threading

    own = args.command not in ("train", "demo") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if own else None
    try:
        return _run(args)
    finally:
        if own:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


PEER_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE: a job of several processes lost one; rerun it with --resume


def _several_processes() -> tuple[int, int] | None:
    """(this process, processes) in a job of several processes (`jax.distributed`), else None;
    initializes nothing."""
    if "jax" not in sys.modules:
        return None
    from qzhou_jax.hosts import coordination_client

    if coordination_client() is None:
        return None
    import jax

    return (jax.process_index(), jax.process_count()) if jax.process_count() > 1 else None


def _leave_the_job(command: str, error: BaseException, where: tuple[int, int]) -> None:
    """A collective or an agreement between the processes failed: say so and exit at once with
    PEER_LOST_EXIT_CODE. A normal exit would wait in JAX's shutdown barrier for the process that
    is gone, until the coordination service gives up on it (minutes) and aborts this one."""
    import traceback

    traceback.print_exc()
    print(f"qzhou-jax {command}: error: {error}", file=sys.stderr)
    print(f"qzhou-jax {command}: process {where[0]} of {where[1]}: a step, collective or agreement between the "
          f"processes failed, most often because another process stopped (its log says why). The checkpoints "
          f"written are intact: rerun the job with --resume. Exiting with status {PEER_LOST_EXIT_CODE} without "
          f"waiting for the others.", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PEER_LOST_EXIT_CODE)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, a missing file, a folder that cannot be written
        print(f"qzhou-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # XLA's runtime errors included
        from qzhou_jax.hosts import peer_lost

        where = _several_processes() if args.command in ("train", "demo") and peer_lost(e) else None
        if where is None:  # a bug, or this process's own failure (out of memory): the traceback
            raise
        _leave_the_job(args.command, e, where)
        raise  # not reached
    except FloatingPointError as e:  # training stopped on a non-finite loss (train.skip_nonfinite)
        print(f"qzhou-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the commands leave no half-written output
        print(f"qzhou-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM, likewise
        print(f"qzhou-jax {args.command}: terminated", file=sys.stderr)
        return 143


def entry() -> None:
    """The console script: `main`, and after Ctrl-C (SIGTERM) the process ends by SIGINT (SIGTERM),
    as shells and schedulers expect (a loop running one command after another stops too)."""
    rc = main()
    if rc in (130, 143):
        import signal

        sig = signal.SIGINT if rc == 130 else signal.SIGTERM
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
