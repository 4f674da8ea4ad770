"""The training input pipeline: datasets -> task-homogeneous, host-local token batches.

    data = TrainData.from_config(run_cfg, tokenizer)     # opens and indexes every dataset
    for item in data.iterator(start_step):               # a grain pipeline
        item.step, item.task, item.dataset, item.batch    # host-local numpy arrays

Batch `step` is a pure function of (seed, step) (`sampler.BatchPlan`): the iterator's state
is the next step (`state()`), saved with every checkpoint and checked on resume against
the data's fingerprint (datasets, sizes, batch sizes, seed). The number of loader workers
and of hosts can change between save and resume; the batches do not.

Each host builds only its slice of every global batch: rows
[process_index * n / process_count, (process_index + 1) * n / process_count) of the
queries, and the matching passage rows, read from the sources by index (a JSONL source
keeps byte offsets, so a host reads only its records' lines). The train step turns the
host-local slices into global arrays (`jax.make_array_from_process_local_data`).

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

log = logging.getLogger(__name__)
STATE_VERSION = 1


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


def pad_to_common_length(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Several processes: pad this host's rows to the longest host's length on each side (hosts
    choose their length bucket from their own rows; the global array needs one shape), through a
    device all-gather of two integers, which waits for the previous step to finish; a single
    process returns the batch as it is."""
    import jax

    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    mine = np.array([batch["q_ids"].shape[1], batch["p_ids"].shape[1]], np.int32)
    q_len, p_len = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2).max(axis=0)
    out = dict(batch)
    for side, length in (("q", int(q_len)), ("p", int(p_len))):
        extra = length - batch[f"{side}_ids"].shape[1]
        if extra:
            out[f"{side}_ids"] = np.pad(batch[f"{side}_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
            out[f"{side}_mask"] = np.pad(batch[f"{side}_mask"], ((0, 0), (0, extra)))
    return out


class DataStateError(ValueError):
    """A checkpointed data state that does not match the configured data."""


class TrainData:
    def __init__(self, sources: Sequence[Any], specs: Sequence[BatchSpec], tokenizer: Any, *, total_steps: int,
                 seed: int = 0, alpha: float = 0.5, eta: float | None = None,
                 weights: Sequence[float | None] | None = None, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, prefetch: int = 2):
        if len(sources) != len(specs):
            raise ValueError("TrainData: one BatchSpec per source")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
        self.process_index, self.process_count = process_index, process_count
        self.workers, self.prefetch = int(workers), int(prefetch)
        self.builders = [BatchBuilder(src, spec, tokenizer, seed, salt=i)
                         for i, (src, spec) in enumerate(zip(sources, specs))]
        weights = list(weights) if weights is not None else [None] * len(sources)
        entries = []
        for b, spec, w in zip(self.builders, specs, weights):
            if spec.batch_size % process_count:
                raise ValueError(f"dataset {b.name!r}: global batch of {spec.batch_size} does not divide over "
                                 f"{process_count} processes")
            entries.append(DatasetEntry(b.name, spec.task, b.size, spec.batch_size, w))
            if b.labels is not None and b.labels.dropped:
                log.warning("dataset %s: %d records are the only text of their label and are not used as anchors",
                            b.name, b.labels.dropped)
            if b.labels is not None and b.labels.duplicates:
                log.warning("dataset %s: %d records repeat an earlier (text, label) record and are left out",
                            b.name, b.labels.duplicates)
        self.plan = BatchPlan(entries, total_steps, seed, alpha, eta)

    @classmethod
    def from_config(cls, run_cfg: Any, tokenizer: Any, process_index: int | None = None,
                    process_count: int | None = None) -> "TrainData":
        """Open the datasets of a `RunConfig` (indexing them: every record is validated here)."""
        from qzhou_jax.data.sources import open_source

        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
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
                   alpha=data.alpha, eta=data.eta, weights=weights, process_index=process_index,
                   process_count=process_count, workers=data.workers, prefetch=data.prefetch)

    # --------------------------------------------------------------- batches
    @property
    def specs(self) -> list[BatchSpec]:
        return [b.spec for b in self.builders]

    def host_rows(self, n: int) -> tuple[int, int]:
        per = n // self.process_count
        return self.process_index * per, (self.process_index + 1) * per

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> Item:
        """This host's part of global batch `step`."""
        d, rows = self.plan.batch(int(step))
        builder = self.builders[d]
        lo, hi = self.host_rows(len(rows))
        return Item(int(step), builder.spec.task, builder.name, builder.build(int(step), rows[lo:hi], lo))

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
        return {"version": STATE_VERSION, "next_step": int(next_step), "plan": self.plan.fingerprint()}

    def check_state(self, state: Mapping[str, Any]) -> int:
        """The step to resume from; DataStateError when the data or its order changed."""
        if state.get("version") != STATE_VERSION:
            raise DataStateError(f"data state: unknown version {state.get('version')!r}")
        saved, now = state.get("plan", {}), self.plan.fingerprint()
        for key in ("seed", "datasets", "probs"):
            if saved.get(key) != now.get(key):
                raise DataStateError(
                    f"data state: the checkpoint was written with {key} = {saved.get(key)!r}, the run is configured "
                    f"with {now.get(key)!r}; resuming would change the data order (start a new run, or restore "
                    "the original data configuration)")
        return int(state["next_step"])

    def describe(self) -> list[dict]:
        return summarize(self.plan.entries, self.plan.probs)
