"""`qzhou-jax synth`: LLM synthesis, hard-negative mining and cleaning of training records.

LLM synthesis (any OpenAI-compatible chat endpoint: vLLM, SGLang, TGI or a hosted API):
    qzhou-jax synth paraphrase --task retrieval|sts|classification --input R.jsonl --output P.jsonl \\
        --llm-url http://localhost:8000/v1 --llm-model Qwen2.5-72B-Instruct
    qzhou-jax synth augment   --input R.jsonl --output A.jsonl --llm-url ... --llm-model ...
    qzhou-jax synth negatives --input R.jsonl --output N.jsonl --share 0.3 --llm-url ... --llm-model ...

With an embedding model (a folder `qzhou-jax encode` takes):
    qzhou-jax synth mine         --model M --input N.jsonl --output T.jsonl [--ranks 10 30] [--num-negatives 4]
    qzhou-jax synth score-filter --model M --input R.jsonl --output F.jsonl --min-score 0.3 | --drop-fraction 0.05

Without a model:
    qzhou-jax synth dedup         --task retrieval --input A.jsonl B.jsonl --output A2.jsonl B2.jsonl
    qzhou-jax synth decontaminate --task retrieval --input T.jsonl --output T2.jsonl --against EVAL_DIR ...

The recipe (README §4): paraphrase and augment retrieval data (paraphrase NLI and classification data too),
give about 30% of the records without hard negatives LLM-written ones (`negatives --share 0.3`),
mine the rest from ranks 10-30 (`mine` fills the records still without negatives), drop pairs the
model scores low, deduplicate across all files, and drop records close to evaluation data.

Inputs are record files in the training format (`--fields` maps other field names), or BEIR
folders for retrieval (mining then searches the folder's whole corpus). Outputs are
written under a temporary name and renamed when complete; an existing output is kept unless
--overwrite. LLM jobs record progress in OUTPUT.partial as they go: after a stop, rerun the same
command with --resume. The LLM key is read from the environment variable --llm-key-env names
(default OPENAI_API_KEY), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from qzhou_jax.cli_args import (add_model_run_args, model_run_overrides, non_negative_float, non_negative_int,
                                positive_float, positive_int)
from qzhou_jax.data.records import (DEFAULT_FIELDS, FAMILIES, BadRecords, check_output_path, staged_outputs,
                                    write_jsonl, write_records)

log = logging.getLogger("qzhou_jax.synth")


def _fields(args: argparse.Namespace, family: str):
    from qzhou_jax.data.cli import parse_fields

    return parse_fields(args.fields, DEFAULT_FIELDS[family], family)


def _report(what: str, stats: dict[str, Any]) -> None:
    print(f"{what}: {json.dumps(stats, ensure_ascii=False)}", file=sys.stderr)


def _llm_job(args: argparse.Namespace, job) -> int:
    from qzhou_jax.synth.llm import ChatClient, LLMError
    from qzhou_jax.synth.runner import SynthesisStopped, synthesize

    extra = None
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body: expected a JSON object, e.g. '{\"top_p\": 0.9}'")
    client = ChatClient(args.llm_url, args.llm_model, api_key_env=args.llm_key_env or None,
                        temperature=args.temperature, max_tokens=args.max_tokens, timeout=args.timeout,
                        retries=args.retries, extra_body=extra)
    try:
        stats = synthesize(job, args.input, args.output, client, fields=_fields(args, job.family),
                           max_tries=args.max_tries, workers=args.workers, resume=args.resume,
                           overwrite=args.overwrite, limit=args.limit, skip_bad_records=args.skip_bad_records,
                           progress=not args.quiet, split=args.split, max_failures=args.max_failures)
    except (SynthesisStopped, LLMError) as e:
        print(f"qzhou-jax synth {args.synth_command}: {e}", file=sys.stderr)
        return 130 if getattr(e, "interrupted", False) else 1
    stats["llm_calls"], stats["llm_retries"] = client.calls, client.retried
    _report(f"wrote {args.output}", stats)
    return 0


def cmd_paraphrase(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.jobs import Paraphrase

    return _llm_job(args, Paraphrase(args.task, length_tolerance=args.length_tolerance))


def cmd_augment(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.jobs import Augment

    return _llm_job(args, Augment(length_tolerance=args.length_tolerance))


def cmd_negatives(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.jobs import Negatives
    from qzhou_jax.synth.runner import share_selector

    select = share_selector(args.share, args.seed)
    job = Negatives(args.num_negatives, length_tolerance=args.length_tolerance, select=select,
                    selection=f"share {args.share} of records without negatives, seed {args.seed}")
    return _llm_job(args, job)


def _encode_fn(args: argparse.Namespace):
    import jax

    from qzhou_jax import sharding
    from qzhou_jax.checkpoint import load_pretrained
    from qzhou_jax.eval.encoder import Encoder
    from qzhou_jax.tokenizer import Tokenizer

    mesh = None
    if jax.local_device_count() > 1 and jax.process_count() == 1:
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    overrides = model_run_overrides(args)
    model = load_pretrained(args.model, mesh=mesh, **overrides)
    tokenizer = Tokenizer(model.tokenizer_path, max_length=args.max_length)
    encoder = Encoder(model.params, model.config, tokenizer, batch_size=args.batch_size, mesh=mesh)
    return lambda texts, instruction: encoder.encode(texts, instruction=instruction, progress=not args.quiet)


def _read(args: argparse.Namespace, family: str):
    from qzhou_jax.synth.runner import read_records

    errors = BadRecords(skip=args.skip_bad_records)
    records = read_records(args.input, family, _fields(args, family), errors, split=args.split)
    errors.warn(args.input, log)
    return records


def _corpus(path: str, field: str, split: str) -> list[str]:
    """Passages of a BEIR folder or a JSONL file; objects with a title read as BEIR's documents
    (`beir.doc_text`), so they match positives read from BEIR folders."""
    from qzhou_jax.data.beir import beir_files, doc_text, load_corpus
    from qzhou_jax.data.jsonl import RecordError, iter_jsonl

    if os.path.isdir(path):
        return [doc_text(d) for d in load_corpus(beir_files(path, split)[0]).values()]
    texts = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, (str, dict)):
            raise RecordError(f"{path}:{lineno}: expected a JSON object with a {field!r} field, or a string")
        value = obj if isinstance(obj, str) else obj.get(field)
        if not isinstance(value, str):
            raise RecordError(f"{path}:{lineno}: field {field!r} "
                              f"{'missing' if value is None and field not in obj else 'must be a string'}")
        title = obj.get("title") if isinstance(obj, dict) else None
        texts.append(doc_text({"title": title, "text": value}) if isinstance(title, str) else value)
    if not texts:
        raise RecordError(f"{path}: no passages")
    return texts


def cmd_mine(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.mine import check_mine_args, mine_negatives

    check_mine_args(tuple(args.ranks), args.num_negatives, args.max_score_ratio)
    check_output_path(args.output, args.overwrite)
    records = _read(args, "retrieval")
    corpus = None
    if args.corpus:
        corpus = _corpus(args.corpus, args.corpus_field, args.split)
    elif os.path.isdir(args.input):  # a BEIR folder: mine from its whole corpus
        corpus = _corpus(args.input, "text", args.split)
    encode = _encode_fn(args)
    out, stats = mine_negatives(records, encode, ranks=tuple(args.ranks), num_negatives=args.num_negatives,
                                corpus=corpus, fill=args.fill, seed=args.seed, max_score_ratio=args.max_score_ratio,
                                instruction=args.instruction, passage_instruction=args.passage_instruction)
    stats["written"] = write_records(args.output, out, overwrite=args.overwrite)
    _report(f"wrote {args.output}", stats)
    return 0


def cmd_score_filter(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.mine import check_filter_args, score_filter

    check_filter_args(args.min_score, args.drop_fraction)
    check_output_path(args.output, args.overwrite)
    records = _read(args, "retrieval")
    out, stats = score_filter(records, _encode_fn(args), min_score=args.min_score, drop_fraction=args.drop_fraction,
                              instruction=args.instruction, passage_instruction=args.passage_instruction)
    stats["written"] = write_records(args.output, out, overwrite=args.overwrite)
    _report(f"wrote {args.output}", stats)
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.filters import Dedup
    from qzhou_jax.synth.runner import iter_records

    if len(args.input) != len(args.output):
        raise ValueError(f"--output: one per --input ({len(args.input)} inputs, {len(args.output)} outputs)")
    outputs = [os.path.realpath(p) for p in args.output]
    if len(set(outputs)) != len(outputs):
        raise ValueError("--output: the same file is named twice")
    for path in args.output:  # an output may be an input: outputs replace files only once all are read
        check_output_path(path, args.overwrite)
    fields = _fields(args, args.task)
    d = Dedup()
    # first pass: every input is read and checked before anything is written, and the positives
    # of every query are collected; the second pass streams each input to its output
    for path in args.input:
        errors = BadRecords(skip=args.skip_bad_records)
        d.scan(iter_records(path, args.task, fields, errors))
        errors.warn(path, log)
    with staged_outputs(args.output, args.overwrite) as tmps:  # every output, or none
        for path, tmp in zip(args.input, tmps):
            write_jsonl(tmp, d.filter(iter_records(path, args.task, fields, BadRecords(skip=True))))
    stats = d.summary()
    for path, s in zip(args.output, stats["datasets"]):
        s["output"] = path
    _report("dedup", stats)
    return 0


def cmd_decontaminate(args: argparse.Namespace) -> int:
    from qzhou_jax.synth.filters import EvalIndex, decontaminated, eval_texts
    from qzhou_jax.synth.runner import iter_records

    check_output_path(args.output, args.overwrite)
    index = EvalIndex(eval_texts(args.against, split=args.against_split), ngram=args.ngram, cjk_ngram=args.cjk_ngram)
    if not index.texts:
        raise ValueError(f"--against {' '.join(args.against)}: no texts found")
    errors = BadRecords(skip=args.skip_bad_records)
    records = iter_records(args.input, args.task, _fields(args, args.task), errors, split=args.split)
    stats: dict[str, Any] = {}
    stats["written"] = write_records(args.output, decontaminated(records, index, stats, workers=args.workers),
                                     overwrite=args.overwrite)
    errors.warn(args.input, log)
    _report(f"wrote {args.output}", stats)
    return 0


def _common(p: argparse.ArgumentParser, task: bool = True) -> None:
    if task:
        p.add_argument("--task", required=True, choices=list(FAMILIES), help="record family of the input")
    p.add_argument("--input", required=True,
                   help="record file (JSONL in the training format), or a BEIR folder (retrieval)")
    p.add_argument("--split", default="train", help="BEIR folders: the qrels split to read (default train)")
    p.add_argument("--output", required=True, help="record file to write (must not exist unless --overwrite)")
    p.add_argument("--fields", nargs="+", action="extend", metavar="OURS=THEIRS",
                   help="field names in the input, e.g. query=anchor pos=positive")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _llm_args(p: argparse.ArgumentParser, tolerance: float) -> None:
    g = p.add_argument_group("LLM endpoint")
    g.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--llm-model", required=True, help="model name the endpoint serves")
    g.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; '' for none)")
    g.add_argument("--temperature", type=non_negative_float, default=0.8)
    g.add_argument("--max-tokens", type=positive_int, default=2048, help="longest answer, in the LLM's tokens")
    g.add_argument("--extra-body", default=None,
                   help="JSON object merged into each request; null removes a field, e.g. "
                        "'{\"max_tokens\": null, \"max_completion_tokens\": 4096}'")
    g.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    g.add_argument("--retries", type=non_negative_int, default=6, help="retries of a failed request (backoff doubles)")
    g.add_argument("--workers", type=positive_int, default=16, help="requests in flight")
    g.add_argument("--max-tries", type=positive_int, default=20, help="answers asked per text before giving up (the recipe: 20)")
    g.add_argument("--max-failures", type=positive_int, default=None,
                   help="failed requests in a row that stop the run (endpoint down; default max(20, 2 x workers))")
    g.add_argument("--length-tolerance", type=non_negative_float, default=tolerance,
                   help=f"allowed length change, a fraction (default {tolerance})")
    g.add_argument("--limit", type=positive_int, default=None, help="only the first N input records (to try prompts)")
    g.add_argument("--resume", action="store_true", help="continue the run recorded in OUTPUT.partial")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding model")
    g.add_argument("--model", required=True, help="model folder (HF safetensors or qzhou-jax Orbax, with tokenizer)")
    g.add_argument("--max-length", type=positive_int, default=512, help="tokens per text (default 512)")
    g.add_argument("--batch-size", type=positive_int, default=64)
    add_model_run_args(g)
    g.add_argument("--instruction", default=None,
                   help="instruction to encode the queries of records without one with (QZhou's "
                        "'Instruct: ...\\nQuery: ...'); the records themselves are written unchanged")
    g.add_argument("--passage-instruction", default=None,
                   help="instruction to encode the passages with: for symmetric data (NLI triplets), the "
                        "dataset's instruction, as training gives both sides (default: none, as asymmetric "
                        "retrieval)")


def add_synth_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `synth` and its commands to a CLI's subparsers."""
    s = subparsers.add_parser("synth", help="LLM synthesis, hard-negative mining, dedup and decontamination",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = s.add_subparsers(dest="synth_command", required=True)

    p = sub.add_parser("paraphrase", help="LLM paraphrases of retrieval pairs, scored pairs or labelled texts")
    _common(p)
    _llm_args(p, 0.15)
    p.set_defaults(func=cmd_paraphrase)

    a = sub.add_parser("augment", help="new (query, positive, hard negative) triplets in each record's field (retrieval "
                                       "data; not NLI triplets, which the recipe paraphrases only)")
    _common(a, task=False)
    _llm_args(a, 0.20)
    a.set_defaults(func=cmd_augment, task="retrieval")

    n = sub.add_parser("negatives", help="LLM-written hard negatives for a share of the records without any")
    _common(n, task=False)
    _llm_args(n, 0.20)
    n.add_argument("--num-negatives", type=int, default=4, help="negatives per chosen record (default 4)")
    n.add_argument("--share", type=float, default=0.3,
                   help="fraction of the records without negatives to write them for (default 0.3, the paper's "
                        "about 30%%); the others are passed through for `synth mine`")
    n.add_argument("--seed", type=int, default=0, help="which records the share picks")
    n.set_defaults(func=cmd_negatives, task="retrieval")

    m = sub.add_parser("mine", help="hard negatives from an embedding model's ranks (the recipe: 10 to 30)")
    _common(m, task=False)
    _model_args(m)
    m.add_argument("--corpus", default=None,
                   help="passages to mine from: a JSONL file (a 'title' field is joined as BEIR does) or a BEIR "
                        "folder (default: a BEIR input's whole corpus, else every positive and negative of the input)")
    m.add_argument("--corpus-field", default="text", help="field of --corpus holding the text (default text)")
    m.add_argument("--ranks", type=int, nargs=2, default=[10, 30], metavar=("FIRST", "LAST"),
                   help="ranks to draw from, 1-based and inclusive, after removing the query's positives")
    m.add_argument("--num-negatives", type=int, default=4)
    m.add_argument("--fill", action="store_true",
                   help="also top up records that have fewer than --num-negatives (default: only records with none)")
    m.add_argument("--max-score-ratio", type=float, default=None,
                   help="drop candidates scoring above this fraction of the positive's score (e.g. 0.95)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_mine, task="retrieval")

    f = sub.add_parser("score-filter", help="drop (query, positive) pairs an embedding model scores low")
    _common(f, task=False)
    _model_args(f)
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--min-score", type=float, default=None, help="drop positives below this cosine")
    g.add_argument("--drop-fraction", type=float, default=None, help="drop this fraction of lowest-scoring records")
    f.set_defaults(func=cmd_score_filter, task="retrieval")

    d = sub.add_parser("dedup", help="drop records seen before, across all the files given, in order")
    d.add_argument("--task", required=True, choices=list(FAMILIES))
    d.add_argument("--input", required=True, nargs="+", help="record files, in priority order")
    d.add_argument("--output", required=True, nargs="+", help="one output per input, same order")
    d.add_argument("--fields", nargs="+", action="extend", metavar="OURS=THEIRS")
    d.add_argument("--skip-bad-records", action="store_true")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_dedup)

    c = sub.add_parser("decontaminate", help="drop records that overlap evaluation data")
    _common(c)
    c.add_argument("--against", required=True, nargs="+",
                   help="evaluation JSONL files (every string in them), BEIR folders (the --against-split "
                        "queries and their relevant documents) or other folders (every .jsonl below them)")
    c.add_argument("--against-split", default="test", help="qrels split of BEIR folders in --against (default test)")
    c.add_argument("--ngram", type=int, default=13, help="shared run length in words (default 13)")
    c.add_argument("--cjk-ngram", type=int, default=26,
                   help="shared run length in characters for Chinese, Japanese, Korean text (default 26)")
    c.add_argument("--workers", type=int, default=1,
                   help="processes checking records (default 1; the input is streamed, memory stays flat)")
    c.set_defaults(func=cmd_decontaminate)
    return s
