"""Input pipeline throughput on CPU: can the data loader feed the train step?

    python bench/input_pipeline.py                       # default: workers 0,2,4 (0,2 on <= 2 cores)
    python bench/input_pipeline.py --quick               # fewer batches, workers 0 and 2, no profile
    python bench/input_pipeline.py --workers 0,2,4       # what bench/RESULTS.md records (2-core VM, ~4 min)
    python bench/input_pipeline.py --batches 12 --workers 0,4,8,16   # a bigger host
    python bench/input_pipeline.py --tokenizer /models/Qwen2.5-7B   # a real tokenizer folder

Measures `TrainData.iterator` as the train loop uses it (a RunConfig from
`load_run_config`, `TrainData.from_config`, a Tokenizer with the loop's max_length), on
input JSONL written to a temporary folder:
- retrieval at the paper's shapes: 256 queries per global batch, each with 1 positive and
  4 hard negatives (drawn from 7 per record), query 256 / passage 1536 tokens; passages
  fill most of 1536 tokens (0.7-1.1 x, so some are truncated), queries 24-256 tokens
  plus an instruction prompt;
- CoSENT pair batches: 768 pairs (DataConfig.pair_batch_size), both sides padded to
  --pair-len (default 256).
Texts come from the SciFact corpus and queries (retrieval) and STS-B (pairs) in
../shared/data when that folder exists, else from the bundled demo data; passages are
abstracts concatenated to length. Nothing is written outside the temporary folder.

Each configuration (grain `workers` = 0: threads only; 2, 4: worker processes) runs a
fresh iterator, one host (process_count = 1, the whole global batch). grain builds
max(1, workers) x prefetch batches at a time (a wave); one wave warms up (worker
start-up included) and is not timed, then `--batches` rounded up to whole waves are
timed (the consumer takes batches as fast as they come). Tokens: padded =
the arrays the train step receives (rows x fixed length, what bench/train_step.py
counts), real = mask ones. Records = texts (queries + passages; both sides of a pair).

The consumption side: the train step's tokens/s per chip from bench/RESULTS.md ("Train
step" section, qzhou-jax rows, one H100), times chips per host (8 GPUs, or 4 TPU chips
per TPU VM host), against the best measured pipeline rate. CPU cores a host needs =
host tokens/s x CPU seconds per padded token (CPU time of this process and its grain
workers over the timed batches; the least of the configurations, as the least disturbed
by other processes).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import re
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qzhou_jax.tokenizer import ASSETS, DEMO_TOKENIZER  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
DEMO = os.path.join(ASSETS, "demo")
RET_INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"
STS_INSTRUCTION = "Retrieve semantically similar text"
# bench/RESULTS.md as of this script; used when the file cannot be parsed.
FALLBACK_TRAIN = {"0.5b, 32 x (1+1+3) x 256": 167_289, "1.5b, 16 x (1+1+3) x 256": 54_854,
                  "1.5b, 256 x (1+1+4) x 512": 47_370}
FALLBACK_ENCODE_7B = 46_864


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# --------------------------------------------------------------------------- texts
def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def text_sources(data_dir: str | None) -> tuple[str, list[str], list[str], list[tuple[str, str, float]]]:
    """(where from, passage pieces, query pieces, sts pairs)."""
    if data_dir:
        corpus = os.path.join(data_dir, "retrieval", "scifact_beir", "corpus.jsonl")
        queries = os.path.join(data_dir, "retrieval", "scifact_beir", "queries.jsonl")
        sts = os.path.join(data_dir, "sts", "stsb_en", "train.jsonl")
        if all(os.path.isfile(p) for p in (corpus, queries, sts)):
            docs = [f"{d.get('title', '')}. {d['text']}".strip() for d in read_jsonl(corpus) if d.get("text")]
            qs = [d["text"] for d in read_jsonl(queries)]
            pairs = [(d["sentence1"], d["sentence2"], float(d["score"])) for d in read_jsonl(sts)]
            return (f"{data_dir}: SciFact corpus abstracts ({len(docs)}) and queries ({len(qs)}), "
                    f"STS-B en train ({len(pairs)} pairs)"), docs, qs, pairs
    ret = read_jsonl(os.path.join(DEMO, "retrieval_train.jsonl"))
    docs = sorted({t for r in ret for t in list(r["pos"]) + list(r.get("neg", []))})
    qs = [r["query"] for r in ret]
    pairs = [(d["text1"], d["text2"], float(d["score"])) for d in read_jsonl(os.path.join(DEMO, "sts_train.jsonl"))]
    return (f"bundled demo data ({DEMO}, no shared data folder): {len(docs)} short passages concatenated, "
            f"{len(qs)} queries, {len(pairs)} pairs"), docs, qs, pairs


def chars_per_token(tok, texts: list[str]) -> float:
    ids = tok.hf(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, texts)) / max(1, sum(map(len, ids)))


def compose(pieces: list[str], n_chars: int, rng: np.random.Generator) -> str:
    """Consecutive pieces from a random start, joined, cut near n_chars at a space."""
    i, parts, size = int(rng.integers(len(pieces))), [], 0
    while size < n_chars:
        parts.append(pieces[i % len(pieces)])
        size += len(parts[-1]) + 1
        i += 1
    text = " ".join(parts)
    cut = text.rfind(" ", 0, n_chars)
    return text[:cut if cut > n_chars // 2 else n_chars]


def write_inputs(folder: str, tok, args, rng: np.random.Generator) -> dict:
    where, docs, qs, pairs = text_sources(args.data_dir)
    sample = [docs[int(i)] for i in rng.choice(len(docs), min(300, len(docs)), replace=False)]
    cpt = chars_per_token(tok, sample)
    qcpt = chars_per_token(tok, qs[:300])
    ret_path = os.path.join(folder, "retrieval.jsonl")
    negs = args.hard_negatives + 3
    # the sampler wants at least 4 batches of records per dataset
    n_records = max(args.records, 4 * args.queries)
    with open(ret_path, "w", encoding="utf-8") as f:
        for _ in range(n_records):
            q_tokens = rng.integers(24, args.query_len + 1)
            passages = [compose(docs, int(rng.uniform(0.7, 1.1) * args.passage_len * cpt), rng)
                        for _ in range(1 + negs)]
            rec = {"query": compose(qs, int(q_tokens * qcpt), rng), "pos": passages[:1], "neg": passages[1:]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    sts_path = os.path.join(folder, "pairs.jsonl")
    n_pairs = max(len(pairs), 4 * args.pairs)  # repeated when there are too few
    with open(sts_path, "w", encoding="utf-8") as f:
        for k in range(n_pairs):
            t1, t2, s = pairs[k % len(pairs)]
            f.write(json.dumps({"text1": t1, "text2": t2, "score": s}, ensure_ascii=False) + "\n")
    return {"where": where, "retrieval": ret_path, "sts": sts_path, "chars_per_token": cpt,
            "negatives_per_record": negs, "records": n_records, "pairs": n_pairs,
            "mib": (os.path.getsize(ret_path) + os.path.getsize(sts_path)) / 2**20}


# ------------------------------------------------------------------------ pipeline
def cpu_snapshot() -> tuple[float, dict[int, float]] | None:
    """CPU time (user + system) of this process, and of each live child process (grain workers)
    by pid; None when there are children and psutil is missing to read them."""
    import multiprocessing

    own = time.process_time()
    try:
        import psutil
    except ImportError:
        return None if multiprocessing.active_children() else (own, {})
    children = {}
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            children[child.pid] = t.user + t.system
        except psutil.Error:
            pass
    return own, children


def cpu_between(start, end) -> float | None:
    """CPU seconds spent between two snapshots by this process and the children alive at the end
    (a child started in between counts from zero)."""
    if start is None or end is None:
        return None
    return end[0] - start[0] + sum(t - start[1].get(pid, 0.0) for pid, t in end[1].items())


def run_config(task: str, path: str, args, workers: int, total_steps: int):
    from qzhou_jax.train.config import load_run_config

    ds = {"name": f"bench-{task}", "task": task, "path": path}
    if task == "retrieval":
        ds["instruction"] = RET_INSTRUCTION
    else:
        ds.update(instruction=STS_INSTRUCTION, query_max_length=args.pair_len, passage_max_length=args.pair_len)
    data = {"batch_size": args.queries, "pair_batch_size": args.pairs, "hard_negatives": args.hard_negatives,
            "query_max_length": args.query_len, "passage_max_length": args.passage_len,
            "workers": workers, "prefetch": args.prefetch, "datasets": [ds]}
    return load_run_config(data={"out_dir": os.path.join(os.path.dirname(path), "run"), "model": {"preset": "tiny"},
                                 "train": {"warmup_steps": 0, "total_steps": total_steps}, "data": data})


def make_data(task: str, path: str, args, workers: int, total_steps: int):
    from qzhou_jax.data.pipeline import HostRows, TrainData
    from qzhou_jax.tokenizer import Tokenizer

    cfg = run_config(task, path, args, workers, total_steps)
    # as the train loop builds it: max_length = the longest configured side
    max_len = max(max(r["query_max_length"], r["passage_max_length"])
                  for r in map(cfg.data.resolved, cfg.data.datasets))
    tok = Tokenizer(args.tokenizer, max_length=max_len)
    return TrainData.from_config(cfg, tok, HostRows.of_process(0, 1))


def measure(task: str, path: str, args, workers: int) -> dict:
    # grain builds max(1, workers) x prefetch batches at once (per process: `prefetch` threads), and
    # they finish together: a "wave". Warm up with one wave (worker start-up, batches built while the
    # workers start), then time whole waves, so the window starts and ends at the same phase.
    wave = max(1, workers) * max(1, args.prefetch)
    warmup = wave
    batches = -(-args.batches // wave) * wave
    data = make_data(task, path, args, workers, warmup + batches)
    t0 = time.perf_counter()
    it = data.iterator(0)
    try:
        for _ in range(warmup):
            item = next(it)
        first = time.perf_counter() - t0
        cpu0, t1 = cpu_snapshot(), time.perf_counter()
        rows = padded = real = 0
        for _ in range(batches):
            b = next(it).batch
            rows += len(b["q_ids"]) + len(b["p_ids"])
            padded += b["q_ids"].size + b["p_ids"].size
            real += int(b["q_mask"].sum()) + int(b["p_mask"].sum())
        dt, cpu1 = time.perf_counter() - t1, cpu_snapshot()
        cpu = cpu_between(cpu0, cpu1)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
        del it
        gc.collect()
    shapes = {k: tuple(v.shape) for k, v in item.batch.items() if k.endswith("_ids")}
    return {"task": task, "workers": workers, "warmup": warmup, "first_s": first, "batches": batches,
            "s": dt, "cpu_s": cpu, "rows": rows, "padded": padded, "real": real, "shapes": shapes}


def profile_build(path: str, args, batches: int) -> list[tuple[str, float]]:
    """cProfile of `batches` retrieval batches built in this process (no grain): seconds per batch by stage."""
    data = make_data("retrieval", path, args, 0, batches + 1)
    data[0]  # warm: file handle, tokenizer caches
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for s in range(1, batches + 1):
        data[s]
    prof.disable()
    wall = (time.perf_counter() - t0) / batches
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def cum(name: str, file_part: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if n == name and file_part in f) / batches

    stages = [
        ("Tokenizer.encode (all of it)", cum("encode", "qzhou_jax/tokenizer.py")),
        ("  of which the Rust tokenizer (encode_batch)", sum(
            v[3] for (f, _, n), v in stats.items() if "encode_batch" in n and f == "~") / batches),
        ("Tokenizer.pad", cum("pad", "qzhou_jax/tokenizer.py")),
        ("records: read + JSON + parse (JsonlSource.__getitem__)", cum("__getitem__", "qzhou_jax/data/sources.py")),
        ("  of which json.loads", cum("decode_json_line", "qzhou_jax/data/records.py")),
        ("  of which pread", cum("_read", "qzhou_jax/data/sources.py")),
        ("sampling (row_rng, choices)", cum("row_rng", "qzhou_jax/data/sampler.py")),
        ("BatchBuilder._texts (records -> texts, all)", cum("_texts", "qzhou_jax/data/batches.py")),
        ("whole batch (TrainData.__getitem__, profiled)", cum("__getitem__", "qzhou_jax/data/pipeline.py")),
        ("whole batch, wall under the profiler", wall),
    ]
    return stages


# --------------------------------------------------------------------- consumption
def parse_results(path: str) -> tuple[dict[str, float], float | None, str]:
    """Best qzhou-jax tokens/s per workload of RESULTS.md's 'Train step' section, and the 7b cuDNN
    encoding tokens/s of its 'Encoding' section."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        return dict(FALLBACK_TRAIN), FALLBACK_ENCODE_7B, "hard-coded (bench/RESULTS.md not readable)"
    sections = {m.group(1).strip(): m.start() for m in re.finditer(r"^## (.+)$", text, re.M)}
    starts = sorted(sections.values()) + [len(text)]

    def section(prefix: str) -> str:
        for name, s in sections.items():
            if name.startswith(prefix):
                return text[s:starts[starts.index(s) + 1]]
        return ""

    train: dict[str, float] = {}
    for line in section("Train step").splitlines():
        # rows "| <size>b, <workload> | <qzhou-jax setting> | <tokens/s> | ...": the best per workload,
        # whatever the setting (PyTorch rows left out)
        cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.match(r"\d+(\.\d+)?b, ", cells[0]) and "PyTorch" not in cells[1]:
            workload = cells[0].split(", GradCache")[0]
            try:
                train[workload] = max(train.get(workload, 0.0), float(cells[2].replace(",", "")))
            except ValueError:
                pass
    enc7b = None
    block = section("Encoding")
    at = block.find("--preset qwen2.5-7b")
    for line in block[at:].splitlines() if at >= 0 else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("qzhou-jax, cuDNN"):
            enc7b = float(cells[1].replace(",", ""))
            break
    if not train:
        return dict(FALLBACK_TRAIN), FALLBACK_ENCODE_7B, "hard-coded (no train-step rows found in bench/RESULTS.md)"
    return train, enc7b, "bench/RESULTS.md, section 'Train step' (qzhou-jax rows, best per workload, one H100)"


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled demo tokenizer)")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    help="shared data folder to compose texts from (default ../shared/data; demo data if absent)")
    ap.add_argument("--batches", type=int, default=None, help="timed retrieval batches per configuration, "
                    "rounded up to whole waves (default 4, --quick 2); pair batches: 2x as many")
    ap.add_argument("--workers", default=None, help="comma-separated grain worker counts (default 0,2,4; "
                    "0,2 on a machine with 2 cores or fewer)")
    ap.add_argument("--quick", action="store_true", help="2 timed batches, workers 0,2, no profile")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    ap.add_argument("--tasks", default="retrieval,sts")
    ap.add_argument("--records", type=int, default=1024, help="retrieval records written (each 1 pos + 7 neg; "
                    "at least 4 batches)")
    ap.add_argument("--queries", type=int, default=256, help="queries per global batch")
    ap.add_argument("--hard-negatives", type=int, default=4)
    ap.add_argument("--query-len", type=int, default=256)
    ap.add_argument("--passage-len", type=int, default=1536)
    ap.add_argument("--pairs", type=int, default=768, help="pairs per CoSENT global batch")
    ap.add_argument("--pair-len", type=int, default=256, help="padded length of both sides of a pair")
    ap.add_argument("--prefetch", type=int, default=2, help="data.prefetch (grain threads / buffer)")
    ap.add_argument("--gpus-per-host", type=int, default=8)
    ap.add_argument("--tpu-chips-per-host", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary input folder")
    args = ap.parse_args()
    batches = args.batches or (2 if args.quick else 4)
    few_cores = (os.cpu_count() or 1) <= 2
    workers = [int(w) for w in (args.workers or ("0,2" if args.quick or few_cores else "0,2,4")).split(",")]
    tasks = args.tasks.split(",")
    if args.data_dir and not os.path.isdir(args.data_dir):
        args.data_dir = None

    demo_tok = args.tokenizer is None
    args.tokenizer = args.tokenizer or DEMO_TOKENIZER
    from qzhou_jax.tokenizer import Tokenizer

    t_start = time.perf_counter()
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count() = {os.cpu_count()}, usable cores = {len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}")
    if os.cpu_count() and os.cpu_count() <= 4:
        print(f"note: only {os.cpu_count()} CPU cores here (the development VM has 2, shared); a training host has "
              "tens to hundreds, and grain workers scale with them")
    tok = Tokenizer(args.tokenizer, max_length=args.passage_len)
    print(f"tokenizer: {args.tokenizer} ({len(tok)} tokens)")
    if demo_tok:
        print("caveat: the bundled demo tokenizer (byte-level BPE, 2,000-token vocabulary), not Qwen2.5's "
              "(151k; not available offline). Per token it sees fewer characters than Qwen2.5 (about half on "
              "English), so its per-token cost differs; rerun with --tokenizer <Qwen2.5 folder> for the real "
              "figure.")
    folder = tempfile.mkdtemp(prefix="qzb-input-")
    try:
        rng = np.random.default_rng(0)
        inputs = write_inputs(folder, tok, args, rng)
        print(f"texts: {inputs['where']}")
        print(f"input: {folder}: {inputs['records']} retrieval records (1 pos + {inputs['negatives_per_record']} neg, "
              f"passages 0.7-1.1 x {args.passage_len} tokens at {inputs['chars_per_token']:.2f} chars/token, "
              f"queries 24-{args.query_len} tokens), {inputs['pairs']} pairs; {inputs['mib']:.0f} MiB")
        print(f"shapes: retrieval {args.queries} x (1 + {args.hard_negatives}) -> q [{args.queries}, {args.query_len}]"
              f", p [{args.queries * (1 + args.hard_negatives)}, {args.passage_len}]; pairs "
              f"[{args.pairs}, {args.pair_len}] x 2; prefetch {args.prefetch}; one host (process_count = 1)")

        results = []
        for task in tasks:
            for w in workers:
                a = argparse.Namespace(**vars(args))
                a.batches = batches if task == "retrieval" else 2 * batches
                r = measure(task, inputs[task], a, w)
                results.append(r)
                print(f"  {task:9s} workers={w}: {r['batches']} batches in {r['s']:.1f} s "
                      f"(first {r['warmup']} in {r['first_s']:.1f} s)", flush=True)

        print()
        header = ["task", "workers", "timed batches", "s/batch", "batches/s", "records/s (q + p)",
                  "padded tok/s", "real tok/s", "real/padded", "CPU-s/batch", "warm-up s"]
        lines = [row(header), row(["---"] * len(header))]
        for r in results:
            lines.append(row([r["task"], r["workers"], r["batches"], f"{r['s'] / r['batches']:.2f}",
                              f"{r['batches'] / r['s']:.2f}", f"{r['rows'] / r['s']:,.0f}",
                              f"{r['padded'] / r['s']:,.0f}", f"{r['real'] / r['s']:,.0f}",
                              f"{r['real'] / r['padded']:.2f}",
                              f"{r['cpu_s'] / r['batches']:.2f}" if r["cpu_s"] is not None else "-",
                              f"{r['first_s']:.1f}"]))
        print("\n".join(lines))

        # ----------------------------------------------------------- consumption
        train, enc7b, cited = parse_results(RESULTS)
        consumers = [(f"train step {k}", v) for k, v in train.items()]
        if enc7b:
            consumers.append(("7b train step, estimate: encoding 7b cuDNN / 3 (no 7b train figure)", enc7b / 3))
        best = {t: max((r for r in results if r["task"] == t), key=lambda r: r["padded"] / r["s"]) for t in tasks}
        # the least disturbed CPU measurement per task (CPU time per batch also grows when other
        # processes share the cores)
        base = {t: min((r for r in results if r["task"] == t and r["cpu_s"]),
                       key=lambda r: r["cpu_s"] / r["padded"], default=None) for t in tasks}
        print(f"\nconsumption: {cited}; per host = per chip x {args.gpus_per_host} GPUs, or x "
              f"{args.tpu_chips_per_host} TPU chips (H100 per-chip figures as a stand-in)")
        for t in tasks:
            r = best[t]
            line = f"best pipeline here, {t}: workers={r['workers']}, {r['padded'] / r['s']:,.0f} padded tok/s"
            if base[t]:
                line += (f"; per CPU-second (least CPU-s/batch, workers={base[t]['workers']}): "
                         f"{base[t]['padded'] / base[t]['cpu_s']:,.0f} padded tok, "
                         f"{base[t]['real'] / base[t]['cpu_s']:,.0f} real tok")
            print(line)
        g, c = args.gpus_per_host, args.tpu_chips_per_host
        header = ["consumer", "tok/s per chip", f"{g}-GPU host tok/s"]
        for t in tasks:
            header += [f"{t}: ratio ({g} GPUs)", f"{t}: ratio ({c} chips)"]
        header += [f"cores needed, {t} ({g} GPUs)" for t in tasks if base[t]]
        lines2 = [row(header), row(["---"] * len(header))]
        for name, per_chip in consumers:
            cells = [name, f"{per_chip:,.0f}", f"{per_chip * g:,.0f}"]
            for t in tasks:
                rate = best[t]["padded"] / best[t]["s"]
                for chips in (g, c):
                    ratio = rate / (per_chip * chips)
                    cells.append(f"{ratio:.2f} ({'outruns' if ratio >= 1 else 'too slow'})")
            for t in tasks:
                if base[t]:
                    cpu_per_tok = base[t]["cpu_s"] / base[t]["padded"]
                    cells.append(f"{per_chip * g * cpu_per_tok:.1f}")
            lines2.append(row(cells))
        print("\n".join(lines2))
        print("ratio = best pipeline padded tok/s on this machine / consumer padded tok/s per host; cores needed = "
              "host tok/s x the least CPU-s per padded token measured (all processes; assumes linear scaling "
              "over worker processes). "
              "On a pod each host builds only its 1/process_count share of every global batch, so a host's demand "
              "is its own chips' consumption whatever the pod size: the per-host columns apply to every host. "
              "The train-step figures are at 256-512 tokens; at 1536-token passages a chip consumes fewer tokens/s "
              "(attention grows with length), so the ratios are conservative.")
        slow = [name for name, per_chip in consumers
                if "retrieval" in tasks and best["retrieval"]["padded"] / best["retrieval"]["s"] < per_chip * g]
        print(f"verdict on this machine: the retrieval pipeline is slower than {len(slow)} of {len(consumers)} "
              f"{g}-GPU-host consumers" + (f" ({'; '.join(slow)})" if slow else ""))

        if not (args.quick or args.no_profile) and "retrieval" in tasks:
            print("\nwhere the time goes (cProfile, retrieval batches built in this process, no grain):")
            stages = profile_build(inputs["retrieval"], args, 1)
            whole = stages[-2][1]
            print(row(["stage", "s/batch", "share"]))
            print(row(["---"] * 3))
            for name, s in stages:
                print(row([name, f"{s:.3f}", f"{s / whole:.0%}" if whole else "-"]))
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f} "
              f"(other processes on this machine slow the wall-clock rates, and inflate CPU-s/batch too)")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
