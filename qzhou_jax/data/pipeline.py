"""The training input pipeline: datasets -> task-homogeneous, host-local token batches.

    data = TrainData.from_config(run_cfg, tokenizer)     # opens and indexes every dataset
    for item in data.iterator(start_step):               # a grain pipeline
        item.step, item.task, item.dataset, item.batch    # host-local numpy arrays

Batch `step` is a pure function of (seed, step) (`sampler.BatchPlan`): the iterator's state
is the next step (`state()`), saved with every checkpoint and checked on resume against
the data's fingerprint (datasets, sizes, batch sizes, seed). The number of loader workers
and of hosts can change between save and resume; the batches do not.

Each host builds only its rows of every global batch (`HostRows`: the blocks of rows its
devices hold; with the batch split over the processes, rows [k * n / P, (k + 1) * n / P) of
the queries for process k, and the matching passage rows), read from the sources by index (a
JSONL source keeps byte offsets, so a host reads only its records' lines). The train step
turns the host-local rows into global arrays (`jax.make_array_from_process_local_data`).

grain runs the loading: `workers` > 0 builds batches in that many worker processes,
`prefetch` batches are prepared ahead by threads. Worker processes ignore SIGTERM and SIGINT:
a preemption signals the whole process group, and a worker killed in the middle of handing
over a batch would leave the trainer blocked on a half-written queue message when it closes
the loader; the trainer stops them itself (``close_iterator``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from qzhou_jax.data.batches import BatchBuilder, BatchSpec
from qzhou_jax.data.sampler import BatchPlan, DatasetEntry, summarize
from qzhou_jax.hosts import HostExchange
from qzhou_jax.tokenizer import format_prompt

log = logging.getLogger(__name__)
STATE_VERSION = 1
OLD_BEIR_TEXT_FORM = "BEIR document = title + newline + text"


@dataclasses.dataclass
class Item:
    step: int
    task: str
    dataset: str
    batch: dict[str, np.ndarray]


def _worker_ignores_stop_signals(worker_index: int, worker_count: int) -> None:
    """grain worker init: leave SIGTERM / SIGINT to the trainer, which stops the workers."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_iterator(it: Iterator[Any], timeout: float = 60.0) -> None:
    """Stop a loader iterator's worker processes, waiting at most ``timeout`` seconds (a worker
    killed from outside can leave grain's shutdown blocked; the run must still end)."""
    close = getattr(it, "close", None)
    if close is None:
        return
    import threading

    t = threading.Thread(target=close, name="close-data-loader", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("the data loader's worker processes did not stop within %.0f s; leaving them", timeout)


class CommonLengths(HostExchange):
    """Pads every host's rows of a bucketed step to the longest host's length on each side: hosts
    choose their length bucket from their own rows, and the global array needs one shape.

    The hosts agree through JAX's coordination service (`hosts.HostExchange`): each posts its two
    lengths, waits at a barrier and reads the others' (three small requests per step, whatever the
    number of hosts). It is host to host, with no device work, so a host does not wait for the
    previous step to finish and keeps dispatching ahead. Every process must call ``pad`` for the
    same steps in the same order, which the loop does (batches are a function of (seed, step)).
    Without a coordination client it falls back to a device all-gather of the lengths, which waits
    for the previous step. One process: batches pass unchanged.
    """

    def __init__(self, client: Any = "jax", process_index: int | None = None, process_count: int | None = None,
                 timeout_s: float | None = None):
        super().__init__("bucket_lengths", client, process_index, process_count, timeout_s)
        if self.count > 1:
            log.info("bucketed steps: the %d hosts agree on padded lengths %s", self.count,
                     "through the coordination service" if self.client is not None else
                     "through a device all-gather (no coordination client)")

    def lengths(self, step: int, mine: tuple[int, int]) -> tuple[int, int]:
        """The longest (query, passage) lengths over all hosts at ``step``."""
        got = self.gather(step, mine, f"step {step}: the length agreement of this bucketed step")
        return int(got[:, 0].max()), int(got[:, 1].max())

    def pad(self, step: int, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        """``batch`` with each side padded (right) to the hosts' common length."""
        q_len, p_len = self.lengths(step, (batch["q_ids"].shape[1], batch["p_ids"].shape[1]))
        out = dict(batch)
        for side, length in (("q", q_len), ("p", p_len)):
            extra = length - batch[f"{side}_ids"].shape[1]
            if extra:
                out[f"{side}_ids"] = np.pad(batch[f"{side}_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
                out[f"{side}_mask"] = np.pad(batch[f"{side}_mask"], ((0, 0), (0, extra)))
        return out


class DataStateError(ValueError):
    """A checkpointed data state that does not match the configured data."""


@dataclasses.dataclass(frozen=True)
class HostRows:
    """The rows of every global batch that this host builds.

    A global batch of n rows splits into ``blocks`` equal blocks of consecutive rows, one per
    data-parallel shard in order; this host builds the blocks its devices hold, ``mine``
    (increasing), and its local arrays are those rows in global order. With the batch split over
    the processes, block k is process k's. A process whose devices share their batch shard with
    another process's devices (a tensor axis across processes: one process per GPU, tensor
    parallel over GPUs; or no data parallelism at all) builds the same rows as that process.
    """

    mine: tuple[int, ...]
    blocks: int

    def __post_init__(self):
        ordered = list(self.mine) == sorted(set(self.mine))
        if not self.mine or not ordered or not 0 <= self.mine[0] <= self.mine[-1] < self.blocks:
            raise ValueError(f"host rows: blocks {self.mine} must be distinct, increasing, in 0..{self.blocks - 1}")

    @classmethod
    def of_process(cls, index: int, count: int) -> "HostRows":
        """Process ``index`` of ``count`` builds the index-th of count blocks."""
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} outside 0..{count - 1}")
        return cls((int(index),), int(count))

    @classmethod
    def from_mesh(cls, mesh: Any, rules: Mapping[str, Any] | None = None,
                  process_index: int | None = None) -> "HostRows":
        """The blocks held by the devices of ``process_index`` (default: this process) when the batch
        is sharded over the mesh's data-parallel axes (``sharding.batch_sharding``)."""
        import jax

        from qzhou_jax import sharding

        p = jax.process_index() if process_index is None else int(process_index)
        dp = sharding.data_parallel_size(mesh, rules)
        held = sharding.batch_sharding(mesh, 1, rules).devices_indices_map((dp,))
        mine = sorted({idx[0].indices(dp)[0] for d, idx in held.items() if d.process_index == p})
        if not mine:
            raise ValueError(f"process {p} has no device in the mesh")
        return cls(tuple(mine), dp)

    def rows(self, n: int) -> np.ndarray:
        """The global row numbers this host builds of a batch of ``n`` rows."""
        if n % self.blocks:
            raise ValueError(f"a batch of {n} rows does not split into {self.blocks} equal blocks")
        per = n // self.blocks
        return np.concatenate([np.arange(k * per, (k + 1) * per) for k in self.mine])

    def global_rows(self, local: int) -> int:
        """The global row count of an array of which this host holds ``local`` rows."""
        if local % len(self.mine):
            raise ValueError(f"{local} host rows do not split into this host's {len(self.mine)} blocks")
        return local // len(self.mine) * self.blocks


def _check_instruction_room(tokenizer: Any, spec: BatchSpec, where: str, source: Any = None) -> None:
    """The dataset's instruction, and each instruction its records carry (retrieval), must leave
    room for the text: texts are cut from the end, so a prompt as long as the limit turns every
    input into the bare instruction (identical queries, a loss with nothing to learn)."""
    own = getattr(source, "instructions", None) or {}
    if getattr(source, "instructions_capped", False):
        log.warning("%s: its records carry more than %d different instructions; the lengths of the first %d are "
                    "checked", where, len(own), len(own))
    named = ([(spec.instruction, "its instruction")] if spec.instruction else []) + \
        [(text, f"the instruction of {n} of its records ({_short(text)!r})") for text, n in own.items()]
    if not named:
        return
    lengths = [len(ids) for ids in tokenizer.encode([format_prompt("", text) for text, _ in named])]
    sides = [("query", spec.query_max_length)]
    if spec.symmetric:
        sides.append(("passage", spec.passage_max_length))
    for side, limit in sides:
        for (_, what), prompt in zip(named, lengths):
            if prompt >= limit:
                raise ValueError(f"{where}: {what} takes {prompt} tokens of the {limit} of {side}_max_length, "
                                 f"so no {side} text would be left; raise {side}_max_length or shorten the "
                                 "instruction")
        k = max(range(len(named)), key=lengths.__getitem__)
        if lengths[k] > 0.75 * limit:
            log.warning("%s: %s takes %d of the %d tokens of %s_max_length: %d are left for the text",
                        where, named[k][1], lengths[k], limit, side, limit - lengths[k])


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class TrainData:
    def __init__(self, sources: Sequence[Any], specs: Sequence[BatchSpec], tokenizer: Any, *, total_steps: int,
                 seed: int = 0, alpha: float = 0.5, eta: float | None = None,
                 weights: Sequence[float | None] | None = None, host: HostRows = HostRows((0,), 1),
                 workers: int = 0, prefetch: int = 2):
        if len(sources) != len(specs):
            raise ValueError("TrainData: one BatchSpec per source")
        self.host = host
        self.workers, self.prefetch = int(workers), int(prefetch)
        self.builders = [BatchBuilder(src, spec, tokenizer, seed, salt=i)
                         for i, (src, spec) in enumerate(zip(sources, specs))]
        weights = list(weights) if weights is not None else [None] * len(sources)
        entries = []
        for i, (b, spec, w, src) in enumerate(zip(self.builders, specs, weights, sources)):
            if spec.batch_size % host.blocks:
                raise ValueError(f"data.datasets[{i}] ({b.name}): global batch of {spec.batch_size} does not divide "
                                 f"over {host.blocks} data-parallel shards (set its batch_size, or data.batch_size / "
                                 f"pair_batch_size, to a multiple of {host.blocks})")
            entries.append(DatasetEntry(b.name, spec.task, b.size, spec.batch_size, w))
            _check_instruction_room(tokenizer, spec, f"data.datasets[{i}] ({b.name})", src)
            if b.labels is not None and b.labels.dropped:
                log.warning("dataset %s: %d records are the only text of their label and are not used as anchors",
                            b.name, b.labels.dropped)
            if b.labels is not None and b.labels.duplicates:
                log.warning("dataset %s: %d records repeat an earlier (text, label) record and are left out",
                            b.name, b.labels.duplicates)
        self.plan = BatchPlan(entries, total_steps, seed, alpha, eta)

    @classmethod
    def from_config(cls, run_cfg: Any, tokenizer: Any, host: HostRows | None = None) -> "TrainData":
        """Open the datasets of a `RunConfig` (indexing them: every record is validated here). ``host``:
        which rows this host builds (the training loop passes ``HostRows.from_mesh``); default, the
        process-th of process-count blocks."""
        from qzhou_jax.data.sources import open_source

        if host is None:
            import jax

            host = HostRows.of_process(jax.process_index(), jax.process_count())
        data = run_cfg.data
        sources, specs, weights = [], [], []
        for i, ds in enumerate(data.datasets):
            r = data.resolved(ds)
            try:
                sources.append(open_source(ds.source_spec(data.skip_bad_records)))
            except FileNotFoundError as e:  # name the config key too, as every other config error does
                raise FileNotFoundError(f"data.datasets[{i}] ({ds.name}): {e}") from None
            specs.append(BatchSpec(ds.task, r["batch_size"], r["hard_negatives"], r["query_max_length"],
                                   r["passage_max_length"], ds.instruction, ds.is_symmetric,
                                   query_buckets=r["query_buckets"], passage_buckets=r["passage_buckets"]))
            weights.append(ds.weight)
        return cls(sources, specs, tokenizer, total_steps=run_cfg.train.total_steps, seed=run_cfg.data_seed,
                   alpha=data.alpha, eta=data.eta, weights=weights, host=host, workers=data.workers,
                   prefetch=data.prefetch)

    # --------------------------------------------------------------- batches
    @property
    def specs(self) -> list[BatchSpec]:
        return [b.spec for b in self.builders]

    def query_instruction(self) -> str | None:
        """The instruction most retrieval queries train with (a record's own, else its dataset's):
        each retrieval dataset's instructions counted over its records and weighted by the queries
        it contributes per step on average (its draw probability times its batch size). The
        "query" prompt of the run's exports; None when no retrieval query has one."""
        weights: dict[str, float] = {}
        for d, b in enumerate(self.builders):
            if b.spec.task != "retrieval" or not len(b.source):
                continue
            per_record = float(self.plan.probs[d]) * b.spec.batch_size / len(b.source)
            own = getattr(b.source, "instructions", None) or {}
            for text, n in own.items():
                weights[text] = weights.get(text, 0.0) + n * per_record
            with_own = getattr(b.source, "records_with_instruction", sum(own.values()))
            rest = len(b.source) - with_own
            if b.spec.instruction and b.spec.instruction.strip() and rest > 0:
                weights[b.spec.instruction] = weights.get(b.spec.instruction, 0.0) + rest * per_record
        if not weights:
            return None
        best = max(weights, key=weights.__getitem__)
        if len(weights) > 1:
            log.info("the exports' query prompt is the instruction of %.0f%% of the retrieval queries with one "
                     "(%d instructions in all): %r", 100 * weights[best] / sum(weights.values()), len(weights), best)
        return best

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> Item:
        """This host's part of global batch `step`."""
        d, rows = self.plan.batch(int(step))
        builder = self.builders[d]
        mine = self.host.rows(len(rows))
        return Item(int(step), builder.spec.task, builder.name, builder.build(int(step), rows[mine], mine))

    def iterator(self, start_step: int = 0) -> Iterator[Item]:
        """Batches start_step, start_step + 1, ... to the end of the plan, loaded by grain."""
        import grain

        if not 0 <= start_step <= len(self):
            raise ValueError(f"start step {start_step} outside the plan's {len(self)} steps")
        if start_step == len(self):
            return iter(())
        ds = grain.MapDataset.range(start_step, len(self)).map(self.__getitem__)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, self.prefetch),
                                                  prefetch_buffer_size=self.prefetch))
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers),
                                worker_init_fn=_worker_ignores_stop_signals)
        return iter(it)

    # ----------------------------------------------------------------- state
    def state(self, next_step: int) -> dict:
        """The iterator state to checkpoint: the next step and what fixes the order."""
        return {"version": STATE_VERSION, "next_step": int(next_step), "plan": self.plan.fingerprint(),
                "file_sizes": self._file_sizes(), "text_forms": self._text_forms()}

    def _text_forms(self) -> list[str | None]:
        return [getattr(b.source, "text_form", None) for b in self.builders]

    def _file_sizes(self) -> list[int | None]:
        return [getattr(b.source, "size_bytes", None) for b in self.builders]

    def check_state(self, state: Mapping[str, Any]) -> int:
        """The step to resume from; DataStateError when the data or its order changed."""
        if state.get("version") != STATE_VERSION:
            raise DataStateError(f"data state: unknown version {state.get('version')!r}")
        saved, now = state.get("plan", {}), self.plan.fingerprint()
        change = _order_change(saved, now)
        if change:
            raise DataStateError(f"data state: {change}; resuming would change the data order (start a new run, "
                                 "or restore the original data configuration)")
        saved_sizes = state.get("file_sizes") or []
        for b, was, now in zip(self.builders, saved_sizes, self._file_sizes()):
            if was is not None and now is not None and was != now:
                log.warning("dataset %s: its file is %d bytes now, %d when the checkpoint was written, with as many "
                            "records: it was rewritten, and the resumed steps read the new texts", b.name, now, was)
        # how a source builds its texts (BEIR: title and text joined by a newline before this was recorded)
        saved_forms = state.get("text_forms") or [OLD_BEIR_TEXT_FORM if f else None for f in self._text_forms()]
        for b, was, now in zip(self.builders, saved_forms, self._text_forms()):
            if was is not None and now is not None and was != now:
                log.warning("dataset %s: its texts are built as %s now, as %s when the checkpoint was written: the "
                            "resumed steps read them in the new form", b.name, now, was)
        return int(state["next_step"])

    def describe(self) -> list[dict]:
        return summarize(self.plan.entries, self.plan.probs)


def _order_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between two `BatchPlan.fingerprint()`s, named by the config keys that set it."""
    if saved.get("seed") != now.get("seed"):
        return (f"data.seed (default: train.seed) was {saved.get('seed')!r} when the checkpoint was written, "
                f"now {now.get('seed')!r}")
    was, is_ = saved.get("datasets") or [], now.get("datasets") or []
    if len(was) != len(is_):
        names = [d[0] for d in was]
        return (f"data.datasets: {len(was)} datasets when the checkpoint was written ({', '.join(map(str, names))}), "
                f"{len(is_)} now")
    for i, (a, b) in enumerate(zip(was, is_)):
        if a == b:
            continue
        where = f"data.datasets[{i}]"
        if a[0] != b[0]:
            return f"{where}.name: {a[0]!r} when the checkpoint was written, {b[0]!r} now"
        if a[1] != b[1]:
            return f"{where}.task ({b[0]}): {a[1]!r} when the checkpoint was written, {b[1]!r} now"
        if a[2] != b[2]:
            return (f"{where} ({b[0]}): {a[2]} records when the checkpoint was written, {b[2]} now (its file or "
                    "its filters changed)")
        key = "pair_batch_size" if b[1] == "sts" else "batch_size"
        return (f"{where}.batch_size (default: data.{key}) ({b[0]}): {a[3]} when the checkpoint was written, "
                f"{b[3]} now")
    if saved.get("probs") != now.get("probs"):
        diff = [f"{d[0]} {p:.4g} -> {q:.4g}" for d, p, q in zip(is_, saved.get("probs") or [], now.get("probs") or [])
                if p != q]
        return ("the datasets' draw probabilities (data.alpha, data.eta, data.datasets[].weight) changed: "
                + ", ".join(diff))
    return None
