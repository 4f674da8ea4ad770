"""What each synthesis job asks the LLM, and which answers it keeps (recipe §4).

A job turns one source record into a prompt, reads the LLM's JSON answer, and either rejects it
with a short reason (fed back into the next try's prompt) or builds new records from it:

- ``Paraphrase`` (retrieval, sts, classification): the same meaning and language, the length within
  15% and the wording different enough (``checks.min_difference``: 0.30 for a sentence, 0.20 for a
  paragraph); sts keeps the score, classification keeps the label. Retrieval paraphrases come out
  without negatives: mine them afterwards (``qzhou-jax synth mine``).
- ``Augment`` (retrieval): a new query in the same field, the topic moved or extended (it must differ
  from the source query like a paraphrase would, and stay a query: at most ``QUERY_GROWTH`` times the
  source query's length, or 10 words longer for short ones), a complete positive and a worse hard
  negative, each within 20% of the source positive's length. Not for NLI triplets: the recipe
  paraphrases NLI data but does not augment it.
- ``Negatives`` (retrieval): hard negatives for a record, each worse than the positive in one of three
  ways (incomplete, carrying irrelevant content, another aspect of the topic), imitating the
  positive's structure, within 20% of its length; added to the record's own.

Every new text must be in the source's writing system and must not duplicate (after
``checks.normalize``) any text of the input or any text already written.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Sequence

from qzhou_jax.data.records import ClassificationRecord, PairRecord, Record, RetrievalRecord
from qzhou_jax.synth import checks

__all__ = ["Job", "Paraphrase", "Augment", "Negatives", "parse_reply", "WEAKNESSES"]

SYSTEM = ("You write training data for a text-embedding model. Follow the instructions exactly and reply "
          "with one JSON object and nothing else.")

WEAKNESSES = (
    "it is incomplete: it leaves out the part of the answer the query needs most",
    "it carries irrelevant content in place of part of the answer",
    "it addresses another aspect of the same topic than the one the query asks about",
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def parse_reply(reply: str, keys: Sequence[str]) -> tuple[dict[str, str] | None, str | None]:
    """The JSON object in an LLM reply with a non-empty string under each key: (fields, None), or
    (None, reason). Code fences, a reasoning model's <think> block and text around the object are
    tolerated, and so are raw line breaks inside strings; when several objects appear, the last
    one with all the keys is taken. The prompt's <<< >>> text markers around a value are removed."""
    text = _THINK.sub("", reply)
    decoder = json.JSONDecoder(strict=False)
    found: list[dict] = []
    pos = text.find("{")
    while pos >= 0:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = text.find("{", end)
    if not found:
        return None, "answer is not a JSON object"
    obj = next((o for o in reversed(found) if all(k in o for k in keys)), found[-1])
    out = {}
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("<<<") and value.endswith(">>>"):
                value = value[3:-3].strip()
        if not isinstance(value, str) or not value:
            return None, f"answer has no text under {key!r}"
        if "<<<" in value or ">>>" in value:
            return None, f"{key} contains the prompt's <<< >>> markers"
        try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 file can hold
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"{key} holds an invalid \\u escape (a lone surrogate)"
        out[key] = value
    return out, None


def _check_length(new: str, reference: str, tolerance: float, what: str) -> str | None:
    r = checks.length_ratio(new, reference)
    if abs(r - 1.0) > tolerance + 1e-9:
        return f"{what} length is {r:.0%} of the source's (allowed {1 - tolerance:.0%}-{1 + tolerance:.0%})"
    return None


QUERY_GROWTH = 3.0


def _check_query_length(new: str, example: str) -> str | None:
    """A new query may be longer than the example's, but not a passage: at most QUERY_GROWTH times
    its length in units (words, CJK characters), or 10 units more when that is larger."""
    n, ref = len(checks.units(new)), len(checks.units(example))
    limit = max(int(QUERY_GROWTH * ref), ref + 10)
    if n > limit:
        return (f"query is {n} words long and the example query {ref} (allowed up to {limit}): write a query, "
                f"not a passage")
    return None


def _check_script(new: str, source: str, what: str) -> str | None:
    if not checks.same_script(new, source):
        return f"{what} is not in the source's language ({checks.script(new)} vs {checks.script(source)})"
    return None


def _check_rewrite(new: str, source: str, what: str) -> str | None:
    need = checks.min_difference(source)
    d = checks.difference(new, source)
    if d <= need:
        return f"{what} differs from the source by {d:.0%} (must be over {need:.0%})"
    return None


def _check_paraphrase(new: str, source: str, tolerance: float, what: str) -> str | None:
    return (_check_script(new, source, what) or _check_length(new, source, tolerance, what)
            or _check_rewrite(new, source, what))


class Job:
    """One kind of synthesis. Subclasses set ``name``, ``family``, ``keys`` and the three methods."""

    name = ""
    family = ""
    keys: tuple[str, ...] = ()
    passes_through = False  # True: records the job does not touch are written out unchanged

    def count(self, record: Record) -> int:
        """How many accepted answers the record needs (0: the job skips it)."""
        return 1

    def messages(self, record: Record, k: int, attempt: int, feedback: str | None) -> list[dict[str, str]]:
        raise NotImplementedError

    def check(self, record: Record, reply: Mapping[str, str], accepted: Sequence[Mapping[str, str]]) -> str | None:
        """A rejection reason, or None to accept."""
        raise NotImplementedError

    def build(self, record: Record, accepted: Sequence[Mapping[str, str]]) -> list[Record]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """What changes the job's output, for the resume check."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _chat(self, task: str, feedback: str | None) -> list[dict[str, str]]:
        if feedback:
            task += f"\n\nYour previous answer was rejected: {feedback}. Fix that."
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]


def _block(label: str, text: str) -> str:
    return f"{label}:\n<<<\n{text}\n>>>"


class Paraphrase(Job):
    """Paraphrase retrieval pairs, scored pairs or labelled texts."""

    name = "paraphrase"

    def __init__(self, family: str, length_tolerance: float = 0.15):
        if family not in ("retrieval", "sts", "classification"):
            raise ValueError(f"paraphrase: unknown task {family!r}")
        self.family = family
        self.length_tolerance = float(length_tolerance)
        self.keys = {"retrieval": ("query", "positive"), "sts": ("text1", "text2"),
                     "classification": ("text",)}[family]

    def _sources(self, record: Record) -> dict[str, str]:
        if isinstance(record, RetrievalRecord):
            return {"query": record.query, "positive": record.pos[0]}
        if isinstance(record, PairRecord):
            return {"text1": record.text1, "text2": record.text2}
        return {"text": record.text}

    def messages(self, record, k, attempt, feedback):
        src = self._sources(record)
        pct = round(self.length_tolerance * 100)
        task = (f"Paraphrase each text below. Keep its meaning, its facts and its language; change the wording "
                f"and the sentence structure substantially (a sentence must differ in at least a third of its "
                f"words); keep each text within {pct}% of its original length.")
        if self.family == "retrieval":
            task += " The rewritten passage must still answer the rewritten query."
        elif self.family == "sts":
            task += " The two rewritten texts must relate to each other exactly as the originals do."
        task += "\n\n" + "\n\n".join(_block(k_, v) for k_, v in src.items())
        task += "\n\nReply as JSON: {" + ", ".join(f'"{k_}": "..."' for k_ in self.keys) + "}"
        return self._chat(task, feedback)

    def check(self, record, reply, accepted):
        src = self._sources(record)
        for key in self.keys:
            reason = _check_paraphrase(reply[key], src[key], self.length_tolerance, key)
            if reason:
                return reason
        if self.family != "classification":
            a, b = self.keys
            same_source = checks.normalize(src[a]) == checks.normalize(src[b])
            if not same_source and checks.normalize(reply[a]) == checks.normalize(reply[b]):
                return f"{a} and {b} are the same text"
        return None

    def build(self, record, accepted):
        out: list[Record] = []
        for r in accepted:
            if isinstance(record, RetrievalRecord):
                out.append(RetrievalRecord(r["query"], (r["positive"],), (), record.instruction))
            elif isinstance(record, PairRecord):
                out.append(PairRecord(r["text1"], r["text2"], record.score))
            else:
                out.append(ClassificationRecord(r["text"], record.label))
        return out


class Augment(Job):
    """New (query, positive, hard negative) triplets in the field of each retrieval record."""

    name = "augment"
    family = "retrieval"
    keys = ("query", "positive", "negative")

    def __init__(self, length_tolerance: float = 0.20):
        self.length_tolerance = float(length_tolerance)

    def messages(self, record, k, attempt, feedback):
        pct = round(self.length_tolerance * 100)
        task = ("Below is an example of a query with a passage that answers it. Write a NEW example in the same "
                "field: a new query whose topic is moved to a neighbouring subject or extends the example's "
                "(not a rewording of the example query), a positive passage that answers the new query "
                "completely, and a hard negative passage on the same subject that looks relevant but is a "
                f"worse answer: {WEAKNESSES[attempt % len(WEAKNESSES)]}. Write in the example's language; keep the "
                f"positive and the negative each within {pct}% of the example passage's length.\n\n"
                + _block("example query", record.query) + "\n\n" + _block("example passage", record.pos[0])
                + '\n\nReply as JSON: {"query": "...", "positive": "...", "negative": "..."}')
        return self._chat(task, feedback)

    def check(self, record, reply, accepted):
        q, p, n = reply["query"], reply["positive"], reply["negative"]
        for key in self.keys:
            reason = _check_script(reply[key], record.pos[0] if key != "query" else record.query, key)
            if reason:
                return reason
        reason = (_check_query_length(q, record.query)
                  or _check_length(p, record.pos[0], self.length_tolerance, "positive")
                  or _check_length(n, record.pos[0], self.length_tolerance, "negative"))
        if reason:
            return reason
        if checks.difference(q, record.query) <= checks.min_difference(record.query):
            return "query is a rewording of the example query, not a new topic"
        if checks.difference(p, record.pos[0]) <= checks.min_difference(record.pos[0]):
            return "positive is a rewording of the example passage"
        if checks.normalize(n) == checks.normalize(p):
            return "negative is the same text as the positive"
        return None

    def build(self, record, accepted):
        return [RetrievalRecord(r["query"], (r["positive"],), (r["negative"],), record.instruction) for r in accepted]


class Negatives(Job):
    """LLM-written hard negatives added to retrieval records.

    ``num`` negatives per selected record; ``select(index, record)`` picks the records (default: every
    record that has none; see ``share_selector`` for the recipe's "about 30% of them").
    """

    name = "negatives"
    family = "retrieval"
    keys = ("negative",)
    passes_through = True

    def __init__(self, num: int = 4, length_tolerance: float = 0.20, min_difference: float = 0.10,
                 select: Callable[[RetrievalRecord], bool] | None = None, selection: str = "records without negatives"):
        if num < 1:
            raise ValueError(f"--num-negatives: expected at least 1, got {num}")
        self.num = int(num)
        self.length_tolerance = float(length_tolerance)
        self.min_difference = float(min_difference)
        self.selection = selection
        self._select = select or (lambda r: not r.neg)

    def count(self, record):
        return self.num if self._select(record) else 0

    def messages(self, record, k, attempt, feedback):
        pct = round(self.length_tolerance * 100)
        task = ("Write a hard negative passage for the query below: it stays on the query's topic and imitates "
                "the structure, style and kind of wording of the positive passage, but it is a worse answer "
                f"than the positive: {WEAKNESSES[(k + attempt) % len(WEAKNESSES)]}. Write in the positive's "
                f"language and keep it within {pct}% of the positive's length.\n\n"
                + _block("query", record.query) + "\n\n" + _block("positive passage", record.pos[0])
                + '\n\nReply as JSON: {"negative": "..."}')
        return self._chat(task, feedback)

    def check(self, record, reply, accepted):
        n, p = reply["negative"], record.pos[0]
        reason = _check_script(n, p, "negative") or _check_length(n, p, self.length_tolerance, "negative")
        if reason:
            return reason
        d = checks.difference(n, p)
        if d <= self.min_difference:
            return f"negative differs from the positive by {d:.0%} only (must be over {self.min_difference:.0%})"
        key = checks.normalize(n)
        if key in {checks.normalize(t) for t in (record.query, *record.pos, *record.neg)}:
            return "negative repeats a text of the record"
        if key in {checks.normalize(a["negative"]) for a in accepted}:
            return "negative repeats one already written for this query"
        return None

    def build(self, record, accepted):
        return [RetrievalRecord(record.query, record.pos, record.neg + tuple(a["negative"] for a in accepted),
                                record.instruction)]

    def options(self):
        return {"num": self.num, "length_tolerance": self.length_tolerance, "min_difference": self.min_difference,
                "selection": self.selection}
