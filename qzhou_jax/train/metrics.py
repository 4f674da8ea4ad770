"""Run metrics: a JSONL log and TensorBoard event files (process 0 writes), throughput and MFU."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Mapping

from qzhou_jax.config import ModelConfig, atomic_write, naming_the_file


def step_flops(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training step on a global batch (padded shapes; forward and
    backward, attention included; GradCache's re-run is not counted, as in MFU)."""
    total = 0.0
    for side in ("q", "p"):
        rows, length = shapes[f"{side}_ids"]
        total += cfg.flops_per_token(length, training=True) * rows * length
    return total


def _set_aside(path: str) -> str:
    """Rename `path` to `<path>.<mtime>` (`-1`, `-2`, ... when that is taken); returns the name."""
    base = f"{path}.{int(os.path.getmtime(path))}"
    target, i = base, 0
    while os.path.exists(target):
        i += 1
        target = f"{base}-{i}"
    os.replace(path, target)
    return target


class MetricsLog:
    """Appends metrics to <out>/metrics.jsonl and TensorBoard events under <out>/tensorboard.

    Rows are labelled with the number of steps done. On resume from step k, rows after k
    (written by the interrupted attempt after its checkpoint) are dropped, and a row at k
    marked partial (a window a preemption cut short; its steps travel in the checkpoint and
    the resumed run logs the window whole), and with `rerun_eval` the evaluation rows at k (the
    resumed run evaluates step k again), so the log reads as one run. TensorBoard's events
    are rebuilt from the log kept: tensorboardX writes from a queue, so a killed process loses
    the events it had not written yet, whatever it flushed. A fresh run in a folder with an earlier log renames that log and its
    TensorBoard folder with their modification time appended.
    """

    def __init__(self, out_dir: str, tensorboard: bool = True, enabled: bool = True, resume_step: int | None = None,
                 rerun_eval: bool = False):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = None
        if resume_step is not None and os.path.isfile(self.path):
            kept = self._truncate(resume_step, rerun_eval)
        tb_dir = os.path.join(out_dir, "tensorboard")
        if resume_step is None:  # a fresh run: keep an earlier run's log and events aside
            for old in (self.path, tb_dir):
                if os.path.exists(old):
                    _set_aside(old)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # TensorBoard drops the earlier events from the purge step on, every tag alike: a resume
            # purges them all and writes the rows kept again (without a log, the steps after k only)
            purge = None if resume_step is None else 0 if kept is not None else resume_step + 1
            self.tb = SummaryWriter(tb_dir, purge_step=purge)
            for row in kept or ():
                self._add_scalars(row)
            self.tb.flush()

    def _truncate(self, step: int, drop_eval: bool) -> list[dict]:
        """Drop the rows after `step`, a partial row at `step` (a logging window that a
        preemption closed early: the resumed run logs that window whole) and, with `drop_eval`,
        the evaluation rows at `step`; returns the rows kept."""
        keep, rows = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                s = row.get("step") if isinstance(row, dict) else None
                if not isinstance(s, int):  # not a row of this log
                    continue
                if s == step and (row.get("partial") or drop_eval and any(k.startswith("eval/") for k in row)):
                    continue
                if s <= step:
                    keep.append(line)
                    rows.append(row)
        with atomic_write(self.path) as f:
            f.writelines(keep)
        return rows

    def write(self, step: int, values: Mapping[str, Any], prefix: str = "train", partial: bool = False) -> None:
        """One row; `partial`: a window cut short by a preemption (replaced on resume)."""
        if not self.enabled:
            return
        row = {"step": int(step), "wall_time": round(time.time(), 3)}  # TensorBoard's, kept for a rebuild
        if partial:
            row["partial"] = True
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{prefix}/{k}" if prefix else k] = float(v) if math.isfinite(float(v)) else str(v)
            elif isinstance(v, str):
                row[f"{prefix}/{k}" if prefix else k] = v
        with naming_the_file(self.path):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        try:
            self._add_scalars(row)
            if self.tb is not None:  # what the writer's thread has taken from its queue, for a live view
                self.tb.flush()
        except OSError as e:  # a full disk: stop writing events (the writer's thread and exit hook would repeat it)
            tb, self.tb = self.tb, None
            with contextlib.suppress(Exception):
                tb.close()
            raise OSError(e.errno, e.strerror or str(e), os.path.join(os.path.dirname(self.path), "tensorboard")) from e

    def _add_scalars(self, row: Mapping[str, Any]) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "partial", "wall_time") and isinstance(v, float):
                    self.tb.add_scalar(k, v, global_step=row["step"], walltime=row.get("wall_time"))

    def sync(self) -> None:
        """The rows written so far on disk (called before each checkpoint: a host that crashes
        after it keeps the log up to that step, which a resume needs whole)."""
        if self.enabled:
            with naming_the_file(self.path):
                os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
