"""The train step: one task-homogeneous batch -> embeddings -> loss -> gradients -> AdamW update.

Batch format (a dict of arrays; one task per batch, `task` is a static Python string)
-----------------------------------------------------------------------------------
Every task has two sides, "queries" `q_*` and "passages" `p_*`, each padded to its own
length (at most the dataset's `query_max_length` / `passage_max_length`; shorter with
`DataConfig.length_buckets`)::

    q_ids, q_mask   [n, Lq]        int   queries / anchors / first texts
    p_ids, p_mask   [n * g, Lp]    int   g passages per query, grouped by query:
                                         row i*g + 0 is query i's positive,
                                         rows i*g + 1 .. i*g + g-1 its hard negatives

    retrieval       g = 1 + k (k >= 0 hard negatives per query), optionally
                    q_keys [n] int, p_keys [n * g] int   keys of the input texts (equal keys:
                                         identical texts), for LossConfig.mask_duplicate_texts
    sts             g = 1 (p row i is the second text of pair i), plus
                    scores  [n] float   gold similarity (only the order matters, CoSENT)
                    valid   [n] bool    optional: False rows are padding, left out of the loss
    classification  g = 1 + k, plus
                    q_labels [n] int      class of each anchor
                    p_labels [n * g] int  class of each passage row (row i*g is the positive)

Masks are 1 for tokens, 0 for padding (either side). n must divide over the data-parallel
devices (mesh axes `data` x `fsdp`), and GradCache's `chunk_size` must divide n.

What the step does
------------------
`loss_and_grads` embeds both sides (float32, L2-normalized), computes the task's loss on the
*global* embedding matrices (every query sees every passage of the batch, on every mesh:
XLA inserts the collectives), and differentiates. With `chunk_size > 0` it does so with
GradCache: (1) embed the batch in chunks of `chunk_size` queries (and their `chunk_size * g`
passages) keeping no activations, (2) loss and d loss / d embeddings on the full matrices,
(3) re-run each chunk under `jax.vjp` with its slice of the embedding gradient and
accumulate parameter gradients (a `lax.scan` over chunks, so compile size does not grow).
Activation memory is then that of one chunk, whatever the batch; the gradient equals the
full-batch gradient. The price is a second forward pass over the batch. With remat "full",
`keep_chunks` chunks avoid it: they keep every layer's input from pass (1) (what remat
"full" keeps), and pass (3) runs remat-full's backward from those inputs
(`embedder.embed_many_backward`), which re-runs each layer once instead of twice.

`train_step` adds global-norm clipping and AdamW (`optim.make_optimizer`), and a guard:
when the loss or the gradient norm is not finite, parameters, optimizer state and step are
returned unchanged and `metrics["finite"]` is 0 (the update runs under `lax.cond`, in place
on the donated state); `check_finite` (called by `Trainer.step`) then raises
FloatingPointError.

Master weights and optimizer state are float32; the model computes in `cfg.compute_dtype`
(bfloat16 by default). Parameters and optimizer state are sharded per the logical-axis
rules (`sharding.py`), the batch over the data-parallel axes; the state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qzhou_jax import losses, sharding
from qzhou_jax.config import ModelConfig, python_scalars
from qzhou_jax.model.embedder import embed_many, embed_many_backward, embed_many_saving
from qzhou_jax.model.qwen2 import check_param_split, check_params, param_specs
from qzhou_jax.train.optim import TrainConfig, learning_rate_schedule, make_optimizer

TASKS = ("retrieval", "sts", "classification")
_SIDES = ("q_ids", "q_mask", "p_ids", "p_mask")
_REQUIRED = {
    "retrieval": _SIDES,
    "sts": _SIDES + ("scores",),
    "classification": _SIDES + ("q_labels", "p_labels"),
}
_OPTIONAL = {"retrieval": ("q_keys", "p_keys"), "sts": ("valid",), "classification": ()}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss settings (recipe §3).

    temperature: InfoNCE tau for retrieval and classification (0.02 in the paper).
    cosent_temperature: CoSENT tau_c (open in the paper; 0.05 is CoSENT's usual scale 20).
    The three switches select the retrieval denominator's parts; false_negative_margin
    drops candidates scoring above the positive + margin (None: off). mask_duplicate_texts
    drops candidates whose input text is identical to the row's positive (or query), and
    other rows' positives of the same query, using the batch's text keys (``q_keys``/``p_keys``, which the data pipeline always writes).
    classification_other_positives adds the other anchors' positives to the classification
    denominator (class-masked like every candidate); the paper's formula leaves them out.
    function: another objective in place of `task_loss` (a `LossFn`), named
    ``"package.module:name"`` (importable) or ``"path/to/file.py:name"`` (relative to the working
    directory); it is imported when the config is built, so a typo fails before any device
    work. options: settings of that function, which reads them as ``loss_cfg.options``.
    """

    temperature: float = 0.02
    cosent_temperature: float = 0.05
    in_batch_negatives: bool = True
    hard_negatives: bool = True
    query_negatives: bool = True
    false_negative_margin: float | None = None
    mask_duplicate_texts: bool = True
    classification_other_positives: bool = False
    function: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        python_scalars(self)
        if self.options and not self.function:
            raise ValueError("loss.options: set only with loss.function (the built-in losses take none)")
        if self.function is not None:
            load_function(self.function, "loss.function")
        for name in ("temperature", "cosent_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                raise ValueError(f"loss.{name}: expected a positive number, got {v!r}")
        m = self.false_negative_margin
        if m is not None and not (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)):
            raise ValueError(f"loss.false_negative_margin: expected a finite number or None (off), got {m!r}")


    def objective(self, loss_fn: "LossFn | None" = None) -> "LossFn":
        """The loss to train on: `loss_fn` (the Python API's), else `function`, else `task_loss`."""
        if loss_fn is not None and self.function is not None:
            raise ValueError(f"a loss_fn was passed and loss.function is {self.function!r}: choose one")
        if loss_fn is not None:
            return loss_fn
        return task_loss if self.function is None else load_function(self.function, "loss.function")

    def __hash__(self) -> int:  # options is a dict: hashed by its JSON form
        import json

        return hash(tuple(json.dumps(v, sort_keys=True, default=repr) if f.name == "options" else v
                          for f in dataclasses.fields(self) for v in (getattr(self, f.name),)))


def load_function(spec: str, key: str) -> Callable:
    """The callable named by ``"package.module:name"`` or ``"path/to/file.py:name"`` (a file is
    loaded once per path); errors name `key`."""
    import importlib
    import importlib.util
    import os
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: expected 'package.module:name' or 'path/to/file.py:name', got {spec!r}")
    if module_name.endswith(".py"):
        import hashlib

        path = os.path.abspath(os.path.expanduser(os.path.expandvars(module_name)))
        name = f"_qzhou_user_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            if not os.path.isfile(path):
                raise ValueError(f"{key}: {module_name}: file not found")
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # before running it, as an import does (dataclasses look it up)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ValueError(f"{key}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{key}: cannot import {module_name!r} ({e}); install it or put its folder "
                             "on PYTHONPATH, or name a file: 'path/to/file.py:name'") from e
        except Exception as e:
            raise ValueError(f"{key}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{key}: {module_name} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{key}: {spec} is a {type(fn).__name__}, not a function")
    return fn


class TrainState(NamedTuple):
    """Everything the step updates: float32 params, optimizer state, number of applied updates."""

    params: Any
    opt_state: Any
    step: jax.Array


# ------------------------------------------------------------------ the loss
def _group(batch: Mapping[str, Any]) -> int:
    n, rows = batch["q_ids"].shape[0], batch["p_ids"].shape[0]
    return rows // n


LossFn = Callable[..., "tuple[jax.Array, dict]"]
"""A replacement for `task_loss`: ``loss_fn(q_emb, p_emb, batch, task, loss_cfg) -> (loss, metrics)``,
on the global float32 embedding matrices q_emb [n, d] and p_emb [n * g, d] (each query's g
passages in a row, its positive first) and the step's batch (the task's keys: labels, scores,
text keys, `valid`). Traced under `jax.jit` and differentiated with respect to the embeddings,
so GradCache applies to it as to the built-in losses; metrics are scalars (logged per task).
The batch is a dict subclass whose missing keys raise a KeyError naming the remedy; it is a
pytree of its own type (use `dict(batch)` to combine it with plain dicts in one tree operation).
Extending `task_loss` keeps the built-in behaviour: ``loss, m = task_loss(...); return loss +
extra, {**m, "extra": extra}``."""


def task_loss(q_emb: jax.Array, p_emb: jax.Array, batch: Mapping[str, Any], task: str,
              loss_cfg: LossConfig = LossConfig()) -> tuple[jax.Array, dict]:
    """The task's loss on the global embedding matrices q_emb [n, d], p_emb [n*g, d]."""
    n, d = q_emb.shape
    g = p_emb.shape[0] // n
    if task == "retrieval":
        grouped = p_emb.reshape(n, g, d)
        keys = {}
        if loss_cfg.mask_duplicate_texts and "q_keys" in batch:
            p_keys = batch["p_keys"].reshape(n, g)
            keys = {"q_keys": batch["q_keys"], "pos_keys": p_keys[:, 0], "neg_keys": p_keys[:, 1:]}
        return losses.infonce_retrieval(
            q_emb, grouped[:, 0], grouped[:, 1:], temperature=loss_cfg.temperature,
            in_batch_negatives=loss_cfg.in_batch_negatives, hard_negatives=loss_cfg.hard_negatives,
            query_negatives=loss_cfg.query_negatives, false_negative_margin=loss_cfg.false_negative_margin,
            **keys)
    if task == "sts":
        return losses.cosent(q_emb, p_emb, batch["scores"], temperature=loss_cfg.cosent_temperature,
                             valid=batch.get("valid"))
    if task == "classification":
        grouped = p_emb.reshape(n, g, d)
        labels = batch["p_labels"].reshape(n, g)
        return losses.infonce_classification(q_emb, grouped[:, 0], grouped[:, 1:], batch["q_labels"],
                                             labels[:, 0], labels[:, 1:], temperature=loss_cfg.temperature,
                                             other_positives=loss_cfg.classification_other_positives)
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def embed_batch(params: Mapping[str, Any], cfg: ModelConfig, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(query embeddings [n, d], passage embeddings [n*g, d]), float32, normalized."""
    q, p = embed_many(params, cfg, [(batch["q_ids"], batch["q_mask"]), (batch["p_ids"], batch["p_mask"])])
    return q, p


def _constrain_params(tree: Any, cfg: ModelConfig) -> Any:
    """Pin a params-shaped tree (gradients, accumulators) to the parameters' sharding."""
    if sharding.current_mesh() is None:
        return tree
    specs = param_specs(cfg)
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    pinned = {p: sharding.constrain(x, specs[p].axes) if p in specs else x for p, x in flat.items()}
    return _unflatten(pinned, like=tree)


def _unflatten(flat: Mapping[str, Any], like: Any) -> Any:
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(like)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), [flat[p] for p in paths])


class _LossBatch(dict):
    """The batch a loss function is given: a key it reads that the batch lacks is named, with the
    remedy. A pytree like a dict."""

    task = ""

    def __missing__(self, key):
        raise KeyError(f"the loss function reads batch[{key!r}], which this {self.task} batch lacks (it has "
                       f"{sorted(self)}): a custom loss's own keys are declared with Trainer(extra_keys=...) "
                       f"and every {self.task} batch must carry them")


def _loss_batch(items, task: str) -> _LossBatch:
    batch = _LossBatch(items)
    batch.task = task
    return batch


jax.tree_util.register_pytree_with_keys(
    _LossBatch,
    lambda b: ([(jax.tree_util.DictKey(k), b[k]) for k in sorted(b)], (tuple(sorted(b)), b.task)),
    lambda aux, children: _loss_batch(zip(aux[0], children), aux[1]))


def _call_loss(loss_fn, q, p, batch, task, loss_cfg):
    """`loss_fn` on the embeddings and the batch (a missing key it reads is named)."""
    return loss_fn(q, p, _loss_batch(batch, task), task, loss_cfg)


def _full_batch(params, batch, cfg, task, loss_cfg, loss_fn):
    def loss_of(p):
        q, d = embed_batch(p, cfg, batch)
        return _call_loss(loss_fn, q, d, batch, task, loss_cfg)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, metrics, grads


def _to_chunks(x: jax.Array, chunk: int, group: int) -> jax.Array:
    """[n*group, ...] -> [n/chunk, chunk*group, ...]; chunk c holds queries c, c + n/chunk, ...

    Taking every (n/chunk)-th query keeps each chunk spread over the data-parallel devices
    (no data moves when `chunk` is a multiple of the data-parallel size), and a query's
    `group` passages stay in its chunk.
    """
    rest = x.shape[1:]
    n_chunks = x.shape[0] // (chunk * group)
    x = x.reshape((chunk, n_chunks, group) + rest)
    x = jnp.swapaxes(x, 0, 1).reshape((n_chunks, chunk * group) + rest)
    return sharding.constrain(x, (None, "batch") + (None,) * len(rest))


def _from_chunks(y: jax.Array, chunk: int, group: int) -> jax.Array:
    """Inverse of `_to_chunks`."""
    n_chunks, rest = y.shape[0], y.shape[2:]
    y = y.reshape((n_chunks, chunk, group) + rest)
    y = jnp.swapaxes(y, 0, 1).reshape((chunk * n_chunks * group,) + rest)
    return sharding.constrain(y, ("batch",) + (None,) * len(rest))


def check_keep_chunks(cfg: ModelConfig, keep_chunks: int) -> None:
    """Kept chunks replace remat "full"'s recomputation (their backward re-runs each layer
    from its saved input); under another policy they would save nothing and cost memory."""
    if keep_chunks and cfg.remat != "full":
        raise ValueError(f"train.keep_chunks: {keep_chunks} saves work only with model.remat 'full' (kept chunks "
                         f"run its backward instead of a second forward plus the policy's recomputation); with "
                         f"remat {cfg.remat!r} it would only cost memory: set keep_chunks to 0")


def kept_chunks(n: int, chunk_size: int, keep_chunks: int) -> int:
    """How many of the batch's `n / chunk_size` GradCache chunks keep their layer inputs
    (`keep_chunks` < 0 or above the number of chunks: all of them)."""
    n_chunks = n // chunk_size
    return n_chunks if keep_chunks < 0 else min(keep_chunks, n_chunks)


def _grad_cache(params, batch, cfg, task, loss_cfg, chunk_size, keep_chunks, loss_fn):
    g = _group(batch)
    groups = tuple(1 if k.startswith("q") else g for k in _SIDES)
    tokens = tuple(_to_chunks(batch[k], chunk_size, grp) for k, grp in zip(_SIDES, groups))
    k = kept_chunks(batch["q_ids"].shape[0], chunk_size, keep_chunks)
    kept, rest = jax.tree.map(lambda t: t[:k], tokens), jax.tree.map(lambda t: t[k:], tokens)

    def inputs(t):
        return [(t[0], t[1]), (t[2], t[3])]

    # 1. Embeddings of every chunk. The first k chunks keep each layer's input (the
    #    residuals of remat "full"), the others nothing.
    frozen = jax.lax.stop_gradient(params)
    embs, saved = [], None
    if k:
        (q_k, p_k), saved = jax.lax.map(lambda t: embed_many_saving(frozen, cfg, inputs(t)), kept)
        saved = jax.tree.map(lambda x: sharding.constrain(x, (None,) * (x.ndim - 3) + ("batch", "seq", "act_embed")),
                             saved)
        embs.append((q_k, p_k))
    if k < tokens[0].shape[0]:
        embs.append(jax.lax.map(lambda t: embed_batch(frozen, cfg, dict(zip(_SIDES, t))), rest))
    q_c, p_c = (jnp.concatenate(e) if len(embs) > 1 else e[0] for e in zip(*embs))
    q_emb, p_emb = _from_chunks(q_c, chunk_size, 1), _from_chunks(p_c, chunk_size, g)

    # 2. Loss and its gradient with respect to the full embedding matrices.
    (loss, metrics), (dq, dp) = jax.value_and_grad(
        lambda q, p: _call_loss(loss_fn, q, p, batch, task, loss_cfg), argnums=(0, 1),
        has_aux=True)(q_emb, p_emb)
    d_emb = (_to_chunks(dq, chunk_size, 1), _to_chunks(dp, chunk_size, g))

    # 3. Each chunk's embedding gradient pulled back to the parameters and accumulated:
    #    the kept chunks from their saved layer inputs (first, so that memory is released
    #    before the rest), the others by running the chunk again under `jax.vjp`.
    def accumulate(acc, grads):
        return _constrain_params(jax.tree.map(jnp.add, acc, grads), cfg)

    def body_kept(acc, xs):
        t, s, dq_c, dp_c = xs
        return accumulate(acc, embed_many_backward(params, cfg, inputs(t), s, [dq_c, dp_c])), None

    def body(acc, xs):
        t, dq_c, dp_c = xs
        _, pullback = jax.vjp(lambda p: embed_batch(p, cfg, dict(zip(_SIDES, t))), params)
        (grads,) = pullback((dq_c, dp_c))
        return accumulate(acc, grads), None

    grads = _constrain_params(jax.tree.map(jnp.zeros_like, params), cfg)
    if k:
        grads, _ = jax.lax.scan(body_kept, grads, (kept, saved) + tuple(d[:k] for d in d_emb))
    if k < tokens[0].shape[0]:
        grads, _ = jax.lax.scan(body, grads, (rest,) + tuple(d[k:] for d in d_emb))
    return loss, metrics, grads


def loss_and_grads(params: Mapping[str, Any], batch: Mapping[str, Any], cfg: ModelConfig, task: str,
                   loss_cfg: LossConfig = LossConfig(), chunk_size: int = 0,
                   keep_chunks: int = 0, loss_fn: LossFn | None = None) -> tuple[jax.Array, dict, Any]:
    """(loss, metrics, d loss / d params) for one batch; GradCache when chunk_size > 0, with
    `keep_chunks` chunks (-1: all) keeping their layer inputs between its two passes.
    `loss_fn` replaces `task_loss` (same signature; see `LossFn`), as `loss_cfg.function` does.

    Pure and traceable: call it under `jax.jit` (inside `sharding.use_mesh` for sharded runs).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    check_keep_chunks(cfg, keep_chunks)
    loss_fn = loss_cfg.objective(loss_fn)
    n = batch["q_ids"].shape[0]
    if chunk_size and chunk_size < n:
        if n % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} does not divide the batch of {n} queries")
        loss, metrics, grads = _grad_cache(params, batch, cfg, task, loss_cfg, chunk_size, keep_chunks, loss_fn)
    else:
        loss, metrics, grads = _full_batch(params, batch, cfg, task, loss_cfg, loss_fn)
    return loss, metrics, _constrain_params(grads, cfg)


# ------------------------------------------------------------------ the step
def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum of squares) over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_step(state: TrainState, batch: Mapping[str, Any], *, cfg: ModelConfig, task: str,
               tx: optax.GradientTransformation, schedule: Callable | None = None,
               loss_cfg: LossConfig = LossConfig(), chunk_size: int = 0,
               keep_chunks: int = 0, loss_fn: LossFn | None = None) -> tuple[TrainState, dict]:
    """One optimizer step. Non-finite loss or gradients leave the state unchanged (finite = 0)."""
    loss, metrics, grads = loss_and_grads(state.params, batch, cfg, task, loss_cfg, chunk_size, keep_chunks,
                                          loss_fn)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A branch, not `where(finite, new, old)` over the state: with a select XLA keeps the old
    # and the new state alive at once and copies every state buffer each step.
    def update(operands):
        params, opt_state, grads = operands
        extra = {"grad_norm": grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return _constrain_params(optax.apply_updates(params, updates), cfg), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda ops: (ops[0], ops[1]),
                                     (state.params, state.opt_state, grads))
    new_state = TrainState(params=params, opt_state=opt_state,
                           step=state.step + finite.astype(state.step.dtype))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                   finite=finite.astype(jnp.float32), step=state.step.astype(jnp.float32))
    if schedule is not None:  # the rate this step's update applies (skipped steps do not advance it)
        metrics["lr"] = jnp.asarray(schedule(_update_count(state.opt_state, state.step)), jnp.float32)
    return new_state, metrics


def _update_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The optimizer's count of applied updates, which its learning-rate schedule reads."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule):
        if is_schedule(leaf):
            return leaf.count
    return default


# ----------------------------------------------------------------- shardings
def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A (1, 1, 1) mesh on one device (the default device)."""
    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), [device or jax.devices()[0]])


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *groups, name = path.split("/")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[name] = value
    return out


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> dict:
    """NamedSharding per parameter, nested like `model.encoder.params()`, from `param_specs`."""
    return _nest({p: sharding.named_sharding(s.axes, mesh, rules, s.shape) for p, s in param_specs(cfg).items()})


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    return _nest({p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in param_specs(cfg).items()})


def train_state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: Mapping[str, Any] | None = None) -> TrainState:
    """Shardings of the whole state: optimizer moments sharded exactly like their parameters.

    Raises ValueError (`sharding.check_split`) when the mesh leaves large parameters whole on
    every device (a mesh axis that does not divide the dimension the rules split over it)."""
    check_param_split(cfg, mesh, rules, bytes_per_element=16,
                      what="train state (float32 parameters, gradients, Adam moments)")
    p_sh = param_shardings(cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params(cfg))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(params=p_sh, opt_state=opt_sh, step=replicated)


def init_train_state(params: Mapping[str, Any], cfg: ModelConfig, tx: optax.GradientTransformation,
                     mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                     donate: bool = False) -> TrainState:
    """Float32 master copy of `params` and a fresh optimizer state, each in its sharding.

    `params` is the pure dict of `model.encoder.params()` (any placement). With `donate`,
    its buffers are reused for the master copy where possible (the caller's arrays, and the
    model holding them, become unusable): no second copy of the weights is ever held.
    """
    mesh = mesh or single_device_mesh()
    shardings = train_state_shardings(cfg, tx, mesh, rules)
    expected = jax.tree.structure(shardings.params)
    if jax.tree.structure(params) != expected:
        raise ValueError(f"params: expected the structure of model.encoder.params() ({expected}), "
                         f"got {jax.tree.structure(params)}")
    check_params(params, cfg)  # shapes too: another size's params would train silently
    params = jax.device_put(params, shardings.params)

    def init(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
        return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))

    return jax.jit(init, out_shardings=shardings, donate_argnums=(0,) if donate else ())(params)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, task: str, *, mesh: Mesh,
                    rules: Mapping[str, Any] | None = None, loss_cfg: LossConfig = LossConfig(),
                    chunk_size: int = 0, keep_chunks: int = 0, schedule: Callable | None = None,
                    loss_fn: LossFn | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)`: jitted over `mesh`, the state donated.

    The batch must be sharded already (`shard_batch`) and checked (`check_batch`).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    state_sh = train_state_shardings(cfg, tx, mesh, rules)
    fn = functools.partial(train_step, cfg=cfg, task=task, tx=tx, schedule=schedule, loss_cfg=loss_cfg,
                           chunk_size=chunk_size, keep_chunks=keep_chunks, loss_fn=loss_fn)
    jitted = jax.jit(fn, out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))

    def step(state: TrainState, batch: Mapping[str, Any]):
        with sharding.use_mesh(mesh, rules):  # activation constraints apply while tracing
            return jitted(state, batch)

    step.jitted = jitted  # type: ignore[attr-defined]
    return step


# ------------------------------------------------------------- host checks
def _describe_dp(mesh: Mesh, rules: Mapping[str, Any] | None) -> str:
    rules = sharding.DEFAULT_RULES if rules is None else rules
    axes = rules.get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return " x ".join(f"{a}={mesh.shape.get(a, 1)}" for a in axes) or "none"


def check_batch(batch: Mapping[str, Any], task: str, mesh: Mesh | None = None,
                rules: Mapping[str, Any] | None = None, chunk_size: int = 0,
                extra_keys: tuple[str, ...] = ()) -> dict[str, int]:
    """Validate a (global) batch's keys and shapes before any device work; returns n, g, Lq, Lp.

    Raises ValueError with the numbers when the batch does not divide over the
    data-parallel devices or by `chunk_size`. `extra_keys`: keys a custom `loss_fn` reads, each
    with one row per query or per passage (first dimension n or n * g).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    missing = [k for k in _REQUIRED[task] if k not in batch]
    if missing:
        raise ValueError(f"{task} batch: missing {missing} (has {sorted(batch)})")
    known = {k for t in TASKS for k in _REQUIRED[t] + _OPTIONAL[t]}
    clash = sorted(set(extra_keys) & known)
    if clash:
        raise ValueError(f"extra_keys: {clash} are the step's own batch keys")
    known |= set(extra_keys)
    unknown = sorted(k for k in batch if k not in known)
    if unknown:
        raise ValueError(f"{task} batch: unknown keys {unknown} (a {task} batch holds {list(_REQUIRED[task])}"
                         f"{' and optionally ' + str(list(_OPTIONAL[task])) if _OPTIONAL[task] else ''})")
    if "valid" in batch and "valid" not in _OPTIONAL[task]:
        raise ValueError(f"{task} batch: 'valid' (rows to ignore) is only supported for sts batches; here padded "
                         f"rows would be trained on as queries and as every other query's negatives")
    shape = {k: tuple(np.shape(batch[k])) for k in _REQUIRED[task] + _OPTIONAL[task] if k in batch}
    for side in ("q", "p"):
        ids, mask = shape[f"{side}_ids"], shape[f"{side}_mask"]
        if len(ids) != 2 or ids[0] == 0 or ids[1] == 0:
            raise ValueError(f"{task} batch: {side}_ids must be a non-empty [rows, length] array, got shape {ids}")
        if mask != ids:
            raise ValueError(f"{task} batch: {side}_mask shape {mask} differs from {side}_ids shape {ids}")
    n, rows = shape["q_ids"][0], shape["p_ids"][0]
    if rows % n:
        raise ValueError(f"{task} batch: {rows} passage rows are not a whole number per query ({n} queries); "
                         f"p_ids holds n * (1 + k) rows grouped by query")
    g = rows // n
    if task == "sts" and g != 1:
        raise ValueError(f"sts batch: expected one second text per pair ({n} rows), got {rows} p_ids rows")
    per_row = {"scores": n, "valid": n, "q_labels": n, "p_labels": rows, "q_keys": n, "p_keys": rows}
    if ("q_keys" in shape) != ("p_keys" in shape):
        raise ValueError(f"{task} batch: q_keys and p_keys (text keys of every row) go together")
    for key, want in per_row.items():
        if key in shape and shape[key] != (want,):
            raise ValueError(f"{task} batch: {key} must have shape ({want},), got {shape[key]}")
    for key in extra_keys:
        got = tuple(np.shape(batch[key])) if key in batch else None
        if got is not None and (not got or got[0] not in (n, rows)):
            raise ValueError(f"{task} batch: {key} must have one row per query ({n}) or per passage ({rows}), "
                             f"got shape {got}")
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh, rules)
        if n % dp:
            raise ValueError(f"batch of {n} queries does not divide over the {dp} data-parallel devices "
                             f"({_describe_dp(mesh, rules)})")
    if chunk_size:
        if chunk_size < 0:
            raise ValueError(f"chunk_size: expected >= 0, got {chunk_size}")
        if chunk_size < n and n % chunk_size:  # a chunk of the whole batch or more: no GradCache
            raise ValueError(f"chunk_size {chunk_size} does not divide the batch of {n} queries "
                             f"(GradCache embeds whole chunks of queries with their {g} passages each)")
    return {"n": n, "group": g, "q_len": shape["q_ids"][1], "p_len": shape["p_ids"][1]}


def check_batch_values(batch: Mapping[str, Any], task: str, vocab_size: int) -> None:
    """Token ids and masks held on the host (numpy; device arrays are not read back): ids must be
    integers in [0, vocab_size) (an id past the embedding table gives NaN embeddings: a tokenizer
    of another model), and every row must have a token (an empty row pools to a zero vector that
    would be trained on; sts rows marked invalid excepted)."""
    valid = batch.get("valid")
    for side in ("q", "p"):
        ids, mask = batch[f"{side}_ids"], batch[f"{side}_mask"]
        if isinstance(ids, jax.Array) or isinstance(mask, jax.Array):
            continue
        ids, mask = np.asarray(ids), np.asarray(mask)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{task} batch: {side}_ids must hold integer token ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{task} batch: {side}_ids holds ids from {lo} to {hi}, outside the model's vocabulary "
                             f"[0, {vocab_size}): is the tokenizer the model's?")
        empty = mask.sum(axis=1) == 0
        if valid is not None:
            empty &= np.asarray(jax.device_get(valid), bool)
        if empty.any():
            raise ValueError(f"{task} batch: {side}_mask row {int(np.argmax(empty))} has no token ({int(empty.sum())} "
                             f"such rows): an empty text embeds to zeros")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Mapping[str, Any] | None = None,
                task: str | None = None, extra_keys: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Global arrays, first dimension over the data-parallel axes; ints as int32, floats float32.

    With several processes, each passes its host-local rows, the blocks of the batch its devices
    hold in global order (`data.pipeline.HostRows.from_mesh`; `jax.make_array_from_process_local_data`).
    With `task`, keys it does not use (nor `extra_keys`) are dropped.
    """
    host = _host_rows(mesh, rules) if jax.process_count() > 1 else None
    keys = [k for k in batch if task is None or k in _REQUIRED[task] + _OPTIONAL[task] + tuple(extra_keys)]
    out = {}
    for k in keys:
        v = batch[k]
        if isinstance(v, jax.Array):
            target = sharding.batch_sharding(mesh, v.ndim, rules)
            out[k] = v if v.sharding.is_equivalent_to(target, v.ndim) else jax.device_put(v, target)
            continue
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.integer):
            v = v.astype(np.int32)
        elif np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32)
        elif v.dtype != np.bool_:
            raise ValueError(f"batch[{k!r}]: expected numbers, got an array of {v.dtype} "
                             f"(class labels are integer ids: map names to ids first)")
        target = sharding.batch_sharding(mesh, v.ndim, rules)
        if host is not None:
            global_shape = (host.global_rows(v.shape[0]),) + v.shape[1:]
            out[k] = jax.make_array_from_process_local_data(target, v, global_shape)
        else:
            out[k] = jax.device_put(v, target)
    return out


def _host_rows(mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """The blocks of a batch this process's devices hold (``data.pipeline.HostRows``)."""
    from qzhou_jax.data.pipeline import HostRows

    return _default_host_rows(mesh) if rules is None else HostRows.from_mesh(mesh, rules)


@functools.lru_cache(maxsize=8)
def _default_host_rows(mesh: Mesh):
    from qzhou_jax.data.pipeline import HostRows

    return HostRows.from_mesh(mesh)


def check_finite(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Raise FloatingPointError when the step's loss or gradient norm was not finite."""
    if float(metrics["finite"]) > 0:
        return
    where = f" at step {step}" if step is not None else ""
    raise FloatingPointError(
        f"non-finite loss{where} (loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); "
        f"parameters not updated")


# ------------------------------------------------------------------ trainer
class Trainer:
    """The sharded train state and one compiled step per task (and batch shape).

        trainer = Trainer(model_cfg, TrainConfig(lr=3e-5), model.encoder.params(), mesh=mesh)
        metrics = trainer.step(batch, "retrieval")   # checks, shards, steps, raises on NaN

    `donate_params=True` hands the given parameter buffers over to the train state (no
    second copy of the weights in device memory; the model they came from is unusable after).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, params: Mapping[str, Any] | None, *,
                 loss_cfg: LossConfig = LossConfig(), mesh: Mesh | None = None,
                 rules: Mapping[str, Any] | None = None, donate_params: bool = False,
                 state: TrainState | None = None, loss_fn: LossFn | None = None,
                 extra_keys: tuple[str, ...] = ()):
        """`params` starts a fresh state; or pass `state` (e.g. restored from a checkpoint)
        with params=None. `loss_fn` replaces the built-in losses (`LossFn`); `extra_keys` are
        batch keys it reads besides the task's (teacher scores, ...), one row per query or per
        passage, sharded as the batch."""
        self.model_cfg, self.train_cfg, self.loss_cfg = model_cfg, train_cfg, loss_cfg
        loss_cfg.objective(loss_fn)  # both set: an error now, not at the first step
        self.loss_fn, self.extra_keys = loss_fn, tuple(extra_keys)
        self.mesh = mesh or single_device_mesh()
        self.rules = rules
        self.tx = make_optimizer(train_cfg)
        self.schedule = learning_rate_schedule(train_cfg)
        if (params is None) == (state is None):
            raise ValueError("Trainer: pass exactly one of params and state")
        check_keep_chunks(model_cfg, train_cfg.keep_chunks)
        if state is not None:  # placed in the mesh's shardings (a no-op for a state restored into them)
            check_params(state.params, model_cfg)
            shardings = self.state_shardings()
            if jax.tree.structure(state) != jax.tree.structure(shardings):
                raise ValueError("Trainer: the state's optimizer state does not have the structure of train_cfg's "
                                 "optimizer (was it made with another TrainConfig, e.g. clip_norm on or off?)")
            state = jax.device_put(state, shardings)
        self.state = state if state is not None else init_train_state(
            params, model_cfg, self.tx, self.mesh, rules, donate=donate_params)
        self._steps: dict[str, Callable] = {}

    def state_shardings(self) -> TrainState:
        return train_state_shardings(self.model_cfg, self.tx, self.mesh, self.rules)

    @property
    def params(self) -> Any:
        """The current float32 parameters. The next `step` donates the state, which deletes these
        arrays: copy what must outlive it (`jax.tree.map(jnp.copy, trainer.params)`)."""
        return self.state.params

    def step_fn(self, task: str) -> Callable:
        """The compiled `(state, batch) -> (state, metrics)` for `task` (state donated)."""
        if task not in self._steps:
            self._steps[task] = make_train_step(
                self.model_cfg, self.tx, task, mesh=self.mesh, rules=self.rules, loss_cfg=self.loss_cfg,
                chunk_size=self.train_cfg.chunk_size, keep_chunks=self.train_cfg.keep_chunks,
                schedule=self.schedule, loss_fn=self.loss_fn)
        return self._steps[task]

    def prepare(self, batch: Mapping[str, Any], task: str) -> dict[str, jax.Array]:
        """Check (global shapes, with the numbers in any error) and shard a batch."""
        local = jax.process_count() > 1 and not all(isinstance(v, jax.Array) for v in batch.values())
        host = _host_rows(self.mesh, self.rules) if local else None
        shapes = {}
        for k, v in batch.items():  # host-local rows -> global shape
            s = tuple(np.shape(v))
            shapes[k] = jax.ShapeDtypeStruct((host.global_rows(s[0]),) + s[1:] if s and host else s, np.int32)
        check_batch(shapes, task, self.mesh, self.rules, self.train_cfg.chunk_size, self.extra_keys)
        check_batch_values(batch, task, self.model_cfg.vocab_size)
        return shard_batch(batch, self.mesh, self.rules, task, self.extra_keys)

    def step(self, batch: Mapping[str, Any], task: str = "retrieval") -> dict[str, float]:
        """One optimizer step; returns the metrics as floats. Raises on a non-finite loss."""
        sharded = self.prepare(batch, task)
        step = int(self.state.step)
        self.state, metrics = self.step_fn(task)(self.state, sharded)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(metrics, step)
        return metrics

