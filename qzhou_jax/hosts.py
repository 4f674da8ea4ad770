"""Agreement between the processes of a multi-process run, host to host.

`HostExchange.gather` has every process post a few integers for a round, wait at a barrier and read
everyone's, through the key-value store and barriers of JAX's coordination service (what
`jax.distributed` runs between the processes): three small requests per round, no device work.
Every process must call it for the same rounds in the same order. Without a coordination client
(a runtime that sets up several processes without `jax.distributed`) it falls back to a device
all-gather. With one process nothing is exchanged.

Uses of it: the padded lengths of bucketed steps (`data.pipeline.CommonLengths`), stopping an
evaluation when a preemption notice reached any host (`preemption_noticed`), and checking at the
start of a run that every host writes to the same output folder (`check_shared_folder`).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

# The key JAX's preemption sync manager (xla/tsl preemption_sync_manager.cc) sets in the coordination
# service when any process receives SIGTERM; its sync point then stops the training loop.
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def coordination_client() -> Any:
    """JAX's coordination-service client (`jax.distributed`), or None. It is private to JAX (orbax
    reaches it the same way); when it moves, callers fall back to device collectives."""
    import jax

    state = getattr(getattr(getattr(jax, "_src", None), "distributed", None), "global_state", None)
    return getattr(state, "client", None)


class HostExchange:
    """Rounds of "every process posts integers, every process reads all of them"."""

    TIMEOUT_S = 1800  # a host that is still compiling or loading; a dead host stops the job sooner
    _runs = itertools.count()  # a key namespace per exchange object of this process

    def __init__(self, name: str, client: Any = "jax", process_index: int | None = None,
                 process_count: int | None = None, timeout_s: float | None = None):
        import jax

        self.process = jax.process_index() if process_index is None else int(process_index)
        self.count = jax.process_count() if process_count is None else int(process_count)
        self.client = coordination_client() if client == "jax" else client
        self.timeout_ms = int(1000 * (self.TIMEOUT_S if timeout_s is None else timeout_s))
        self.prefix = f"qzhou_jax/{name}/{next(self._runs)}"
        self._posted: str | None = None  # this host's key of the previous round
        self._rounds = itertools.count()

    def next_round(self) -> int:
        """0, 1, 2, ...: round ids for a caller whose rounds have no name of their own."""
        return next(self._rounds)

    def gather(self, round_id: Any, values: Sequence[int], what: str) -> np.ndarray:
        """[processes, len(values)]: every process's values for this round, in process order.
        `what` names the round in errors (a host that never arrives stops the others after the
        timeout with it, instead of a hang)."""
        mine = np.asarray(values, np.int64).reshape(-1)
        if self.count == 1:
            return mine[None]
        if self.client is None:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(mine)).reshape(self.count, -1)
        key = f"{self.prefix}/{round_id}"
        self.client.key_value_set(f"{key}/{self.process}", ",".join(map(str, mine.tolist())))
        start = time.monotonic()
        try:
            self.client.wait_at_barrier(key, self.timeout_ms)
        except Exception as e:
            waited = time.monotonic() - start
            allowed = self.timeout_ms / 1000
            why = ("another process stopped" if waited < 0.9 * allowed
                   else f"not every process reached it within the {allowed:g} s allowed: one stopped or is stuck")
            raise RuntimeError(f"{what}: failed after {waited:.0f} s ({why}; its log says why): {e}") from e
        entries = dict(self.client.key_value_dir_get(key))
        if len(entries) != self.count:
            raise RuntimeError(f"{what}: {len(entries)} of {self.count} hosts posted under {key} "
                               f"(processes out of step?)")
        # Every host passed this barrier, so every host has finished reading the previous round.
        if self._posted is not None:
            self.client.key_value_delete(self._posted)
        self._posted = f"{key}/{self.process}"
        rows = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in entries.items())
        return np.asarray([[int(x) for x in v.split(",")] for _, v in rows], np.int64)


# What a collective or the coordination service reports when another process is gone (Gloo on
# CPU, NCCL on GPU, JAX's coordination service and heartbeats, HostExchange's agreements)
_PEER_LOST = ("heartbeat", "unhealthy", "task is set to error", "connection reset", "connection closed",
              "connection refused", "socket closed", "broken pipe", "gloo", "nccl", "unavailable:",
              "deadline_exceeded", "another process stopped")


def peer_lost(error: BaseException) -> bool:
    """Whether `error` (a failed collective or agreement) says that another process is gone."""
    text = str(error).lower()
    return any(s in text for s in _PEER_LOST)


def preemption_noticed(client: Any = "jax") -> bool:
    """Whether a preemption notice (SIGTERM to any process) has reached the coordination service.
    Local and immediate: processes may see it at different moments, so agree on it through
    `HostExchange.gather` before acting on it."""
    client = coordination_client() if client == "jax" else client
    if client is None:
        return False
    try:
        return client.key_value_try_get(PREEMPTION_NOTICE_KEY) is not None
    except Exception:  # not found (the client raises), or the service is shutting down
        return False


def check_shared_folder(path: str, what: str, exchange: HostExchange) -> None:
    """Raise ValueError on every process unless all of them see the same folder at `path`: process 0
    writes a random token there, and every process must read it back. A folder on each host's own
    disk would otherwise fail only at the first checkpoint (after hours), with the processes waiting
    for each other's files. The folder must exist; the token file is removed afterwards."""
    token = secrets.randbits(62) if exchange.process == 0 else 0
    token = int(exchange.gather("token", [token], f"{what} check")[0, 0])
    probe = os.path.join(path, f".qzhou-shared-check-{token}")
    written = 1
    if exchange.process == 0:
        try:
            with open(probe, "w") as f:
                f.write(str(token))
        except OSError as e:  # every host must still reach the next round, or the others wait
            written, error = 0, e
    if not exchange.gather("written", [written], f"{what} check")[0, 0]:
        raise ValueError(f"{what} {path}: process 0 cannot write there"
                         + (f" ({error})" if exchange.process == 0 else ""))
    try:
        with open(probe) as f:
            seen = int(f.read().strip() == str(token))
    except OSError:
        seen = 0
    seen_by = exchange.gather("read", [seen], f"{what} check")[:, 0]
    if exchange.process == 0:
        os.remove(probe)
    missing = [p for p, ok in enumerate(seen_by) if not ok]
    if missing:
        raise ValueError(f"{what} {path}: processes {missing} of {exchange.count} do not see the files process 0 "
                         f"writes there (a folder on each host's own disk?). Every process must write checkpoints "
                         f"and logs to one shared folder: a network file system, or a bucket mounted on every host")
