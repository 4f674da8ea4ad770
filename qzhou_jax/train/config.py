"""The configuration of a training run: one YAML file, overridable from the command line.

    qzhou-jax train --config configs/stage1-qwen2.5-7b.yaml --set train.lr=2e-5 --set data.batch_size=128

Top-level sections (every key is checked, unknown keys and wrong types fail with the
key's path before any device work):

    out_dir      folder of the run: checkpoints/, metrics.jsonl, tensorboard events, hf/
    init_from    a HF checkpoint folder or an Orbax checkpoint (params folder, or another
                 run's checkpoints/ folder: stage 2 starts from stage 1's result)
    model        `preset: <name>` plus any ModelConfig field (architecture fields only
                 without init_from; with it, only the embedding and execution fields)
    mesh         MeshConfig: data / fsdp / tensor sizes (-1: the remaining devices)
    train        TrainConfig (optimizer, schedule, total_steps, chunk_size, keep_chunks, seed)
    loss         LossConfig (temperatures, negatives, or a `function` of your own)
    data         DataConfig: datasets, mixture (alpha, eta), batch sizes, lengths
    checkpoint   CheckpointConfig: dir / every / keep / async_save / save_on_preemption
    eval         EvalConfig: task file, how often
    log          LogConfig: how often, TensorBoard, progress bar
    export_hf    export <out_dir>/hf at the end (default true)
    compilation_cache_dir  XLA's persistent cache (default ~/.cache/qzhou-jax/xla)

A file may start from others: `base: stage1.yaml` (or a list) loads that file first and
merges this one on top (mappings key by key; lists, such as data.datasets, replace).
Paths may use `{assets}` (the package's bundled assets folder) and environment variables
(`$DATA/...`); relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Literal

from qzhou_jax.config import (PRESETS, ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml,
                              read_json, to_dict, token_ids)
from qzhou_jax.sharding import MeshConfig
from qzhou_jax.tokenizer import ASSETS
from qzhou_jax.train.optim import TrainConfig
from qzhou_jax.train.step import LossConfig, check_keep_chunks

TASKS = ("retrieval", "sts", "classification")
FORMATS = ("jsonl", "beir", "tfds")
# ModelConfig fields a run may change on a pretrained checkpoint (not its architecture).
POLICY_FIELDS = ("attention", "pooling", "normalize", "embedding_dim", "param_dtype", "compute_dtype",
                 "remat", "remat_layers", "scan_layers", "attention_impl", "weight_grad_dtype")


def expand_path(path: str) -> str:
    """`{assets}` -> the bundled assets folder; `$VAR` / `~` expanded."""
    return os.path.expanduser(os.path.expandvars(path.replace("{assets}", ASSETS)))


def _local_path(value: str | None, path: str) -> None:
    """Run outputs are written with the filesystem's own calls: a URL would become a local
    folder named after it (`gs:/bucket/...`) and be lost with the machine."""
    if isinstance(value, str) and "://" in value:
        raise ConfigError(f"{path}: {value!r} is a URL; run outputs need a filesystem path that every "
                          f"process can read and write and that outlives the machines (a shared mount: "
                          f"NFS / Filestore, or a bucket mounted with gcsfuse)")


def _positive(value: Any, path: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{path}: expected a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One training dataset; every batch comes from exactly one dataset.

    task: retrieval (query, pos, neg), sts (text1, text2, score: CoSENT) or
    classification (text, label: class-masked InfoNCE over example-based triplets).
    path: a JSONL file, a BEIR folder or a TFDS dataset name; format: jsonl (default), beir
    (a folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; retrieval only) or tfds
    (`pip install "qzhou-jax[tfds]"`; data_dir: its data folder); split: the BEIR qrels or
    TFDS split (default train). skip_bad_records: this dataset's (default: the data section's).
    fields: our field name -> the name in the data (e.g. {query: anchor, pos: positive}).
    instruction: QZhou's prompt on the first side (the retrieval query, sts text1, the
    classification anchor), and on both sides when `symmetric` (default: true for sts and
    classification, recipe §2). For retrieval a record's own `instruction` field wins.
    Unset sizes and lengths come from the `data` section, except that sts and classification
    datasets cut both sides at one length (their query length) unless this dataset's
    `passage_max_length` is set: a pair and its swapped copy see the same texts.
    weight: replaces the n^alpha mixture weight of this dataset.
    """

    name: str
    task: Literal["retrieval", "sts", "classification"]
    path: str
    format: Literal["jsonl", "beir", "tfds"] = "jsonl"
    split: str = "train"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    instruction: str | None = None
    symmetric: bool | None = None
    batch_size: int | None = None
    hard_negatives: int | None = None
    query_max_length: int | None = None
    passage_max_length: int | None = None
    weight: float | None = None
    skip_bad_records: bool | None = None
    data_dir: str | None = None

    def __post_init__(self):
        if not self.name:
            raise ConfigError("name: must not be empty")
        if self.instruction is not None and not self.instruction.strip():  # blank is none, as in records
            object.__setattr__(self, "instruction", None)
        for key in ("batch_size", "query_max_length", "passage_max_length"):
            _positive(getattr(self, key), key)
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise ConfigError(f"hard_negatives: expected >= 0, got {self.hard_negatives}")
        if self.weight is not None and not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"weight: expected a positive number, got {self.weight}")
        if self.fields:
            from qzhou_jax.data.records import DEFAULT_FIELDS, resolve_fields

            if self.format == "beir":
                raise ConfigError("fields: does not apply to BEIR folders (their layout fixes the field names)")
            try:
                resolve_fields(DEFAULT_FIELDS[self.task], self.fields, self.task)
            except ValueError as e:
                raise ConfigError(f"fields: {e}") from None

    @property
    def is_symmetric(self) -> bool:
        return self.task != "retrieval" if self.symmetric is None else self.symmetric

    def source_spec(self, skip_bad_records: bool) -> dict:
        """Keyword arguments of `qzhou_jax.data.sources.open_source`."""
        return {"name": self.name, "task": self.task, "path": expand_path(self.path), "format": self.format,
                "split": self.split, "fields": dict(self.fields),
                "skip_bad_records": self.skip_bad_records if self.skip_bad_records is not None else skip_bad_records,
                "data_dir": expand_path(self.data_dir) if self.data_dir else None}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset mixture and batch shapes.

    Dataset i is drawn with probability proportional to n_i^alpha (its `weight` if set).
    With `eta`, retrieval datasets together get the share eta of the draws and the others
    1 - eta (each group split by n^alpha inside; recipe §5: 0.72 in stage 2).
    batch_size: global queries (retrieval) / anchors (classification) per step;
    pair_batch_size: global pairs per CoSENT step (sts). Each query carries
    `hard_negatives` passages besides its positive (records with fewer get random passages
    of the same dataset). Lengths are per dataset (`query_max_length`, `passage_max_length`:
    texts are cut there, from the end).
    length_buckets: each side of a batch is padded to the shortest of these lengths that holds
    its longest text (or to the dataset's maximum), the same on every host: batches of short
    texts do not pay for the maximum, at the cost of one compiled step per length pair that
    occurs. None (default): powers of two from 128 below each maximum; []: always the maximum.
    tokenizer: the tokenizer folder; required unless init_from holds one or the preset is tiny
    (the bundled demo tokenizer). seed: the data order's seed (default: train.seed).
    skip_bad_records: skip and count records that fail their checks instead of stopping.
    workers: loader processes (0: batches are built in threads); prefetch: batches prepared ahead.
    """

    datasets: tuple[DatasetConfig, ...] = ()
    alpha: float = 0.5
    eta: float | None = None
    batch_size: int = 256
    pair_batch_size: int = 768
    hard_negatives: int = 4
    query_max_length: int = 256
    passage_max_length: int = 1536
    tokenizer: str | None = None
    seed: int | None = None
    skip_bad_records: bool = False
    workers: int = 0
    prefetch: int = 2
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        for i, b in enumerate(self.length_buckets or ()):
            _positive(b, f"length_buckets[{i}]")
        if not self.datasets:
            raise ConfigError("datasets: at least one dataset is required")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"datasets: duplicate name {dup[0]!r}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha: expected a number >= 0, got {self.alpha}")
        if self.eta is not None:
            if not 0.0 <= self.eta <= 1.0:
                raise ConfigError(f"eta: expected a share in [0, 1], got {self.eta}")
            tasks = {d.task for d in self.datasets}
            if 0 < self.eta < 1 and not ("retrieval" in tasks and tasks - {"retrieval"}):
                raise ConfigError("eta: needs both retrieval and non-retrieval datasets "
                                  f"(tasks present: {sorted(tasks)})")
            idle = [d.name for d in self.datasets if (d.task == "retrieval") == (self.eta == 0)]
            if self.eta in (0, 1) and idle and len(idle) < len(self.datasets):
                import logging

                logging.getLogger(__name__).warning(
                    "data.eta: %g gives the %s datasets no batches: %s", self.eta,
                    "retrieval" if self.eta == 0 else "non-retrieval", ", ".join(idle))
        for key in ("batch_size", "pair_batch_size", "query_max_length", "passage_max_length"):
            _positive(getattr(self, key), key)
        for key in ("hard_negatives", "workers", "prefetch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(self, key)!r}")

    def resolved(self, ds: DatasetConfig) -> dict:
        """The dataset's effective batch size, group size and lengths."""
        if ds.task == "sts":
            n = ds.batch_size or self.pair_batch_size
            k = 0
        else:
            n = ds.batch_size or self.batch_size
            k = self.hard_negatives if ds.hard_negatives is None else ds.hard_negatives
        query_len = ds.query_max_length or self.query_max_length
        # symmetric-side tasks: the second text is not a retrieval passage, cut it like the first
        passage_len = ds.passage_max_length or (query_len if ds.task in ("sts", "classification")
                                                else self.passage_max_length)
        return {"batch_size": n, "hard_negatives": k, "group": 1 + k,
                "query_max_length": query_len, "passage_max_length": passage_len,
                "query_buckets": self.buckets_below(query_len), "passage_buckets": self.buckets_below(passage_len)}

    def buckets_below(self, max_length: int) -> tuple[int, ...]:
        """The padding lengths shorter than `max_length` (see `length_buckets`)."""
        if self.length_buckets is None:
            out, b = [], 128
            while b < max_length:
                out.append(b)
                b *= 2
            return tuple(out)
        return tuple(sorted({b for b in self.length_buckets if b < max_length}))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax CheckpointManager settings: a save every `every` steps and at the end, the
    last `keep` kept, asynchronous writes (`async_save`); on SIGTERM the run saves and exits
    with status 75 (`save_on_preemption: false`: SIGTERM ends it as usual, without a save).
    dir: default <out_dir>/checkpoints."""

    dir: str | None = None
    every: int = 1000
    keep: int = 3
    async_save: bool = True
    save_on_preemption: bool = True

    def __post_init__(self):
        _positive(self.every, "every")
        _positive(self.keep, "keep")
        _local_path(self.dir, "dir")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training: `tasks` is a task file (or names from the shipped
    tables), run before training (`before`), every `every` steps (0: never in between)
    and at the end. `max_length` defaults to the official evaluation's 1024 tokens, as `qzhou-jax
    eval` does."""

    tasks: str | None = None
    every: int = 0
    before: bool = True
    batch_size: int = 32
    max_length: int = 1024

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"every: expected >= 0, got {self.every}")
        _positive(self.batch_size, "batch_size")
        _positive(self.max_length, "max_length")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics every `every` steps to <out_dir>/metrics.jsonl and TensorBoard event files.
    peak_tflops: per-device peak for MFU (default: known accelerators; none on CPU)."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = None

    def __post_init__(self):
        _positive(self.every, "every")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    out_dir: str = "runs/run"
    init_from: str | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # a preset or init_from is required
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    export_hf: bool = True
    # XLA's persistent compilation cache: a restarted or resumed run (preemption) reuses
    # the compiled train step instead of compiling it again. null: off. The variable
    # JAX_COMPILATION_CACHE_DIR, when set, wins. Entries a killed writer left truncated are
    # removed at the start (train/xla_cache.py), so they are compiled and written again.
    compilation_cache_dir: str | None = "~/.cache/qzhou-jax/xla"

    def __post_init__(self):
        _local_path(self.out_dir, "out_dir")
        object.__setattr__(self, "_model", model_config(self.model, self.init_from))
        try:
            check_keep_chunks(self._model, self.train.keep_chunks)  # type: ignore[attr-defined]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        chunk = self.train.chunk_size
        for i, ds in enumerate(self.data.datasets):
            n = self.data.resolved(ds)["batch_size"]
            if chunk and n % chunk and chunk < n:
                raise ConfigError(f"train.chunk_size: {chunk} does not divide data.datasets[{i}] "
                                  f"({ds.name}) batch of {n}")

    @property
    def model_config(self) -> ModelConfig:
        return self._model  # type: ignore[attr-defined]

    @property
    def checkpoint_dir(self) -> str:
        return expand_path(self.checkpoint.dir) if self.checkpoint.dir else os.path.join(self.output_dir, "checkpoints")

    @property
    def output_dir(self) -> str:
        return expand_path(self.out_dir)

    @property
    def data_seed(self) -> int:
        return self.train.seed if self.data.seed is None else self.data.seed

    def to_dict(self) -> dict:
        return to_dict(self)


def model_config(section: dict[str, Any], init_from: str | None) -> ModelConfig:
    """The ModelConfig of a run: a preset plus fields, or a pretrained checkpoint's config
    plus embedding / execution fields. With both a preset and init_from, the preset gives
    the architecture (no file is read: `qzhou-jax plan` works without the weights) and the
    run checks it against the checkpoint's before loading (`check_init_from`)."""
    section = dict(section or {})
    preset = section.pop("preset", None)
    if init_from and preset is None:
        from qzhou_jax.checkpoint.orbax_io import read_model_config

        arch = sorted(k for k in section if k not in POLICY_FIELDS)
        if arch:
            raise ConfigError(f"model.{arch[0]}: the architecture comes from init_from ({init_from}); "
                              f"only {', '.join(POLICY_FIELDS)} may be set")
        folder = resolve_init_from(init_from)
        try:
            base = read_model_config(folder, **{k: section[k] for k in ("pooling", "attention") if k in section})
        except FileNotFoundError as e:
            raise ConfigError(f"init_from: {e}") from None
        data = {**to_dict(base), **section}
    else:
        if preset is None:
            raise ConfigError("model.preset: required without init_from (known presets: "
                              f"{', '.join(sorted(PRESETS))})")
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
        data = {**_token_ids_of(init_from), **PRESETS[preset], **section}
    return from_dict(ModelConfig, data, "model")


def _token_ids_of(init_from: str | None) -> dict[str, Any]:
    """The special-token ids init_from's config states, for a run whose preset gives the
    architecture (the export writes them back); none when the folder is not there yet (`plan`
    works without the weights) or its config does not read (the run's own check reports it)."""
    if not init_from:
        return {}
    try:
        folder = resolve_init_from(init_from)
        for name in ("qzhou_config.json", "config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                raw = read_json(path)
                break
    except (ConfigError, OSError, ValueError):
        return {}
    return token_ids(raw, path) if isinstance(raw, dict) else {}


def resolve_init_from(path: str) -> str:
    """The folder holding the model config of `init_from` (a run's checkpoints/ folder or one
    step folder of it, an Orbax or a HF folder)."""
    folder = expand_path(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"init_from: {folder}: folder not found")
    for candidate in (folder, os.path.dirname(folder.rstrip("/"))):
        if any(os.path.isfile(os.path.join(candidate, n)) for n in ("qzhou_config.json", "config.json")):
            return candidate
    raise ConfigError(f"init_from: {folder}: no qzhou_config.json or config.json there or in its parent")


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config_file(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """A YAML run config with its `base:` chain applied: `base: stage1.yaml` (relative to
    this file; a list applies several in order) is loaded first and this file's keys
    merged on top."""
    path = os.path.abspath(os.fspath(path))
    if path in _seen:
        raise ConfigError(f"{path}: base: circular reference ({' -> '.join(_seen + (path,))})")
    raw = load_yaml(path)
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for b in bases:
        merged = merge(merged, load_config_file(os.path.join(os.path.dirname(path), expand_path(b)),
                                                _seen + (path,)))
    return merge(merged, raw)


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                    data: dict | None = None) -> RunConfig:
    """A checked RunConfig from a YAML file (with its `base:` chain; or a dict) and
    `key=value` overrides."""
    raw = load_config_file(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, list(overrides))
    _warn_unset_variables(raw)
    try:
        return from_dict(RunConfig, raw, "")
    except ConfigError as e:
        msg = str(e)
        key = _key_path(msg)
        origin = _origin(key, path, overrides) if key else ""
        if origin:  # right after the key: "train.lr_typo (set in stage1.yaml): unknown key ..."
            msg = f"{key}{origin}{msg[len(key):]}"
        if path is not None:
            msg = f"{os.fspath(path)}: {msg}"
        raise ConfigError(msg) from None


def _warn_unset_variables(raw: Any) -> None:
    """A warning naming each environment variable a config's paths use but this process lacks
    (`$QZHOU_DATA/x.jsonl` would otherwise be reported as a missing file). Not an error: a pod
    launcher checks the config where the variables may be set only on the workers."""
    import logging

    unset: dict[str, list[str]] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            for a, b in re.findall(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))", node):
                if (a or b) not in os.environ:
                    unset.setdefault(a or b, []).append(where)

    walk(raw, "")
    for name, keys in unset.items():
        logging.getLogger(__name__).warning("$%s is not set in this environment (used by %s)", name,
                                            ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else ""))


def _key_path(message: str) -> str | None:
    """The key path an error message starts with (``data.datasets[0].path: ...``)."""
    m = re.match(r"[A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*(?=[:\s])", message)
    return m.group(0) if m else None


def _sets(node: Any, parts: list[str]) -> bool:
    """Whether a raw config mapping gives the value at ``parts``: the key itself, or a list or value
    above it (a list replaces the whole list when files merge)."""
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit():
            return True
        else:
            return False
    return True


def _origin(key: str, path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...]) -> str:
    """" (from --set K=V)" or " (set in FILE)" when the value at `key` came from an override or
    from a `base:` file rather than the file given, else ""."""
    parts = re.findall(r"[A-Za-z_]\w*|\d+", key)
    for item in reversed(list(overrides)):
        key = [p for p in re.split(r"[.\[\]]", item.split("=", 1)[0].strip()) if p]
        n = min(len(key), len(parts))
        if key[:n] == parts[:n]:
            return f" (from --set {item})"
    if path is None:
        return ""
    for file in reversed(_config_files(os.path.abspath(os.fspath(path)))):
        if _sets(load_yaml(file), parts):
            return "" if file == os.path.abspath(os.fspath(path)) else f" (set in {file})"
    return ""


def _config_files(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """The files of a config's `base:` chain in the order they merge (the file itself last)."""
    bases = load_yaml(path).get("base") if path not in _seen else None
    if isinstance(bases, str):
        bases = [bases]
    out: list[str] = []
    for b in bases if isinstance(bases, list) else []:
        out += _config_files(os.path.abspath(os.path.join(os.path.dirname(path), expand_path(b))), _seen + (path,))
    return out + [path]


ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings")


def check_init_from(cfg: RunConfig) -> None:
    """init_from exists and its architecture is the configured one (before any device work)."""
    if not cfg.init_from:
        return
    from qzhou_jax.checkpoint.orbax_io import read_model_config

    folder = resolve_init_from(cfg.init_from)
    # the run's pooling and attention: not architecture (and read once, quietly)
    stored = read_model_config(folder, pooling=cfg.model_config.pooling, attention=cfg.model_config.attention)
    _warn_unfinished(expand_path(cfg.init_from))
    for name in ARCH_FIELDS:
        a, b = getattr(stored, name), getattr(cfg.model_config, name)
        if a != b:
            raise ConfigError(f"model.{name}: the config gives {b!r} but init_from ({folder}) has {a!r}")


def _warn_unfinished(path: str) -> None:
    """A warning when `init_from` is an earlier run's checkpoints/ folder whose newest step is
    below that run's `train.total_steps` (a stage 2 started while stage 1 was cut short)."""
    import logging

    import yaml

    from qzhou_jax.checkpoint.orbax_io import step_dirs

    steps = step_dirs(path) if os.path.isdir(path) else []
    run_file = os.path.join(path, "run_config.yaml")
    if not steps or not os.path.isfile(run_file):
        return
    try:
        with open(run_file) as f:
            total = ((yaml.safe_load(f) or {}).get("train") or {}).get("total_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if isinstance(total, int) and steps[-1][0] < total:
        logging.getLogger(__name__).warning(
            "init_from %s: its newest checkpoint is step %d of the %d that run was configured for; "
            "this run starts from that unfinished model (name a step folder to choose one explicitly)",
            path, steps[-1][0], total)

