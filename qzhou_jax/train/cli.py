"""`qzhou-jax train` and `qzhou-jax demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from qzhou_jax.cli_args import positive_int
from qzhou_jax.tokenizer import ASSETS

DEMO_CONFIG = os.path.join(ASSETS, "demo", "demo.yaml")
DEMO_MARKER = ".qzhou-demo"


def _report(result, stream=None) -> None:
    stream = sys.stderr if stream is None else stream  # the stderr of the call, not of the import
    print(f"{result.status} at step {result.step} in {result.seconds:.0f}s; checkpoints: {result.checkpoint_dir}",
          file=stream)
    if result.hf_dir:
        print(f"HF / sentence-transformers export: {result.hf_dir}", file=stream)
    print(f"metrics: {os.path.join(result.out_dir, 'metrics.jsonl')} (TensorBoard: tensorboard --logdir "
          f"{result.out_dir})", file=stream)


def _logged_scores(out_dir: str, step: int) -> dict[str, float]:
    """The evaluation scores metrics.jsonl holds for `step` (a resumed run evaluated before it started)."""
    scores: dict[str, float] = {}
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("step") == step:
                    for k, v in row.items():
                        if k.startswith("eval/"):
                            try:  # a non-finite score is logged as text ("nan")
                                scores[k[len("eval/"):]] = float(v)
                            except (TypeError, ValueError):
                                pass
    except (OSError, ValueError):
        pass
    return scores


def _score_table(result, stream) -> None:
    """Main score of each evaluation task before and after training (before: from metrics.jsonl
    when a resumed run did not evaluate it again; "-" where there is none)."""
    from qzhou_jax.train.loop import main_scores

    final = result.evals.get("after", {})
    if not final:
        return
    before = main_scores(result.evals.get("before", {})) or _logged_scores(result.out_dir, 0)
    after = main_scores(final)
    print(f"\n{'evaluation task':24s} {'metric':16s} {'before':>8s} {'after':>8s}", file=stream)
    for name in after:
        metric = final[name].get("qzhou_jax", {}).get("task", {}).get("main_score", "")
        was = f"{before[name]:8.4f}" if name in before else f"{'-':>8s}"
        print(f"{name:24s} {metric:16s} {was} {after[name]:8.4f}", file=stream)


def cmd_train(args: argparse.Namespace) -> int:
    from qzhou_jax.train.config import load_run_config
    from qzhou_jax.train.loop import PREEMPTED_EXIT_CODE, train

    cfg = load_run_config(args.config, args.set or [])  # every key checked before any device work
    if args.print_config:
        import dataclasses

        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        resolved = yaml.safe_dump({"model": dataclasses.asdict(cfg.model_config)}, sort_keys=False)
        print("# the model it resolves to (preset / init_from plus the fields above):")
        print("".join(f"# {line}\n" for line in resolved.splitlines()), end="")
        return 0
    result = train(cfg, resume=args.resume)
    _score_table(result, sys.stderr)
    _report(result)
    if result.status == "preempted" and os.environ.get("QZ_PREEMPTED_MARKER"):
        # for launchers: srun may report another task's status (launch/slurm_gpu.sbatch)
        with open(os.environ["QZ_PREEMPTED_MARKER"], "w") as f:
            f.write(f"{result.step}\n")
    return PREEMPTED_EXIT_CODE if result.status == "preempted" else 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train an embedding model from a YAML config",
                       description="Train from a YAML run config (see configs/). Exit code 75: preempted, a "
                                   "checkpoint was saved; rerun the same command with --resume. Exit code 69 (a "
                                   "job of several processes): another process stopped; rerun the job with "
                                   "--resume.")
    t.add_argument("--config", required=True, help="YAML run config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=2e-5 --set data.datasets.0.batch_size=64")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run's checkpoint folder (a fresh start if none)")
    t.add_argument("--print-config", action="store_true", help="print the checked, complete config and exit")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train the tiny model on the bundled sample data on CPU, evaluate, export",
                       description="Trains the tiny Qwen2-architecture model for a few minutes on the bundled "
                                   "synthetic multi-task sample, evaluates it on the held-out part before and "
                                   "after, saves the checkpoint and exports it as a HF folder.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; a previous demo "
                                                      "output there is replaced)")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the config's)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo in its output folder instead of starting over (exit code "
                        "75: preempted)")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from qzhou_jax.train.config import load_run_config
    from qzhou_jax.train.loop import PREEMPTED_EXIT_CODE, train

    out = os.path.abspath(args.out)
    overrides = [f"out_dir={out}"] + (args.set or [])
    if args.steps is not None:
        warmup = load_run_config(DEMO_CONFIG).train.warmup_steps
        overrides += [f"train.total_steps={args.steps}", f"train.warmup_steps={min(warmup, args.steps)}"]
    cfg = load_run_config(DEMO_CONFIG, overrides)
    out = cfg.output_dir  # --set out_dir=... names it too
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, DEMO_MARKER)):
        raise ValueError(f"{out}: exists and is not a demo output; choose another --out")
    if not args.resume and os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, DEMO_MARKER), "w").close()
    logging.getLogger("qzhou_jax").setLevel(logging.INFO)
    print(f"training the tiny model ({cfg.model_config.num_params():,} parameters) for {cfg.train.total_steps} "
          f"steps on the bundled sample; output in {out}", file=sys.stderr)
    result = train(cfg, resume=args.resume)
    if result.status == "preempted":
        _report(result, sys.stdout)
        print("the demo was interrupted; `qzhou-jax demo --resume` (with the same options) continues it",
              file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    _score_table(result, sys.stdout)
    _report(result, sys.stdout)
    return 0
