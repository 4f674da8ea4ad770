"""Tests for qzhou_jax.losses: float64 numpy references of recipe §3, sentence-transformers
parity, finite gradients under masking, sharded == unsharded, and argument checks."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qzhou_jax.losses import cosent, infonce_classification, infonce_retrieval

RTOL = 1e-6


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(np.float32)  # the float64 references use exactly these (rounded) values


def _close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(float(actual), float(expected), rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------- float64 references (loops)

def _ref_infonce(anchors, positives, candidates_of, tau):
    """candidates_of(i) -> list of [d] vectors in the denominator besides the positive."""
    anchors, positives = anchors.astype(np.float64), positives.astype(np.float64)
    losses, hits, pos_sims, neg_sims = [], [], [], []
    for i in range(len(anchors)):
        s_pos = anchors[i] @ positives[i]
        s_neg = np.array([anchors[i] @ c.astype(np.float64) for c in candidates_of(i, s_pos)])
        denom = np.exp(s_pos / tau) + np.sum(np.exp(s_neg / tau))
        losses.append(-(s_pos / tau - np.log(denom)))
        hits.append(len(s_neg) == 0 or s_pos > s_neg.max())
        pos_sims.append(s_pos)
        neg_sims.extend(s_neg)
    neg_sim = np.mean(neg_sims) if neg_sims else 0.0
    return np.mean(losses), {"accuracy": np.mean(hits), "pos_sim": np.mean(pos_sims), "neg_sim": neg_sim}


def ref_retrieval(q, pos, neg, tau, in_batch, hard, qneg, margin, keys=None):
    """keys = (q_keys, pos_keys, neg_keys): candidates whose key equals the row's positive's
    or the row's query's are left out, and so are the positives of rows with the same query."""
    n, k = q.shape[0], (0 if neg is None else neg.shape[1])
    qk, pk, nk = keys if keys is not None else (np.arange(n), -1 - np.arange(n), -100 - np.arange(n * k).reshape(n, k))

    def candidates_of(i, s_pos):
        c = []
        same_query_pos = {pk[j] for j in range(n) if qk[j] == qk[i]}
        if in_batch:
            c += [pos[j] for j in range(n) if j != i and pk[j] != qk[i] and pk[j] not in same_query_pos
                  and qk[j] != qk[i]]
        if hard:
            c += [neg[j, l] for j in (range(n) if in_batch else [i]) for l in range(k)
                  if nk[j, l] not in (pk[i], qk[i]) and nk[j, l] not in same_query_pos]
        if qneg:
            c += [q[j] for j in range(n) if j != i and qk[j] != qk[i] and qk[j] not in same_query_pos]
        if margin is not None:
            c = [v for v in c if q[i].astype(np.float64) @ v.astype(np.float64) <= s_pos + margin]
        return c

    return _ref_infonce(q, pos, candidates_of, tau)


def ref_classification(anc, pos, neg, la, lp, ln, tau, other_positives=False):
    """Recipe §3: the anchor's negatives, other anchors and other anchors' negatives, class-masked
    (`other_positives`: also the other anchors' positives)."""
    n, k = neg.shape[:2]

    def candidates_of(i, s_pos):
        c = [pos[j] for j in range(n) if j != i and lp[j] != la[i]] if other_positives else []
        c += [neg[j, l] for j in range(n) for l in range(k) if ln[j, l] != la[i]]
        c += [anc[j] for j in range(n) if j != i and la[j] != la[i]]
        return c

    return _ref_infonce(anc, pos, candidates_of, tau)


def ref_cosent(a, b, y, tau, valid=None):
    a, b = a.astype(np.float64), b.astype(np.float64)
    n = len(y)
    valid = np.ones(n, bool) if valid is None else valid
    cos = np.sum(a * b, axis=-1)
    total, pairs, right = 0.0, 0, 0
    for i in range(n):
        for j in range(n):
            if valid[i] and valid[j] and y[i] > y[j]:
                total += np.exp((cos[j] - cos[i]) / tau)
                pairs += 1
                right += cos[i] > cos[j]
    return np.log1p(total), {"pos_sim": cos[valid].mean(), "pair_accuracy": right / max(pairs, 1)}


def _check_metrics(metrics, ref_metrics):
    assert set(metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        assert metrics[key].dtype == jnp.float32 and metrics[key].shape == ()
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------- 1. against the references

@pytest.mark.parametrize("in_batch,hard,qneg", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("margin", [None, 0.05])
def test_retrieval_matches_reference(in_batch, hard, qneg, margin):
    rng = np.random.default_rng(0)
    n, k, d = 6, 3, 16
    q = _unit(rng, n, d)
    pos = _unit(rng, n, d)
    neg = _unit(rng, n, k, d)
    neg[::2, 0] = q[::2]  # some negatives harder than the positive (masked by the margin)
    kw = dict(in_batch_negatives=in_batch, hard_negatives=hard, query_negatives=qneg,
              false_negative_margin=margin)
    loss, metrics = infonce_retrieval(q, pos, neg, **kw)
    ref_loss, ref_metrics = ref_retrieval(q, pos, neg, 0.02, in_batch, hard, qneg, margin)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    _close(loss, ref_loss)
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("neg_kind", ["none", "empty"])
def test_retrieval_without_hard_negatives(neg_kind):
    rng = np.random.default_rng(1)
    q, pos = _unit(rng, 5, 8), _unit(rng, 5, 8)
    neg = None if neg_kind == "none" else np.zeros((5, 0, 8), np.float32)
    loss, metrics = infonce_retrieval(q, pos, neg, temperature=0.1)
    ref_loss, ref_metrics = ref_retrieval(q, pos, None, 0.1, True, True, True, None)
    _close(loss, ref_loss)
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("in_batch,hard,qneg", list(itertools.product([True, False], repeat=3)))
def test_retrieval_leaves_out_identical_texts(in_batch, hard, qneg):
    """Rows 0 and 3 share their positive text (and so its embedding), row 5's query repeats
    row 1's, a hard negative of row 2 is row 4's positive, one of row 4's own negatives is
    its positive, row 2's query is row 0's positive text (a symmetric task), and row 1's
    second hard negative is its own query."""
    rng = np.random.default_rng(3)
    n, k, d = 6, 2, 16
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    qk, pk, nk = np.arange(n) * 10, np.arange(n) * 10 + 1, (np.arange(n * k) * 10 + 2).reshape(n, k)
    pos[3], pk[3] = pos[0], pk[0]
    q[5], qk[5] = q[1], qk[1]
    neg[2, 1], nk[2, 1] = pos[4], pk[4]
    neg[4, 0], nk[4, 0] = pos[4], pk[4]
    q[2], qk[2] = pos[0], pk[0]
    neg[1, 1], nk[1, 1] = q[1], qk[1]
    kw = dict(in_batch_negatives=in_batch, hard_negatives=hard, query_negatives=qneg)
    loss, metrics = infonce_retrieval(q, pos, neg, q_keys=qk, pos_keys=pk, neg_keys=nk, **kw)
    ref_loss, ref_metrics = ref_retrieval(q, pos, neg, 0.02, in_batch, hard, qneg, None, keys=(qk, pk, nk))
    _close(loss, ref_loss)
    _check_metrics({key: v for key, v in metrics.items() if key != "duplicates"}, ref_metrics)
    plain, _ = infonce_retrieval(q, pos, neg, **kw)
    ref_plain, _ = ref_retrieval(q, pos, neg, 0.02, in_batch, hard, qneg, None)
    _close(plain, ref_plain)
    if in_batch or hard or qneg:  # the scenario leaves something out in every configuration
        assert ref_loss < ref_plain and float(metrics["duplicates"]) > 0


def test_retrieval_text_keys_count_left_out_candidates():
    rng = np.random.default_rng(4)
    n, k, d = 4, 1, 8
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    qk, pk, nk = np.arange(n), np.arange(n) + 10, np.arange(n).reshape(n, k) + 20
    pk[1] = pk[0]  # rows 0 and 1 share a positive: each leaves out the other's
    _, metrics = infonce_retrieval(q, pos, neg, q_keys=qk, pos_keys=pk, neg_keys=nk)
    assert float(metrics["duplicates"]) == 2 / n
    with pytest.raises(ValueError, match="go together"):
        infonce_retrieval(q, pos, neg, q_keys=qk)
    # a swapped pair (A -> B, B -> A): each row's in-batch candidate is its own query
    a, b = _unit(rng, 1, d)[0], _unit(rng, 1, d)[0]
    loss, metrics = infonce_retrieval(np.stack([a, b]), np.stack([b, a]), None, q_keys=np.array([1, 2]),
                                      pos_keys=np.array([2, 1]), query_negatives=False)
    assert float(metrics["duplicates"]) == 1.0 and float(metrics["accuracy"]) == 1.0 and float(loss) < 1e-6
    with pytest.raises(ValueError, match="neg_keys"):
        infonce_retrieval(q, pos, neg, q_keys=qk, pos_keys=pk, neg_keys=nk[:, :0])


def test_retrieval_keeps_other_positives_of_the_same_query():
    """A query with two relevant passages, one record per pair (SciFact-style): neither row
    pushes the query away from its other positive; hard negatives of either row still count."""
    rng = np.random.default_rng(5)
    n, k, d = 4, 1, 8
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    qk, pk, nk = np.arange(n), np.arange(n) + 10, np.arange(n).reshape(n, k) + 20
    q[1], qk[1] = q[0], qk[0]
    loss, metrics = infonce_retrieval(q, pos, neg, q_keys=qk, pos_keys=pk, neg_keys=nk, query_negatives=False)
    # rows 0 and 1 each leave out the other's positive, nothing else
    assert float(metrics["duplicates"]) == 2 / n
    by_hand = []
    for i in range(n):
        cands = [pos[j] for j in range(n) if j != i and not (i < 2 and j < 2)] + list(neg.reshape(n * k, d))
        logits = np.array([q[i] @ pos[i]] + [q[i] @ c for c in cands], np.float64) / 0.02
        by_hand.append(np.logaddexp.reduce(logits) - logits[0])
    _close(loss, np.mean(by_hand))
    # a hard negative of row 0 that is row 1's positive (same query): left out in both modes
    neg[0, 0], nk[0, 0] = pos[1], pk[1]
    for in_batch in (True, False):
        kw = dict(in_batch_negatives=in_batch, query_negatives=False)
        got, m = infonce_retrieval(q, pos, neg, q_keys=qk, pos_keys=pk, neg_keys=nk, **kw)
        ref, _ = ref_retrieval(q, pos, neg, 0.02, in_batch, True, False, None, keys=(qk, pk, nk))
        _close(got, ref)
        # in-batch: rows 0 and 1 each drop the other's positive and both drop neg[0, 0]
        assert float(m["duplicates"]) == (4 / n if in_batch else 1 / n)


def test_a_positive_of_the_same_query_is_left_out_wherever_it_appears_in_the_batch():
    """Rows (A, X), (B, Y), (A, Y): Y is relevant to A through row 2, so row 0 leaves out row 1's
    copy of Y as well as row 2's, as it would a hard negative Y."""
    rng = np.random.default_rng(6)
    q, pos = _unit(rng, 3, 8), _unit(rng, 3, 8)
    q[2], pos[2] = q[0], pos[1]
    qk, pk = np.array([10, 11, 10]), np.array([20, 21, 21])
    loss, m = infonce_retrieval(q, pos, None, q_keys=qk, pos_keys=pk, query_negatives=False)
    # row 0: both Y; row 1: row 2's Y (its own positive's copy); row 2: row 0's X and row 1's Y
    assert float(m["duplicates"]) == pytest.approx(5 / 3)
    ref, _ = ref_retrieval(q, pos, None, 0.02, True, False, False, None, keys=(qk, pk, np.zeros((3, 0), int)))
    _close(loss, ref)


def test_a_query_that_is_a_positive_of_the_same_query_is_left_out_of_the_query_column():
    """Rows (A, B), (A, C), (C, D): C is relevant to A through row 1, so row 0 leaves out row 2's
    query C as it leaves out row 1's passage C."""
    rng = np.random.default_rng(7)
    q, pos = _unit(rng, 3, 8), _unit(rng, 3, 8)
    q[1], q[2] = q[0], pos[1]
    qk, pk = np.array([10, 10, 12]), np.array([11, 12, 13])
    loss, m = infonce_retrieval(q, pos, None, q_keys=qk, pos_keys=pk)
    # row 0: passage C (row 1), queries A (row 1) and C (row 2); row 1: passage B (row 0), queries
    # A (row 0) and C (row 2, its own positive); row 2: passage C (row 1, its own query)
    assert float(m["duplicates"]) == pytest.approx(7 / 3)
    ref, _ = ref_retrieval(q, pos, None, 0.02, True, False, True, None, keys=(qk, pk, np.zeros((3, 0), int)))
    _close(loss, ref)


def test_retrieval_margin_masks_candidates():
    """A duplicate of the positive among the negatives is dropped with a margin, kept without."""
    rng = np.random.default_rng(2)
    q, pos = _unit(rng, 4, 8), _unit(rng, 4, 8)
    neg = np.stack([pos + 1e-3, _unit(rng, 4, 8)], axis=1)
    neg /= np.linalg.norm(neg, axis=-1, keepdims=True)
    kept, _ = infonce_retrieval(q, pos, neg, in_batch_negatives=False, query_negatives=False)
    dropped, _ = infonce_retrieval(q, pos, neg, in_batch_negatives=False, query_negatives=False,
                                   false_negative_margin=0.0)
    assert float(kept) > float(dropped)


@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("tau", [0.05, 0.02])
def test_cosent_matches_reference(use_valid, tau):
    rng = np.random.default_rng(3)
    n, d = 12, 16
    a, b = _unit(rng, n, d), _unit(rng, n, d)
    y = rng.integers(0, 4, n).astype(np.float32)  # many ties
    valid = (np.arange(n) < 9) if use_valid else None
    if use_valid:  # padded rows hold garbage that would change the loss if it leaked in, on either
        y[9:] = [100.0, -100.0, 100.0]  # side of a pair: scored above and below every real row
    loss, metrics = cosent(a, b, y, temperature=tau, valid=valid)
    ref_loss, ref_metrics = ref_cosent(a, b, y, tau, valid)
    _close(loss, ref_loss)
    _check_metrics(metrics, ref_metrics)


def test_cosent_nearly_ordered_batch_has_a_small_loss():
    """Similarities ordered almost as the gold scores: log(1 + S) with S small. The appended 1
    (the 0 inside CoSENT's logsumexp) is what keeps the loss near 0 rather than log(S) << 0."""
    rng = np.random.default_rng(13)
    n, d, tau = 10, 16, 0.02
    a = _unit(rng, n, d)
    y = np.arange(n, dtype=np.float32)
    noise = rng.standard_normal((n, d))
    noise -= np.sum(noise * a, -1, keepdims=True) * a
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    cos = np.linspace(0.0, 0.9, n)[:, None]  # higher score, closer pair: cosine steps of 0.1
    cos[6] = 0.56  # one step of 0.02 only: that pair costs exp(-1)
    b = (cos * a + np.sqrt(1 - cos ** 2) * noise).astype(np.float32)
    loss, metrics = cosent(a, b, y, temperature=tau)
    ref_loss, ref_metrics = ref_cosent(a, b, y, tau)
    assert 1e-4 < ref_loss < 0.5
    _close(loss, ref_loss)
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("tau", [0.02, 0.1])
def test_classification_matches_reference(tau):
    rng = np.random.default_rng(4)
    n, k, d = 8, 3, 16
    anc, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    la = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    ln = rng.integers(0, 5, (n, k))
    ln[0, 0] = la[0]  # negatives sharing the anchor's class
    ln[3, 1] = la[3]
    for other_positives in (False, True):
        loss, metrics = infonce_classification(anc, pos, neg, la, la, ln, temperature=tau,
                                               other_positives=other_positives)
        ref_loss, ref_metrics = ref_classification(anc, pos, neg, la, la, ln, tau, other_positives)
        _close(loss, ref_loss)
        _check_metrics(metrics, ref_metrics)
    assert abs(float(loss) - float(infonce_classification(anc, pos, neg, la, la, ln, temperature=tau)[0])) > 1e-3
    loss = infonce_classification(anc, pos, neg, la, la, ln, temperature=tau)[0]
    # the class mask matters: with all-distinct labels the loss is different
    unmasked, _ = infonce_classification(anc, pos, neg, np.arange(n), np.arange(n), ln + 100, temperature=tau)
    assert abs(float(unmasked) - float(loss)) > 1e-3


# ---------------------------------------------------------------- 2. sentence-transformers parity

def _torch64(*arrays):
    import torch
    return [torch.tensor(np.asarray(x), dtype=torch.float64) for x in arrays]


@pytest.mark.parametrize("k,qneg", [(0, False), (2, False), (2, True)])
def test_retrieval_matches_sentence_transformers(k, qneg):
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rng = np.random.default_rng(5)
    n, d, tau = 8, 16, 0.02
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    directions = ("query_to_doc", "query_to_query") if qneg else ("query_to_doc",)
    st = MultipleNegativesRankingLoss(torch.nn.Module(), scale=1.0 / tau, directions=directions)
    cols = _torch64(q, pos, *[neg[:, j] for j in range(k)])
    expected = st.compute_loss_from_embeddings(cols, None).item()
    loss, _ = infonce_retrieval(q, pos, neg if k else None, temperature=tau, query_negatives=qneg)
    _close(loss, expected)


def test_cosent_matches_sentence_transformers():
    import torch
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    rng = np.random.default_rng(6)
    n, d, tau = 16, 16, 0.05
    a, b = _unit(rng, n, d), _unit(rng, n, d)
    y = rng.integers(0, 5, n).astype(np.float32)
    st = CoSENTLoss(torch.nn.Module(), scale=1.0 / tau)
    expected = st.compute_loss_from_embeddings(_torch64(a, b), *_torch64(y)).item()
    loss, _ = cosent(a, b, y, temperature=tau)
    _close(loss, expected)


# ---------------------------------------------------------------- 3. gradients and sharding

def _finite_grads(fn, *args, eager=False):
    grad = jax.grad(fn, argnums=tuple(range(len(args))))
    for f in ([grad] if eager else []) + [jax.jit(grad)]:
        for g in f(*args):
            assert np.all(np.isfinite(np.asarray(g)))


def test_gradients_finite_with_masks():
    rng = np.random.default_rng(7)
    n, k, d = 8, 2, 8
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    neg[:, 0] = pos  # duplicates of the positive, removed by the margin
    for i, kw in enumerate([dict(false_negative_margin=-2.0),  # removes every negative
                            dict(false_negative_margin=0.0),
                            dict(in_batch_negatives=False, hard_negatives=False, query_negatives=False),
                            dict(temperature=1e-3)]):
        _finite_grads(lambda q, p, n_: infonce_retrieval(q, p, n_, **kw)[0], q, pos, neg, eager=i == 0)
    loss, metrics = infonce_retrieval(q, pos, neg, false_negative_margin=-2.0)
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 1.0 and float(metrics["neg_sim"]) == 0.0

    same = np.zeros(n, np.int32)  # one class: every candidate is masked
    _finite_grads(lambda a, p, n_: infonce_classification(a, p, n_, same, same, np.zeros((n, k)))[0],
                  q, pos, neg)
    y = np.zeros(n, np.float32)  # all ties: no ordered pair
    _finite_grads(lambda a, b: cosent(a, b, y, valid=np.arange(n) < 5)[0], q, pos)
    assert float(cosent(q, pos, y)[0]) == 0.0


def _numeric_grads(ref_loss, arrays, eps=1e-6):
    """Central differences of a float64 reference loss with respect to each array."""
    arrays = [np.asarray(x, np.float64) for x in arrays]
    out = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            up = ref_loss(*arrays)
            a[idx] = old - eps
            down = ref_loss(*arrays)
            a[idx] = old
            g[idx] = (up - down) / (2 * eps)
        out.append(g)
    return out


@pytest.mark.parametrize("loss_name", ["retrieval", "retrieval_margin", "classification", "cosent"])
def test_gradients_equal_the_float64_references(loss_name):
    """d loss / d embeddings against central differences of the recipe §3 formulas in float64: a
    stop_gradient or a wrong factor inside a loss changes these, not the loss value."""
    rng = np.random.default_rng(12)
    n, k, d, tau = 5, 2, 6, 0.1
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    la = np.array([0, 0, 1, 2, 2])
    ln = rng.integers(0, 3, (n, k))
    y = rng.integers(0, 4, n).astype(np.float32)
    if loss_name.startswith("retrieval"):
        margin = 0.3 if loss_name == "retrieval_margin" else None
        ours = lambda q, p, n_: infonce_retrieval(q, p, n_, temperature=tau, false_negative_margin=margin)[0]  # noqa: E731
        ref = lambda q, p, n_: ref_retrieval(q, p, n_, tau, True, True, True, margin)[0]  # noqa: E731
        args = (q, pos, neg)
    elif loss_name == "classification":
        ours = lambda a, p, n_: infonce_classification(a, p, n_, la, la, ln, temperature=tau)[0]  # noqa: E731
        ref = lambda a, p, n_: ref_classification(a, p, n_, la, la, ln, tau)[0]  # noqa: E731
        args = (q, pos, neg)
    else:
        ours = lambda a, b: cosent(a, b, y, temperature=tau)[0]  # noqa: E731
        ref = lambda a, b: ref_cosent(a, b, y, tau)[0]  # noqa: E731
        args = (q, pos)
    got = jax.jit(jax.grad(ours, argnums=tuple(range(len(args)))))(*args)
    expected = _numeric_grads(ref, args)
    for name, g, e in zip(("first", "second", "third"), got, expected):
        assert np.linalg.norm(e) > 1e-3, name
        err = np.linalg.norm(np.asarray(g, np.float64) - e) / np.linalg.norm(e)
        assert err < 1e-4, (name, err)


def test_sharded_equals_unsharded():
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(8)
    n, k, d = 16, 2, 16
    q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, k, d)
    y = rng.integers(0, 4, n).astype(np.float32)
    la, ln = rng.integers(0, 4, n), rng.integers(0, 4, (n, k))
    valid = np.arange(n) < 13
    cases = [
        (lambda q, p, n_: infonce_retrieval(q, p, n_, false_negative_margin=0.1), (q, pos, neg)),
        (lambda q, p, n_: infonce_retrieval(q, p, n_, in_batch_negatives=False), (q, pos, neg)),
        (lambda a, b, y, v: cosent(a, b, y, valid=v), (q, pos, y, valid)),
        (lambda a, p, n_, la, ln: infonce_classification(a, p, n_, la, la, ln), (q, pos, neg, la, ln)),
    ]
    for fn, args in cases:
        plain, plain_metrics = fn(*args)
        sharded_args = [jax.device_put(x, rows) for x in args]
        loss, metrics = jax.jit(fn)(*sharded_args)
        _close(loss, plain)
        for key in plain_metrics:  # metrics are means of cosines near 0: absolute tolerance
            np.testing.assert_allclose(float(metrics[key]), float(plain_metrics[key]), rtol=1e-6, atol=1e-7)
        grads = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1)))(*sharded_args)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ---------------------------------------------------------------- 4. argument checks

def test_shape_errors_name_the_argument():
    rng = np.random.default_rng(9)
    q, pos, neg = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^pos:"):
        infonce_retrieval(q, pos[:3], neg)
    with pytest.raises(ValueError, match=r"^neg:"):
        infonce_retrieval(q, pos, neg[:3])
    with pytest.raises(ValueError, match=r"^neg:"):
        infonce_retrieval(q, pos, neg[..., :4])
    with pytest.raises(ValueError, match=r"^temperature:"):
        infonce_retrieval(q, pos, neg, temperature=0.0)
    with pytest.raises(ValueError, match=r"^b:"):
        cosent(q, pos[:, :4], np.zeros(4))
    with pytest.raises(ValueError, match=r"^scores:"):
        cosent(q, pos, np.zeros(5))
    with pytest.raises(ValueError, match=r"^valid:"):
        cosent(q, pos, np.zeros(4), valid=np.ones(3, bool))
    labels = np.arange(4)
    with pytest.raises(ValueError, match=r"^anchor_labels:"):
        infonce_classification(q, pos, neg, labels[:3], labels, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"^neg_labels:"):
        infonce_classification(q, pos, neg, labels, labels, np.zeros((4, 3)))
