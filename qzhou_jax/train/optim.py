"""Optimizer and learning-rate schedule: AdamW with global-norm clipping, warm-up then decay.

The paper (recipe §5): AdamW with weight decay 0.01, learning rate 3e-5 (stage 1) or
2e-5 (stage 2), 300 warm-up steps; the schedule after warm-up is open (cosine by default).
Weight decay skips RMSNorm weights and biases (every parameter whose path names `norm` or
`bias`). Master weights are float32 (`train.step.init_train_state`), and so is the optimizer
state by default; `mu_dtype: bfloat16` keeps Adam's first moment in bfloat16 (optax's
`mu_dtype`): 2 bytes less per parameter to hold and 4 less to move in each update. The second
moment stays float32: with b2 = 0.999 each update changes it by a part in a thousand, below
bfloat16's resolution (1 part in 256).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from qzhou_jax.config import python_scalars

SCHEDULES = ("cosine", "linear", "constant")
MU_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and step settings.

    lr is the peak learning rate, reached at the end of `warmup_steps` (linear from lr/warmup);
    after it, `schedule` decays to `final_lr_ratio * lr` at `total_steps` ("constant": no decay).
    `clip_norm` <= 0 turns clipping off. `chunk_size` > 0 turns GradCache on: the batch is
    embedded `chunk_size` queries at a time (0: the whole batch at once). `keep_chunks` (with
    remat "full" only): how many of those chunks keep every layer's input from GradCache's
    first pass to its second, which then runs their backward from those inputs: one forward
    pass less per kept chunk (-1: all; memory per kept chunk: its tokens x (layers + 1) x
    hidden x 2 bytes in bfloat16, e.g. 2.0 GiB for 8 queries x 6 sequences x 512 tokens of
    Qwen2.5-1.5B). `skip_nonfinite`: the training loop skips up to this many non-finite steps in
    a row (their update is not applied, a warning names each) and stops at the next one; 0: the
    first stops the run.
    """

    lr: float = 3e-5
    warmup_steps: int = 300
    total_steps: int = 32_000
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    chunk_size: int = 0
    keep_chunks: int = 0
    seed: int = 0
    skip_nonfinite: int = 0
    mu_dtype: str = "float32"

    def __post_init__(self):
        python_scalars(self)
        self.validate()

    def validate(self) -> None:
        for name in ("lr", "final_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm"):
            v = getattr(self, name)  # NaN or inf here would reach the parameters unnoticed
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"train.{name}: expected a finite number, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr: expected a positive number, got {self.lr!r}")
        for name in ("warmup_steps", "total_steps", "chunk_size", "seed", "skip_nonfinite"):
            v, least = getattr(self, name), 1 if name == "total_steps" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"train.{name}: expected an integer >= {least}, got {v!r}")
        if not isinstance(self.keep_chunks, int) or isinstance(self.keep_chunks, bool) or self.keep_chunks < -1:
            raise ValueError(f"train.keep_chunks: expected an integer >= -1 (-1: all chunks), got {self.keep_chunks!r}")
        if self.keep_chunks and not self.chunk_size:
            raise ValueError(f"train.keep_chunks: {self.keep_chunks} needs GradCache (train.chunk_size > 0)")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) exceeds train.total_steps "
                             f"({self.total_steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"train.final_lr_ratio: expected a value in [0, 1], got {self.final_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay: expected >= 0, got {self.weight_decay}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"train.b1/b2: expected values in [0, 1), got {self.b1}, {self.b2}")
        if self.eps <= 0:
            raise ValueError(f"train.eps: expected > 0, got {self.eps}")
        if self.mu_dtype not in MU_DTYPES:
            raise ValueError(f"train.mu_dtype: expected one of {MU_DTYPES}, got {self.mu_dtype!r}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(cfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """step (0-based count of applied updates) -> learning rate, float32.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps (the first update
    already moves). Then cosine / linear from lr to final_lr_ratio * lr over the remaining
    steps, held at the final value after total_steps; or constant.
    """
    peak = float(cfg.lr)
    final = peak * float(cfg.final_lr_ratio)
    warmup = int(cfg.warmup_steps)
    decay_steps = max(1, cfg.total_steps - warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup > 0:
            warm = peak * jnp.minimum(1.0, (step + 1.0) / warmup)
        else:
            warm = jnp.asarray(peak, jnp.float32)
        if cfg.schedule == "constant":
            return warm
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            decayed = peak + (final - peak) * progress
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def decays(path: str) -> bool:
    """Whether weight decay applies to the parameter at `path` ("layers/q_bias" ...)."""
    name = path.lower()
    return "norm" not in name and "bias" not in name


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: False for norms and biases."""
    def one(path, _):
        return decays("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path))

    return jax.tree_util.tree_map_with_path(one, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (same rule, same empty state) that takes the global norm
    as `grad_norm=` when the caller has it: the train step computes it anyway (for its
    finiteness check and metrics), and computing it again inside the update would read
    every gradient a second time (the update runs in a `lax.cond` branch, where XLA cannot
    reuse the first reduction). `grad_norm` must be the norm of the updates this transform
    receives: keep it first in the chain, and do not pass it through wrappers that change
    the updates (e.g. `optax.MultiSteps`, which accumulates them)."""

    def update(updates, state, params=None, *, grad_norm=None, **_extra):
        del params
        g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)
        return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
                            updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm(clip_norm) then AdamW(schedule, weight decay masked off norms/biases).

    `update` accepts `grad_norm=` (the gradients' global norm, if already computed)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask, mu_dtype=jnp.dtype(cfg.mu_dtype))
    if cfg.clip_norm and cfg.clip_norm > 0:
        return optax.chain(clip_by_global_norm(cfg.clip_norm), adamw)
    return optax.with_extra_args_support(adamw)
