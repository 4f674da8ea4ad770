"""`qzhou-jax data`: turn raw datasets into training records, and check record files.

    qzhou-jax data transform KIND --input raw.jsonl --output records.jsonl [--fields ours=theirs ...]
    qzhou-jax data check --task retrieval|sts|classification --input records.jsonl [--fields ...] [--tokenizer T]

Kinds (recipe §4):
  sts-swap                 STS pairs, each also emitted swapped          -> text1/text2/score
  nli                      premise/hypothesis/label: entailment 2, neutral 1, contradiction 0,
                           both directions                               -> text1/text2/score
  binary-labels            text1/text2/label with true/false, yes/no, 1/0 -> score 1/0, both directions
  classification-triplets  text/label -> query, a same-label positive, other-label negatives
  title-body               title -> query, body -> positive
  conversation             messages: user turn -> query, assistant reply -> positive
  reading-comprehension    context + "\\n请阅读上述文章，回答下列问题：" + question -> query, answer -> positive
  claim-evidence           claim/evidence/label: supports -> positive, refutes -> negative
  triplets                 anchor/positive/negative -> query/pos/neg

Output is JSONL in the record format training reads (retrieval: query/pos/neg/instruction; sts:
text1/text2/score). It is written under a temporary name and renamed when complete: a failed run
leaves no output, and an existing output is kept unless --overwrite. A bad input row stops the run
with file:line and the field, or is skipped and counted with --skip-bad-records.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from typing import Any

import numpy as np

from qzhou_jax.cli_args import positive_int
from qzhou_jax.data.records import FAMILIES, BadRecords, iter_rows, resolve_fields, write_records
from qzhou_jax.data.transforms import KIND_FIELDS, KINDS, NLI_INT_LABELS

log = logging.getLogger("qzhou_jax.data")


def parse_fields(items: list[str] | None, defaults: dict[str, str], what: str) -> dict[str, str] | None:
    """["query=anchor", "pos=positive"] -> {"query": "anchor", "pos": "positive"}, checked against ``defaults``."""
    if not items:
        return None
    fields = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"--fields {item!r}: expected OURS=THEIRS, e.g. query=anchor "
                             f"(our names for {what}: {', '.join(defaults)})")
        fields[ours.strip()] = theirs.strip()
    resolve_fields(defaults, fields, what)
    return fields


def cmd_transform(args: argparse.Namespace) -> int:
    fn, family = KINDS[args.kind]
    fields = parse_fields(args.fields, KIND_FIELDS[args.kind], args.kind)
    errors = BadRecords(skip=args.skip_bad_records)
    kwargs: dict[str, Any] = {"fields": fields, "errors": errors}
    stats: dict[str, Any] = {}
    if args.kind == "nli":
        kwargs.update(int_labels=args.nli_int_labels, both_directions=not args.one_direction)
    elif args.kind == "binary-labels":
        kwargs.update(both_directions=not args.one_direction)
    elif args.kind == "classification-triplets":
        kwargs.update(num_negatives=4 if args.num_negatives is None else args.num_negatives, seed=args.seed,
                      stats=stats)
    elif args.kind == "claim-evidence":
        kwargs.update(stats=stats)
    elif args.kind == "reading-comprehension":
        kwargs.update(max_context_chars=args.max_context_chars, stats=stats)
    elif args.kind == "conversation":
        kwargs.update(first_turn_only=args.first_turn_only)
    if args.num_negatives is not None and args.kind != "classification-triplets":
        raise ValueError("--num-negatives applies to classification-triplets only")
    if args.first_turn_only and args.kind != "conversation":
        raise ValueError("--first-turn-only applies to conversation only")
    if args.max_context_chars is not None and args.kind != "reading-comprehension":
        raise ValueError("--max-context-chars applies to reading-comprehension only")
    if family == "retrieval":
        kwargs.update(instruction=args.instruction)
    elif args.instruction is not None:
        raise ValueError(f"--instruction does not apply to {args.kind} (it writes scored pairs)")
    if args.one_direction and args.kind not in ("nli", "binary-labels"):
        raise ValueError("--one-direction applies to nli and binary-labels only")
    if os.path.isdir(args.input):
        raise ValueError(f"{args.input}: a folder, not a JSONL file")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such file")
    not_json = BadRecords(skip=args.skip_bad_records)  # lines that are not JSON, counted as rows too
    rows = _counted(iter_rows(args.input, not_json))
    try:  # no record at all is an error before the output is renamed into place (an old one is kept)
        n = write_records(args.output, _some(fn(rows, **kwargs), args.input, family), overwrite=args.overwrite)
    except ValueError as e:
        if str(e).startswith(args.input):
            raise
        raise ValueError(f"{args.input}: {e}") from None
    not_json.warn(args.input, log)
    errors.warn(args.input, log)
    extra = "".join(f", {k.replace('_', ' ')}: {_fmt(v)}" for k, v in stats.items() if k != "records")
    bad = not_json.count + errors.count
    skipped = f", {bad} bad rows skipped" if bad else ""
    print(f"wrote {args.output}: {n} {family} records from {rows.count + not_json.count} input rows"
          f"{skipped}{extra}", file=sys.stderr)
    return 0


def _some(records, path: str, family: str):
    """`records`, raising at their end when there were none."""
    n = 0
    for r in records:
        n += 1
        yield r
    if not n:
        raise ValueError(f"{path}: no {family} records to write (empty input, or every row skipped)")


class _counted:
    """Iterator wrapper counting the rows it passed on."""

    def __init__(self, it):
        self.it = iter(it)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.count += 1
        return item


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return f"{len(value)}" + (f" ({', '.join(map(str, list(value)[:5]))}{', ...' if len(value) > 5 else ''})"
                                  if value else "")
    return str(value)


def cmd_check(args: argparse.Namespace) -> int:
    from qzhou_jax.data.records import DEFAULT_FIELDS
    from qzhou_jax.data.sources import open_source

    fields = parse_fields(args.fields, DEFAULT_FIELDS[args.task], args.task)
    if args.tokenizer and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer_config.json")):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no tokenizer_config.json")  # before the scan
    spec = {"task": args.task, "path": args.input, "format": args.format, "fields": fields,
            "skip_bad_records": args.skip_bad_records, "split": args.split}
    source = open_source(spec)
    print(f"{args.input}: {len(source)} {args.task} records"
          + (f", {source.skipped} bad records skipped" if getattr(source, "skipped", 0) else ""))
    if args.task == "retrieval":
        pos, neg, instr = [], [], Counter()
        index, positive_negatives = source.query_positives, 0
        for i in range(len(source)):
            r = source[i]
            pos.append(len(r.pos))
            neg.append(len(r.neg))
            instr[r.instruction] += 1
            positive_negatives += sum(index.positives_among(i, r, r.neg))
        pos, neg = np.array(pos), np.array(neg)
        print(f"  positives per query: mean {pos.mean():.2f}, max {pos.max()}")
        print(f"  hard negatives per query: mean {neg.mean():.2f}, min {neg.min()}, max {neg.max()} "
              f"({int((neg > 0).sum())} queries have some)")
        print(f"  instructions: {len(source) - instr.get(None, 0)} records have one "
              f"({len([k for k in instr if k is not None])} distinct)")
        print(f"  queries in several records: {index.shared_queries}; listed negatives that are a positive "
              f"of their query (left out in training): {positive_negatives}")
    elif args.task == "sts":
        scores = np.array([source[i].score for i in range(len(source))])
        print(f"  scores: min {scores.min():g}, max {scores.max():g}, mean {scores.mean():.3f}, "
              f"{len(np.unique(scores))} distinct")
    else:
        counts = Counter(source.label_names[k] for k in source.labels)
        print(f"  labels: {len(counts)}; records per label: min {min(counts.values())}, "
              f"max {max(counts.values())}")
        singles = [k for k, v in counts.items() if v < 2]
        if singles:
            print(f"  labels with a single text (no positive possible): {', '.join(singles[:10])}"
                  + (", ..." if len(singles) > 10 else ""))
    if args.tokenizer:
        _length_report(source, args)
    return 0


def _sides(record: Any, task: str, instruction: str | None, symmetric: bool | None) -> list[tuple[str, list[str]]]:
    """("query" | "passage", texts as the model sees them) of one record, prompts as training applies
    them: the first side always; the second side (retrieval passages, sts text2) when symmetric
    (default: retrieval no, sts and classification yes)."""
    from qzhou_jax.tokenizer import format_prompt

    symmetric = task != "retrieval" if symmetric is None else symmetric
    if task == "retrieval":
        instr = record.instruction or instruction
        passages = list(record.pos) + list(record.neg)
        return [("query", [format_prompt(record.query, instr)]),
                ("passage", [format_prompt(t, instr if symmetric else None) for t in passages])]
    if task == "sts":
        return [("query", [format_prompt(record.text1, instruction),
                           format_prompt(record.text2, instruction if symmetric else None)])]
    return [("query", [format_prompt(record.text, instruction)])]


def _length_report(source: Any, args: argparse.Namespace) -> None:
    """Token lengths of (a sample of) the records, and how many a training run would cut (from the end)."""
    from qzhou_jax.tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer, max_length=1 << 20)
    n = len(source)
    rows = range(n) if not args.sample or n <= args.sample else \
        sorted(np.random.default_rng(0).choice(n, args.sample, replace=False).tolist())
    texts: dict[str, list[str]] = {"query": [], "passage": []}
    for i in rows:
        for side, values in _sides(source[int(i)], args.task, args.instruction, args.symmetric):
            texts[side].extend(values)
    limits = {"query": args.query_max_length,
              "passage": args.passage_max_length if args.task == "retrieval" else args.query_max_length}
    what = f"{len(rows)} sampled records" if len(rows) < n else "all records"
    print(f"  token lengths ({what}, {args.tokenizer}, prompts included):")
    for side, values in texts.items():
        if not values:
            continue
        lengths = np.array([len(ids) for ids in tok.encode(values)])
        over = int((lengths > limits[side]).sum())
        name = {"query": "queries" if args.task == "retrieval" else "texts", "passage": "passages"}[side]
        print(f"    {name}: p50 {np.percentile(lengths, 50):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
              f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}; {over} ({over / len(lengths):.1%}) "
              f"longer than {limits[side]} tokens, cut from the end in training")


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `data transform` and `data check` to a CLI's subparsers."""
    d = subparsers.add_parser("data", help="convert raw datasets to training records; check record files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = d.add_subparsers(dest="data_command", required=True)

    t = sub.add_parser("transform", help="raw JSONL -> training records (see `qzhou-jax data -h`)")
    t.add_argument("kind", choices=list(KINDS))
    t.add_argument("--input", required=True, help="input JSONL file")
    t.add_argument("--output", required=True, help="output JSONL file (must not exist unless --overwrite)")
    t.add_argument("--fields", nargs="+", action="extend", metavar="OURS=THEIRS",
                   help="input field names, e.g. text1=sentence1 text2=sentence2 (defaults per kind)")
    t.add_argument("--seed", type=int, default=0, help="classification-triplets: sampling seed (default 0)")
    t.add_argument("--num-negatives", type=int, default=None,
                   help="classification-triplets: negatives per query (default 4)")
    t.add_argument("--nli-int-labels", choices=list(NLI_INT_LABELS), default=None,
                   help="nli: meaning of integer labels 0/1/2: snli = entailment/neutral/contradiction "
                        "(SNLI, MultiNLI, XNLI), clue = neutral/entailment/contradiction (CLUE OCNLI, CMNLI)")
    t.add_argument("--one-direction", action="store_true",
                   help="nli, binary-labels: do not also emit the swapped pair")
    t.add_argument("--max-context-chars", type=int, default=None,
                   help="reading-comprehension: cut longer contexts to this many characters around the answer, "
                        "so that the question survives the query token limit (256 tokens: about 300 Chinese "
                        "characters, leaving room for the instruction and the question)")
    t.add_argument("--first-turn-only", action="store_true",
                   help="conversation: only the first user -> assistant exchange of each dialogue")
    t.add_argument("--instruction", default=None, help="retrieval outputs: instruction for records without one")
    t.add_argument("--skip-bad-records", action="store_true", help="skip and count bad rows instead of stopping")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t.set_defaults(func=cmd_transform)

    c = sub.add_parser("check", help="validate a record file and print counts")
    c.add_argument("--task", required=True, choices=list(FAMILIES))
    c.add_argument("--input", required=True, help="JSONL file (or BEIR folder with --format beir)")
    c.add_argument("--fields", nargs="+", action="extend", metavar="OURS=THEIRS",
                   help="field names in the data, e.g. query=anchor pos=positive neg=negative")
    c.add_argument("--format", choices=["jsonl", "beir"], default=None,
                   help="default: beir for a folder, else jsonl")
    c.add_argument("--split", default=None, help="BEIR qrels split (default train)")
    c.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping")
    g = c.add_argument_group("token lengths (with --tokenizer)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (a model folder works): report token lengths and how many texts a "
                        "training run would cut at the limits below")
    g.add_argument("--instruction", default=None, help="the dataset's instruction (records without their own)")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="the dataset's `symmetric`: the instruction on the second side too (retrieval passages, "
                        "sts text2); default as training: no for retrieval, yes for sts and classification")
    g.add_argument("--query-max-length", type=positive_int, default=256,
                   help="query limit (sts/classification: both sides; default 256)")
    g.add_argument("--passage-max-length", type=positive_int, default=1536,
                   help="retrieval passage limit (default 1536)")
    g.add_argument("--sample", type=int, default=20000, help="records to tokenize (default 20000; 0: all)")
    c.set_defaults(func=cmd_check)
    return d
