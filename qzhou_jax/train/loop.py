"""A training run: config -> data -> sharded train state -> steps -> checkpoints -> HF export.

    from qzhou_jax.train.config import load_run_config
    from qzhou_jax.train.loop import train
    result = train(load_run_config("configs/demo.yaml"), resume=False)

What a run does, in order:
1. The config was checked when loaded. Multi-process runs call `jax.distributed.initialize()`
   and the mesh is built; every dataset is opened and indexed (every record validated; each
   host builds the rows of every batch that its devices hold) and batch sizes are checked
   against the mesh, before any device work.
2. The state is created: from a checkpoint (`resume`), from `init_from` (a HF or Orbax model;
   stage 2 starts from stage 1's checkpoints folder) or from a random initialization.
3. Steps run over the task-homogeneous batches (one compiled step per batch shape),
   with metrics logged every `log.every` steps and an evaluation before, every
   `eval.every` steps and at the end. Checkpoints are written asynchronously every
   `checkpoint.every` steps and at the end.
4. SIGTERM (preemption): the current step finishes, a checkpoint is written and waited
   for, and the run returns status "preempted" (the command exits with code 75:
   rerun it with --resume). Before the first step (indexing, restore, the evaluation
   before training) the run stops without a new checkpoint; after the last one, the final
   checkpoint is written and the final evaluation and export are left to the rerun.
   With several processes, JAX's preemption sync point (its own SIGTERM handler) makes
   every process save at the same step.
5. At the end the parameters are exported as a HF + sentence-transformers folder
   (<out_dir>/hf) when `export_hf` is set.

Resuming restores parameters, optimizer state, step, and the data position; batches are
a function of (seed, step), so a resumed run computes exactly the losses an
uninterrupted run would, on any mesh shape and number of data-loading processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import numpy as np

from qzhou_jax import sharding
from qzhou_jax.checkpoint.manager import RunCheckpoints, abstract_train_state
from qzhou_jax.topology import peak_flops
from qzhou_jax.tokenizer import DEMO_TOKENIZER, Tokenizer
from qzhou_jax.train import xla_cache
from qzhou_jax.train.config import POLICY_FIELDS, RunConfig, resolve_init_from
from qzhou_jax.train.metrics import MetricsLog, step_flops
from qzhou_jax.train.optim import make_optimizer
from qzhou_jax.train.step import Trainer, check_batch, check_finite, train_state_shardings

if TYPE_CHECKING:
    from qzhou_jax.data.pipeline import TrainData

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: rerun with --resume


@dataclasses.dataclass
class RunResult:
    status: str                      # "completed" or "preempted"
    step: int                        # optimizer steps done
    history: list[dict]              # logged metrics per step (every log.every steps)
    evals: dict[str, Any]            # "before" / "step_<n>" / "after" -> task results
    out_dir: str
    checkpoint_dir: str
    hf_dir: str | None = None
    seconds: float = 0.0


class _Preemption:
    """SIGTERM sets a flag that the run checks after each step and between evaluation tasks.

    Single-process runs only: with several processes, `jax.distributed.initialize()` has
    installed JAX's own SIGTERM handler, which the preemption sync point
    (`RunCheckpoints.reached_preemption`) relies on to make every process stop at the same
    step; a Python handler would replace it, and processes stopping at different steps
    deadlock or crash in their next collective."""

    def __init__(self, enabled: bool):
        self.flag = False
        self._old = None
        self.enabled = (enabled and jax.process_count() == 1
                        and threading.current_thread() is threading.main_thread())

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: finishing this step, then saving a checkpoint")
        self.flag = True

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)


def tokenizer_path(cfg: RunConfig) -> str:
    """The tokenizer of a run: data.tokenizer, else init_from's, else the demo tokenizer
    for the tiny preset."""
    from qzhou_jax.train.config import expand_path

    if cfg.data.tokenizer:
        path = expand_path(cfg.data.tokenizer)
    elif cfg.init_from:
        folder = resolve_init_from(cfg.init_from)
        path = os.path.join(folder, "tokenizer") if os.path.isdir(os.path.join(folder, "tokenizer")) else folder
    elif cfg.model.get("preset") == "tiny":
        path = DEMO_TOKENIZER
    else:
        raise ValueError("data.tokenizer: required (a tokenizer folder) when the model is neither the tiny preset "
                         "nor initialized from a checkpoint")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"data.tokenizer: {path}: no tokenizer_config.json")
    return path


def _eval_specs(cfg: RunConfig) -> list:
    """The run's evaluation tasks, read and checked (files included): at the start of a run, so a
    bad task file stops it before training, not at its first evaluation hours later."""
    from qzhou_jax.eval.run import check_tasks
    from qzhou_jax.eval.tasks import load_task_specs
    from qzhou_jax.train.config import expand_path

    try:
        specs = load_task_specs(expand_path(cfg.eval.tasks))
        check_tasks(specs)
    except (OSError, ValueError) as e:  # name the config key, as every other config error does
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(f"eval.tasks: {e}") from None
    return specs


def _stop_check(preempt: _Preemption, exchange: Any = None) -> Callable[[], bool]:
    """What an evaluation asks before each task. One process (`exchange` None): the SIGTERM flag.
    Several: JAX's own SIGTERM handler posts a preemption notice to the coordination service; the
    processes agree through `exchange` (the run's `hosts.HostExchange`, one round per task, which
    every process reaches in the same order) on whether any of them has seen it, and all stop at
    the same task. The training loop's preemption sync point then saves at the next step."""
    if exchange is None:
        return lambda: preempt.flag
    from qzhou_jax.hosts import preemption_noticed

    def should_stop() -> bool:
        n = exchange.next_round()
        noticed = preemption_noticed(exchange.client)
        if bool(exchange.gather(n, [noticed], f"evaluation stop check {n}").max()):
            preempt.flag = True
        return preempt.flag

    return should_stop


def _evaluate(cfg: RunConfig, params: Any, tokenizer_dir: str, mesh: Any, preempt: _Preemption,
              specs: list, stop_exchange: Any) -> dict:
    from qzhou_jax.eval.encoder import Encoder
    from qzhou_jax.eval.run import evaluate

    tok = Tokenizer(tokenizer_dir, max_length=cfg.eval.max_length)
    encoder = Encoder(params, cfg.model_config, tok, batch_size=cfg.eval.batch_size, mesh=mesh)
    return evaluate(specs, encoder, should_stop=_stop_check(preempt, stop_exchange))


def _log_eval(logger: MetricsLog, step: int, results: Mapping[str, Any], preempt: _Preemption) -> None:
    """Log an evaluation's main scores, unless SIGTERM cut it short (a partial row would read as
    the evaluation of that step; the rerun evaluates again where it can)."""
    if preempt.flag:
        log.warning("the evaluation at step %d was cut short by SIGTERM after %d task(s); not logged", step,
                    len(results))
        return
    logger.write(step, main_scores(results), prefix="eval")


def main_scores(results: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(r["main_score"]) for name, r in results.items() if "main_score" in r}


def _window_means(steps: list[dict]) -> dict[str, float]:
    """What the log gets for the steps since the last line: the mean loss and gradient norm over
    them, the last learning rate, and each task's metrics (loss, accuracy, similarities,
    duplicates left out, ...) averaged over that task's steps, under ``<task>/``; one line per
    window keeps every step's values in the curves, and losses of different tasks apart."""
    out = {k: float(np.mean([m[k] for m in steps])) for k in ("loss", "grad_norm") if k in steps[-1]}
    if "lr" in steps[-1]:
        out["lr"] = steps[-1]["lr"]
    for task in dict.fromkeys(m["task"] for m in steps):
        mine = [m for m in steps if m["task"] == task]
        for k in mine[-1]:
            if k not in ("step", "task", "dataset", "lr"):
                out[f"{task}/{k}"] = float(np.mean([m[k] for m in mine if k in m]))
    return out


def _initial_params(cfg: RunConfig, mesh: Any) -> Any:
    from qzhou_jax.model import create_model

    model_cfg = cfg.model_config
    if cfg.init_from:
        from qzhou_jax.checkpoint import load_pretrained
        from qzhou_jax.train.config import expand_path

        policy = {k: getattr(model_cfg, k) for k in POLICY_FIELDS}
        loaded = load_pretrained(expand_path(cfg.init_from), mesh=mesh, **policy)
        return loaded.params
    return create_model(model_cfg, seed=cfg.train.seed, mesh=mesh).encoder.params()


def train(cfg: RunConfig, resume: bool = False, *, hooks: Sequence[Callable[[int, dict], None]] = (),
          stop_after: int | None = None) -> RunResult:
    """Run (or resume) the training run `cfg`. `hooks(step, metrics)` are called after each
    step's metrics are fetched; `stop_after` ends the loop early after that many steps
    (no final save: for tests and debugging)."""
    from qzhou_jax.train.config import check_init_from

    t_start = time.perf_counter()
    check_init_from(cfg)
    xla_cache.use(cfg.compilation_cache_dir)
    sharding.maybe_initialize_distributed()
    cfg = _portable_kernel(cfg)
    sharding.check_kernel_platform(cfg.model_config.attention_impl, "model.attention_impl")
    # SIGTERM from here on (indexing, restore, compile, evaluation) ends the run with status
    # "preempted" (exit code 75, which the launchers requeue) instead of killing it.
    with _Preemption(cfg.checkpoint.save_on_preemption) as preempt, _RunLock(cfg):
        if jax.process_index() == 0:  # the process that writes the cache
            xla_cache.drop_unreadable_entries()
        return _run(cfg, resume, hooks, stop_after, preempt, t_start)


LOCK_FILE = ".qzhou-run.lock"


class _RunLock:
    """One run at a time in an out_dir (and in its checkpoint.dir): an exclusive `flock` on
    `<folder>/.qzhou-run.lock`, held by process 0 until the run returns. A second `train` on the
    same folders (a requeued job while the old one still saves, a `--resume` typed in another
    terminal) is refused before it writes anything, instead of both writing checkpoints, the
    metrics log and the export into one folder. The kernel drops the lock with its process, a
    SIGKILL included, so nothing stale is left to remove. A filesystem without locks (gcsfuse)
    gets a warning and no lock."""

    def __init__(self, cfg: RunConfig):
        out, ckpt = os.path.abspath(cfg.output_dir), os.path.abspath(cfg.checkpoint_dir)
        self.folders = [("out_dir", out)]
        if os.path.commonpath([out, ckpt]) != out:  # a checkpoint.dir outside out_dir
            self.folders.append(("checkpoint.dir", ckpt))
        self.files: list = []

    def __enter__(self):
        taken, error = 1, None
        if jax.process_index() == 0:  # one job, one holder: the other processes share process 0's folders
            try:
                for what, folder in self.folders:
                    self.files.append(_lock_folder(what, folder))
            except BaseException as e:
                self.__exit__()
                if jax.process_count() == 1 or not isinstance(e, (ValueError, OSError)):
                    raise
                taken, error = 0, e
        if jax.process_count() > 1:  # every process stops alike, or the others wait in their first collective
            from qzhou_jax.hosts import HostExchange

            taken = int(HostExchange("run_lock").gather("taken", [taken], "the run's folder lock")[0, 0])
            if error is not None:
                raise error
            if not taken:
                raise ValueError(f"out_dir {self.folders[0][1]}: process 0 could not take the run's lock (another "
                                 "run using the folder? process 0's log says)")
        return self

    def __exit__(self, *exc):
        for f in self.files:
            if f is not None:
                f.close()  # closing the file releases the lock
        self.files = []


def _lock_folder(what: str, folder: str) -> Any:
    import errno
    import fcntl
    import socket

    _check_writable(folder, what)  # the usual message for a folder that cannot be written
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{what} {folder}: another qzhou-jax run is using it ({holder}, which holds {path}); "
                             "let it finish or stop it (SIGTERM saves a checkpoint) before starting or resuming a "
                             "run there, or choose another folder") from None
        f.close()
        log.warning("%s %s: cannot lock %s (%s): make sure that no other run uses this folder", what, folder, path,
                    e.strerror or e)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _portable_kernel(cfg: RunConfig) -> RunConfig:
    """A run whose model config comes from `init_from` inherits the attention kernel of the
    machine that trained it (cuDNN on GPU, splash on TPU); on another platform, and unless the
    run's own `model` section names a kernel, it runs XLA attention (the same function)."""
    from qzhou_jax.checkpoint import KERNEL_PLATFORM

    section = dict(cfg.model or {})
    want = KERNEL_PLATFORM.get(cfg.model_config.attention_impl)
    if not cfg.init_from or "attention_impl" in section or want is None or sharding.platform() == want:
        return cfg
    log.warning("init_from %s was trained with attention_impl %r (a %s kernel); on %s this run uses 'xla' "
                "attention (set model.attention_impl to choose)", cfg.init_from, cfg.model_config.attention_impl,
                want.upper(), sharding.platform())
    return dataclasses.replace(cfg, model={**section, "attention_impl": "xla"})


def _shorter_plan(total_steps: int, why: str) -> None:
    raise ValueError(f"train.total_steps: {total_steps}, but {why}; a resumed run can keep or extend its plan, not "
                     "shorten it below the steps done")


def _existing_parent(path: str) -> str:
    """`path` or the nearest of its parents that exists (absolute)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def _check_writable(path: str, what: str) -> None:
    """Fail early (before datasets are indexed) when ``path`` cannot become a writable folder;
    nothing is created."""
    path = os.path.abspath(path)
    existing = _existing_parent(path)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path}: cannot write there ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write there (no write permission in {existing})")


def _warn_if_short_of_space(cfg: RunConfig) -> None:
    """Warn at the start when a filesystem has less room than the run will write: `keep` checkpoints
    plus the one being written (parameters and Adam's two moments), and the export. Only a
    warning: the figure a network filesystem reports may not be its room."""
    n = cfg.model_config.num_params()
    mu = 2 if cfg.train.mu_dtype == "bfloat16" else 4
    param = jax.numpy.dtype(cfg.model_config.param_dtype).itemsize
    have = 0  # checkpoints already there (a resume) take their room already
    if os.path.isdir(cfg.checkpoint_dir):
        have = sum(name.isdigit() for name in os.listdir(cfg.checkpoint_dir))
    need: dict[int, list] = {}  # st_dev -> [bytes, folder]
    wants = [(cfg.checkpoint_dir, max(cfg.checkpoint.keep + 1 - have, 1) * n * (param + mu + 4))]
    if cfg.export_hf:
        wants.append((cfg.output_dir, 2 * n * param))  # the new export and the one it replaces
    for path, size in wants:
        existing = _existing_parent(path)
        entry = need.setdefault(os.stat(existing).st_dev, [0, existing])
        entry[0] += size
    for total, folder in need.values():
        try:
            free = shutil.disk_usage(folder).free
        except OSError:  # a filesystem that does not say
            continue
        if free < total:
            log.warning("%s: %.1f GiB free, and this run writes up to %.1f GiB there (checkpoint.keep %d checkpoints "
                        "and the one being written%s): a save may fail for lack of room", folder, free / 2**30,
                        total / 2**30, cfg.checkpoint.keep, ", the export" if cfg.export_hf else "")


def _run(cfg: RunConfig, resume: bool, hooks: Sequence[Callable[[int, dict], None]], stop_after: int | None,
         preempt: _Preemption, t_start: float) -> RunResult:
    from qzhou_jax.data.pipeline import CommonLengths, HostRows, TrainData, close_iterator

    model_cfg = cfg.model_config
    out_dir = cfg.output_dir
    for what, path in (("out_dir", out_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
        _check_writable(path, what)  # before indexing the datasets, which can take minutes
    if jax.process_index() == 0:
        _warn_if_short_of_space(cfg)
    eval_specs = _eval_specs(cfg) if cfg.eval.tasks else []
    eval_stop = None  # several processes: how evaluations agree to stop (`_stop_check`)
    if jax.process_count() > 1:
        from qzhou_jax.hosts import HostExchange, check_shared_folder

        exchange = HostExchange("shared_folders")  # one folder for all hosts, or the first checkpoint hangs
        for what, path in (("out_dir", out_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
            os.makedirs(path, exist_ok=True)
            check_shared_folder(path, what, exchange)
        eval_stop = HostExchange("eval_stop") if cfg.eval.tasks else None
    tok_dir = tokenizer_path(cfg)
    tokenizer = Tokenizer(tok_dir, max_length=max(max(s["query_max_length"], s["passage_max_length"])
                                                   for s in map(cfg.data.resolved, cfg.data.datasets)))
    tokenizer.check_fits(cfg.model_config.vocab_size, "data.tokenizer")  # on every host, before any step
    main = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    data = TrainData.from_config(cfg, tokenizer, HostRows.from_mesh(mesh))  # the rows this host's devices hold
    if preempt.flag:  # SIGTERM while the datasets were indexed: stop before any device work
        log.warning("preempted before the first step; rerun with --resume")
        return RunResult("preempted", 0, [], {}, out_dir, cfg.checkpoint_dir, seconds=time.perf_counter() - t_start)
    for spec, ds in zip(data.specs, cfg.data.datasets):  # fail before compiling with the numbers
        shapes = {"q_ids": (spec.batch_size, spec.query_max_length),
                  "p_ids": (spec.batch_size * spec.group, spec.passage_max_length)}
        shapes.update(q_mask=shapes["q_ids"], p_mask=shapes["p_ids"], scores=(spec.batch_size,),
                      q_labels=(spec.batch_size,), p_labels=(spec.batch_size * spec.group,))
        try:
            check_batch({k: np.empty(v, np.int8) for k, v in shapes.items()}, spec.task, mesh, None,
                        cfg.train.chunk_size)
        except ValueError as e:
            raise ValueError(f"data.datasets ({ds.name}): {e}") from None

    dp = sharding.data_parallel_size(mesh)
    for i, (spec, ds) in enumerate(zip(data.specs, cfg.data.datasets)):
        if 0 < spec.batch_size <= cfg.train.chunk_size:
            log.warning("train.chunk_size %d is not below data.datasets[%d] (%s)'s batch of %d: its steps embed the "
                        "whole batch at once, without GradCache", cfg.train.chunk_size, i, ds.name, spec.batch_size)
    if cfg.train.chunk_size and cfg.train.chunk_size % dp:
        log.warning("train.chunk_size %d is not a multiple of the %d data-parallel devices: every device computes "
                    "whole chunks redundantly; use a multiple of %d", cfg.train.chunk_size, dp, dp)

    ckpts = RunCheckpoints(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start_step = 0
    carried: list[dict] = []  # the steps of a logging window a preemption left open
    data_state: dict = {}
    restored = resume and ckpts.latest_step() is not None
    if restored:
        if min(ckpts.all_steps()) > len(data):  # before a (long) restore: no checkpoint can continue
            _shorter_plan(len(data), f"every checkpoint in {ckpts.directory} is past it "
                                     f"(steps {sorted(ckpts.all_steps())})")
        tx = make_optimizer(cfg.train)
        target = abstract_train_state(model_cfg, tx, train_state_shardings(model_cfg, tx, mesh))
        state, data_state, saved = ckpts.restore_newest_readable(target, cfg.to_dict(), model_cfg, POLICY_FIELDS)
        start_step = data.check_state(data_state)
        carried = [dict(m) for m in data_state.get("log_window", [])]
        if int(state.step) != start_step:
            raise ValueError(f"{ckpts.directory}/{saved}: train state at step {int(state.step)} but data at "
                             f"{start_step}")
        if start_step > len(data):  # refused before anything of the run is rewritten
            _shorter_plan(len(data), f"checkpoint {ckpts.directory}/{saved} is at step {start_step}")
        trainer = Trainer(model_cfg, cfg.train, None, loss_cfg=cfg.loss, mesh=mesh, state=state)
        log.warning("resumed from %s at step %d", ckpts.directory, start_step)
        ckpts.prune()
        changed = ckpts.model_changes(model_cfg, ("attention", "pooling", "normalize", "embedding_dim"))
        if changed:  # allowed (the arrays fit), but the model now computes another function
            log.warning("%s: the model computes differently from the steps trained so far (their "
                        "qzhou_config.json): %s; set these in the run's model section to keep them",
                        ckpts.directory, "; ".join(changed))
    else:
        if ckpts.latest_step() is not None:
            raise ValueError(f"{ckpts.directory}: holds checkpoints (latest step {ckpts.latest_step()}); pass "
                             "--resume to continue that run, or choose another out_dir")
        trainer = Trainer(model_cfg, cfg.train, _initial_params(cfg, mesh), loss_cfg=cfg.loss, mesh=mesh,
                          donate_params=True)
    ckpts.write_metadata(model_cfg, tok_dir, cfg.to_dict(), export_settings(cfg, data))

    # The evaluation owed at the step resumed from (every eval.every steps, and the final one) runs
    # again: a preemption may have cut it short or come before it.
    # A checkpoint written after its step's evaluation was logged says so (`evaluated`).
    eval_due = restored and bool(cfg.eval.tasks) and (
        start_step == cfg.train.total_steps or bool(cfg.eval.every and start_step % cfg.eval.every == 0)
        and data_state.get("evaluated") != start_step)
    # a resume without a checkpoint is a fresh start: an earlier log is kept aside, not truncated
    logger = MetricsLog(out_dir, cfg.log.tensorboard, enabled=main, resume_step=start_step if restored else None,
                        rerun_eval=eval_due)
    result = RunResult("completed", start_step, [], {}, out_dir, ckpts.directory)
    if main:
        for row in data.describe():
            log.info("dataset %(name)s: %(task)s, %(records)d records, batch %(batch_size)d, "
                     "p=%(probability).3f", row)
    if cfg.eval.tasks and cfg.eval.before and start_step == 0:
        result.evals["before"] = _evaluate(cfg, trainer.params, tok_dir, mesh, preempt, eval_specs, eval_stop)
        _log_eval(logger, 0, result.evals["before"], preempt)
    if eval_due and start_step < cfg.train.total_steps and not preempt.flag:
        res = _evaluate(cfg, trainer.params, tok_dir, mesh, preempt, eval_specs, eval_stop)
        result.evals[f"step_{start_step}"] = res
        _log_eval(logger, start_step, res, preempt)

    peak = peak_flops(jax.devices()[0], cfg.log.peak_tflops)
    n_dev = jax.device_count()
    progress = None
    if main and cfg.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True)
    pending: list[tuple[int, str, str, Any]] = []  # (step, task, dataset, metrics on device)
    # a window a preemption left open carries its steps and this host's token counts (padding)
    text, local = data_state.get("log_window_tokens") or (0, 0)
    window = {"t": time.perf_counter(), "flops": 0.0, "tokens": 0, "local": int(local), "text": int(text)}
    last_saved = start_step if restored else None
    evaluated = {"at": None}  # the step whose in-loop evaluation was logged last
    skips = {"in_a_row": 0, "total": 0, **data_state.get("nonfinite_skips", {})}  # train.skip_nonfinite's count

    def flush(preempted: bool = False) -> dict | None:
        """Settle the pending steps (fetch their metrics, check them) and log their window. At a
        preemption the line is marked partial and the window (its steps and token counts) is
        returned for the checkpoint: the resumed run logs the whole window, as an uninterrupted
        run does."""
        nonlocal carried
        if not pending:
            return None
        fetched = jax.device_get([p[3] for p in pending])
        if not multi:  # a failed asynchronous save stops the run now, not at the next save (with several
            ckpts.check()  # processes Orbax's finalize takes the error; its commit barrier stops the run)
        now = time.perf_counter()
        dt = max(now - window["t"], 1e-9)
        skipped = 0
        for (s, task, name, _), m in zip(pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            if m["finite"] > 0:
                skips["in_a_row"] = 0
            elif skips["in_a_row"] < cfg.train.skip_nonfinite:
                skips["in_a_row"] += 1
                skipped += 1
                log.warning("step %d (%s): non-finite loss %s, gradient norm %s: update skipped (%d in a row, "
                            "train.skip_nonfinite %d)", s + 1, name, m["loss"], m["grad_norm"], skips["in_a_row"],
                            cfg.train.skip_nonfinite)
            else:
                check_finite(m, s + 1)  # steps are counted from 1, as in the metrics and checkpoints
            m.update(step=s, task=task, dataset=name)
            result.history.append(m)
            for hook in hooks:
                hook(s, m)
        if skipped:
            # A skipped step applies no update and leaves the state's step count behind the data's;
            # count it, so that checkpoints hold matching steps (the learning-rate schedule follows
            # the optimizer's own count of applied updates).
            skips["total"] += skipped
            trainer.state = trainer.state._replace(step=trainer.state.step + skipped)
        steps = carried + result.history[-len(pending):]
        carried = []
        last = steps[-1]
        finite_steps = [m for m in steps if m["finite"] > 0] or steps  # a skipped step's NaN stays out of means
        rates = {"tokens_per_s": window["tokens"] / dt, "steps_per_s": len(pending) / dt,
                 "padding": 1.0 - window["text"] / max(window["local"], 1)}  # this host's rows
        if peak:
            rates["mfu"] = window["flops"] / dt / (n_dev * peak)
        summary = _window_means(finite_steps)
        summary.update(rates, task=last["task"], dataset=last["dataset"])
        if skips["total"]:
            summary["skipped_steps"] = skips["total"]
        done_now = last["step"] + 1
        # where an uninterrupted run closes a window: every log.every steps, the last step, and
        # before each checkpoint and evaluation
        closes = (done_now % cfg.log.every == 0 or done_now == cfg.train.total_steps
                  or done_now % cfg.checkpoint.every == 0
                  or bool(cfg.eval.tasks and cfg.eval.every and done_now % cfg.eval.every == 0))
        open_window = preempted and not closes
        logger.write(done_now, summary, partial=open_window)
        if progress is not None:
            post = {"loss": f"{last['loss']:.4f}", "tok/s": f"{rates['tokens_per_s']:,.0f}", "task": last["task"]}
            if "mfu" in rates:
                post["mfu"] = f"{rates['mfu']:.2f}"
            progress.set_postfix(post, refresh=False)
        left_open = {"steps": [m for m in steps if m["finite"] > 0], "tokens": [window["text"], window["local"]]}
        pending.clear()
        window.update(t=now, flops=0.0, tokens=0, local=0, text=0)
        return left_open if open_window else None

    def save(at: int, force: bool = False, log_window: dict | None = None) -> None:
        nonlocal last_saved
        if last_saved == at:
            return
        state = data.state(at)
        if log_window:
            state["log_window"] = log_window["steps"]
            state["log_window_tokens"] = log_window["tokens"]
        if skips["in_a_row"] or skips["total"]:
            state["nonfinite_skips"] = dict(skips)
        if evaluated["at"] == at:
            state["evaluated"] = at
        logger.sync()
        ckpts.save(at, trainer.state, state, force=force)
        last_saved = at

    multi = jax.process_count() > 1
    if multi and cfg.checkpoint.save_on_preemption and not preempt.flag:
        # JAX's preemption sync point is the step after the highest one the processes last
        # reported (0 before any): a notice that came while restoring or compiling set it to 1,
        # which a resumed run never reaches. Report the starting step, then agree on a notice
        # that came before it; one that comes later makes the first step the sync point.
        from qzhou_jax.hosts import preemption_noticed

        at_start = ckpts.reached_preemption(start_step)
        noticed = exchange.gather("first_step", [int(at_start or preemption_noticed(exchange.client))],
                                  "preemption check before the first step")
        preempt.flag = bool(noticed.max())
    if preempt.flag:  # SIGTERM before the first step: nothing new to save
        result.status = "preempted"
        log.warning("preempted before the first step; rerun with --resume")
    batches = iter(()) if preempt.flag else data.iterator(start_step)
    wait_for_saves = True
    try:
        bucketed = {b.name for b in data.builders if b.spec.query_buckets or b.spec.passage_buckets}
        common = CommonLengths() if multi and bucketed else None
        for item in batches:
            step = item.step
            host_batch = item.batch
            if multi and item.dataset in bucketed:  # every host the same, or none of them
                host_batch = common.pad(step, host_batch, tokenizer.pad_id)
            batch = trainer.prepare(host_batch, item.task)
            trainer.state, metrics = trainer.step_fn(item.task)(trainer.state, batch)
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            window["flops"] += step_flops(model_cfg, shapes)
            window["tokens"] += int(np.prod(shapes["q_ids"])) + int(np.prod(shapes["p_ids"]))
            window["local"] += host_batch["q_ids"].size + host_batch["p_ids"].size
            window["text"] += int(host_batch["q_mask"].sum()) + int(host_batch["p_mask"].sum())
            pending.append((step, item.task, item.dataset, metrics))
            done = step + 1
            if progress is not None:
                progress.update(1)
            if done % cfg.log.every == 0 or done == cfg.train.total_steps:
                flush()
            if (cfg.eval.tasks and cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.total_steps
                    and not preempt.flag):
                flush()
                res = _evaluate(cfg, trainer.params, tok_dir, mesh, preempt, eval_specs, eval_stop)
                result.evals[f"step_{done}"] = res
                _log_eval(logger, done, res, preempt)
                if not preempt.flag:
                    evaluated["at"] = done
            result.step = done
            stop = ckpts.reached_preemption(done) if multi else preempt.flag
            if stop and cfg.checkpoint.save_on_preemption:
                save(done, force=True, log_window=flush(preempted=True))
                ckpts.wait()
                result.status = "preempted"
                log.warning("preempted: checkpoint for step %d written to %s; rerun with --resume",
                            done, ckpts.directory)
                break
            if done % cfg.checkpoint.every == 0:
                flush()  # a non-finite step raises here, before a checkpoint could record it
                save(done)
            if stop_after is not None and done >= stop_after:
                flush()
                result.status = "stopped"
                break
        flush()
        if result.status == "completed":
            save(result.step, force=True)
    except BaseException as e:
        # another process is gone: closing would wait for a save in flight, which waits for that
        # process in Orbax's barrier until JAX gives up on it and aborts this one
        from qzhou_jax.hosts import peer_lost

        wait_for_saves = not (multi and peer_lost(e))
        raise
    finally:
        close_iterator(batches)
        if progress is not None:
            progress.close()
        if wait_for_saves:
            ckpts.close()

    if main:
        passes = ", ".join(f"{k} {v:.2f}" for k, v in data.plan.epochs_seen(result.step).items())
        log.info("passes over each dataset after %d steps: %s", result.step, passes)
    if result.status == "completed":
        left = []  # what SIGTERM kept from running; the last checkpoint is written, --resume runs it
        if cfg.eval.tasks:
            if not preempt.flag:
                after = _evaluate(cfg, trainer.params, tok_dir, mesh, preempt, eval_specs, eval_stop)
                if not preempt.flag:  # one cut short by SIGTERM is not reported: --resume runs it again
                    result.evals["after"] = after
                _log_eval(logger, result.step, after, preempt)
            if "after" not in result.evals:
                left.append("the evaluation")
        if cfg.export_hf:
            if preempt.flag:
                left.append("the export")
            else:
                try:
                    result.hf_dir = _export(cfg, trainer, tok_dir, data)
                except OSError:  # a full disk: say that the trained state is safe
                    log.error("the export to %s failed; checkpoint %d is saved in %s: rerun with --resume (once "
                              "there is room) to export it", os.path.join(cfg.output_dir, "hf"), result.step,
                              ckpts.directory)
                    raise
        if left:
            result.status = "preempted"
            log.warning("preempted after the last step (checkpoint %d written); rerun with --resume to finish %s",
                        result.step, " and ".join(left))
    logger.close()
    result.seconds = time.perf_counter() - t_start
    return result


def _export(cfg: RunConfig, trainer: Trainer, tok_dir: str, data: TrainData) -> str | None:
    from qzhou_jax.checkpoint.export import save_hf

    out = os.path.join(cfg.output_dir, "hf")
    # several processes: each gathers, process 0 writes (out_dir is shared, checked at the start)
    return save_hf(trainer.params, cfg.model_config, out, dtype=cfg.model_config.param_dtype, tokenizer_dir=tok_dir,
                   settings=export_settings(cfg, data), overwrite=True, owned=True)


def export_settings(cfg: RunConfig, data: TrainData):
    """The sentence-transformers settings of the run's model: the longest text it trained on
    as max_seq_length, the instruction most of its retrieval queries trained with (records'
    own or their dataset's) in the "query" prompt, empty when they had none."""
    from qzhou_jax.st_folder import Settings

    instruction = data.query_instruction()
    length = max(max(cfg.data.resolved(d)["query_max_length"], cfg.data.resolved(d)["passage_max_length"])
                 for d in cfg.data.datasets)
    if instruction is None:  # queries trained without one: an empty prompt, not the web-search default
        return Settings(max_seq_length=length, prompts={"query": "", "document": ""})
    return Settings().overridden(max_seq_length=length, query_instruction=instruction)
