"""Records -> token arrays of one task batch, in the train step's format (`train/step.py`).

A global batch of n rows (queries, pairs or anchors) is cut into equal contiguous slices,
one per host; a host builds only its rows. Everything random about a row (which positive,
which negatives) is drawn from a generator keyed by (seed, step, global row), so the
batch is the same whatever the number of hosts or loader workers.

Per task (g = 1 + hard negatives):
- retrieval: query (with the record's instruction, else the dataset's); its positive (one of
  `pos`, at random when there are several) then k hard negatives (k of the distinct texts of
  `neg` at random; a record with fewer gets passages of other records of the same dataset:
  random negatives).
  No negative, listed or random, is a positive of the query in any record of the dataset
  (`sources.QueryPositives`: one record per (query, positive) pair is a common layout).
  Passages get the instruction only for symmetric datasets.
- sts: text1 / text2 and the gold score; the instruction on text1, and on text2 too when
  symmetric (the default for sts and classification; evaluation does the same).
- classification (example-based triplets, recipe §4): the anchor text, another text
  of its label as positive, k texts of other labels as negatives, and every row's label; the
  instruction on the anchor, and on the other texts too when symmetric.
Every side is cut at the dataset's maximum length and padded (right) to the shortest of the
spec's buckets that holds its longest row (the maximum when there are none; the training loop
then pads every host to the longest host's length). Retrieval batches also carry
`q_keys` / `p_keys`: a 32-bit hash of each row's token ids as the model sees them (prompt
included, after truncation), so the loss can leave out candidates identical to a row's
positive or query (two queries citing one document, a hard negative repeating the
positive, a passage equal to the query, questions cut off the same long context).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from qzhou_jax.data.sampler import row_rng
from qzhou_jax.data.sources import QueryPositives, text_key
from qzhou_jax.tokenizer import Tokenizer, format_prompt


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The shape and prompting of one dataset's batches."""

    task: str
    batch_size: int
    hard_negatives: int
    query_max_length: int
    passage_max_length: int
    instruction: str | None = None
    symmetric: bool = False
    query_buckets: tuple[int, ...] = ()  # padding lengths below the maximum (empty: always the maximum)
    passage_buckets: tuple[int, ...] = ()

    @property
    def group(self) -> int:
        return 1 if self.task == "sts" else 1 + self.hard_negatives


def draw_distinct(draw: Callable[[], "tuple[Any, Hashable] | None"], count: int, tries: int,
                  taken: Iterable[Hashable] = ()) -> list:
    """Up to ``count`` values from ``draw()``, which gives (value, key) or None for a rejected draw:
    keys distinct from each other and from ``taken`` during the first half of the ``tries``,
    repeats allowed after that (a source with fewer distinct items than ``count``)."""
    out: list = []
    seen = set(taken)
    for attempt in range(tries):
        if len(out) == count:
            break
        got = draw()
        if got is None or (got[1] in seen and attempt < tries // 2):
            continue
        out.append(got[0])
        seen.add(got[1])
    return out


class LabelIndex:
    """Records grouped by label, for drawing positives (same label) and negatives (others).

    ``text_keys`` (one key per record, equal for equal texts) make a text count once per label:
    a repeated (text, label) row is left out, so no anchor is its own positive; negatives are
    distinct texts, never the anchor's own text (one text filed under two labels in noisy data).
    Anchors are the kept records whose label has at least two distinct texts."""

    NEGATIVE_TRIES = 64  # draws per negative before giving up (only identical texts are redrawn)

    def __init__(self, labels: np.ndarray, name: str, text_keys: np.ndarray):
        self.labels, self.name = np.asarray(labels, np.int64), name
        n = len(self.labels)
        self.keys = np.asarray(text_keys, np.int64)
        if self.keys.shape != (n,):
            raise ValueError(f"dataset {name!r}: {len(self.keys)} text keys for {n} records")
        # the first record of each distinct (label, text), in record order
        pairs = np.stack([self.labels, self.keys], axis=1)
        self.kept = np.sort(np.unique(pairs, axis=0, return_index=True)[1]) if n else np.zeros(0, np.int64)
        self.duplicates = int(n - len(self.kept))
        order = self.kept[np.argsort(self.labels[self.kept], kind="stable")]
        uniq, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
        self.order = order  # kept records, grouped by label: label u is order[start_u : start_u + count_u]
        self.span = {int(u): (int(s), int(c)) for u, s, c in zip(uniq, starts, counts)}
        if len(uniq) < 2:
            raise ValueError(f"dataset {name!r}: classification needs at least two labels, found {len(uniq)}")
        self.anchors = self.kept[counts[np.searchsorted(uniq, self.labels[self.kept])] >= 2]
        if len(self.anchors) == 0:
            raise ValueError(f"dataset {name!r}: no label has two distinct texts (a positive needs another "
                             "text of the same label)")
        self.dropped = int(len(self.kept) - len(self.anchors))  # the only text of their label

    def positive(self, i: int, rng: np.random.Generator) -> int:
        start, count = self.span[int(self.labels[i])]
        same = self.order[start:start + count]
        j = int(same[rng.integers(len(same) - 1)])
        return j if j != i else int(same[-1])  # uniform over the label's other texts

    def negatives(self, i: int, k: int, rng: np.random.Generator, avoid: Sequence[int] = ()) -> list[int]:
        """k records of other labels, uniform over their distinct texts (drawn straight from the other
        labels, so a dominant label costs nothing): never the anchor's text or a text in ``avoid`` (the
        positive: one text filed under two labels), distinct from each other while the draws allow (a
        tiny dataset may repeat some)."""
        start, count = self.span[int(self.labels[i])]
        others = len(self.order) - count
        banned = {int(self.keys[i]), *map(int, avoid)}

        def draw() -> tuple[int, int] | None:
            u = int(rng.integers(others))
            j = int(self.order[u + count if u >= start else u])
            return None if int(self.keys[j]) in banned else (j, int(self.keys[j]))

        tries = k * self.NEGATIVE_TRIES
        out = draw_distinct(draw, k, tries)
        if len(out) < k:
            raise ValueError(f"dataset {self.name!r}: found {len(out)} of {k} negatives for record {i} in {tries} "
                             "draws: (nearly) every text of the other labels is this record's own text or its "
                             "positive's; add data or lower hard_negatives")
        return out


class BatchBuilder:
    """Builds host-local batches of one dataset from its source."""

    def __init__(self, source: Any, spec: BatchSpec, tokenizer: Tokenizer, seed: int, salt: int = 0):
        self.source, self.spec, self.tokenizer = source, spec, tokenizer
        self.seed, self.salt = int(seed), int(salt)
        self.name = getattr(source, "name", "dataset")
        self.labels: LabelIndex | None = None
        self.positives: QueryPositives | None = None
        if spec.task == "retrieval":
            self.positives = getattr(source, "query_positives", None)
            if self.positives is None:  # a source that does not index its texts: read them once
                self.positives = QueryPositives.from_records(source[i] for i in range(len(source)))
            fewest = self.positives.fewest_negatives
            if (spec.hard_negatives and self.positives.distinct_positives < 2
                    and (fewest is None or fewest < spec.hard_negatives)):
                raise ValueError(f"dataset {self.name!r}: every record's positive is the same text, and records "
                                 f"listing fewer than {spec.hard_negatives} hard negatives take the rest from "
                                 "other records' positives: there are none to take; add records or hard "
                                 "negatives, or lower hard_negatives")
        if spec.task == "classification":
            labels = getattr(source, "labels", None)
            if labels is None:
                labels = self._read_labels()
            keys = getattr(source, "text_keys", None)
            if keys is None:  # a source that does not index its texts: read them once
                keys = np.array([text_key(self.source[i].text) for i in range(len(self.source))], np.int64)
            self.labels = LabelIndex(labels, self.name, keys)

    def _read_labels(self) -> np.ndarray:
        names: dict[str, int] = {}
        return np.array([names.setdefault(self.source[i].label, len(names)) for i in range(len(self.source))])

    @property
    def size(self) -> int:
        """How many records the sampler draws from (classification: the usable anchors)."""
        return len(self.labels.anchors) if self.labels is not None else len(self.source)

    def record_index(self, i: int) -> int:
        return int(self.labels.anchors[i]) if self.labels is not None else int(i)

    # ------------------------------------------------------------------ texts
    def _texts(self, step: int, rows: Sequence[int], row0: "int | Sequence[int]") -> tuple[list[str], list[str], dict]:
        spec, src = self.spec, self.source
        q_texts: list[str] = []
        p_texts: list[str] = []
        extra: dict[str, list] = {"scores": [], "q_labels": [], "p_labels": []}
        side_instr = spec.instruction if spec.symmetric else None  # the second side's (sts, classification)
        global_rows = range(row0, row0 + len(rows)) if isinstance(row0, (int, np.integer)) else row0
        if len(global_rows) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(global_rows)} global row numbers")
        for idx, g in zip(rows, global_rows):
            rng = row_rng(self.seed, step, int(g), self.salt)
            i = self.record_index(idx)
            rec = src[i]
            if spec.task == "retrieval":
                instr = getattr(rec, "instruction", None) or spec.instruction
                q_texts.append(format_prompt(rec.query, instr))
                pos = rec.pos[int(rng.integers(len(rec.pos)))] if len(rec.pos) > 1 else rec.pos[0]
                listed = list(dict.fromkeys(rec.neg))  # a text listed twice is one negative
                negs = [t for t, bad in zip(listed, self.positives.positives_among(i, rec, listed)) if not bad]
                k = spec.hard_negatives
                if len(negs) > k:
                    negs = [negs[j] for j in sorted(rng.choice(len(negs), k, replace=False))]
                if len(negs) < k:
                    negs += self._random_negatives(rec, i, k - len(negs), negs, rng)
                p_instr = instr if spec.symmetric else None
                p_texts.extend(format_prompt(t, p_instr) for t in [pos] + negs)
            elif spec.task == "sts":
                q_texts.append(format_prompt(rec.text1, spec.instruction))
                p_texts.append(format_prompt(rec.text2, side_instr))
                extra["scores"].append(float(rec.score))
            else:
                assert self.labels is not None
                q_texts.append(format_prompt(rec.text, spec.instruction))
                pos = self.labels.positive(i, rng)
                negs = self.labels.negatives(i, spec.hard_negatives, rng, avoid=(int(self.labels.keys[pos]),))
                for j in [pos] + negs:
                    p_texts.append(format_prompt(src[j].text, side_instr))
                    extra["p_labels"].append(int(self.labels.labels[j]))
                extra["q_labels"].append(int(self.labels.labels[i]))
        return q_texts, p_texts, extra

    RANDOM_NEGATIVE_TRIES = 64

    def _random_negatives(self, rec, i: int, count: int, taken: Sequence[str], rng) -> list[str]:
        """`count` other records' positives as negatives for record `i`: never a positive of its
        query, its own or another record's (queries sharing a document are common in BEIR
        training sets, one record per (query, positive) in flattened data: the loss would push
        a relevant text below the query), and distinct from each other and from its hard
        negatives while the draws allow (a source with fewer distinct positives repeats some)."""
        src, positives = self.source, self.positives
        assert positives is not None

        def draw() -> tuple[str, str] | None:
            j = int(rng.integers(len(src)))
            if j == i:
                return None
            other = src[j].pos
            text = other[int(rng.integers(len(other)))]
            return None if positives.is_positive(i, rec, text) else (text, text)

        tries = count * self.RANDOM_NEGATIVE_TRIES
        out = draw_distinct(draw, count, tries, taken)
        if len(out) < count:
            raise ValueError(f"data.datasets ({self.name}): found {len(out)} of the {count} random negatives "
                             f"needed for record {i} in {tries} draws: the other records' positives are "
                             f"(nearly) all positives of this record's query; add records or lower hard_negatives")
        return out

    def build(self, step: int, rows: Sequence[int], row0: "int | Sequence[int]") -> dict[str, np.ndarray]:
        """The batch arrays for sampler indices `rows`: global rows `row0`, row0 + 1, ..., or the global
        row number of each (a host whose rows are several blocks of the batch)."""
        spec = self.spec
        q_texts, p_texts, extra = self._texts(step, rows, row0)
        tok = self.tokenizer
        q_seqs = _encode(tok, q_texts, spec.query_max_length)
        p_seqs = _encode(tok, p_texts, spec.passage_max_length)
        q_ids, q_mask = tok.pad(q_seqs, length=padded_length(q_seqs, spec.query_max_length, spec.query_buckets))
        p_ids, p_mask = tok.pad(p_seqs, length=padded_length(p_seqs, spec.passage_max_length, spec.passage_buckets))
        batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}
        if spec.task == "retrieval":
            batch["q_keys"] = sequence_keys(q_seqs, spec.query_max_length)
            batch["p_keys"] = sequence_keys(p_seqs, spec.passage_max_length)
        elif spec.task == "sts":
            batch["scores"] = np.asarray(extra["scores"], np.float32)
        elif spec.task == "classification":
            batch["q_labels"] = np.asarray(extra["q_labels"], np.int32)
            batch["p_labels"] = np.asarray(extra["p_labels"], np.int32)
        return batch


def padded_length(seqs: Sequence[Sequence[int]], max_length: int, buckets: Sequence[int] = ()) -> int:
    """The shortest of `buckets` (then `max_length`) that holds the longest sequence, cut at `max_length`."""
    longest = min(max((len(s) for s in seqs), default=1), max_length)
    return next((b for b in sorted(buckets) if longest <= b < max_length), max_length)


def sequence_keys(seqs: Sequence[Sequence[int]], max_length: int) -> np.ndarray:
    """int32 keys of token id sequences as the model sees them (cut to `max_length`), equal
    for identical inputs (BLAKE2b, so the same on every host; two different inputs share a
    key with probability 2^-32)."""
    return np.array([int.from_bytes(hashlib.blake2b(np.asarray(s[:max_length], np.int32).tobytes(),
                                                    digest_size=4).digest(), "little", signed=True)
                     for s in seqs], np.int32)


CHARS_PER_TOKEN_BOUND = 16


def _encode(tok: Tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of `texts`, tokenizing at most 16 characters per allowed token: text past
    that is cut off by the token limit anyway (BPE tokens of natural text average 1.5 to 5
    characters), and tokenizing it is most of a batch's cost for long documents. A cut
    text that then does not exceed `max_tokens` (long whitespace or separator runs merge
    into long tokens) is tokenized whole, so the cut never changes the result."""
    limit = CHARS_PER_TOKEN_BOUND * max_tokens
    ids = tok.encode([t if len(t) <= limit else t[:limit] for t in texts])
    short = [i for i, t in enumerate(texts) if len(t) > limit and len(ids[i]) <= max_tokens]
    for i, whole in zip(short, tok.encode([texts[i] for i in short]) if short else []):
        ids[i] = whole
    return ids
