"""Contrastive losses of QZhou-Embedding (recipe §3), as pure JAX functions.

All inputs are L2-normalised embeddings, so s(x, y) = <x, y> is the cosine similarity.
The functions work on the *global* batch: under ``jax.jit`` with sharded inputs, XLA
inserts whatever communication the matrix products need; nothing here is per-device.
Every function returns ``(loss, metrics)``, metrics being a dict of float32 scalars.

Retrieval (InfoNCE with in-batch, hard and query-query negatives, tau = 0.02)::

    L_ret = -1/n sum_i log( e^{s(q_i,d_i+)/tau} / ( e^{s(q_i,d_i+)/tau}
                            + sum_{d in D_i} e^{s(q_i,d)/tau} + sum_{j!=i} e^{s(q_i,q_j)/tau} ) )

    D_i = other queries' positives d_j+ (j != i)        if in_batch_negatives
        + all hard negatives of the batch               if hard_negatives and in_batch_negatives
        + only q_i's own hard negatives                 if hard_negatives and not in_batch_negatives
    the q-q sum is present only if query_negatives.

    With false_negative_margin = m, every candidate c != d_i+ with s(q_i,c) > s(q_i,d_i+) + m
    is dropped from the denominator (a likely false negative).

    With text keys (equal keys = identical model inputs), every candidate identical to d_i+
    or to q_i is dropped too: another query's copy of the same positive, a hard negative equal
    to it, a passage equal to the query (symmetric data, swapped pairs), a repeated query.
    Their embedding is the positive's or the query's own, and keeping them pushes a text away
    from itself. So is the positive d_j+ of a row j whose query equals q_i, in any column (in-batch
    or hard negative): a query with several relevant passages (one record per pair) must not
    push its own positives away. That holds in the query column too: a query q_j whose text is a
    positive of a row with q_i's query is dropped.

STS / NLI (CoSENT, tau_c = temperature, default 0.05 i.e. scale 20)::

    L_cos = log( 1 + sum_{(i,j): y_i > y_j} exp( (cos_j - cos_i) / tau_c ) ),  cos_i = s(a_i, b_i)

Classification / clustering (InfoNCE with a same-class mask)::

    as L_ret with anchors t_i, positives t_i+ and negatives; the denominator holds t_i+,
    every negative of the batch (the anchor's and the other anchors') and the other anchors,
    as the paper writes it, and every candidate other than t_i+ whose class equals class(t_i)
    gets weight 0. `other_positives=True` adds the other anchors' positives as candidates
    (L_ret's in-batch negatives), under the same class mask.

Implementation: a masked log-softmax over a candidate matrix [n, 1 + m] (the positive, then
the negatives), written as log(1 + sum_valid exp((s_neg - s_pos)/tau)) so that small losses
keep float32 precision. Masked logits are replaced by a large negative finite value before
exp(), so they contribute exactly 0 and gradients stay finite.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # "minus infinity" for masked logits; finite so gradients never see inf - inf
_HI = jax.lax.Precision.HIGHEST


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _check_temperature(temperature) -> None:
    try:
        value = float(temperature) if not isinstance(temperature, bool) and np.ndim(temperature) == 0 else None
    except jax.errors.ConcretizationTypeError:  # traced: not readable here
        return
    except (TypeError, ValueError):
        value = None
    _check(value is not None and value > 0, "temperature", f"must be a number > 0, got {temperature!r}")


def _sim(x: jax.Array, y: jax.Array) -> jax.Array:
    """[n, d] x [m, d] -> [n, m] cosine similarities (inputs already normalised)."""
    return jnp.matmul(x, y.T, precision=_HI)


def _log1p_sum_exp(x, valid, axis=None):
    """log(1 + sum_{valid} exp(x)) along ``axis``, stable and precise for small results too.

    With m = max(0, max x): m + log1p(expm1(-m) + sum exp(x - m)). The identity holds for any
    m, so m is a constant for differentiation. Masked entries are replaced *before* exp() so
    neither the value nor the gradient can overflow.
    """
    best = jnp.max(jnp.where(valid, x, _NEG), axis=axis, keepdims=True, initial=_NEG)
    m = jax.lax.stop_gradient(jnp.maximum(best, 0.0))
    total = jnp.sum(jnp.exp(jnp.where(valid, x - m, _NEG)), axis=axis, keepdims=True)
    out = m + jnp.log1p(jnp.expm1(-m) + total)
    return jnp.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def _masked_infonce(pos_sim, neg_sim, neg_valid, temperature, margin=None):
    """InfoNCE with one positive per row and masked negative candidates.

    pos_sim [n]; neg_sim [n, m]; neg_valid [n, m] bool. Per row, -log softmax of the positive
    is log(1 + sum_valid exp((s_neg - s_pos) / tau)).
    """
    if margin is not None:
        too_close = jax.lax.stop_gradient(neg_sim) > jax.lax.stop_gradient(pos_sim)[:, None] + margin
        neg_valid = neg_valid & ~too_close
    diff = (neg_sim - pos_sim[:, None]) / temperature
    loss = jnp.mean(_log1p_sum_exp(diff, neg_valid, axis=1))

    best_neg = jnp.max(jnp.where(neg_valid, neg_sim, _NEG), axis=1, initial=_NEG)
    count = jnp.sum(neg_valid.astype(jnp.float32))
    metrics = {
        "accuracy": jnp.mean((pos_sim > best_neg).astype(jnp.float32)),
        "pos_sim": jnp.mean(pos_sim),
        "neg_sim": jnp.sum(jnp.where(neg_valid, neg_sim, 0.0)) / jnp.maximum(count, 1.0),
    }
    return loss, metrics


def _as_negatives(neg, n: int, d: int, name: str = "neg") -> jax.Array:
    if neg is None:
        return jnp.zeros((n, 0, d), jnp.float32)
    neg = jnp.asarray(neg, jnp.float32)
    _check(neg.ndim == 3 and neg.shape[0] == n and neg.shape[2] == d, name,
           f"expected shape [{n}, k, {d}], got {tuple(neg.shape)}")
    return neg


def _check_pair(x, y, xname: str, yname: str) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    _check(x.ndim == 2, xname, f"expected shape [n, d], got {tuple(x.shape)}")
    _check(y.shape == x.shape, yname, f"expected shape {tuple(x.shape)} (as {xname}), got {tuple(y.shape)}")
    return x, y


def _text_keys(q_keys, pos_keys, neg_keys, n: int, k: int):
    if neg_keys is None and k == 0 and q_keys is not None:
        neg_keys = jnp.zeros((n, 0), jnp.int32)
    given = [x is not None for x in (q_keys, pos_keys, neg_keys)]
    if not any(given):
        return None
    _check(all(given), "q_keys", "q_keys, pos_keys and neg_keys go together (text keys of every row)")
    q_keys, pos_keys, neg_keys = (jnp.asarray(x) for x in (q_keys, pos_keys, neg_keys))
    _check(q_keys.shape == (n,), "q_keys", f"expected shape [{n}], got {tuple(q_keys.shape)}")
    _check(pos_keys.shape == (n,), "pos_keys", f"expected shape [{n}], got {tuple(pos_keys.shape)}")
    _check(neg_keys.shape == (n, k), "neg_keys", f"expected shape [{n}, {k}], got {tuple(neg_keys.shape)}")
    return q_keys, pos_keys, neg_keys


def infonce_retrieval(q, pos, neg=None, *, temperature=0.02, in_batch_negatives=True,
                      hard_negatives=True, query_negatives=True, false_negative_margin=None,
                      q_keys=None, pos_keys=None, neg_keys=None) -> tuple[jax.Array, dict]:
    """Retrieval InfoNCE (L_ret).

    q, pos: [n, d] queries and their positives; neg: [n, k, d] hard negatives (k may be 0)
    or None. q_keys [n], pos_keys [n], neg_keys [n, k] (all or none; neg_keys may be left out
    when k == 0): integer keys of the model inputs, equal for identical inputs; candidates
    identical to the row's positive or query, and other rows' positives of the same query,
    are then left out. Returns (mean loss, {"accuracy", "pos_sim", "neg_sim"}, plus
    "duplicates", the mean number of candidates left out per row, when keys are given).
    """
    _check_temperature(temperature)
    q, pos = _check_pair(q, pos, "q", "pos")
    n, d = q.shape
    neg = _as_negatives(neg, n, d)
    k = neg.shape[1]
    keys = _text_keys(q_keys, pos_keys, neg_keys, n, k)
    row = jnp.arange(n)[:, None]
    others = row != jnp.arange(n)[None, :]

    pos_sim = jnp.sum(q * pos, axis=-1)
    sims, valid, same = [], [], []
    if keys is not None:  # [n, n]: row j's query is row i's (a query with several positives)
        same_query = (keys[0][:, None] == keys[0][None, :]).astype(jnp.float32)
    if in_batch_negatives:
        sims.append(_sim(q, pos))  # the diagonal is the positive itself, already in column 0
        valid.append(others)
        if keys is not None:
            # a positive equal to a positive of any row with the row's query (another copy of its
            # own, or another relevant passage of the same query, one row per pair, wherever it
            # appears in the batch), or to the query; and the positives of rows with that query
            other_pos = jnp.matmul(same_query, (keys[1][:, None] == keys[1][None, :]).astype(jnp.float32),
                                   precision=_HI) > 0
            same.append(other_pos | (keys[1][None, :] == keys[0][:, None]) | (same_query > 0))
    if hard_negatives and k > 0:
        if in_batch_negatives:
            sims.append(_sim(q, neg.reshape(n * k, d)))  # column c belongs to query c // k
            if keys is not None:
                flat = keys[2].reshape(1, n * k)
                # ... and a negative equal to a positive of any row with the same query
                other_pos = jnp.matmul(same_query, (keys[1][:, None] == flat).astype(jnp.float32), precision=_HI) > 0
                same.append((flat == keys[1][:, None]) | (flat == keys[0][:, None]) | other_pos)
        else:
            sims.append(jnp.einsum("nd,nkd->nk", q, neg, precision=_HI))
            if keys is not None:
                hit = (keys[1][None, :, None] == keys[2][:, None, :]).astype(jnp.float32)  # [i, j, l]: neg[i,l] == pos[j]
                other_pos = jnp.einsum("ij,ijl->il", same_query, hit, precision=_HI) > 0
                same.append((keys[2] == keys[1][:, None]) | (keys[2] == keys[0][:, None]) | other_pos)
        valid.append(jnp.ones(sims[-1].shape, bool))
    if query_negatives:
        sims.append(_sim(q, q))
        valid.append(others)
        if keys is not None:
            # a repeated query, or a query whose text is a positive of any row with q_i's query
            # (row i's own included: a swapped pair)
            other_pos = jnp.matmul(same_query, (keys[1][:, None] == keys[0][None, :]).astype(jnp.float32),
                                   precision=_HI) > 0
            same.append((keys[0][None, :] == keys[0][:, None]) | other_pos)
    if not sims:
        sims, valid = [jnp.zeros((n, 0), jnp.float32)], [jnp.zeros((n, 0), bool)]
    valid = jnp.concatenate(valid, axis=1)
    dropped = None
    if keys is not None and same:
        same = jnp.concatenate(same, axis=1)
        dropped = valid & same
        valid = valid & ~same
    loss, metrics = _masked_infonce(pos_sim, jnp.concatenate(sims, axis=1), valid, temperature, false_negative_margin)
    if keys is not None:
        metrics["duplicates"] = (jnp.sum(dropped.astype(jnp.float32)) / n if dropped is not None
                                 else jnp.zeros((), jnp.float32))
    return loss, metrics


def cosent(a, b, scores, *, temperature=0.05, valid=None) -> tuple[jax.Array, dict]:
    """CoSENT (L_cos) on pairs (a_i, b_i) with gold scores y_i; ``valid`` [n] masks padded rows.

    Returns (loss, {"pos_sim", "pair_accuracy"}).
    """
    _check_temperature(temperature)
    a, b = _check_pair(a, b, "a", "b")
    n = a.shape[0]
    scores = jnp.asarray(scores, jnp.float32)
    _check(scores.shape == (n,), "scores", f"expected shape ({n},), got {tuple(scores.shape)}")
    if valid is None:
        valid = jnp.ones((n,), bool)
    else:
        valid = jnp.asarray(valid)
        _check(valid.shape == (n,), "valid", f"expected shape ({n},), got {tuple(valid.shape)}")
        valid = valid.astype(bool)

    cos = jnp.sum(a * b, axis=-1)
    # ordered[i, j]: y_i > y_j, both rows real -> term exp((cos_j - cos_i) / tau)
    ordered = (scores[:, None] > scores[None, :]) & valid[:, None] & valid[None, :]
    diff = (cos[None, :] - cos[:, None]) / temperature
    loss = _log1p_sum_exp(diff, ordered)  # = logsumexp over [0, masked diff]

    n_pairs = jnp.sum(ordered.astype(jnp.float32))
    right = jnp.sum((ordered & (cos[:, None] > cos[None, :])).astype(jnp.float32))
    n_valid = jnp.sum(valid.astype(jnp.float32))
    metrics = {
        "pos_sim": jnp.sum(jnp.where(valid, cos, 0.0)) / jnp.maximum(n_valid, 1.0),
        "pair_accuracy": right / jnp.maximum(n_pairs, 1.0),
    }
    return loss, metrics


def infonce_classification(anchor, pos, neg, anchor_labels, pos_labels, neg_labels, *,
                           temperature=0.02, other_positives=False) -> tuple[jax.Array, dict]:
    """Class-masked InfoNCE for classification / clustering data.

    anchor, pos: [n, d]; neg: [n, k, d] (or None); integer labels [n], [n], [n, k] (or None).
    pos_labels[i] is expected to equal anchor_labels[i]. `other_positives`: the other anchors'
    positives are candidates too (not in the paper's formula). Returns the same metrics as
    ``infonce_retrieval``.
    """
    _check_temperature(temperature)
    anchor, pos = _check_pair(anchor, pos, "anchor", "pos")
    n, d = anchor.shape
    neg = _as_negatives(neg, n, d)
    k = neg.shape[1]
    anchor_labels = jnp.asarray(anchor_labels)
    pos_labels = jnp.asarray(pos_labels)
    _check(anchor_labels.shape == (n,), "anchor_labels", f"expected shape ({n},), got {tuple(anchor_labels.shape)}")
    _check(pos_labels.shape == (n,), "pos_labels", f"expected shape ({n},), got {tuple(pos_labels.shape)}")
    if neg_labels is None:
        _check(k == 0, "neg_labels", f"required when neg has k={k} negatives per anchor")
        neg_labels = jnp.zeros((n, 0), anchor_labels.dtype)
    neg_labels = jnp.asarray(neg_labels)
    _check(neg_labels.shape == (n, k), "neg_labels", f"expected shape ({n}, {k}), got {tuple(neg_labels.shape)}")

    row = jnp.arange(n)[:, None]
    other_row = row != jnp.arange(n)[None, :]
    lab = anchor_labels[:, None]
    pos_sim = jnp.sum(anchor * pos, axis=-1)
    sims = [_sim(anchor, neg.reshape(n * k, d)),  # every negative of the batch
            _sim(anchor, anchor)]                 # other anchors
    valid = [neg_labels.reshape(1, n * k) != lab,
             other_row & (anchor_labels[None, :] != lab)]
    if other_positives:  # other anchors' positives (diagonal = own positive, left out)
        sims.insert(0, _sim(anchor, pos))
        valid.insert(0, other_row & (pos_labels[None, :] != lab))
    return _masked_infonce(pos_sim, jnp.concatenate(sims, axis=1), jnp.concatenate(valid, axis=1), temperature)
