"""Training: the train step (jit over the mesh), GradCache, optimizer and schedule."""

from qzhou_jax.train.optim import (TrainConfig, decays, learning_rate_schedule, make_optimizer,
                                   weight_decay_mask)
from qzhou_jax.train.step import (TASKS, LossConfig, LossFn, Trainer, TrainState, check_batch, check_finite,
                                  embed_batch, init_train_state, loss_and_grads, make_train_step,
                                  param_shardings, shard_batch, single_device_mesh, task_loss,
                                  train_state_shardings, train_step)

__all__ = [
    "TrainConfig", "decays", "learning_rate_schedule", "make_optimizer", "weight_decay_mask",
    "TASKS", "LossConfig", "LossFn", "Trainer", "TrainState", "check_batch", "check_finite", "embed_batch",
    "init_train_state", "loss_and_grads", "make_train_step", "param_shardings", "shard_batch",
    "single_device_mesh", "task_loss", "train_state_shardings", "train_step",
]
