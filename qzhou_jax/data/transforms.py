"""recipe §4's transformations of raw datasets into the three record families.

Every function takes ``rows``: an iterable of dicts (or of records, where that makes sense), or of
``(where, dict)`` pairs as ``records.iter_rows(path)`` yields them, so that errors name "file:line".
Plain dicts are located as "row N" (1-based). ``fields`` maps the function's field names to the
names in the data, like ``parse_record``; each function lists its defaults in a ``*_FIELDS`` constant.
A bad row raises ``RecordError("file:line: field 'x': ...")``; pass ``errors=BadRecords(skip=True)``
to skip and count bad rows instead.

Functions that must see every row first (``classification_to_triplets``, ``claim_evidence_to_retrieval``)
return lists; the others are generators.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from qzhou_jax.data.records import (
    DEFAULT_FIELDS, BadRecords, ClassificationRecord, PairRecord, Record, RecordError, RetrievalRecord,
    _Row, check_text, parse_record, resolve_fields,
)

__all__ = [
    "sts_with_swapped", "nli_to_scored_pairs", "binary_labels", "classification_to_triplets",
    "title_body_to_retrieval", "conversation_to_retrieval", "reading_comprehension_to_retrieval",
    "claim_evidence_to_retrieval", "triplets_to_retrieval",
    "NLI_FIELDS", "NLI_SCORES", "NLI_INT_LABELS", "BINARY_FIELDS", "TITLE_BODY_FIELDS", "CONVERSATION_FIELDS",
    "READING_COMPREHENSION_FIELDS", "RC_PROMPT", "CLAIM_EVIDENCE_FIELDS", "TRIPLET_FIELDS",
]


def _located(rows: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for k, item in enumerate(rows):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            yield f"row {k + 1}", item


def _each(rows: Iterable[Any], errors: BadRecords | None,
          fn: Callable[[Any, str], Iterable[Record]]) -> Iterator[Record]:
    """Apply ``fn(obj, where)`` to every row; a RecordError goes to ``errors`` (raise or skip)."""
    errors = errors or BadRecords()
    for where, obj in _located(rows):
        try:
            out = list(fn(obj, where))
        except RecordError as e:
            errors.handle(e)
            continue
        yield from out


def _with_instruction(record: RetrievalRecord, instruction: str | None) -> RetrievalRecord:
    """Give ``instruction`` to a record that has none (a record's own instruction wins)."""
    if instruction is None or record.instruction is not None:
        return record
    return RetrievalRecord(record.query, record.pos, record.neg, instruction)


# ----------------------------------------------------------------------------------------- pairs

def sts_with_swapped(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                     errors: BadRecords | None = None) -> Iterator[PairRecord]:
    """Each STS pair as given, then swapped (text2, text1) with the same score: twice as many pairs.

    Inputs are ``PairRecord``s or dicts with text1/text2/score (mapped with ``fields``). The swapped copy
    is emitted even when both texts are equal, so every input pair has the same weight (two copies).
    """
    def one(obj, where):
        r = obj if isinstance(obj, PairRecord) else parse_record(obj, "sts", fields, where)
        return r, PairRecord(r.text2, r.text1, r.score)

    return _each(records, errors, one)


NLI_FIELDS = {"text1": "premise", "text2": "hypothesis", "label": "label"}
NLI_SCORES = {"entailment": 2.0, "neutral": 1.0, "contradiction": 0.0}
# Integer label conventions. The JSONL files of SNLI dev and OCNLI (FewCLUE) in the shared data carry
# string labels only; integers appear in exports of the Hugging Face versions, which disagree:
#   "snli": snli, multi_nli, glue/mnli, xnli, anli: 0 entailment, 1 neutral, 2 contradiction (-1: no gold label)
#   "clue": clue/ocnli, clue/cmnli:                 0 neutral, 1 entailment, 2 contradiction
NLI_INT_LABELS = {"snli": ("entailment", "neutral", "contradiction"),
                  "clue": ("neutral", "entailment", "contradiction")}


def _nli_score(value: Any, row: _Row, name: str, int_labels: str | None) -> float:
    if isinstance(value, str) and value.strip().lower() in NLI_SCORES:
        return NLI_SCORES[value.strip().lower()]
    if isinstance(value, str) and value.strip() == "-" or (isinstance(value, (int, float)) and value == -1):
        raise row.error(name, f"no gold label ({value!r}: the annotators did not agree)")
    as_int = None
    if isinstance(value, int) and not isinstance(value, bool):
        as_int = value
    elif isinstance(value, float) and value.is_integer():  # 1.0: a label column exported as floats
        as_int = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        as_int = int(value.strip())
    if as_int is not None and 0 <= as_int <= 2:
        if int_labels is None:
            raise row.error(name, f"integer label {value!r} is ambiguous: choose the convention "
                                  "(int_labels / --nli-int-labels): 'snli' = 0 entailment, 1 neutral, "
                                  "2 contradiction (SNLI, MultiNLI, XNLI); 'clue' = 0 neutral, 1 entailment, "
                                  "2 contradiction (CLUE OCNLI, CMNLI)")
        return NLI_SCORES[NLI_INT_LABELS[int_labels][as_int]]
    raise row.error(name, f"unknown NLI label {value!r} (expected entailment, neutral or contradiction"
                          + (", or 0/1/2" if int_labels else "") + ")")


def nli_to_scored_pairs(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                        int_labels: str | None = None, both_directions: bool = True,
                        errors: BadRecords | None = None) -> Iterator[PairRecord]:
    """NLI rows (premise, hypothesis, label) -> scored pairs: entailment 2, neutral 1, contradiction 0.

    Each row gives (premise, hypothesis, score) and, with ``both_directions``, also (hypothesis, premise,
    score). String labels are case-insensitive ("ENTAILMENT" as in SICK). Integer labels 0/1/2 (or
    "0"/"1"/"2") need ``int_labels``: "snli" or "clue" (see ``NLI_INT_LABELS``). Unknown labels, and "-"
    / -1 (no gold label), are errors naming file:line.
    """
    if int_labels is not None and int_labels not in NLI_INT_LABELS:
        raise ValueError(f"int_labels must be one of {', '.join(NLI_INT_LABELS)}, got {int_labels!r}")
    f = resolve_fields(NLI_FIELDS, fields, "NLI pairs")
    return _labelled_pairs(records, f, lambda v, row, name: _nli_score(v, row, name, int_labels),
                           both_directions, errors)


def _labelled_pairs(records: Iterable[Any], f: Mapping[str, str], score: Callable[[Any, _Row, str], float],
                    both_directions: bool, errors: BadRecords | None) -> Iterator[PairRecord]:
    """Records with two texts and a label -> scored pairs (score(label, row, field)), and the
    swapped pairs with ``both_directions``."""
    def one(obj, where):
        row = _Row(obj, where)
        t1, t2 = row.text(f["text1"]), row.text(f["text2"])
        if f["label"] not in row.obj:
            raise row.missing(f["label"])
        value = score(row.obj[f["label"]], row, f["label"])
        return [PairRecord(t1, t2, value)] + ([PairRecord(t2, t1, value)] if both_directions else [])

    return _each(records, errors, one)


BINARY_FIELDS = {"text1": "text1", "text2": "text2", "label": "label"}
_TRUE = {"true", "yes", "1", "1.0"}
_FALSE = {"false", "no", "0", "0.0"}


def _binary(value: Any, row: _Row, name: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return 1.0
        if s in _FALSE:
            return 0.0
    raise row.error(name, f"not a binary label: {value!r} (expected true/false, yes/no or 1/0)")


def binary_labels(records: Iterable[Any], fields: Mapping[str, str] | None = None, both_directions: bool = True,
                  errors: BadRecords | None = None) -> Iterator[PairRecord]:
    """Pairs with a binary label -> scored pairs with score 1 (true, yes, 1) or 0 (false, no, 0).

    Labels may be JSON booleans, 0/1 numbers or strings (case-insensitive). With ``both_directions`` the
    swapped pair is emitted too, as for STS pairs.
    """
    f = resolve_fields(BINARY_FIELDS, fields, "binary pairs")
    return _labelled_pairs(records, f, _binary, both_directions, errors)


# ------------------------------------------------------------------------------ classification

def classification_to_triplets(records: Iterable[Any], num_negatives: int = 4, seed: int = 0,
                               fields: Mapping[str, str] | None = None, instruction: str | None = None,
                               errors: BadRecords | None = None,
                               stats: dict | None = None) -> list[RetrievalRecord]:
    """Example-based classification data (recipe §4) as retrieval triplets.

    For every text (in input order): query = the text, positive = another text with the same label,
    negatives = ``num_negatives`` distinct texts of other labels (fewer when fewer exist), all drawn with
    ``numpy.random.default_rng(seed)``: the same input and seed give the same output. Repeated
    (label, text) pairs count once. Labels with a single text cannot give a positive; their texts are
    dropped as queries (they still serve as negatives for other labels) and counted in
    ``stats["dropped_labels"]`` ({label: 1}). ``stats`` (if given) also gets "labels", "duplicates" and
    "records".

    The training pipeline builds such triplets on the fly from (text, label) sources and masks
    same-label candidates in the loss; this offline form loses the labels, so train it as retrieval
    only knowingly (in-batch texts of the same label become false negatives).
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    texts: list[str] = []
    label_ids: list[int] = []
    label_of: dict[str, int] = {}
    groups: list[list[int]] = []  # label id -> indices into texts
    seen: set[tuple[str, str]] = set()
    duplicates = 0

    def one(obj, where):
        return [obj if isinstance(obj, ClassificationRecord) else parse_record(obj, "classification", fields, where)]

    for r in _each(records, errors, one):
        if (r.label, r.text) in seen:
            duplicates += 1
            continue
        seen.add((r.label, r.text))
        lid = label_of.setdefault(r.label, len(label_of))
        if lid == len(groups):
            groups.append([])
        groups[lid].append(len(texts))
        texts.append(r.text)
        label_ids.append(lid)
    names = list(label_of)
    dropped = {names[lid]: len(g) for lid, g in enumerate(groups) if len(g) < 2}
    if stats is not None:
        stats.update(labels=len(names), duplicates=duplicates, dropped_labels=dropped)
    if not texts:
        raise RecordError("no classification records")
    if len(groups) < 2 and num_negatives > 0:
        raise ValueError(f"negatives need texts of at least two labels, got only {names[0]!r} "
                         "(--num-negatives 0 writes pairs without them)")

    labels = np.asarray(label_ids)
    rank = [0] * len(texts)  # position of each text in its label's group
    for g in groups:
        for r, t in enumerate(g):
            rank[t] = r
    rng = np.random.default_rng(seed)
    complement: dict[int, np.ndarray] = {}
    n = len(texts)
    out: list[RetrievalRecord] = []
    for i, lid in enumerate(label_ids):
        group = groups[lid]
        if len(group) < 2:
            continue
        query = texts[i]
        j = int(rng.integers(len(group) - 1))
        j = group[j + (j >= rank[i])]  # uniform over the group without i
        positive = texts[j]
        k = min(num_negatives, n - len(group))
        chosen: list[str] = []
        taken = {query, positive}
        tries = 0
        while len(chosen) < k and tries < 8 * k + 16:  # rejection sampling: uniform over other labels' texts
            tries += 1
            t = int(rng.integers(n))
            if labels[t] != lid and texts[t] not in taken:
                chosen.append(texts[t])
                taken.add(texts[t])
        if len(chosen) < k:  # a dominant label: draw from the explicit list of other labels' texts
            if lid not in complement:
                complement[lid] = np.flatnonzero(labels != lid)
            for t in rng.permutation(complement[lid]):
                if len(chosen) == k:
                    break
                if texts[t] not in taken:
                    chosen.append(texts[t])
                    taken.add(texts[t])
        out.append(RetrievalRecord(query, (positive,), tuple(chosen), instruction))
    if stats is not None:
        stats["records"] = len(out)
    return out


# ----------------------------------------------------------------------------------- retrieval

TITLE_BODY_FIELDS = {"query": "title", "pos": "body", "neg": "neg", "instruction": "instruction"}
TRIPLET_FIELDS = {"query": "anchor", "pos": "positive", "neg": "negative", "instruction": "instruction"}


def _retrieval_rows(rows, defaults, fields, instruction, errors, what):
    f = resolve_fields(defaults, fields, what)

    def one(obj, where):
        return [_with_instruction(parse_record(obj, "retrieval", f, where), instruction)]

    return _each(rows, errors, one)


def title_body_to_retrieval(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                            instruction: str | None = None,
                            errors: BadRecords | None = None) -> Iterator[RetrievalRecord]:
    """Title -> query, body (or abstract: ``fields={"pos": "abstract"}``) -> positive; optional neg.

    ``instruction`` is given to records that carry none.
    """
    return _retrieval_rows(records, TITLE_BODY_FIELDS, fields, instruction, errors, "title-body rows")


def triplets_to_retrieval(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                          instruction: str | None = None,
                          errors: BadRecords | None = None) -> Iterator[RetrievalRecord]:
    """(anchor, positive, negative) rows, such as the SNLI / AllNLI triplets -> retrieval records.

    positive and negative may be strings or lists; negative is optional. One record per row.
    """
    return _retrieval_rows(records, TRIPLET_FIELDS, fields, instruction, errors, "triplet rows")


CONVERSATION_FIELDS = {"messages": "messages"}
_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}
_OTHER_ROLES = {"system", "tool", "function", "ipython", "observation"}


def _turn(turn: Any, k: int, row: _Row, name: str) -> tuple[str, Any]:
    if not isinstance(turn, Mapping):
        raise row.error(name, f"turn {k}: expected an object with role and content")
    role = turn.get("role", turn.get("from"))
    if not isinstance(role, str):
        raise row.error(name, f"turn {k}: no role (expected 'role' or 'from')")
    content = turn.get("content", turn.get("value"))
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        content = "\n".join(p for p in parts if isinstance(p, str)) if parts else content
    return role.strip().lower(), content


def conversation_to_retrieval(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                              instruction: str | None = None, first_turn_only: bool = False,
                              errors: BadRecords | None = None) -> Iterator[RetrievalRecord]:
    """Dialogues -> (user turn as query, the assistant's reply as positive), one record per exchange.

    ``messages`` (or, when that field is absent and not remapped, ``conversations``) is a list of turns in
    the OpenAI form ``{"role": "user"|"assistant"|"system", "content": ...}`` or the ShareGPT form
    ``{"from": "human"|"gpt", "value": ...}``. A user turn immediately followed by an assistant turn makes
    a record; system and tool turns are skipped, and so are assistant tool calls (``content`` null with
    ``tool_calls``): the user turn pairs with the reply that follows the tool's answer.
    ``first_turn_only`` keeps only the first exchange.
    A conversation without any exchange is an error.
    """
    f = resolve_fields(CONVERSATION_FIELDS, fields, "conversations")
    fallback = not (fields and "messages" in fields)

    def one(obj, where):
        row = _Row(obj, where)
        name = f["messages"]
        if name not in row.obj and fallback and "conversations" in row.obj:
            name = "conversations"
        if name not in row.obj:
            raise row.missing(name)
        turns = row.obj[name]
        if not isinstance(turns, list):
            raise row.error(name, f"must be a list of turns, got {type(turns).__name__}")
        out = []
        previous: tuple[str, Any] | None = None
        for k, turn in enumerate(turns):
            role, content = _turn(turn, k, row, name)
            if role not in _USER_ROLES | _ASSISTANT_ROLES | _OTHER_ROLES:
                raise row.error(name, f"turn {k}: unknown role {role!r}")
            if role in _ASSISTANT_ROLES and content is None and isinstance(turn, Mapping) and (
                    turn.get("tool_calls") or turn.get("function_call")):
                continue  # a tool call: the reply to the user comes after the tool's answer
            if role in _ASSISTANT_ROLES and previous is not None and previous[0] in _USER_ROLES:
                query = check_text(previous[1], row, name, item=k - 1)
                answer = check_text(content, row, name, item=k)
                out.append(RetrievalRecord(query, (answer,), (), instruction))
                if first_turn_only:
                    break
            if role not in _OTHER_ROLES:  # system / tool turns do not break a user -> assistant exchange
                previous = (role, content)
        if not out:
            raise row.error(name, "no user turn followed by an assistant turn")
        return out

    return _each(records, errors, one)


READING_COMPREHENSION_FIELDS = {"context": "context", "question": "question", "answer": "answer"}
RC_PROMPT = "\n请阅读上述文章，回答下列问题："


def _context_window(context: str, answer: str, start: int | None, size: int) -> tuple[str, bool]:
    """At most ``size`` characters of ``context`` around the answer (at ``start`` when that is where
    it is, else its first occurrence); the beginning when the answer is not in the context.
    Returns (window, whether the answer is inside it)."""
    if len(context) <= size:
        return context, True
    if start is None or context[start:start + len(answer)] != answer:
        start = context.find(answer) if answer else -1
    if start < 0:
        return context[:size], False
    lo = max(0, min(start + len(answer) // 2 - size // 2, len(context) - size))
    return context[lo:lo + size], lo <= start and start + len(answer) <= lo + size


def reading_comprehension_to_retrieval(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                                       instruction: str | None = None, errors: BadRecords | None = None,
                                       max_context_chars: int | None = None,
                                       stats: dict | None = None) -> Iterator[RetrievalRecord]:
    """(context, question, answer) -> query = context + RC_PROMPT + question, positive = the answer.

    ``RC_PROMPT`` is "\\n请阅读上述文章，回答下列问题：" ("read the passage above and answer the question
    below"), as in the QZhou report. The answer may be a string, a list of strings, or SQuAD's
    ``{"text": [...], "answer_start": [...]}``; distinct answers become the positives. A row without
    an answer (SQuAD 2.0's unanswerable questions) is an error, or skipped with ``errors``.

    Training cuts a query at its token limit from the end, which would drop the prompt and the
    question of a long context (two questions on one context then become one input). With
    ``max_context_chars``, a longer context is cut to a window of that many characters around the
    (first) answer, so the question always survives; choose it from the query token limit (Qwen
    tokenizes about 1.4 Chinese characters or 4 English characters per token). ``stats`` counts
    "contexts_cut" and "answer_outside_window" (the answer was not found verbatim in the context).
    """
    f = resolve_fields(READING_COMPREHENSION_FIELDS, fields, "reading comprehension rows")
    if max_context_chars is not None and max_context_chars < 1:
        raise ValueError(f"max_context_chars: expected a positive number of characters, got {max_context_chars}")
    counts = stats if stats is not None else {}
    if max_context_chars is not None:
        counts.setdefault("contexts_cut", 0)
        counts.setdefault("answer_outside_window", 0)

    def one(obj, where):
        row = _Row(obj, where)
        context, question = row.text(f["context"]), row.text(f["question"])
        name = f["answer"]
        if name not in row.obj:
            raise row.missing(name)
        answer = row.obj[name]
        starts = None
        if isinstance(answer, Mapping):  # SQuAD: {"text": [...], "answer_start": [...]}
            if "text" not in answer:
                raise row.error(name, "an answer object needs a 'text' list (SQuAD form)")
            starts = answer.get("answer_start")
            answer = answer["text"]
        if isinstance(answer, (list, tuple)) and not answer:
            raise row.error(name, "no answer (unanswerable question)")
        answers = row.texts_of(answer, name, required=True)
        if max_context_chars is not None and len(context) > max_context_chars:
            first = starts[0] if isinstance(starts, (list, tuple)) and starts and isinstance(starts[0], int) else None
            context, inside = _context_window(context, answers[0], first, max_context_chars)
            counts["contexts_cut"] += 1
            counts["answer_outside_window"] += not inside
        return [RetrievalRecord(context + RC_PROMPT + question, tuple(dict.fromkeys(answers)), (), instruction)]

    return _each(records, errors, one)


CLAIM_EVIDENCE_FIELDS = {"claim": "claim", "evidence": "evidence", "label": "label"}
_SUPPORTS = {"supports", "support", "supported", "entailment"}
_REFUTES = {"refutes", "refute", "refuted", "contradict", "contradicts", "contradicted", "contradiction"}
_NO_INFO = {"not enough info", "not_enough_info", "nei", "noinfo", "not enough information"}


def claim_evidence_to_retrieval(records: Iterable[Any], fields: Mapping[str, str] | None = None,
                                instruction: str | None = None, errors: BadRecords | None = None,
                                stats: dict | None = None) -> list[RetrievalRecord]:
    """(claim, evidence, label) rows grouped by claim: supporting evidence -> positives, refuting -> negatives.

    Labels (case-insensitive): SUPPORTS / SUPPORT (FEVER, SciFact) -> positive; REFUTES / CONTRADICT ->
    negative; NOT ENOUGH INFO -> ignored. ``evidence`` may be a string or a list of strings. Claims come
    out in order of first appearance; a claim with no supporting evidence cannot be a retrieval record
    and is dropped. ``stats`` (if given) gets "claims", "records", "without_support" and "not_enough_info".
    """
    f = resolve_fields(CLAIM_EVIDENCE_FIELDS, fields, "claim-evidence rows")
    groups: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    no_info = 0

    def one(obj, where):
        row = _Row(obj, where)
        claim = row.text(f["claim"])
        if f["label"] not in row.obj:
            raise row.missing(f["label"])
        label = row.obj[f["label"]]
        key = label.strip().lower().replace("-", " ") if isinstance(label, str) else None
        if key in _NO_INFO:
            return [("nei", claim, ())]
        if key not in _SUPPORTS and key not in _REFUTES:
            raise row.error(f["label"], f"unknown label {label!r} (expected SUPPORTS, REFUTES or NOT ENOUGH INFO)")
        return [("pos" if key in _SUPPORTS else "neg", claim, row.texts(f["evidence"], required=True))]

    for kind, claim, evidence in _each(records, errors, one):
        pos, neg = groups.setdefault(claim, ({}, {}))
        if kind == "nei":
            no_info += 1
            continue
        for e in evidence:
            (pos if kind == "pos" else neg)[e] = None
    out = [RetrievalRecord(claim, tuple(pos), tuple(e for e in neg if e not in pos), instruction)
           for claim, (pos, neg) in groups.items() if pos]
    if stats is not None:
        stats.update(claims=len(groups), records=len(out), without_support=len(groups) - len(out),
                     not_enough_info=no_info)
    return out


# For the command line: kind -> (function, output family)
KINDS: dict[str, tuple[Callable[..., Iterable[Record]], str]] = {
    "sts-swap": (sts_with_swapped, "sts"),
    "nli": (nli_to_scored_pairs, "sts"),
    "binary-labels": (binary_labels, "sts"),
    "classification-triplets": (classification_to_triplets, "retrieval"),
    "title-body": (title_body_to_retrieval, "retrieval"),
    "conversation": (conversation_to_retrieval, "retrieval"),
    "reading-comprehension": (reading_comprehension_to_retrieval, "retrieval"),
    "claim-evidence": (claim_evidence_to_retrieval, "retrieval"),
    "triplets": (triplets_to_retrieval, "retrieval"),
}

# The input fields each kind reads (our name -> default name in the data), for --fields.
KIND_FIELDS: dict[str, dict[str, str]] = {
    "sts-swap": DEFAULT_FIELDS["sts"],
    "nli": NLI_FIELDS,
    "binary-labels": BINARY_FIELDS,
    "classification-triplets": DEFAULT_FIELDS["classification"],
    "title-body": TITLE_BODY_FIELDS,
    "conversation": CONVERSATION_FIELDS,
    "reading-comprehension": READING_COMPREHENSION_FIELDS,
    "claim-evidence": CLAIM_EVIDENCE_FIELDS,
    "triplets": TRIPLET_FIELDS,
}
