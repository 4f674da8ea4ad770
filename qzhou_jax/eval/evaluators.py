"""One evaluator per task type, each following mteb 2.x's protocol on the task's data.

An evaluator takes a `TaskSpec` and an `encode(texts, instruction)` function and returns
`(scores, info)`: the metrics of the evaluated split (mteb's names) and what was done
(instructions per side, number of texts encoded).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from qzhou_jax.data.jsonl import RecordError
from qzhou_jax.eval import data as D
from qzhou_jax.eval import metrics as M
from qzhou_jax.eval.tasks import SUBQUERIES, TaskSpec

EncodeFn = Callable[[Sequence[str], "str | None"], np.ndarray]
log = logging.getLogger(__name__)


def _need_sklearn(task_type: str):
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError(f"{task_type} evaluation needs scikit-learn (logistic regression / k-means, as mteb "
                          "uses): pip install scikit-learn") from None


def _sides(spec: TaskSpec) -> tuple[str | None, str | None]:
    """(first-side / query instruction, second-side / document instruction)."""
    return spec.instruction, (spec.instruction if spec.symmetric else None)


def _encode_pairs(encode: EncodeFn, t1: Sequence[str], t2: Sequence[str], i1: str | None,
                  i2: str | None) -> tuple[np.ndarray, np.ndarray]:
    if i1 == i2:  # one call: shared sentences are encoded once
        emb = encode(list(t1) + list(t2), i1)
        return emb[: len(t1)], emb[len(t1):]
    return encode(t1, i1), encode(t2, i2)


# ------------------------------------------------------------------ retrieval / reranking
def evaluate_retrieval(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    reranking = spec.type == "reranking"
    path = spec.files["path"]
    if spec.format == "beir" and not reranking:
        data = D.load_beir(path, spec.split, spec.files.get("qrels"))
    else:
        data = D.load_retrieval_records(path, spec.fields, reranking=reranking)
    q_instr = [own if own is not None else spec.instruction for own in data.query_instructions]
    doc_instr = None
    if spec.symmetric:  # one instruction on both sides, as training gives a symmetric dataset's passages
        distinct = set(q_instr)
        if len(distinct) > 1:
            raise ValueError(f"{spec.where} is symmetric but its queries get {len(distinct)} different "
                             f"instructions (their records' own and the task's: "
                             f"{', '.join('none' if i is None else repr(i) for i in sorted(distinct, key=str)[:3])}"
                             f"{', ...' if len(distinct) > 3 else ''}); the documents need the same one as "
                             "the queries: give the records one instruction, or make the task asymmetric")
        doc_instr = next(iter(distinct), None)
    q_emb = None
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, instr in enumerate(q_instr):
        groups[instr].append(i)
    for instr, rows in groups.items():
        emb = encode([data.queries[i] for i in rows], instr)
        if q_emb is None:
            q_emb = np.zeros((len(data.queries), emb.shape[1]), emb.dtype)
        q_emb[rows] = emb
    d_emb = encode(data.docs, doc_instr)
    k_values = sorted(int(k) for k in spec.option("k_values"))
    kmax = k_values[-1]
    rank = M.id_order(data.doc_ids)
    rankings: dict[str, list[str]] = {}
    merged = None
    if reranking:
        pos = {d: i for i, d in enumerate(data.doc_ids)}
        cosines = {}
        for qi, qid in enumerate(data.query_ids):
            cand = np.array([pos[d] for d in data.candidates[qid]])  # type: ignore[index]
            cosines[qid] = M.unit_rows(d_emb[cand]) @ M.unit_rows(q_emb[qi:qi + 1])[0]  # cosine, in float64
            rankings[qid] = [data.doc_ids[j] for j in cand[np.lexsort((-rank[cand], -cosines[qid]))[:kmax]]]
        groups = data.subqueries or {}
        if any(len(g) > 1 for g in groups.values()) or spec.main_score.startswith(SUBQUERIES):
            # mteb's max_over_subqueries: a record's candidates ranked by their best score over its texts
            merged = {}
            for rid, sub in groups.items():
                cand = np.array([pos[d] for d in data.candidates[sub[0]]])  # type: ignore[index]
                best = np.max([cosines[q] for q in sub], axis=0)
                merged[rid] = [data.doc_ids[j] for j in cand[np.lexsort((-rank[cand], -best))[:kmax]]]
    else:
        idx, _ = M.top_k(q_emb, d_emb, kmax, rank)  # cosine, as mteb
        for qi, qid in enumerate(data.query_ids):
            rankings[qid] = [data.doc_ids[j] for j in idx[qi]]
    if spec.option("ignore_identical_ids"):
        rankings = {q: [d for d in docs if d != q] for q, docs in rankings.items()}
    scores = M.retrieval_scores(rankings, data.qrels, k_values)
    if merged is not None:
        qrels = {rid: data.qrels[sub[0]] for rid, sub in data.subqueries.items()}  # type: ignore[union-attr]
        scores.update({SUBQUERIES + k: v for k, v in M.retrieval_scores(merged, qrels, k_values).items()})
    distinct_q = sorted({i for i in q_instr if i is not None})
    info = {
        "instructions": {"query": distinct_q[0] if len(distinct_q) == 1 else (distinct_q or None),
                         "document": doc_instr},
        "num_queries": len(data.queries), "num_documents": len(data.docs),
        "files": data.files,
    }
    return scores, info


# ------------------------------------------------------------------ pairs
def _evaluate_pairs(spec: TaskSpec, encode: EncodeFn, task: str, score: Callable) -> tuple[dict, dict]:
    data = D.load_pairs(spec.files["path"], task, spec.fields)
    i1, i2 = _sides(spec)
    e1, e2 = _encode_pairs(encode, data.text1, data.text2, i1, i2)
    return score(e1, e2, data.values), {"instructions": {"text1": i1, "text2": i2},
                                        "num_pairs": len(data.values), "files": data.files}


def evaluate_sts(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    return _evaluate_pairs(spec, encode, "sts", M.sts_scores)


def evaluate_pair_classification(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    return _evaluate_pairs(spec, encode, "pair_classification", M.pair_classification_scores)


# ------------------------------------------------------------------ classification
def undersample(labels: Sequence[Any], samples_per_label: int, n_experiments: int, seed: int) -> list[list[int]]:
    """mteb's training subsets: per experiment, shuffle the (already shuffled) index list with a
    fresh RandomState(seed) and keep the first `samples_per_label` indices of each label."""
    idxs = list(range(len(labels)))
    out = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(idxs)
        counter: dict[Any, int] = defaultdict(int)
        chosen = []
        for i in idxs:
            if counter[labels[i]] < samples_per_label:
                chosen.append(i)
                counter[labels[i]] += 1
        out.append(chosen)
    return out


def classification_metrics(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score

    out: dict[str, Any] = {
        "accuracy": accuracy_score(y_true, y_pred),
        "f1": f1_score(y_true, y_pred, average="macro"),
        "f1_weighted": f1_score(y_true, y_pred, average="weighted"),
        "precision": precision_score(y_true, y_pred, average="macro"),
        "precision_weighted": precision_score(y_true, y_pred, average="weighted"),
        "recall": recall_score(y_true, y_pred, average="macro"),
        "recall_weighted": recall_score(y_true, y_pred, average="weighted"),
        "ap": None, "ap_weighted": None,
    }
    if len(np.unique(np.asarray(y_true))) == 2:
        try:
            out["ap"] = average_precision_score(y_true, y_pred, average="macro")
            out["ap_weighted"] = average_precision_score(y_true, y_pred, average="weighted")
        except (ValueError, TypeError):  # labels that are not 0/1: mteb cannot score them either
            pass
    return {k: (float(v) if v is not None else None) for k, v in out.items()}


def evaluate_classification(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    _need_sklearn("classification")
    import warnings

    from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
    from sklearn.linear_model import LogisticRegression

    train = D.load_labelled(spec.files["train"], spec.fields)
    test = D.load_labelled(spec.files["path"], spec.fields)
    D.check_labels_cover(train.labels, train.files[0])
    if type(train.labels[0]) is not type(test.labels[0]):
        raise RecordError(f"{test.files[0]}: labels are {type(test.labels[0]).__name__}s but the training "
                          f"labels in {train.files[0]} are {type(train.labels[0]).__name__}s")
    unseen = sorted(set(test.labels) - set(train.labels), key=str)
    if unseen:
        log.warning("%s: %d test record(s) carry labels the training file %s does not have (%s); "
                    "the classifier can never predict them", test.files[0],
                    sum(lab in set(unseen) for lab in test.labels), train.files[0],
                    ", ".join(map(repr, unseen[:5])) + (", ..." if len(unseen) > 5 else ""))
    seed, n_exp = int(spec.option("seed")), int(spec.option("n_experiments"))
    spl = int(spec.option("samples_per_label"))
    subsets = undersample(train.labels, spl, n_exp, seed)
    union = sorted(set().union(*subsets))
    at = {j: p for p, j in enumerate(union)}
    instr = spec.instruction  # symmetric by definition: train and test texts alike
    train_emb = encode([train.texts[j] for j in union], instr)
    test_emb = encode(test.texts, instr)
    per_exp = []
    for chosen in subsets:
        clf = LogisticRegression(max_iter=int(spec.option("max_iter")), random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(train_emb[[at[j] for j in chosen]], [train.labels[j] for j in chosen])
        with warnings.catch_warnings():  # precision of a class never predicted: 0, as in mteb
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            per_exp.append(classification_metrics(test.labels, clf.predict(test_emb)))
    scores: dict[str, Any] = {}
    for key in per_exp[0]:
        values = [s[key] for s in per_exp if s[key] is not None]
        scores[key] = float(np.mean(values)) if values else float("nan")
    scores["scores_per_experiment"] = per_exp
    info = {"instructions": {"train": instr, "test": instr}, "num_train": len(train.texts),
            "num_train_encoded": len(union), "num_test": len(test.texts), "files": train.files + test.files}
    return scores, info


# ------------------------------------------------------------------ clustering
def _bootstrap_clustering(emb: np.ndarray, labels: list[list[Any]], *, n_clusters: int, cluster_size: int,
                          batch_size: int, max_depth: int | None, rng: random.Random, seed: int) -> dict[str, Any]:
    """mteb's bootstrapped k-means: per label level, `n_clusters` samples (with replacement)
    of `cluster_size` texts, each clustered by MiniBatchKMeans and scored by V-measure / AMI."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import adjusted_mutual_info_score, v_measure_score

    funcs = {"v_measure": v_measure_score, "ami": adjusted_mutual_info_score}
    scores: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in funcs}
    depth = max(map(len, labels))
    depth = min(max_depth, depth) if max_depth is not None else depth
    for level in range(depth):
        level_labels = [lab[level] if len(lab) > level else -1 for lab in labels]
        arr = np.array(level_labels)
        valid = np.array([x != -1 for x in arr])
        arr = arr[valid]
        level_emb = emb[valid]
        km = MiniBatchKMeans(n_clusters=np.unique(arr).size, batch_size=batch_size, init="k-means++", n_init=1,
                             random_state=seed)
        for _ in range(n_clusters):
            pick = rng.choices(range(len(level_emb)), k=cluster_size)
            assignment = km.fit_predict(level_emb[pick])
            for name, f in funcs.items():
                scores[name][f"Level {level}"].append(float(f(arr[pick], assignment)))
    out: dict[str, Any] = {}
    for name, by_level in scores.items():
        flat = [x for v in by_level.values() for x in v]
        out["v_measures" if name == "v_measure" else f"{name}_scores"] = dict(by_level)
        out[name] = float(np.mean(flat))
        out[f"{name}_std"] = float(np.std(flat))
    return out


def evaluate_clustering(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    _need_sklearn("clustering")
    data = D.load_clustering(spec.files["path"], spec.fields)
    seed = int(spec.option("seed"))
    instr = spec.instruction
    protocol = spec.option("protocol")
    encoded = 0
    if protocol == "legacy":
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.metrics.cluster import v_measure_score

        v = []
        for texts, labels in data.sets:
            flat = [lab[0] if isinstance(lab, list) else lab for lab in labels]
            if len(set(flat)) <= 1:
                v.append(1.0)
                continue
            emb = encode(texts, instr)
            encoded += len(texts)
            km = MiniBatchKMeans(n_clusters=len(set(flat)), batch_size=int(spec.option("clustering_batch_size")),
                                 n_init="auto", compute_labels=True, random_state=seed)
            km.fit(emb)
            v.append(float(v_measure_score(flat, km.labels_.tolist())))
        scores: dict[str, Any] = {"v_measure": float(np.mean(v)), "v_measure_std": float(np.std(v)), "v_measures": v}
    elif protocol == "bootstrap":
        texts = [t for s in data.sets for t in s[0]]
        labels = [lab if isinstance(lab, list) else [lab] for s in data.sets for lab in s[1]]
        rng = random.Random(seed)
        frac = spec.option("max_fraction_of_documents_to_embed")
        max_docs = spec.option("max_document_to_embed")
        if max_docs is not None and frac is not None:
            if "max_fraction_of_documents_to_embed" in spec.options:
                raise ValueError(f"{spec.where}: set only one of max_document_to_embed and "
                                 "max_fraction_of_documents_to_embed")
            frac = None
        if max_docs is None and frac is None:
            pick = list(range(len(texts)))
        else:
            n = int(frac * len(texts)) if frac is not None else int(max_docs)
            pick = rng.sample(range(len(texts)), k=min(len(texts), n))
        if not pick:
            raise ValueError(f"{spec.files['path']}: {len(texts)} texts x "
                             f"max_fraction_of_documents_to_embed {frac} leaves none to cluster")
        emb = encode([texts[i] for i in pick], instr)
        encoded = len(pick)
        scores = _bootstrap_clustering(
            emb, [labels[i] for i in pick], n_clusters=int(spec.option("n_clusters")),
            cluster_size=int(spec.option("max_documents_per_cluster")),
            batch_size=int(spec.option("k_mean_batch_size")),
            max_depth=spec.option("max_depth"), rng=rng, seed=seed)
    else:
        raise ValueError(f"{spec.where}: clustering protocol {protocol!r} is not 'bootstrap' "
                         "or 'legacy'")
    return scores, {"instructions": {"text": instr}, "num_texts_encoded": encoded, "files": data.files}


# ------------------------------------------------------------------ summarization
def evaluate_summarization(spec: TaskSpec, encode: EncodeFn) -> tuple[dict[str, Any], dict[str, Any]]:
    data = D.load_summarization(spec.files["path"], spec.fields)
    i_m, i_h = _sides(spec)  # machine summaries get the instruction; human ones when symmetric
    h_all = [s for row in data.human for s in row]
    m_all = [s for row in data.machine for s in row]
    h_emb, m_emb = _encode_pairs(encode, h_all, m_all, i_h, i_m)
    h_emb, m_emb = np.asarray(h_emb, np.float64), np.asarray(m_emb, np.float64)
    h_split = np.split(h_emb, np.cumsum([len(r) for r in data.human])[:-1])
    m_split = np.split(m_emb, np.cumsum([len(r) for r in data.machine])[:-1])
    per: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    for hs, ms, gold in zip(h_split, m_split, data.relevance):
        hn = hs / np.linalg.norm(hs, axis=1, keepdims=True).clip(1e-12)
        mn = ms / np.linalg.norm(ms, axis=1, keepdims=True).clip(1e-12)
        cos = (mn @ hn.T).max(axis=1)
        dot = (ms @ hs.T).max(axis=1)
        if len(set(gold)) == 1 or len(set(dot.tolist())) == 1 or len(set(cos.tolist())) == 1:
            skipped += 1
            continue
        per["cosine_spearman"].append(M.spearman(gold, cos))
        per["cosine_pearson"].append(M.pearson(gold, cos))
        per["dot_spearman"].append(M.spearman(gold, dot))
        per["dot_pearson"].append(M.pearson(gold, dot))
    if not per:
        raise ValueError(f"{spec.files['path']}: every text has constant gold or predicted scores; nothing to "
                         "correlate")
    scores = {k: float(np.mean(v)) for k, v in per.items()}
    scores["spearman"], scores["pearson"] = scores["cosine_spearman"], scores["cosine_pearson"]
    return scores, {"instructions": {"human_summaries": i_h, "machine_summaries": i_m},
                    "num_texts": len(data.texts), "num_skipped": skipped, "files": data.files}


EVALUATORS: dict[str, Callable[[TaskSpec, EncodeFn], tuple[dict[str, Any], dict[str, Any]]]] = {
    "retrieval": evaluate_retrieval,
    "reranking": evaluate_retrieval,
    "sts": evaluate_sts,
    "pair_classification": evaluate_pair_classification,
    "classification": evaluate_classification,
    "clustering": evaluate_clustering,
    "summarization": evaluate_summarization,
}
