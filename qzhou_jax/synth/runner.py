"""Running a synthesis job over a record file: concurrent LLM calls, retries, resume.

Each selected record gets up to ``max_tries`` LLM answers per text it needs (the recipe: at most 20);
a rejected answer's reason goes into the next prompt. Answers are checked by the job, then
against every text seen so far (the input's and those already accepted), so no duplicate is ever
written.

Progress goes to ``OUTPUT.partial`` as each record finishes (one JSON line per record, after a
header naming the job, its options and the input's SHA-256). A run that stops (the endpoint gave up,
Ctrl-C, a crash) keeps that file; ``resume=True`` continues it, refusing a partial file written by
a different job or an input with other contents. The output itself is written only at the end, in input
order, under a temporary name renamed when complete; the partial file is then removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterator, Mapping

from qzhou_jax.data.records import (BadRecords, PairRecord, Record, RetrievalRecord, check_output_path, iter_rows,
                                    parse_record, write_records)
from qzhou_jax.synth import checks
from qzhou_jax.synth.jobs import Job, parse_reply
from qzhou_jax.synth.llm import LLM, LLMError

__all__ = ["SynthesisStopped", "iter_records", "read_records", "synthesize", "share_selector", "record_texts", "file_sha256"]

log = logging.getLogger(__name__)
HEADER_KEY = "qzhou_jax_synth"
_PERCENT = re.compile(r"\d+(\.\d+)?%")


class SynthesisStopped(RuntimeError):
    """A run stopped part way (the endpoint is down, Ctrl-C, a bug); its progress file is kept for
    --resume. ``interrupted`` is True for Ctrl-C."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


def iter_records(path: str, family: str, fields: Mapping[str, str] | None = None,
                 errors: BadRecords | None = None, split: str = "train") -> Iterator[Record]:
    """The records of a JSONL record file (our format, or ``fields`` mapping our names to the file's),
    or of a BEIR folder (retrieval: one record per query with its relevant documents, for ``split``),
    one at a time; raises at the end when there were none."""
    if os.path.isdir(path):
        from qzhou_jax.data.beir import BeirSource

        if family != "retrieval":
            raise ValueError(f"{path}: a folder is read as BEIR, which holds retrieval data, not {family}")
        if fields:
            raise ValueError(f"{path}: --fields does not apply to BEIR folders")
        source = BeirSource(path, split=split)
        for i in range(len(source)):
            yield source[i]
        return
    errors = errors or BadRecords()
    n = 0
    for where, obj in iter_rows(path, errors):
        try:
            record = parse_record(obj, family, fields, where)
        except ValueError as e:
            errors.handle(e)
            continue
        n += 1
        yield record
    if not n:
        raise ValueError(f"{path}: no {family} records")


def read_records(path: str, family: str, fields: Mapping[str, str] | None = None,
                 errors: BadRecords | None = None, split: str = "train") -> list[Record]:
    """Every record of ``path`` (see ``iter_records``), as a list."""
    return list(iter_records(path, family, fields, errors, split))


def record_texts(record: Record) -> tuple[str, ...]:
    if isinstance(record, RetrievalRecord):
        return (record.query, *record.pos, *record.neg)
    if isinstance(record, PairRecord):
        return (record.text1, record.text2)
    return (record.text,)


def file_sha256(path: str, split: str = "train") -> str:
    """SHA-256 of a file, or of the files a BEIR folder's ``split`` reads (corpus, queries, qrels)."""
    h = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        from qzhou_jax.data.beir import beir_files

        files = list(beir_files(path, split))
    for name in files:
        if name != path:
            h.update(os.path.relpath(name, path).encode("utf-8") + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def share_selector(share: float, seed: int = 0):
    """A stable choice of about ``share`` of the records without negatives (by a hash of the query
    and first positive, so reruns and resumes choose the same ones)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--share: expected a fraction in [0, 1], got {share}")

    def select(record: RetrievalRecord) -> bool:
        if record.neg:
            return False
        digest = hashlib.blake2b(f"{seed}\x00{record.query}\x00{record.pos[0]}".encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0 ** 64 < share

    return select


def _read_partial(path: str, header: dict) -> dict[int, dict]:
    """Finished records of an earlier run; refuses a partial file from another job or input."""
    header = json.loads(json.dumps(header))  # tuples read back as lists
    lines = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    try:
        old = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError, IndexError):
        old = None
    if not isinstance(old, dict) or HEADER_KEY not in old:
        raise ValueError(f"{path}: not a qzhou-jax synthesis progress file (delete it to start over)")
    changed = [k for k in header if k not in ("max_tries", "input") and old.get(k) != header[k]
               and (k != "llm" or k in old)]  # files written before "llm" was recorded
    if changed:
        what = ", ".join(f"{k}: {old.get(k)!r} now {header[k]!r}" for k in changed)
        raise ValueError(f"{path}: written by a different run ({what}); "
                         f"delete it to start over, or rerun with the same input and options")
    done: dict[int, dict] = {}
    body = [line for line in lines[1:] if line.strip()]
    for n, line in enumerate(body):
        try:
            item = json.loads(line)
            done[int(item["i"])] = item
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            if n == len(body) - 1:  # the line being written when the run stopped
                log.warning("%s: dropping a half-written last line", path)
                continue
            raise ValueError(f"{path}:{n + 2}: unreadable progress line (delete the file to start over)") from None
    return done


def _write_partial_header(path: str, header: dict, done: Mapping[int, dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
            for i in sorted(done):
                f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Seen:
    """Normalized texts already present; claims new ones atomically."""

    def __init__(self):
        self.keys: set[str] = set()
        self.lock = threading.Lock()

    def add_all(self, texts) -> None:
        self.keys.update(checks.normalize(t) for t in texts)

    def claim(self, texts) -> bool:
        keys = [checks.normalize(t) for t in texts]
        with self.lock:
            if any(k in self.keys for k in keys):
                return False
            self.keys.update(keys)
            return True


_ANSWERED_KINDS = ("answer without content", "answer is not JSON")


class _Run:
    """What the worker threads share: the stop flag, and the count of failed requests in a row."""

    def __init__(self, max_failures: int):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures = 0
        self.failing: set[int] = set()  # the records those failures came from
        self.max_failures = max_failures

    def ask(self, llm: LLM, messages, record: int = -1) -> tuple[str | None, str | None]:
        """The LLM's answer, or (None, reason) for a failed request that only this record's try
        pays for (a prompt over the context length, an empty answer). Too many in a row (from more
        than one record when the server answered: one prompt refused at every try is that record's
        problem), or an error no other prompt can avoid (the endpoint down, a bad key or model), stop the run."""
        if self.stop.is_set():
            raise _Cancelled()
        try:
            answer = llm(messages)
        except LLMError as e:
            if self.stop.is_set():
                raise _Cancelled() from None
            with self.lock:
                self.failures += 1
                self.failing.add(record)
                # a server that answered (HTTP 4xx, an empty answer) refused one prompt: that alone
                # is no sign of an endpoint down, however often the same record repeats it
                answered = e.kind.startswith("HTTP ") or e.kind in _ANSWERED_KINDS
                too_many = self.failures >= self.max_failures and (len(self.failing) > 1 or not answered)
            if e.fatal or too_many:
                self.stop.set()
                if too_many and not e.fatal:
                    raise LLMError(f"{self.failures} requests in a row failed; the last: {e}", fatal=True) from None
                raise
            return None, f"request failed: {e.kind}"
        with self.lock:
            self.failures = 0
            self.failing.clear()
        return answer, None


class _Cancelled(Exception):
    """A worker noticed the run is stopping."""


def _work(job: Job, record: Record, i: int, llm: LLM, seen: _Seen, max_tries: int, run: _Run) -> dict:
    accepted: list[dict[str, str]] = []
    reasons: Counter = Counter()
    tries = 0
    for k in range(job.count(record)):
        feedback = None
        for attempt in range(max_tries):
            tries += 1
            answer, reason = run.ask(llm, job.messages(record, k, attempt, feedback), i)
            reply = None
            if answer is not None:
                reply, reason = parse_reply(answer, job.keys)
            if reply is not None:
                reason = job.check(record, reply, accepted)
                if reason is None and not seen.claim(reply.values()):
                    reason = "duplicates a text already in the data"
            if reason is None:
                accepted.append(reply)
                break
            reasons[_PERCENT.sub("N%", reason.split(" (")[0])] += 1
            if answer is not None:  # a failed request is no answer to correct: the feedback stays
                feedback = reason
    return {"i": i, "accepted": accepted, "wanted": job.count(record), "tries": tries, "reasons": dict(reasons)}


def synthesize(job: Job, input_path: str, output: str, llm: LLM, *, fields: Mapping[str, str] | None = None,
               max_tries: int = 20, workers: int = 8, resume: bool = False, overwrite: bool = False,
               limit: int | None = None, skip_bad_records: bool = False, progress: bool = False,
               max_failures: int | None = None, split: str = "train") -> dict[str, Any]:
    """Run ``job`` over the records of ``input_path``; write the result to ``output``. Returns counts.

    A request that fails for its prompt alone costs that try; ``max_failures`` of them in a row
    (default max(20, 2 x workers)) stop the run, as does any error the LLM client calls fatal."""
    if max_tries < 1 or workers < 1:
        raise ValueError(f"--max-tries and --workers must be at least 1, got {max_tries} and {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: expected a positive count, got {limit}")
    output = check_output_path(output, overwrite)
    errors = BadRecords(skip=skip_bad_records)
    records = read_records(input_path, job.family, fields, errors, split=split)
    errors.warn(input_path, log)
    if limit is not None:
        records = records[:limit]
    header = {HEADER_KEY: 1, "job": job.name, "task": job.family, "options": job.options(),
              "input": os.path.abspath(input_path), "input_sha256": file_sha256(input_path, split),
              "fields": dict(fields or {}), "split": split, "limit": limit, "max_tries": max_tries}
    settings = getattr(llm, "settings", None)
    if callable(settings):  # the model and sampling settings (not the URL: a server may move)
        header["llm"] = settings()
    partial = output + ".partial"
    done: dict[int, dict] = {}
    if os.path.exists(partial):
        if not resume:
            raise ValueError(f"{partial}: an earlier run stopped here; pass --resume to continue it, "
                             f"or delete it to start over")
        done = _read_partial(partial, header)
        log.info("resuming: %d records already done", len(done))
    _write_partial_header(partial, header, done)

    seen = _Seen()
    for r in records:
        seen.add_all(record_texts(r))
    for item in done.values():
        for reply in item["accepted"]:
            seen.add_all(reply.values())
    todo = [i for i, r in enumerate(records) if job.count(r) > 0 and i not in done]
    total = len(todo) + len(done)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=len(done), unit="record", file=sys.stderr, desc=job.name)
    t0 = time.perf_counter()
    run = _Run(max_failures=max_failures or max(20, 2 * workers))
    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    for i in todo:
        tasks.put(i)

    def worker() -> None:
        while not run.stop.is_set():
            try:
                i = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((_work(job, records[i], i, llm, seen, max_tries, run), None))
            except BaseException as e:  # noqa: BLE001  (handed to the main thread)
                results.put((None, e))

    # daemon threads: a stopping run never waits for a request in flight
    threads = [threading.Thread(target=worker, daemon=True, name=f"synth-{n}")
               for n in range(min(workers, len(todo)))]
    with open(partial, "a", encoding="utf-8") as f:

        def keep(item: dict) -> None:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            f.flush()
            done[item["i"]] = item
            if bar is not None:
                bar.update(1)

        try:
            for t in threads:
                t.start()
            for _ in range(len(todo)):
                item, error = results.get()
                if error is not None and not isinstance(error, _Cancelled):
                    raise error
                if item is not None:
                    keep(item)
        except BaseException as e:
            run.stop.set()  # running records stop at their next try; queued ones never start
            cancel = getattr(llm, "cancel", None)
            if callable(cancel):
                cancel()
            while True:  # records that finished meanwhile are kept too
                try:
                    item, _ = results.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    keep(item)
            if bar is not None:
                bar.close()
            if done:
                msg = (f"stopped with {len(done)} of {total} records done; their answers are kept in {partial}: "
                       f"rerun with --resume to continue")
            else:  # nothing to keep (a wrong --llm-url, a bad key): the corrected command runs as it is
                f.close()
                os.remove(partial)
                msg = f"stopped with none of {total} records done"
            if isinstance(e, KeyboardInterrupt):
                raise SynthesisStopped(f"interrupted\n{msg}", interrupted=True) from None
            if isinstance(e, Exception):
                raise SynthesisStopped(f"{e}\n{msg}") from e
            log.warning(msg)
            raise
    if bar is not None:
        bar.close()

    out: list[Record] = []
    reasons: Counter = Counter()
    stats = {"input_records": len(records), "selected": total, "accepted": 0, "wanted": 0, "tries": 0,
             "records_without_any": 0}
    for i, r in enumerate(records):
        item = done.get(i)
        if item is None:
            if job.passes_through:
                out.append(r)
            continue
        stats["accepted"] += len(item["accepted"])
        stats["wanted"] += item["wanted"]
        stats["tries"] += item["tries"]
        stats["records_without_any"] += not item["accepted"]
        reasons.update(item["reasons"])
        out.extend(job.build(r, item["accepted"]))
    stats["written"] = write_records(output, out, overwrite=overwrite)
    stats["rejections"] = dict(reasons.most_common())
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    os.remove(partial)
    return stats

