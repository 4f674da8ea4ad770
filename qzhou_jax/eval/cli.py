"""`qzhou-jax eval`: score a saved model on tasks the way MTEB does.

    qzhou-jax eval --model DIR --tasks tasks.yaml --output results.json
    qzhou-jax eval --model DIR --tasks STSBenchmark,SCIDOCS --data-dir DATA --results-dir results/
"""

from __future__ import annotations

import argparse
import os
import sys

from qzhou_jax.cli_args import add_model_run_args, model_run_overrides, non_negative_int, positive_int


def _parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected axis=size pairs over data, fsdp, tensor (e.g. data=-1), got {text!r}")
        out[key.strip()] = int(value)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    import jax

    from qzhou_jax import sharding
    from qzhou_jax.checkpoint import load_pretrained
    from qzhou_jax.eval.encoder import Encoder, length_buckets
    from qzhou_jax.eval.run import check_tasks, evaluate, summary_table, write_results
    from qzhou_jax.eval.tasks import load_task_specs, read_instruction_map, with_instructions
    from qzhou_jax.tokenizer import Tokenizer

    sharding.maybe_initialize_distributed()
    specs = load_task_specs(args.tasks, data_dir=args.data_dir)  # bad input fails before the model loads
    if args.instructions:
        if args.no_instructions:
            raise ValueError("--instructions and --no-instructions: give one or the other")
        table = read_instruction_map(args.instructions)
        specs = with_instructions(specs, table)
        missing = [s.name for s in specs if s.name not in table]
        if missing:
            print(f"warning: {args.instructions} names no instruction for {', '.join(missing)}: "
                  "they keep their own (the task file's or the shipped table's)", file=sys.stderr)
    check_tasks(specs)
    if args.output:
        _check_output_file(args.output)
    mesh_cfg = _parse_mesh(args.mesh) if args.mesh else {"data": -1, "fsdp": 1, "tensor": 1}
    devices = jax.devices()
    if args.devices is not None:
        if args.devices < 1 or args.devices > jax.local_device_count() or jax.process_count() > 1:
            raise ValueError(f"--devices: expected 1..{jax.local_device_count()} on a single process, "
                             f"got {args.devices}")
        devices = jax.local_devices()[: args.devices]
    mesh = None
    if len(devices) > 1:
        mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    overrides = model_run_overrides(args)
    model = load_pretrained(args.model, mesh=mesh, **overrides)
    tokenizer = Tokenizer(model.tokenizer_path, max_length=args.max_length)
    buckets = length_buckets(args.max_length, args.bucket_steps) if args.bucket_steps else None
    encoder = Encoder(model.params, model.config, tokenizer, batch_size=args.batch_size, mesh=mesh, buckets=buckets)
    main = jax.process_index() == 0
    log = (lambda msg: print(msg, file=sys.stderr)) if main and not args.quiet else None
    path = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    results: dict = {}
    try:
        evaluate(specs, encoder, model={"path": path, "tokenizer": model.tokenizer_path},
                 progress=main and not args.quiet, results_dir=args.results_dir if main else None,
                 use_instructions=not args.no_instructions, log=log, results=results)
    except BaseException:
        if main and args.output and results:  # keep the finished tasks' results
            write_results(results, args.output)
            print(f"wrote the {len(results)} finished task(s) to {args.output} before stopping", file=sys.stderr)
        raise
    if main:
        print(summary_table(results))
        if args.output:
            write_results(results, args.output)
            print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _check_output_file(path: str) -> None:
    """--output must be a file in a writable folder: found out before hours of encoding."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path}: a folder (give a file name; --results-dir takes a folder)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {path}: folder {folder} is not writable")


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score a saved model on MTEB-style tasks (task file or table names)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (HF safetensors or qzhou-jax Orbax, with tokenizer)")
    p.add_argument("--tasks", required=True,
                   help="task file (YAML/JSON) or comma-separated names from the MTEB(eng, v2) / CMTEB tables")
    p.add_argument("--data-dir", default=None,
                   help="for task names: folder holding <name>/ (a BEIR folder, or <split>.jsonl + train.jsonl)")
    p.add_argument("--output", default=None, help="JSON file with every task's result (mteb's shape per task)")
    p.add_argument("--results-dir", default=None, help="folder for one <task>.json per task, written as each finishes")
    p.add_argument("--max-length", type=positive_int, default=1024,
                   help="tokens per text, instruction included (default "
                   "1024, as QZhou's official evaluation)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_model_run_args(p)
    p.add_argument("--bucket-steps", type=non_negative_int, default=4,
                   help="bucket lengths per doubling (default 4: 7%% padding on SciFact at 1024 tokens; "
                        "0: the tokenizer's powers of two)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=-1 (default: data-parallel over all devices)")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="use only the first N local devices (1: no sharding)")
    p.add_argument("--instructions", default=None, metavar="FILE",
                   help="JSON {task name: instruction} (the layout of QZhou's task_to_instructions_v2.json): "
                        "replaces the instruction of the tasks it names (null: none; a retrieval record's own "
                        "instruction field still wins for its query)")
    p.add_argument("--no-instructions", action="store_true", help="encode every text without an instruction")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_eval)
    return p
