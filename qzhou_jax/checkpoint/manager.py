"""Training checkpoints: an Orbax CheckpointManager holding the train state and the data state.

Layout of a run's checkpoint folder:

    <dir>/<step>/state/        the TrainState {params, opt_state, step} (Orbax pytree, sharded)
    <dir>/<step>/data/         the input pipeline's state (JSON: next step, data fingerprint)
    <dir>/qzhou_config.json    the model config (so the folder is also a model: `init_from`,
    <dir>/tokenizer/           `qzhou-jax convert`, `load_pretrained` read it)
    <dir>/run_config.yaml      the run's full configuration
    <dir>/sentence_transformers.json   max_seq_length and prompts of the run's HF export
                               (`convert orbax-to-hf` writes the same)

Saves are asynchronous (training continues while the arrays are written) and a step folder
appears only once complete, so a crash during a save leaves the previous checkpoints intact.
Restoring places every array in the sharding of the *current* mesh, whatever mesh wrote it.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qzhou_jax import st_folder
from qzhou_jax.checkpoint.export import copy_tokenizer, write_json
from qzhou_jax.config import TOKEN_ID_FIELDS, ModelConfig, atomic_write, naming_the_file

log = logging.getLogger(__name__)


class RunCheckpoints:
    """Save / restore (TrainState, data state) pairs under one folder."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        # cleanup_tmp_directories: a save killed outright leaves `<step>.orbax-checkpoint-tmp` (up to a whole
        # checkpoint of arrays); Orbax replaces it only when the same step is saved again, which never
        # happens for a preemption's off-schedule step. The run holds the folder (`loop._RunLock`), so no
        # other run's save in progress is removed.
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    # ------------------------------------------------------------- metadata
    def write_metadata(self, cfg: ModelConfig, tokenizer_dir: str | None, run_config: Mapping | None = None,
                       settings: st_folder.Settings | None = None) -> None:
        """Model config, tokenizer, run config and the sentence-transformers settings of the
        run's HF export next to the steps (process 0 only)."""
        if jax.process_index() != 0:
            return
        from qzhou_jax.checkpoint.orbax_io import CONFIG_FILE, TOKENIZER_DIR, config_to_json

        os.makedirs(self.directory, exist_ok=True)
        write_json(os.path.join(self.directory, CONFIG_FILE), config_to_json(cfg))
        if settings is not None:
            st_folder.save_settings(self.directory, settings)
        if tokenizer_dir and not os.path.isdir(os.path.join(self.directory, TOKENIZER_DIR)):
            tmp = os.path.join(self.directory, f".{TOKENIZER_DIR}.tmp{os.getpid()}")
            try:
                os.makedirs(tmp, exist_ok=True)
                with naming_the_file(tmp):
                    copy_tokenizer(tokenizer_dir, tmp)
                os.replace(tmp, os.path.join(self.directory, TOKENIZER_DIR))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if run_config is not None:
            import yaml

            path = os.path.join(self.directory, "run_config.yaml")
            with atomic_write(path) as f:
                yaml.safe_dump(run_config, f, sort_keys=False)
                f.flush()  # the new file is complete before the last start's is moved aside
                if os.path.isfile(path):  # a restart: say what changed since the last start
                    with open(path, encoding="utf-8") as old:
                        before = yaml.safe_load(old) or {}
                    changed = _changes(before, dict(run_config))
                    if changed:
                        log.warning("%s: the run config differs from the last start's (now kept as "
                                    "run_config.previous.yaml): %s", self.directory, "; ".join(changed))
                        os.replace(path, os.path.join(self.directory, "run_config.previous.yaml"))

    # ---------------------------------------------------------------- steps
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def prune(self) -> list[int]:
        """Delete the oldest steps beyond `keep`; returns them. Orbax removes old steps after a
        save completes, so a run killed between a save's commit and that removal keeps one step
        too many, for good when it had no save left (its last). Every process calls it."""
        keep = self._options.max_to_keep
        steps = sorted(self.all_steps())
        extra = steps[:-keep] if keep and len(steps) > keep else []
        for step in extra:
            self.manager.delete(step)
        if extra:
            log.info("%s: removed step(s) %s (checkpoint.keep is %d)", self.directory,
                     ", ".join(map(str, extra)), keep)
        return extra

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], force: bool = False) -> bool:
        """Start writing `state` (a TrainState) and `data_state` as checkpoint `step`."""
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            data=ocp.args.JsonSave(dict(data_state))), force=force)
        return bool(saved)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(TrainState, data state, step) of checkpoint `step` (default: the latest).

        `target` is an abstract TrainState (jax.ShapeDtypeStruct leaves carrying the
        shardings to restore into)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target._asdict()), data=ocp.args.JsonRestore()))
        state = type(target)(**restored["state"])
        return state, dict(restored["data"]), step

    def restore_newest_readable(self, target: Any, run_config: Mapping | None = None,
                                model_config: ModelConfig | None = None,
                                policy_fields: Collection[str] = ()) -> tuple[Any, dict, int]:
        """``restore`` of the newest checkpoint that reads.

        A step folder damaged after it was committed (a non-atomic rename on a gcsfuse/NFS mount, a
        lost file) makes the restore raise. The older steps are then tried, newest first; once one
        reads, the newer unreadable folders are renamed ``<step>.unreadable`` (kept for inspection, out
        of Orbax's way) and a warning names each. When no step reads, nothing is renamed and the newest
        step's error is raised (a changed model config fails every step alike).
        Several processes agree on each step through the coordination service (`hosts.HostExchange`):
        a step counts as read only where it read on every process, and process 0 renames. The damage
        a fallback handles fails every process alike (a step's metadata or data item, which all of
        them read). A step that fails on some processes only leaves the others waiting in Orbax's
        barrier: the failed ones stop after the exchange's timeout (`_read_everywhere`), naming the
        step folder to move aside, and the job ends.
        With the current run's `model_config` and `run_config`, the error names the settings that
        shape the train state and differ from those the checkpoints were written with: the model's
        fields less its `policy_fields` (against `qzhou_config.json`) and whether gradients are
        clipped (against `run_config.yaml`)."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        shapes = self._shape_changes(target, steps[0])
        if shapes:  # another model: every step would fail alike; say so before reading any array
            path = os.path.join(self.directory, str(steps[0]))
            changed = self._state_changes(model_config, run_config, policy_fields)
            why = (f"the run config differs from the one that wrote the checkpoints (their qzhou_config.json) in "
                   f"{'; '.join(changed)}: restore those settings to resume" if changed else
                   "does the model config match the checkpoint's?")
            raise ValueError(f"{path}: checkpoint {steps[0]} holds parameters of other shapes "
                             f"({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''}); {why}")
        failed: list[tuple[int, str]] = []
        exchange = None
        if jax.process_count() > 1:
            from qzhou_jax.hosts import HostExchange

            exchange = HostExchange("restore")
        for step in steps:
            restored, reason = self._read_everywhere(target, step, exchange)
            if restored is None:  # one retry: a transient storage error is not damage
                log.warning("%s/%d: restore failed (%s); retrying once", self.directory, step, reason)
                restored, reason = self._read_everywhere(target, step, exchange, "retry")
            if restored is None:
                if step == steps[-1]:
                    path = os.path.join(self.directory, str(steps[0]))
                    first = failed[0][1] if failed else reason
                    changed = self._state_changes(model_config, run_config, policy_fields)
                    if changed:
                        raise ValueError(f"{path}: checkpoint {steps[0]} could not be restored: {first}; the run "
                                         "config differs from the one that wrote the checkpoints (their "
                                         f"qzhou_config.json and run_config.yaml) in {'; '.join(changed)}: restore "
                                         "those settings to resume")
                    hint = (f"; if its files are damaged, move it aside (mv {path} {path}.unreadable) on the "
                            "shared storage and resume from the previous step" if len(steps) > 1 else "")
                    raise ValueError(f"{path}: checkpoint {steps[0]} could not be restored: {first} (does the "
                                     f"model and optimizer config match the checkpoint's?){hint}")
                failed.append((step, reason))
                log.warning("%s/%d: checkpoint unreadable (%s); trying the previous one", self.directory, step,
                            reason)
                continue
            if failed:
                self._move_aside(failed, step, exchange)
                self._reopen()  # the manager's list of steps
            return restored
        raise AssertionError("unreachable")

    def _read_everywhere(self, target: Any, step: int, exchange: Any, attempt: str = "first") -> tuple[Any, str]:
        """``_try_restore``; with several processes, a step counts as read only where it read on every
        one of them. A failed read reopens the manager, a barrier of every process, so with several
        processes that waits until they agree: a process whose read failed while the others' went
        through stops at the exchange's timeout, naming the folder (the others wait in Orbax's
        barrier until the job ends)."""
        if exchange is None:
            return self._try_restore(target, step)
        restored, reason = self._try_restore(target, step, reopen=False)
        path = os.path.join(self.directory, str(step))
        read = exchange.gather(f"step-{step}-{attempt}", [restored is not None],
                               f"{path}: agreeing whether checkpoint {step} read on every host "
                               f"({'it did' if restored is not None else f'not here: {reason}'}); "
                               f"if its files are damaged, move it aside (mv {path} {path}.unreadable) "
                               "and resume again")[:, 0]
        if read.all():
            return restored, ""
        if restored is not None:
            restored, reason = None, f"unreadable on process(es) {np.flatnonzero(read == 0).tolist()}"
        self._reopen()  # on every process alike
        return None, reason

    def _move_aside(self, failed: list[tuple[int, str]], step: int, exchange: Any) -> None:
        """Rename the `failed` step folders ``<step>.unreadable`` (process 0; the others wait for it)."""
        problem = ""
        if jax.process_index() == 0:
            for bad, why in failed:
                path = os.path.join(self.directory, str(bad))
                try:
                    os.replace(path, f"{path}.unreadable")
                except OSError as e:  # e.g. a bucket mount that cannot rename folders
                    problem = (f"{path}: unreadable ({why}), and it could not be renamed out of the way "
                               f"({e.strerror or e}); move it aside yourself and resume again")
                    break
        if exchange is not None:
            renamed = exchange.gather("renamed", [not problem], f"{self.directory}: waiting for process 0 to "
                                      "rename the unreadable checkpoints")
            if not renamed[0, 0] and not problem:
                problem = (f"{self.directory}: process 0 could not rename the unreadable checkpoints "
                           f"{[bad for bad, _ in failed]} (its log says why); move them aside and resume again")
        if problem:
            raise ValueError(problem)
        for bad, why in failed:
            path = os.path.join(self.directory, str(bad))
            log.warning("%s: unreadable (%s), renamed %s.unreadable; resuming from step %d", path, why, path, step)

    def _state_changes(self, model_config: ModelConfig | None, run_config: Mapping | None,
                       policy_fields: Collection[str]) -> list[str]:
        """The settings shaping the train state that differ from the checkpoints' own."""
        changed = [] if model_config is None else self.model_changes(
            model_config, exclude=(*policy_fields, *TOKEN_ID_FIELDS))  # the ids shape nothing
        saved_run = os.path.join(self.directory, "run_config.yaml")
        if run_config is not None and os.path.isfile(saved_run):
            import yaml

            try:
                with open(saved_run, encoding="utf-8") as f:
                    clip_before = ((yaml.safe_load(f) or {}).get("train") or {}).get("clip_norm")
            except (OSError, yaml.YAMLError, AttributeError):
                return changed
            clip_now = (dict(run_config).get("train") or {}).get("clip_norm")
            if bool(clip_before and clip_before > 0) != bool(clip_now and clip_now > 0):  # the optimizer chain
                changed.append(f"train.clip_norm: {clip_before!r} -> {clip_now!r}")
        return changed

    def model_changes(self, model_config: ModelConfig, fields: Collection[str] | None = None,
                      exclude: Collection[str] = ()) -> list[str]:
        """'model.<field>: saved -> now' for the fields of `model_config` (all, or `fields`, less
        `exclude`) that differ from the checkpoints' qzhou_config.json ([] without one)."""
        import dataclasses

        from qzhou_jax.checkpoint.orbax_io import read_model_config

        saved_model = os.path.join(self.directory, "qzhou_config.json")
        if not os.path.isfile(saved_model):
            return []
        try:
            before = dataclasses.asdict(read_model_config(saved_model))
        except (OSError, ValueError):
            return []
        now = dataclasses.asdict(model_config)
        return [f"model.{k}: {before[k]!r} -> {now[k]!r}" for k in now
                if (fields is None or k in fields) and k not in exclude and before.get(k) != now[k]]

    def _shape_changes(self, target: Any, step: int) -> list[str]:
        """'name: (saved shape) -> (target shape)' for the parameters whose shapes differ between
        checkpoint `step` (its metadata) and `target`; [] when they agree or the metadata does not read
        (the restore then reports it)."""
        from qzhou_jax.checkpoint.orbax_io import tree_metadata

        try:
            meta = tree_metadata(os.path.join(self.directory, str(step), "state"))
            saved = {jax.tree_util.keystr(p): tuple(leaf.shape)
                     for p, leaf in jax.tree_util.tree_leaves_with_path(meta["params"])}
        except Exception:  # unreadable metadata is the restore's to report (and to fall back from)
            return []
        want = {jax.tree_util.keystr(p): tuple(leaf.shape)
                for p, leaf in jax.tree_util.tree_leaves_with_path(target.params)}
        out = [f"params{k}: {saved.get(k, 'absent')} -> {shape}" for k, shape in want.items() if saved.get(k) != shape]
        return out + [f"params{k}: {shape} -> absent" for k, shape in saved.items() if k not in want]

    def _try_restore(self, target: Any, step: int, reopen: bool = True) -> tuple[Any, str]:
        """(restore(...), "") or (None, the error's first line). Orbax and TensorStore raise many types;
        any means "unreadable". The manager is reopened after a failure (unless `reopen` is false:
        the caller does it), outside the ``except`` so that the failed read's pending coroutines can
        be finalized then, not at interpreter exit."""
        try:
            return self.restore(target, step), ""
        except Exception as e:
            reason = _first_line(e)
        if reopen:
            self._reopen()
        return None, reason

    def _reopen(self) -> None:
        """A fresh manager on the same folder (after a failed restore, or steps moved aside)."""
        try:
            self.manager.close()
        except Exception:  # a manager whose restore failed may not close cleanly
            pass
        import gc

        gc.collect()  # a failed restore leaves read coroutines behind: finalize them now, not at exit
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption notice reached this job (multi-process: all processes agree
        on the step, through JAX's coordination service). Call it only in multi-process
        runs; a single process uses the SIGTERM flag of the training loop."""
        return bool(self.manager.reached_preemption(step))

    def check(self) -> None:
        """Raise the error of an asynchronous save that failed (a full disk), instead of at the
        next save: the steps trained meanwhile could not be saved. Does not wait for a save in
        progress."""
        self.manager.check_for_errors()
        if not self.manager.is_saving_in_progress():
            self.manager.wait_until_finished()  # returns at once; raises the error of a save that failed

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The start of an error's message (TensorStore's run to pages)."""
    text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested config dicts."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = []
        for k in list(before) + [k for k in after if k not in before]:
            out += _changes(before.get(k), after.get(k), f"{prefix}{k}.")
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after) and before != after:
        return [c for i, (a, b) in enumerate(zip(before, after)) for c in _changes(a, b, f"{prefix[:-1]}[{i}].")]
    return [] if before == after else [f"{prefix[:-1]}: {before!r} -> {after!r}"]


def abstract_train_state(cfg: ModelConfig, tx: Any, shardings: Any) -> Any:
    """The TrainState's shapes and dtypes with `shardings` attached: a restore target."""
    from qzhou_jax.train.step import TrainState, abstract_params

    abstract = jax.eval_shape(lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)), abstract_params(cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

