"""Run tasks with an encoder; results in mteb's result-file shape; a summary table.

    specs = load_task_specs("tasks.yaml")
    results = evaluate(specs, encoder)            # {task name: result}
    print(summary_table(results))
    write_results(results, "results.json")        # all tasks, one file
    write_results(results, "results/", per_task=True)  # one <task>.json per task

Each result is what `mteb` writes for a task (`task_name`, `dataset_revision`,
`mteb_version`, `scores` = {split: [{metrics..., "main_score", "hf_subset", "languages"}]},
`evaluation_time`, ...), so `mteb.TaskResult.from_dict` reads it, plus:

- `main_score`: the main score of the evaluated split, for convenience;
- `qzhou_jax`: how the numbers were produced: the task definition (type, files, options),
  the prompt template and the instructions given to each side, the model (path when known)
  and the encoding settings (max length, dtype, buckets), and counts. Reproduction gaps come
  mostly from prompts, max length and model revision; all three are recorded here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qzhou_jax.config import write_json
from qzhou_jax.data.jsonl import RecordError
from qzhou_jax.eval.data import fingerprint
from qzhou_jax.eval.evaluators import EVALUATORS
from qzhou_jax.eval.tasks import TaskSpec
from qzhou_jax.tokenizer import PROMPT_TEMPLATE


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qzhou-jax")
    except Exception:
        return "unknown"


def make_encode_fn(encoder: Any, progress: bool = False, counter: dict | None = None,
                   use_instructions: bool = True) -> Callable:
    """`encode(texts, instruction)` over `encoder.encode`, encoding each distinct text once;
    `use_instructions=False` drops every instruction."""

    def encode(texts: Sequence[str], instruction: str | None) -> np.ndarray:
        instruction = instruction if use_instructions else None
        texts = list(texts)
        index: dict[str, int] = {}
        rows = [index.setdefault(t, len(index)) for t in texts]
        unique = list(index)
        emb = np.asarray(encoder.encode(unique, instruction=instruction, progress=progress))
        if counter is not None:
            counter["texts_encoded"] = counter.get("texts_encoded", 0) + len(unique)
        if emb.ndim != 2 or emb.shape[0] != len(unique):
            raise ValueError(f"encoder returned shape {emb.shape} for {len(unique)} texts")
        return emb if len(unique) == len(texts) and rows == list(range(len(texts))) else emb[rows]

    return encode


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def evaluate_task(spec: TaskSpec, encoder: Any, *, model: Any = None, progress: bool = False,
                  use_instructions: bool = True) -> dict[str, Any]:
    """One task's result dict (see the module docstring)."""
    spec.check_files()
    if not use_instructions:  # records' own instructions are dropped too: no side gets one
        spec = dataclasses.replace(spec, instruction=None, symmetric=False)
    counter: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        scores, info = EVALUATORS[spec.type](spec, make_encode_fn(encoder, progress, counter, use_instructions))
    except ValueError as e:  # name the task in data and protocol errors that do not already
        if spec.where in str(e):
            raise
        raise (RecordError if isinstance(e, RecordError) else ValueError)(f"{spec.where}: {e}") from e
    if not use_instructions:
        info["instructions"] = {side: None for side in info.get("instructions", {})}
    elapsed = time.perf_counter() - t0
    if spec.main_score not in scores:
        known = ", ".join(k for k, v in scores.items() if not isinstance(v, (dict, list)))
        raise ValueError(f"{spec.where}: main_score {spec.main_score!r} is not among the {spec.type} metrics ({known})")
    main = float(scores[spec.main_score])
    split_scores = dict(scores, main_score=main, hf_subset=spec.hf_subset, languages=list(spec.language))
    describe = getattr(encoder, "describe", None)
    encoding = describe() if callable(describe) else {}
    files = info.pop("files", [])
    model_info = model if isinstance(model, Mapping) else {"path": model}
    return _jsonable({
        "dataset_revision": fingerprint(files) if files else "local",
        "task_name": spec.name,
        "mteb_version": None,
        "scores": {spec.split: [split_scores]},
        "evaluation_time": elapsed,
        "kg_co2_emissions": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "main_score": main,
        "qzhou_jax": {
            "version": _version(),
            "task": spec.to_dict(),
            "prompt_template": PROMPT_TEMPLATE,
            "instructions": info.pop("instructions", {}),
            "model": dict(model_info),
            "encoding": encoding,
            "data_files": files,
            "counts": {**info, **counter},
        },
    })


def evaluate(specs: Sequence[TaskSpec], encoder: Any, *, model: Any = None, progress: bool = False,
             results_dir: str | os.PathLike | None = None, use_instructions: bool = True,
             log: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             results: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate every task with `encoder` (anything with `encode(texts, instruction=None,
    progress=False) -> [n, dim]`, normally `qzhou_jax.eval.encoder.Encoder`).

    Returns {task name: result} in the order of `specs`. `model` (a path or a mapping) is
    recorded in each result; with `results_dir`, each task's file is written there as soon
    as the task finishes (`<task>.json`, atomically). `use_instructions=False` encodes
    every text without an instruction (records' own instructions included). `should_stop`
    is asked before each task: when it returns True the tasks done so far are returned.
    `results`, when given, is filled as tasks finish, so a caller keeps them when a later task
    fails.
    """
    check_tasks(specs)  # missing files fail before any encoding
    results = {} if results is None else results
    for spec in specs:
        if should_stop is not None and should_stop():
            break
        if log is not None:
            log(f"evaluating {spec.name} ({spec.type}, split {spec.split})")
        results[spec.name] = evaluate_task(spec, encoder, model=model, progress=progress,
                                           use_instructions=use_instructions)
        if results_dir is not None:
            write_results({spec.name: results[spec.name]}, results_dir, per_task=True)
        if log is not None:
            r = results[spec.name]
            log(f"  {spec.main_score} = {r['main_score']:.4f} ({r['evaluation_time']:.1f}s)")
    return results


def _atomic_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, obj)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.()" else "_" for c in name)


def check_tasks(specs: Sequence[TaskSpec]) -> None:
    """Everything about `specs` that can fail before a text is encoded: each task's data files
    and distinct result names."""
    for spec in specs:
        spec.check_files()
    check_result_names(specs)


def check_result_names(specs: Sequence[TaskSpec]) -> None:
    """Every task gets its own result: names distinct, also as file names (`<task>.json`)."""
    seen: dict[str, str] = {}
    for spec in specs:
        key = _safe_name(spec.name).lower()  # one file on case-insensitive file systems too
        if key in seen:
            raise ValueError(f"{spec.where}: its result file {_safe_name(spec.name)}.json would overwrite task "
                             f"{seen[key]!r}'s; give the tasks distinct names")
        seen[key] = spec.name


def write_results(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                  per_task: bool = False) -> list[str]:
    """Write results atomically (temporary name, then rename): one JSON mapping task name ->
    result at `path`, or with `per_task`, one `<task>.json` per task in the folder `path`."""
    path = os.fspath(path)
    if not per_task:
        _atomic_json(path, dict(results))
        return [path]
    written = []
    for name, result in results.items():
        p = os.path.join(path, _safe_name(name) + ".json")
        _atomic_json(p, result)
        written.append(p)
    return written


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: task, type, split, main metric, score (x100), seconds; then the
    mean over tasks and the mean over task types (as MTEB's leaderboards average)."""
    rows = [("task", "type", "split", "metric", "score x100", "seconds")]
    by_type: dict[str, list[float]] = {}
    values = []
    for name, r in results.items():
        task = r.get("qzhou_jax", {}).get("task", {})
        ttype = task.get("type", "?")
        split = next(iter(r.get("scores", {})), "?")
        v = float(r["main_score"])
        values.append(v)
        by_type.setdefault(ttype, []).append(v)
        rows.append((name, ttype, split, task.get("main_score", "main_score"), f"{100 * v:.2f}",
                     f"{float(r.get('evaluation_time') or 0):.1f}"))
    if len(values) > 1:
        rows.append(("mean (tasks)", "", "", "", f"{100 * float(np.mean(values)):.2f}", ""))
        if len(by_type) > 1:
            type_means = [float(np.mean(v)) for v in by_type.values()]
            rows.append(("mean (types)", "", "", "", f"{100 * float(np.mean(type_means)):.2f}", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    right = {4, 5}
    lines = []
    for j, row in enumerate(rows):
        cells = [str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
