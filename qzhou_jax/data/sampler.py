"""Task-homogeneous sampling: which dataset, and which records, make up global batch `step`.

Every global batch comes from one dataset (recipe §5). Dataset i is drawn with
probability proportional to n_i^alpha (or its configured weight); with `eta`, the retrieval
datasets together get the share eta and the others 1 - eta, each group split by
n^alpha inside.

The plan is a pure function of (seed, step): the dataset of every step is fixed by one
seeded draw sequence, and a dataset's records are read in the order of a seeded
permutation per epoch (a new permutation each time the dataset is exhausted; each pass
reads every record once, and no batch holds a record twice). Nothing
else is state, so a resumed run, a run with a different number of hosts or loader
workers, and an uninterrupted run see exactly the same batches; the data iterator's
checkpointed state is just the next step.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """What the sampler needs to know of a dataset."""

    name: str
    task: str
    size: int
    batch_size: int
    weight: float | None = None


def mixture_probabilities(entries: Sequence[DatasetEntry], alpha: float = 0.5,
                          eta: float | None = None) -> np.ndarray:
    """Draw probability of each dataset: n^alpha (or weight), normalized; with `eta`, the
    retrieval group is rescaled to sum to eta and the rest to 1 - eta."""
    if not entries:
        raise ValueError("mixture: no datasets")
    raw = np.array([e.weight if e.weight is not None else float(e.size) ** alpha for e in entries], np.float64)
    if np.any(raw <= 0) or not np.all(np.isfinite(raw)):
        bad = [e.name for e, w in zip(entries, raw) if not (w > 0 and np.isfinite(w))]
        raise ValueError(f"mixture: dataset {bad[0]!r} has weight 0 (empty dataset?)")
    if eta is None:
        return raw / raw.sum()
    is_ret = np.array([e.task == "retrieval" for e in entries])
    probs = np.zeros_like(raw)
    for group, share in ((is_ret, eta), (~is_ret, 1.0 - eta)):
        if group.any():
            probs[group] = share * raw[group] / raw[group].sum()
        elif share > 0:
            kind = "retrieval" if group is is_ret else "non-retrieval"
            raise ValueError(f"mixture: eta gives {kind} datasets the share {share:g}, but there are none")
    return probs / probs.sum()


class BatchPlan:
    """step -> (dataset index, the dataset's record indices of that global batch).

        plan = BatchPlan(entries, total_steps=1000, seed=0, alpha=0.5, eta=None)
        d, rows = plan.batch(step)           # rows: int64 [entries[d].batch_size]
    """

    def __init__(self, entries: Sequence[DatasetEntry], total_steps: int, seed: int = 0,
                 alpha: float = 0.5, eta: float | None = None):
        self.entries = list(entries)
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        for i, e in enumerate(self.entries):
            if 4 * e.batch_size > e.size:
                what = "usable anchors" if e.task == "classification" else "records"
                raise ValueError(f"data.datasets[{i}] ({e.name}): a batch of {e.batch_size} exceeds a quarter of "
                                 f"its {e.size} {what} (a batch that crosses the end of a pass must not repeat a "
                                 "record, so every dataset needs at least 4 batches of records); lower its "
                                 "batch_size or add records")
        self.probs = mixture_probabilities(self.entries, alpha, eta)
        rng = np.random.default_rng([self.seed, 0x5EED])
        # Inverse-CDF draws: the first T steps are the same for any total_steps >= T, so a
        # run can be extended on resume without changing the batches already planned.
        cdf = np.cumsum(self.probs)
        self.sequence = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(self.total_steps), side="right"),
                                   len(self.entries) - 1)
        # occurrence[s]: how many batches of the same dataset come before step s.
        self.occurrence = np.zeros(self.total_steps, np.int64)
        for d in range(len(self.entries)):
            hit = self.sequence == d
            self.occurrence[hit] = np.arange(int(hit.sum()))
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        # grain builds batches in several threads (data.prefetch): the cache is shared by them
        self._perms_lock = threading.Lock()

    def __len__(self) -> int:
        return self.total_steps

    def __getstate__(self) -> dict:  # pickled into grain's worker processes: without the lock
        state = self.__dict__.copy()
        del state["_perms_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._perms_lock = threading.Lock()

    def dataset(self, step: int) -> int:
        self._check(step)
        return int(self.sequence[step])

    def _check(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the plan's {self.total_steps} steps")

    def _raw_permutation(self, d: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0xDA7A, d, epoch]).permutation(self.entries[d].size)

    def permutation(self, d: int, epoch: int) -> np.ndarray:
        """The record order of dataset d in its `epoch`-th pass (cached, two per dataset).

        A batch may straddle two passes; so that it never holds a record twice, records of
        this pass's first batch_size positions that were among the previous pass's last
        batch_size are swapped with records from the middle of this pass (the middle only,
        so each pass's tail, and hence this fix, depends on the seed alone)."""
        key = (d, epoch)
        with self._perms_lock:
            perm = self._perms.get(key)
            if perm is None:
                perm = self._perms[key] = self._pass_order(d, epoch)
                for k in [k for k in self._perms if k[0] == d and k[1] < epoch - 1]:
                    del self._perms[k]
        return perm

    def _pass_order(self, d: int, epoch: int) -> np.ndarray:
        """`permutation` uncached."""
        perm = self._raw_permutation(d, epoch)
        b, n = self.entries[d].batch_size, self.entries[d].size
        if epoch > 0:
            prev_tail = set(self._raw_permutation(d, epoch - 1)[n - b:].tolist())
            j = b
            for i in range(b):
                if int(perm[i]) in prev_tail:
                    while int(perm[j]) in prev_tail:
                        j += 1
                    perm[i], perm[j] = perm[j], perm[i]
                    j += 1
        return perm

    def batch(self, step: int) -> tuple[int, np.ndarray]:
        """(dataset index, record indices [batch_size]) of global batch `step`.

        A dataset's batches read its records as one stream: pass 0's permutation, then
        pass 1's, ... so each pass reads every record exactly once."""
        d = self.dataset(step)
        e = self.entries[d]
        start = int(self.occurrence[step]) * e.batch_size
        pos = np.arange(start, start + e.batch_size)
        epochs = pos // e.size
        out = np.empty(e.batch_size, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(d, int(epoch))[pos[sel] % e.size]
        return d, out

    def epochs_seen(self, step: int) -> dict[str, float]:
        """Passes over each dataset completed by the batches before `step`."""
        counts = np.bincount(self.sequence[:step], minlength=len(self.entries))
        return {e.name: float(c * e.batch_size / e.size) for e, c in zip(self.entries, counts)}

    def fingerprint(self) -> dict:
        """What must not change between a save and a resume for the data order to be the same."""
        return {"seed": self.seed, "total_steps": self.total_steps,
                "datasets": [[e.name, e.task, e.size, e.batch_size] for e in self.entries],
                "probs": [round(float(p), 12) for p in self.probs]}


def row_rng(seed: int, step: int, row: int, salt: int = 0) -> np.random.Generator:
    """Randomness for one row of one global batch (picking a positive, negatives):
    keyed by its global position, so it does not depend on which host builds the row."""
    return np.random.default_rng([seed, 0x0B0B, salt, step, row])


def summarize(entries: Sequence[DatasetEntry], probs: np.ndarray) -> list[Mapping]:
    return [{"name": e.name, "task": e.task, "records": e.size, "batch_size": e.batch_size,
             "probability": float(p)} for e, p in zip(entries, probs)]
