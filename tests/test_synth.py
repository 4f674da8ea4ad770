"""LLM synthesis (checks, prompts, the runner's retries, dedup and resume, the HTTP client),
hard-negative mining, score filtering, dedup and decontamination, and the `synth` commands."""

import http.server
import json
import os
import re
import threading

import numpy as np
import pytest

from hf_utils import write_jsonl
from qzhou_jax import cli
from qzhou_jax.data.records import ClassificationRecord, PairRecord, RetrievalRecord
from qzhou_jax.synth import checks
from qzhou_jax.synth.filters import EvalIndex, decontaminate, dedup, eval_texts
from qzhou_jax.synth.jobs import WEAKNESSES, Augment, Negatives, Paraphrase, parse_reply
from qzhou_jax.synth.llm import ChatClient, LLMError
from qzhou_jax.synth.mine import mine_negatives, score_filter, search
from qzhou_jax.synth.runner import SynthesisStopped, share_selector, synthesize

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def sentence(i: int, n: int = 12) -> str:
    """A distinct English-looking sentence per i."""
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, n)) + f" number{i}."


def reword(text: str, tag: str = "z") -> str:
    """Same length, every other word changed: differs by about half."""
    return " ".join(tag + w if k % 2 == 0 else w for k, w in enumerate(text.split()))


def blocks(messages) -> list[str]:
    return re.findall(r"<<<\n(.*?)\n>>>", messages[-1]["content"], re.S)


# --- checks -----------------------------------------------------------------------------------

def test_sentences_scripts_and_keys_on_realistic_text():
    # decimals, initialisms and abbreviations do not end sentences (one sentence: the 30% bar)
    assert checks.sentence_count("The U.S. economy grew by 2.5 percent in 2023, said Dr. Smith.") == 1
    assert checks.sentence_count("J. Smith wrote it. Then he left.") == 2
    # a word counts once, like a CJK character: Chinese with English terms is Chinese
    assert checks.script("如何在Ubuntu上安装PyTorch和CUDA") == "HAN"
    assert not checks.same_script("如何在Ubuntu上安装PyTorch和CUDA", "How to install PyTorch and CUDA on Ubuntu")
    # symbols are part of the duplicate key; sentence punctuation and quotes are not
    assert checks.normalize("C++") != checks.normalize("C#") and checks.normalize("-5") != checks.normalize("5")
    assert checks.normalize("“Hello,” she said.") == checks.normalize('"hello" she said')


def test_units_lengths_and_difference():
    assert checks.units("Hello, World! 你好世界") == ["hello", "world", "你", "好", "世", "界"]
    assert checks.normalize("Ｈｅｌｌｏ,  world!") == checks.normalize("hello world")
    assert checks.length_ratio("a b c d", "a b") == 2.0
    assert checks.difference("the cat sat", "the cat sat.") == 0.0
    assert checks.difference("a b c d", "e f g h") == 1.0
    assert abs(checks.difference("a b c d", "a b x y") - 0.5) < 1e-12
    assert checks.sentence_count("One. Two! 三。") == 3 and checks.sentence_count("just one") == 1
    assert checks.min_difference("one sentence") == 0.30 and checks.min_difference("One. Two.") == 0.20


def test_script_detection():
    assert checks.script("The quick fox") == "LATIN"
    assert checks.script("今天天气很好") == "HAN"
    assert checks.script("今日はいい天気ですね") == "KANA"
    assert checks.script("Привет мир") == "CYRILLIC"
    assert checks.script("12 + 3 = 15") is None
    assert checks.same_script("Hello", "World 2") and not checks.same_script("Hello there", "你好")
    assert checks.same_script("42", "你好")  # no letters: nothing to compare


def test_parse_reply():
    assert parse_reply('```json\n{"query": "q", "positive": "p"}\n```', ("query", "positive")) == (
        {"query": "q", "positive": "p"}, None)
    assert parse_reply('Sure! {"negative": " n "} hope this helps', ("negative",))[0] == {"negative": "n"}
    assert parse_reply("no json here", ("negative",)) == (None, "answer is not a JSON object")
    assert parse_reply('{"negative": ""}', ("negative",))[1] == "answer has no text under 'negative'"
    assert parse_reply('{"negative": 3}', ("negative",))[1] == "answer has no text under 'negative'"
    thinking = '<think>The keys are {query, positive}; e.g. {"query": "x"}</think>\n{"query": "q", "positive": "p"}'
    assert parse_reply(thinking, ("query", "positive"))[0] == {"query": "q", "positive": "p"}
    assert parse_reply('{"query": "draft"} final: {"query": "q", "positive": "p"}', ("query", "positive"))[0] == {
        "query": "q", "positive": "p"}
    assert parse_reply('{"positive": "Title\nBody."}', ("positive",))[0] == {"positive": "Title\nBody."}  # raw line break
    assert parse_reply('{"query": "<<<\nq\n>>>"}', ("query",))[0] == {"query": "q"}  # the prompt's markers copied
    assert parse_reply('{"query": "a >>> b"}', ("query",))[1] == "query contains the prompt's <<< >>> markers"


# --- jobs -------------------------------------------------------------------------------------

def test_paraphrase_checks():
    job = Paraphrase("retrieval")
    r = RetrievalRecord(sentence(1), (sentence(2, 40),))
    good = {"query": reword(r.query), "positive": reword(r.pos[0])}
    assert job.check(r, good, []) is None
    assert "differs from the source" in job.check(r, {"query": r.query + " also", "positive": good["positive"]}, [])
    assert "length" in job.check(r, {"query": reword(r.query) + " one two three", "positive": good["positive"]}, [])
    assert "language" in job.check(r, {"query": "这是一个完全不同的问题吗", "positive": good["positive"]}, [])
    [out] = job.build(RetrievalRecord("q", ("p",), ("n",), "Find it"), [good])
    assert out == RetrievalRecord(good["query"], (good["positive"],), (), "Find it")
    sts = Paraphrase("sts")
    same = "A man is playing a guitar on the stage."
    assert sts.check(PairRecord(same, same, 5.0), {"text1": reword(same), "text2": reword(same)}, []) is None
    assert "same text" in sts.check(PairRecord(same, reword(same, "q"), 3.0),
                                    {"text1": reword(same), "text2": reword(same)}, [])
    assert sts.build(PairRecord("a", "b", 0.7), [{"text1": "c", "text2": "d"}]) == [PairRecord("c", "d", 0.7)]
    cls = Paraphrase("classification")
    assert cls.build(ClassificationRecord("a", "x"), [{"text": "b"}]) == [ClassificationRecord("b", "x")]
    msgs = job.messages(r, 0, 1, "query length is 150% of the source's")
    assert blocks(msgs) == [r.query, r.pos[0]] and "was rejected: query length" in msgs[-1]["content"]


def test_augment_and_negative_checks():
    r = RetrievalRecord(sentence(3), (sentence(4, 30),))
    aug = Augment()
    ok = {"query": sentence(5), "positive": sentence(6, 30), "negative": sentence(7, 30)}
    assert aug.check(r, ok, []) is None
    assert "rewording of the example query" in aug.check(r, {**ok, "query": r.query}, [])
    assert "negative is the same text" in aug.check(r, {**ok, "negative": ok["positive"] + "!"}, [])
    assert "length" in aug.check(r, {**ok, "negative": sentence(7, 10)}, [])
    # a longer query is fine, a passage written as the query is not (the example query: 13 words)
    assert aug.check(r, {**ok, "query": sentence(5, 38)}, []) is None
    assert "query is 41 words long and the example query 13 (allowed up to 39)" in aug.check(
        r, {**ok, "query": sentence(5, 40)}, [])
    short = RetrievalRecord("capital of France", r.pos)
    assert aug.check(short, {**ok, "query": sentence(5, 12)}, []) is None
    assert "allowed up to 13" in aug.check(short, {**ok, "query": sentence(5, 13)}, [])
    neg = Negatives(2)
    n1 = {"negative": reword(r.pos[0])}
    assert neg.check(r, n1, []) is None
    assert "repeats one already written" in neg.check(r, n1, [n1])
    assert "differs from the positive by" in neg.check(r, {"negative": r.pos[0] + " x"}, [])
    with_neg = RetrievalRecord(r.query, r.pos, (sentence(8, 30),))
    assert "repeats a text of the record" in neg.check(with_neg, {"negative": sentence(8, 30) + "!"}, [])
    assert neg.count(r) == 2 and neg.count(RetrievalRecord("q", ("p",), ("n",))) == 0
    # the three ways a negative is worse take turns, per negative and per try
    prompts = {WEAKNESSES.index(w) for k in range(3) for w in WEAKNESSES
               if w in neg.messages(r, k, 0, None)[-1]["content"]}
    assert prompts == {0, 1, 2}


# --- the runner, with a fake LLM --------------------------------------------------------------

class FakeLLM:
    """Answers like a well-behaved model, after `bad` bad answers per text; can fail after `stop_after` calls."""

    def __init__(self, bad=0, stop_after=None, same=False):
        self.bad, self.stop_after, self.same = bad, stop_after, same
        self.calls = []
        self.asked = {}  # answers given per source text
        self.lock = threading.Lock()

    def __call__(self, messages):
        with self.lock:
            self.calls.append(messages)
            if self.stop_after is not None and len(self.calls) > self.stop_after:
                raise LLMError("HTTP 503 from fake: overloaded")
        text = messages[-1]["content"]
        src = blocks(messages)
        with self.lock:
            n = self.asked[tuple(src)] = self.asked.get(tuple(src), 0) + 1
        if n <= self.bad:  # first no JSON, then a copy of the source
            return "I cannot do that." if n % 2 else json.dumps({"query": src[0], "positive": src[-1]})
        if "hard negative passage for the query" in text:
            weak = next(i for i, w in enumerate(WEAKNESSES) if w in text)
            return json.dumps({"negative": reword(src[1], tag=f"w{weak}")})
        keys = re.findall(r'"(\w+)": "\.\.\."', text)
        tag = "same" if self.same else "p"
        return "```json\n" + json.dumps({k: reword(s, tag) for k, s in zip(keys, src)}) + "\n```"


def retrieval_file(tmp_path, n=6, neg_every=0):
    rows = []
    for i in range(n):
        row = {"query": sentence(100 + i), "pos": [sentence(200 + i, 30)], "instruction": "Find the passage"}
        if neg_every and i % neg_every == 0:
            row["neg"] = [sentence(300 + i, 30)]
        rows.append(row)
    return write_jsonl(tmp_path / "in.jsonl", rows)


def read_out(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_paraphrase_run_retries_with_feedback(tmp_path):
    src = retrieval_file(tmp_path)
    llm = FakeLLM(bad=2)
    stats = synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", llm, workers=3)
    out = read_out(tmp_path / "out.jsonl")
    inp = read_out(src)
    assert len(out) == 6 and stats["accepted"] == 6 and stats["tries"] == 18
    for o, i in zip(out, inp):  # input order, instruction kept, no negatives
        assert o["query"] == reword(i["query"], "p") and o["pos"] == [reword(i["pos"][0], "p")]
        assert o["neg"] == [] and o["instruction"] == "Find the passage"
    assert set(stats["rejections"]) == {"answer is not a JSON object", "query differs from the source by N%"}
    assert any("was rejected" in m[-1]["content"] for m in llm.calls)
    assert not os.path.exists(str(tmp_path / "out.jsonl") + ".partial")


def test_duplicates_and_exhausted_tries(tmp_path):
    rows = [{"query": "alpha bravo charlie delta echo", "pos": [sentence(1, 20)]},
            {"query": "Alpha, bravo charlie delta echo!", "pos": [sentence(1, 20)]}]  # same texts, other spelling
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    stats = synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", FakeLLM(), max_tries=3, workers=1)
    # the second record's answers repeat the first's: rejected until its tries run out
    assert stats["accepted"] == 1 and stats["records_without_any"] == 1 and stats["tries"] == 4
    assert stats["rejections"] == {"duplicates a text already in the data": 3}
    assert len(read_out(tmp_path / "out.jsonl")) == 1


def test_negatives_share_passes_other_records_through(tmp_path):
    src = retrieval_file(tmp_path, n=40, neg_every=4)
    select = share_selector(0.3, seed=1)
    job = Negatives(2, select=select)
    stats = synthesize(job, src, tmp_path / "out.jsonl", FakeLLM(), workers=4)
    inp, out = read_out(src), read_out(tmp_path / "out.jsonl")
    assert len(out) == 40
    chosen = [i for i, row in enumerate(inp) if select(RetrievalRecord(row["query"], tuple(row["pos"]),
                                                                       tuple(row.get("neg", ()))))]
    assert 0 < len(chosen) < 30 and stats["selected"] == len(chosen) and stats["accepted"] == 2 * len(chosen)
    for i, (a, b) in enumerate(zip(inp, out)):
        assert b["query"] == a["query"]
        if i in chosen:
            assert len(b["neg"]) == 2 and b["neg"][0] != b["neg"][1]
        else:
            assert b["neg"] == a.get("neg", [])
    assert not any(i % 4 == 0 for i in chosen)  # records with negatives are never chosen


def test_stop_and_resume(tmp_path):
    src = retrieval_file(tmp_path, n=12)
    out = tmp_path / "out.jsonl"
    partial = str(out) + ".partial"
    ref = tmp_path / "ref.jsonl"
    synthesize(Paraphrase("retrieval"), src, ref, FakeLLM(), workers=1)
    with pytest.raises(SynthesisStopped, match="rerun with --resume"):
        synthesize(Paraphrase("retrieval"), src, out, FakeLLM(stop_after=5), workers=1)
    assert not out.exists() and os.path.exists(partial)
    with open(partial, "a") as f:
        f.write('{"i": 7, "accep')  # a line cut by the crash
    with pytest.raises(ValueError, match="pass --resume"):
        synthesize(Paraphrase("retrieval"), src, out, FakeLLM(), workers=1)
    with pytest.raises(ValueError, match="different run.*length_tolerance"):
        synthesize(Paraphrase("retrieval", length_tolerance=0.3), src, out, FakeLLM(), workers=1, resume=True)
    llm = FakeLLM()
    stats = synthesize(Paraphrase("retrieval"), src, out, llm, workers=2, resume=True)
    assert len(llm.calls) == 12 - 5 and stats["accepted"] == 12
    assert out.read_text() == ref.read_text() and not os.path.exists(partial)


class RefusingLLM(FakeLLM):
    """Refuses one record's prompt (HTTP 400: too long) or, with fatal, fails the whole endpoint."""

    def __init__(self, poison, fatal=False, delay=0.0, **kw):
        super().__init__(**kw)
        self.poison, self.fatal, self.delay = poison, fatal, delay

    def __call__(self, messages):
        import time

        time.sleep(self.delay)
        if self.poison in messages[-1]["content"]:
            with self.lock:
                self.calls.append(messages)
            raise LLMError("HTTP 400: maximum context length exceeded", fatal=self.fatal,
                           kind="HTTP 401" if self.fatal else "HTTP 400")
        return super().__call__(messages)


def test_a_refused_prompt_costs_its_tries_not_the_run(tmp_path):
    src = retrieval_file(tmp_path, n=8)
    poison = read_out(src)[3]["query"]
    stats = synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", RefusingLLM(poison), max_tries=3,
                       workers=2)
    assert stats["accepted"] == 7 and stats["records_without_any"] == 1
    assert stats["rejections"] == {"request failed: HTTP 400": 3}


def test_a_fatal_error_stops_the_run_promptly_and_keeps_finished_records(tmp_path):
    src = retrieval_file(tmp_path, n=12)
    rows = read_out(src)
    # every record but the poisoned one keeps failing its checks (bad=20), slowly
    llm = RefusingLLM(rows[1]["query"], fatal=True, delay=0.02, bad=20)
    with pytest.raises(SynthesisStopped, match="maximum context length"):
        synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", llm, max_tries=20, workers=4)
    # records 0, 2 and 3 were running when record 1 failed: they stop at their next try, not after 20
    assert len(llm.calls) < 12
    with pytest.raises(SynthesisStopped, match=r"1\d requests in a row failed"):
        synthesize(Paraphrase("retrieval"), src, tmp_path / "out2.jsonl",
                   RefusingLLM("Paraphrase each text"), max_tries=20, workers=2, max_failures=10)
    # a record finished before the stop is kept for --resume
    llm = RefusingLLM(rows[11]["query"], fatal=True)
    with pytest.raises(SynthesisStopped):
        synthesize(Paraphrase("retrieval"), src, tmp_path / "out3.jsonl", llm, workers=1)
    done = read_out(str(tmp_path / "out3.jsonl") + ".partial")[1:]
    assert sorted(d["i"] for d in done) == list(range(11))


def test_resume_from_a_moved_input(tmp_path):
    src = retrieval_file(tmp_path, n=6)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SynthesisStopped):
        synthesize(Paraphrase("retrieval"), src, out, FakeLLM(stop_after=2), workers=1)
    moved = tmp_path / "moved.jsonl"
    os.rename(src, moved)
    stats = synthesize(Paraphrase("retrieval"), moved, out, FakeLLM(), workers=1, resume=True)
    assert stats["accepted"] == 6
    with open(moved, "a") as f:
        f.write(json.dumps({"query": "one more", "pos": ["p"]}) + "\n")
    with pytest.raises(SynthesisStopped):
        synthesize(Paraphrase("retrieval"), moved, tmp_path / "o2.jsonl", FakeLLM(stop_after=1), workers=1)
    write_jsonl(moved, read_out(moved)[:-2])
    with pytest.raises(ValueError, match="different run.*input_sha256"):
        synthesize(Paraphrase("retrieval"), moved, tmp_path / "o2.jsonl", FakeLLM(), workers=1, resume=True)


def test_bad_input_names_the_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "pos": ["p"]}, {"query": "q2"}])
    with pytest.raises(ValueError, match=r"in.jsonl:2: .*'pos'"):
        synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", FakeLLM())
    assert not (tmp_path / "out.jsonl").exists() and not os.path.exists(str(tmp_path / "out.jsonl") + ".partial")


# --- the HTTP client --------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    script: list = []  # (status, body, headers) answers, in order; then the fake LLM answers
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, dict(self.headers), body))
        if type(self).script:
            status, payload, headers = type(self).script.pop(0)
            if callable(payload):  # a misbehaving answer written by the test
                return payload(self)
        else:
            status, headers = 200, {}
            payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                           "content": FakeLLM()(body["messages"])}}]})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    _Handler.script, _Handler.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Handler
    server.shutdown()


def test_chat_client_retries_and_errors(llm_server, monkeypatch):
    url, handler = llm_server
    monkeypatch.setenv("QZ_TEST_KEY", "sekrit")
    client = ChatClient(url, "m", api_key_env="QZ_TEST_KEY", backoff=0.01, retries=2)
    handler.script = [(429, "slow down", {"Retry-After": "0"}), (503, "busy", {})]
    msgs = [{"role": "user", "content": 'Reply as JSON: {"negative": "..."}\n<<<\na b c\n>>>'}]
    assert parse_reply(client(msgs), ("negative",))[0] == {"negative": "pa b pc"}
    path, headers, body = handler.seen[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekrit"
    assert body["model"] == "m" and body["messages"] == msgs and client.retried == 2
    handler.script = [(400, '{"error": "bad model"}', {})]
    with pytest.raises(LLMError, match="HTTP 400 .*bad model"):
        client(msgs)
    handler.script = [(503, "busy", {})] * 3
    with pytest.raises(LLMError, match="gave up after 3 tries: HTTP 503") as e:
        client(msgs)
    assert not e.value.fatal  # the server may fail on this prompt alone: the run counts failures in a row
    handler.script = [(200, '{"choices": []}', {})]
    with pytest.raises(LLMError, match="no choices"):
        client(msgs)
    handler.script = [(200, '{"choices": [{"message": {"content": null}, "finish_reason": "length"}]}', {})]
    with pytest.raises(LLMError, match="empty answer.*length") as e:
        client(msgs)
    assert not e.value.fatal and e.value.kind == "answer without content"
    handler.script = [(401, "bad key", {})]
    with pytest.raises(LLMError) as e:
        client(msgs)
    assert e.value.fatal
    handler.script = [(400, "too long", {})]
    with pytest.raises(LLMError) as e:
        client(msgs)
    assert not e.value.fatal and e.value.kind == "HTTP 400"
    handler.script = []
    ChatClient(url, "m", extra_body={"max_tokens": None, "max_completion_tokens": 99})(msgs)
    body = handler.seen[-1][2]
    assert "max_tokens" not in body and body["max_completion_tokens"] == 99 and body["temperature"] == 0.8
    monkeypatch.delenv("QZ_TEST_KEY")
    handler.script = []
    client(msgs)
    assert "Authorization" not in handler.seen[-1][1]
    with pytest.raises(ValueError, match="--llm-url"):
        ChatClient("localhost:8000", "m")


def test_an_unreachable_endpoint_stops_at_once_until_it_has_answered(caplog):
    """Nothing listening on --llm-url's port (a typo) is fatal at the first request instead of
    minutes of silent retries; once the server has answered, a refused connection is a restart
    and is retried."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, backoff=0.01, retries=2)
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match=rf"cannot reach http://127.0.0.1:{port}/v1/chat/completions: .*refused.*"
                                       r"--llm-url") as e:
        client([{"role": "user", "content": "hi"}])
    assert e.value.fatal and time.perf_counter() - t0 < 5
    client.answered = 1
    with caplog.at_level("WARNING"), pytest.raises(LLMError, match="gave up after 3 tries") as e:
        client([{"role": "user", "content": "hi"}])
    assert not e.value.fatal and "retrying up to 2 times" in caplog.text


def test_chat_client_cancel_ends_the_backoff(llm_server):
    import time

    url, handler = llm_server
    client = ChatClient(url, "m", backoff=30.0, retries=3, api_key_env=None)
    handler.script = [(503, "busy", {})] * 4
    threading.Timer(0.3, client.cancel).start()
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="cancelled") as e:
        client([{"role": "user", "content": "hi"}])
    assert e.value.fatal and time.perf_counter() - t0 < 5


def test_ctrl_c_stops_at_once_and_keeps_finished_records(tmp_path):
    import _thread
    import time

    class Slow(FakeLLM):
        fired = False

        def __call__(self, messages):
            with self.lock:
                fire = len(self.calls) >= 6 and not self.fired
                self.fired = self.fired or fire
            if fire:
                _thread.interrupt_main()  # Ctrl-C while records are in flight
            time.sleep(0.05)
            return super().__call__(messages)

    src = retrieval_file(tmp_path, n=40)
    out = tmp_path / "out.jsonl"
    t0 = time.perf_counter()
    with pytest.raises(SynthesisStopped, match="interrupted") as e:
        synthesize(Paraphrase("retrieval"), src, out, Slow(), workers=2)
    assert e.value.interrupted and time.perf_counter() - t0 < 10
    done = read_out(str(out) + ".partial")[1:]
    assert 3 <= len(done) < 40
    stats = synthesize(Paraphrase("retrieval"), src, out, FakeLLM(), workers=2, resume=True)
    assert stats["accepted"] == 40


def test_cli_paraphrase_through_http(llm_server, tmp_path, capsys):
    url, _ = llm_server
    src = write_jsonl(tmp_path / "sts.jsonl", [{"s1": sentence(i), "s2": sentence(50 + i), "y": i / 10}
                                               for i in range(5)])
    out = tmp_path / "para.jsonl"
    rc = cli.main(["synth", "paraphrase", "--task", "sts", "--input", str(src), "--output", str(out),
                   "--fields", "text1=s1", "text2=s2", "score=y", "--llm-url", url, "--llm-model", "m",
                   "--llm-key-env", "", "--quiet", "--workers", "2"])
    assert rc == 0
    rows = read_out(out)
    assert [r["score"] for r in rows] == [i / 10 for i in range(5)]
    assert rows[0]["text1"] == reword(sentence(0), "p")
    assert '"llm_calls": 5' in capsys.readouterr().err
    assert cli.main(["synth", "paraphrase", "--task", "sts", "--input", str(src), "--output", str(out),
                     "--llm-url", url, "--llm-model", "m"]) == 2  # output exists
    assert cli.main(["synth", "paraphrase", "--task", "sts", "--input", str(src), "--output", str(tmp_path),
                     "--llm-url", url, "--llm-model", "m", "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


# --- mining and score filtering ---------------------------------------------------------------

def test_search_matches_brute_force():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(37, 16)), rng.normal(size=(301, 16))
    ref = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    for doc_block, query_block in ((64, 8), (1000, 1000), (50, 37)):
        idx, val = search(q, d, 25, doc_block=doc_block, query_block=query_block)
        assert idx.shape == (37, 25)
        np.testing.assert_allclose(val, -np.sort(-ref, axis=1)[:, :25], atol=1e-6)  # the best 25, best first
        np.testing.assert_allclose(val, np.take_along_axis(ref, idx, axis=1), atol=1e-6)  # at those indices
        assert all(len(set(row)) == 25 for row in idx)
    idx, _ = search(q[:2], d[:5], 25)
    assert idx.shape == (2, 5)
    # the corpus in several device chunks (64 rows x 16 dims x 4 bytes each), merged on the host
    idx, val = search(q, d, 25, doc_block=64, device_bytes=64 * 16 * 4 * 2)
    np.testing.assert_allclose(val, -np.sort(-ref, axis=1)[:, :25], atol=1e-6)
    np.testing.assert_allclose(val, np.take_along_axis(ref, idx, axis=1), atol=1e-6)


class FakeEncoder:
    """Texts 'doc N' sit at angle N degrees from 'query'; instructions are recorded."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, instruction):
        self.calls.append((len(texts), instruction))
        out = []
        for t in texts:
            m = re.search(r"(\d+)", t)
            a = np.deg2rad(float(m.group(1)) if m and t.startswith("doc") else 0.0)
            out.append([np.cos(a), np.sin(a), 0.0])
        return np.array(out, np.float32)


def test_mine_never_takes_a_positive_of_the_same_query():
    corpus = [f"doc {k}" for k in range(1, 60)]
    # one record per (query, positive): docs 11-25 are all positives of "query one"
    records = [RetrievalRecord("query one", (f"doc {k}",)) for k in range(11, 26)]
    out, stats = mine_negatives(records, FakeEncoder(), corpus=corpus, ranks=(1, 20), num_negatives=20)
    positives = {f"doc {k}" for k in range(11, 26)}
    assert all(not set(r.neg) & positives for r in out) and stats["mined"] == 15 * 20


def test_mine_searches_deeper_for_a_query_with_many_positives():
    corpus = [f"doc {k}" for k in range(1, 60)]
    records = [RetrievalRecord("continue", (f"doc {k}",)) for k in range(1, 46)]  # 45 positives of one query
    enc = FakeEncoder()
    out, stats = mine_negatives(records, enc, corpus=corpus, ranks=(1, 20), num_negatives=20)
    rest = {f"doc {k}" for k in range(46, 60)}  # the 14 documents no record cites
    assert all(set(r.neg) == rest for r in out) and stats["short"] == 45
    assert stats["distinct_queries"] == 1 and stats["searched_deeper"] == 1
    assert enc.calls[0] == (1, None)  # the repeated query is encoded once


def test_mine_draws_from_the_rank_window():
    corpus = [f"doc {k}" for k in range(1, 60)]
    records = [RetrievalRecord("query one", ("doc 3",), (), "Find it"),
               RetrievalRecord("query two", ("doc 5",), ("doc 1",)),  # has a negative: left alone
               RetrievalRecord("query three", ("doc 2", "doc 4"))]
    enc = FakeEncoder()
    out, stats = mine_negatives(records, enc, corpus=corpus, ranks=(10, 30), num_negatives=4, seed=0)
    assert out[1] == records[1] and stats["selected"] == 2 and stats["mined"] == 8 and stats["short"] == 0
    for r in (out[0], out[2]):
        ranked = [t for t in corpus if t not in r.pos]  # by angle: 'doc 1', 'doc 2', ... best first
        window = ranked[9:30]
        assert len(r.neg) == 4 and set(r.neg) <= set(window) and len(set(r.neg)) == 4
    assert (1, "Find it") in enc.calls and (1, None) in enc.calls  # queries grouped by instruction
    enc = FakeEncoder()
    default, _ = mine_negatives(records, enc, corpus=corpus, seed=0, instruction="Default task")
    assert default == out and (1, "Default task") in enc.calls and (1, None) not in enc.calls[:-1]
    again, _ = mine_negatives(records, FakeEncoder(), corpus=corpus, seed=0)
    assert again == out
    filled, stats = mine_negatives(records, FakeEncoder(), corpus=corpus, fill=True, num_negatives=2)
    assert len(filled[1].neg) == 2 and filled[1].neg[0] == "doc 1" and stats["selected"] == 3
    # candidates scoring above 0.999 x the positive's score are dropped: with the positive at 3 degrees
    # only docs at angles whose cosine is below 0.999 cos(3 deg) remain
    capped, stats = mine_negatives(records[:1], FakeEncoder(), corpus=corpus, ranks=(1, 50), num_negatives=40,
                                   max_score_ratio=0.999)
    kept = [int(t.split()[1]) for t in capped[0].neg]
    assert min(kept) > 3 and np.cos(np.deg2rad(min(kept))) <= 0.999 * np.cos(np.deg2rad(3))
    short, stats = mine_negatives(records[:1], FakeEncoder(), corpus=corpus[:12], num_negatives=4)
    assert stats["short"] == 1 and len(short[0].neg) == 2  # ranks 10-11 of 11 candidates
    with pytest.raises(ValueError, match="--ranks"):
        mine_negatives(records, FakeEncoder(), ranks=(0, 5))


def test_mine_and_score_filter_encode_passages_with_the_passage_instruction():
    """Symmetric data (NLI triplets) trains with the instruction on passages too: the corpus and
    the positives are then encoded with it; asymmetric data encodes them without."""
    records = [RetrievalRecord(f"q{i}", (f"p{i}",)) for i in range(6)]
    calls = []

    def encode(texts, instruction):
        calls.append((len(texts), instruction))
        rng = np.random.default_rng(len(texts))
        return rng.normal(size=(len(texts), 4)).astype(np.float32)

    mine_negatives(records, encode, ranks=(1, 3), num_negatives=1, instruction="Same", passage_instruction="Same",
                   max_score_ratio=0.99)
    assert {i for _, i in calls} == {"Same"}
    calls.clear()
    mine_negatives(records, encode, ranks=(1, 3), num_negatives=1, instruction="Ask")
    assert sorted(calls, key=str) == [(6, "Ask"), (6, None)]
    calls.clear()
    score_filter(records, encode, drop_fraction=0.5, instruction="Same", passage_instruction="Same")
    assert {i for _, i in calls} == {"Same"}


def test_score_filter():
    records = [RetrievalRecord("query a", ("doc 10", "doc 80")), RetrievalRecord("query b", ("doc 85",)),
               RetrievalRecord("query c", ("doc 30",))]
    out, stats = score_filter(records, FakeEncoder(), min_score=0.5)
    assert out == [RetrievalRecord("query a", ("doc 10",)), RetrievalRecord("query c", ("doc 30",))]
    assert stats["dropped_records"] == 1 and stats["dropped_positives"] == 2
    out, stats = score_filter(records, FakeEncoder(), drop_fraction=0.34)
    assert out == [records[0], records[2]] and abs(stats["threshold"] - np.cos(np.deg2rad(85))) < 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        score_filter(records, FakeEncoder())


def test_cli_mine_and_score_filter_with_a_model(tiny_model_dir, tmp_path, capsys):
    rows = [{"query": sentence(i, 6), "pos": [sentence(500 + i, 20)]} for i in range(40)]
    rows[0]["neg"] = ["already here"]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "mined.jsonl"
    assert cli.main(["synth", "mine", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out),
                     "--max-length", "64", "--batch-size", "16", "--quiet"]) == 0
    mined = read_out(out)
    assert mined[0]["neg"] == ["already here"]
    for row, m in zip(rows[1:], mined[1:]):
        assert len(m["neg"]) == 4 and row["pos"][0] not in m["neg"]
        assert set(m["neg"]) <= {r["pos"][0] for r in rows} | {"already here"}
    assert '"mined": 156' in capsys.readouterr().err
    # settings are checked before the model loads
    assert cli.main(["synth", "mine", "--model", str(tmp_path / "no-model"), "--input", str(src),
                     "--output", str(tmp_path / "x.jsonl"), "--ranks", "0", "5"]) == 2
    assert "--ranks" in capsys.readouterr().err
    for flag, value in (("--max-length", "0"), ("--batch-size", "0")):  # zero-length texts embed to zeros
        with pytest.raises(SystemExit):
            cli.main(["synth", "mine", "--model", str(tiny_model_dir), "--input", str(src),
                      "--output", str(tmp_path / "x.jsonl"), flag, value])
        assert f"{flag}: expected a positive integer, got '0'" in capsys.readouterr().err
    assert cli.main(["synth", "score-filter", "--model", str(tmp_path / "no-model"), "--input", str(src),
                     "--output", str(tmp_path / "x.jsonl"), "--min-score", "2"]) == 2
    assert "--min-score: a cosine similarity, in [-1, 1]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.jsonl")
    # a --corpus with titles reads them as BEIR documents: title + space + text, as mteb
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"title": "T", "text": rows[1]["pos"][0]}, {"text": "plain"}])
    from qzhou_jax.synth.cli import _corpus
    assert _corpus(str(corpus), "text", "train") == ["T " + rows[1]["pos"][0], "plain"]
    filt = tmp_path / "filtered.jsonl"
    assert cli.main(["synth", "score-filter", "--model", str(tiny_model_dir), "--input", str(src),
                     "--output", str(filt), "--drop-fraction", "0.25", "--max-length", "64", "--quiet"]) == 0
    assert len(read_out(filt)) == 30


# --- dedup and decontamination ----------------------------------------------------------------

def test_dedup_across_files():
    a = [RetrievalRecord("What is X?", ("X is a letter.",), ("x is a letter", "Y.", "y", "What is x")),
         RetrievalRecord("what is x", ("X is a letter!",))]
    b = [RetrievalRecord("WHAT IS X", ("x is a letter",)), RetrievalRecord("what is y", ("Y.",))]
    (a2, b2), stats = dedup([a, b])
    assert a2 == [RetrievalRecord("What is X?", ("X is a letter.",), ("Y.",))] and b2 == [b[1]]
    assert stats["datasets"][0] == {"read": 2, "duplicates": 1, "negatives_dropped": 3, "written": 1}
    assert stats["datasets"][1]["duplicates"] == 1
    (c,), stats = dedup([[ClassificationRecord("Great film", "pos"), ClassificationRecord("great film!", "neg"),
                          ClassificationRecord("great film", "pos")]])
    assert len(c) == 2 and stats["texts_with_several_labels"] == 1
    (s,), _ = dedup([[PairRecord("a", "b", 1.0), PairRecord("b", "a", 1.0), PairRecord("A", "b", 1.0)]])
    assert len(s) == 2  # the swapped pair is a different training pair
    # a negative that is a positive of another record with the same query (in any file) goes too
    (r1, r2), _ = dedup([[RetrievalRecord("q", ("p1",), ("p2", "n"))], [RetrievalRecord("Q", ("p2",), ("p1",))]])
    assert r1 == [RetrievalRecord("q", ("p1",), ("n",))] and r2 == [RetrievalRecord("Q", ("p2",), ())]
    (c,), _ = dedup([[PairRecord("C++", "x", 1.0), PairRecord("C#", "x", 1.0)]])
    assert len(c) == 2


def test_run_hashes_are_the_polynomial_hash_of_each_run():
    from qzhou_jax.synth.filters import run_hashes, unit_hash

    mul, mod = 0x9E3779B97F4A7C15, 1 << 64

    def direct(words):
        h = 0
        for w in words:
            h = (h * mul + (unit_hash(w) % mod)) % mod
        return h

    words = [f"w{i % 50}" for i in range(3000)]  # longer than the cached powers: they grow
    got = run_hashes(words, 13).view(np.uint64)
    assert len(got) == 3000 - 12 and len(run_hashes(words[:12], 13)) == 0
    assert all(int(got[i]) == direct(words[i:i + 13]) for i in range(0, len(got), 37))
    assert got[0] == got[50] and got[0] != got[1]  # equal runs, equal hashes
    # the same in every process (Python's str hash is salted per process): worker processes match
    import subprocess
    import sys

    probe = "from qzhou_jax.synth.filters import unit_hash; print(unit_hash('w7'), unit_hash('词'))"
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert other == [str(unit_hash("w7")), str(unit_hash("词"))]


def test_decontaminate(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "Does zinc shorten the common cold?"}])
    long_doc = " ".join(WORDS[:20])
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "title": "Zinc", "text": long_doc}])
    index = EvalIndex(eval_texts([str(beir / "queries.jsonl"), str(beir / "corpus.jsonl")]), ngram=13)
    assert index.texts == 3  # ids are not texts
    records = [RetrievalRecord("does zinc shorten the common cold", ("p",)),  # exact (normalized) query
               RetrievalRecord("q", ("intro " + " ".join(WORDS[3:16]) + " outro",)),  # a 13-word run
               RetrievalRecord("q2", ("p2",), (" ".join(WORDS[3:15]),)),  # 12 words only
               RetrievalRecord("zinc", ("p3",))]  # equals the title, but one word is too short to match whole
    kept, stats = decontaminate(records, index)
    assert kept == [records[2], records[3]]
    assert stats["dropped_by_field"] == {"query": 1, "pos": 1}
    # Chinese: runs of 26 characters, so a shared 16-character agency name is not a hit
    zh = EvalIndex(["中华人民共和国国家卫生健康委员会今天发布了关于流感疫苗接种的最新指导意见，建议老年人尽早接种。"])
    assert not zh.hit("中华人民共和国国家卫生健康委员会表示将加强医院管理")
    assert zh.hit("据报道，国家卫生健康委员会今天发布了关于流感疫苗接种的最新指导意见，请关注")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(eval_texts([str(tmp_path / "nope")]))
    # STS-B rows: the two sentences are evaluation texts, their metadata is not
    sts = write_jsonl(tmp_path / "sts_dev.jsonl", [{"sentence1": "A man plays a guitar.", "sentence2": "A man plays.",
                                                    "score": 4.2, "sid": "0001", "genre": "main-captions",
                                                    "dataset": "MSRvid", "year": "2012test"}])
    assert sorted(eval_texts([str(sts)])) == ["A man plays a guitar.", "A man plays."]
    # a BEIR folder with qrels: only the split's queries and their relevant documents, not the
    # whole corpus (which the training split shares)
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "title": "Zinc", "text": long_doc},
                                        {"_id": "d2", "text": "Vitamin C does not prevent colds in most people."}])
    texts = sorted(eval_texts([str(beir)]))
    assert texts == ["Does zinc shorten the common cold?", "Vitamin C does not prevent colds in most people."]
    kept, _ = decontaminate(records, EvalIndex(texts))
    assert records[1] in kept  # the long document is the corpus's, not the test split's


def test_a_mining_corpus_line_without_its_text_says_what_is_wrong(tmp_path):
    from qzhou_jax.data.jsonl import RecordError
    from qzhou_jax.synth.cli import _corpus

    for line, message in (({"title": "t"}, ":1: field 'text' missing"), ({"text": 3}, ":1: field 'text' must be a string"),
                          ([1], ":1: expected a JSON object with a 'text' field, or a string")):
        path = write_jsonl(tmp_path / "c.jsonl", [line])
        with pytest.raises(RecordError, match=re.escape(f"{path}{message}")):
            _corpus(str(path), "text", "test")


def test_a_beir_folder_without_qrels_is_not_read_as_plain_text(tmp_path):
    """A folder with corpus.jsonl and queries.jsonl but no qrels/ is a BEIR folder missing its split,
    not a folder of JSONL files (whose every document would count as evaluation text)."""
    folder = tmp_path / "ev"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "text": "a document shared with training"}])
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "a question"}])
    with pytest.raises(FileNotFoundError, match=r"qrels/test\.tsv: no such file"):
        list(eval_texts([str(folder)]))


def test_cli_dedup_and_decontaminate(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "Good movie", "label": "pos"},
                                           {"text": "this movie was really bad", "label": "neg"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "good movie!", "label": "pos"}, {"text": "fine", "label": "pos"}])
    oa, ob = tmp_path / "a2.jsonl", tmp_path / "b2.jsonl"
    assert cli.main(["synth", "dedup", "--task", "classification", "--input", str(a), str(b),
                     "--output", str(oa), str(ob)]) == 0
    assert len(read_out(oa)) == 2 and read_out(ob) == [{"text": "fine", "label": "pos"}]
    assert cli.main(["synth", "dedup", "--task", "classification", "--input", str(a), "--output", str(oa)]) == 2
    assert "output exists" in capsys.readouterr().err
    ev = write_jsonl(tmp_path / "eval.jsonl",
                     [{"sentence1": "This movie was REALLY bad!", "sentence2": "x", "score": 1}])
    out = tmp_path / "clean.jsonl"
    assert cli.main(["synth", "decontaminate", "--task", "classification", "--input", str(oa), "--output", str(out),
                     "--against", str(ev)]) == 0
    assert read_out(out) == [{"text": "Good movie", "label": "pos"}]
    assert cli.main(["synth", "decontaminate", "--task", "classification", "--input", str(oa), "--output", str(out),
                     "--against", str(ev), "--workers", "2", "--overwrite"]) == 0
    assert read_out(out) == [{"text": "Good movie", "label": "pos"}]
    # outputs replace files only once every input is read: an output may be a later input
    b_copy = write_jsonl(tmp_path / "b_copy.jsonl", [{"text": "good movie!", "label": "pos"},
                                                     {"text": "fine", "label": "pos"}])
    a_copy = write_jsonl(tmp_path / "a_copy.jsonl", [{"text": "Good movie", "label": "pos"},
                                                     {"text": "this movie was really bad", "label": "neg"}])
    assert cli.main(["synth", "dedup", "--task", "classification", "--input", str(a_copy), str(b_copy),
                     "--output", str(b_copy), str(a_copy), "--overwrite"]) == 0
    assert len(read_out(b_copy)) == 2 and read_out(a_copy) == [{"text": "fine", "label": "pos"}]
    assert cli.main(["synth", "dedup", "--task", "classification", "--input", str(oa), str(b),
                     "--output", str(oa), str(ob), "--overwrite"]) == 0
    assert len(read_out(oa)) == 2 and read_out(ob) == [{"text": "fine", "label": "pos"}]


def test_an_interrupted_dedup_writes_no_output(tmp_path, capsys, monkeypatch):
    """Outputs are renamed into place together at the end: Ctrl-C while the second file is
    written leaves neither (a rerun is not refused for an output that exists), and exits 130."""
    from qzhou_jax.synth import filters

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "label": "x"}, {"text": "two", "label": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "three", "label": "x"}])
    oa, ob = tmp_path / "oa.jsonl", tmp_path / "ob.jsonl"
    real, calls = filters.Dedup.filter, []

    def interrupted(self, records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, records)

    monkeypatch.setattr(filters.Dedup, "filter", interrupted)
    argv = ["synth", "dedup", "--task", "classification", "--input", str(a), str(b), "--output", str(oa), str(ob)]
    assert cli.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]
    monkeypatch.setattr(filters.Dedup, "filter", real)
    assert cli.main(argv) == 0 and len(read_out(oa)) == 2 and len(read_out(ob)) == 1


def test_decontaminate_real_chinese_data(shared_data):
    """text2vec's Chinese triplets are built from STS-B sentences: every row sharing a sentence with
    the zh STS-B dev files must go, and little else (the dataset lists its overlapping rows)."""
    folder = shared_data / "training" / "text2vec_bge_finetune_zh"
    dev = [shared_data / "zh_pairs" / "stsb" / "dev.jsonl", shared_data / "sts" / "stsb_multi_mt_zh" / "dev.jsonl"]
    rows = [json.loads(line) for line in open(folder / "train.jsonl", encoding="utf-8")]
    dev_sentences = {t.strip() for p in dev for line in open(p, encoding="utf-8")
                     for t in (json.loads(line)["sentence1"], json.loads(line)["sentence2"])}
    shared = {i for i, r in enumerate(rows) if any(t.strip() in dev_sentences for t in [r["query"], *r["pos"], *r["neg"]])}
    listed = {int(x) for x in open(folder / "rows_overlapping_stsb_zh_dev_test.txt")}
    records = [RetrievalRecord(r["query"], tuple(r["pos"]), tuple(r["neg"])) for r in rows]
    index = EvalIndex(eval_texts([str(p) for p in dev]))
    kept, stats = decontaminate(records, index)
    in_workers, stats2 = decontaminate(records, index, workers=2)  # worker processes, chunks in flight
    assert [id(r) for r in in_workers] == [id(r) for r in kept] and stats2 == stats
    kept_ids = {id(r) for r in kept}
    dropped = {i for i, r in enumerate(records) if id(r) not in kept_ids}
    assert len(shared) > 500 and shared <= dropped  # every exact overlap found
    assert len(dropped - shared - listed) <= 0.005 * len(rows), sorted(dropped - shared - listed)


def test_cli_mine_a_beir_folder_searches_its_whole_corpus(shared_data, tiny_model_dir, tmp_path, capsys):
    folder = shared_data / "retrieval" / "scifact_beir"
    out = tmp_path / "scifact_mined.jsonl"
    assert cli.main(["synth", "mine", "--model", str(tiny_model_dir), "--input", str(folder), "--output", str(out),
                     "--max-length", "32", "--batch-size", "256", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().err.split(": ", 1)[1])
    corpus = [json.loads(line) for line in open(folder / "corpus.jsonl", encoding="utf-8")]
    texts = {(d["title"] + " " + d["text"]).strip() if d.get("title") else d["text"].strip() for d in corpus}  # mteb
    mined = read_out(out)
    assert stats["corpus"] > 5000 and stats["selected"] == len(mined) > 700 and stats["short"] == 0
    for row in mined:
        assert len(row["neg"]) == 4 and not set(row["neg"]) & set(row["pos"]) and set(row["neg"]) <= texts
    # most negatives are documents no query of the split cites: the search covered the whole corpus
    cited = {p for row in mined for p in row["pos"]}
    assert np.mean([n not in cited for row in mined for n in row["neg"]]) > 0.5


def test_read_records_from_a_beir_folder(tmp_path):
    from qzhou_jax.synth.runner import file_sha256, read_records

    (tmp_path / "qrels").mkdir()
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first?"}])
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_records(str(tmp_path), "retrieval") == [RetrievalRecord("first?", ("T one",))]
    with pytest.raises(ValueError, match="BEIR"):
        read_records(str(tmp_path), "sts")
    before = file_sha256(str(tmp_path))
    (tmp_path / "out.jsonl.partial").write_text("progress")  # an output inside the folder: not input
    assert file_sha256(str(tmp_path)) == before
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    assert file_sha256(str(tmp_path)) != before


# --- regressions from the synthesis audit -------------------------------------------------------

def _cut_body(status, body=b'{"error": "overloaded, try later"}', sent=10, stall=0.0):
    """An answer that announces its length, sends part of the body, then stalls or closes."""
    def write(handler):
        import socket
        import time

        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:sent])
        handler.wfile.flush()
        time.sleep(stall)
        handler.connection.shutdown(socket.SHUT_RDWR)
    return write


def test_an_error_answer_cut_or_stalled_mid_body_is_retried(llm_server):
    url, handler = llm_server
    client = ChatClient(url, "m", api_key_env=None, backoff=0.01, retries=2, timeout=1.0)
    msgs = [{"role": "user", "content": 'Reply as JSON: {"negative": "..."}\n<<<\na b c\n>>>'}]
    handler.script = [(503, _cut_body(503), {}), (503, _cut_body(503, stall=3.0), {})]
    assert parse_reply(client(msgs), ("negative",))[0] == {"negative": "pa b pc"}
    assert client.retried == 2


def test_the_timeout_bounds_a_whole_request_not_each_read(llm_server):
    import time

    url, handler = llm_server

    def trickle(h):
        body = json.dumps({"choices": [{"message": {"content": '{"negative": "x"}'}}]}).encode()
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for k in range(len(body)):  # a byte every 0.1 s: each read is quick, the answer takes seconds
            h.wfile.write(body[k:k + 1])
            h.wfile.flush()
            time.sleep(0.1)
    handler.script = [(200, trickle, {})]
    client = ChatClient(url, "m", api_key_env=None, retries=0, timeout=1.0)
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="gave up after 1 tries") as e:
        client([{"role": "user", "content": "hi"}])
    assert not e.value.fatal and time.perf_counter() - t0 < 3


def test_retry_after_as_an_http_date(llm_server):
    import email.utils
    import time

    url, handler = llm_server
    client = ChatClient(url, "m", api_key_env=None, backoff=0.001, retries=1)
    handler.script = [(429, "slow down", {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)})]
    t0 = time.perf_counter()
    client([{"role": "user", "content": 'Reply as JSON: {"negative": "..."}\n<<<\na b c\n>>>'}])
    assert 1.0 < time.perf_counter() - t0 < 5


def test_an_answer_with_a_lone_surrogate_is_rejected_not_fatal(tmp_path):
    assert parse_reply('{"text": "a \\ud800 b"}', ("text",))[0] is None
    assert parse_reply('{"text": "a \\ud83d\\ude00 b"}', ("text",))[0] == {"text": "a \U0001F600 b"}

    class Surrogate(FakeLLM):
        def __call__(self, messages):
            answer = super().__call__(messages)
            with self.lock:
                first = len(self.calls) == 1
            return answer.replace('"}', ' \\ud800"}') if first else answer
    src = retrieval_file(tmp_path, n=3)
    stats = synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", Surrogate(), workers=1)
    assert stats["accepted"] == 3 and stats["tries"] == 4


def test_an_input_text_with_a_lone_surrogate_names_its_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "fine", "pos": ["p"]}\n{"query": "bad \\udc80", "pos": ["p"]}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: .*surrogate"):
        synthesize(Negatives(1, select=lambda r: False), src, tmp_path / "out.jsonl", FakeLLM())


def test_one_prompt_over_the_context_does_not_stop_a_one_worker_run(tmp_path):
    src = retrieval_file(tmp_path, n=4)
    poison = read_out(src)[1]["query"]
    llm = RefusingLLM(poison)
    stats = synthesize(Paraphrase("retrieval"), src, tmp_path / "out.jsonl", llm, max_tries=20, workers=1)
    assert stats["accepted"] == 3 and stats["records_without_any"] == 1 and stats["tries"] == 23
    # a failed request is no rejected answer: its "reason" is not fed back into the prompt
    assert not any("rejected" in m[-1]["content"] for m in llm.calls)


def test_resume_with_other_llm_settings_is_refused(tmp_path):
    class Model(FakeLLM):
        def __init__(self, model, **kw):
            super().__init__(**kw)
            self.model = model

        def settings(self):
            return {"model": self.model, "temperature": 0.8}
    src = retrieval_file(tmp_path, n=6)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SynthesisStopped):
        synthesize(Paraphrase("retrieval"), src, out, Model("a", stop_after=2), workers=1)
    with pytest.raises(ValueError, match="different run.*llm.*'a'.*'b'"):
        synthesize(Paraphrase("retrieval"), src, out, Model("b"), workers=1, resume=True)
    assert synthesize(Paraphrase("retrieval"), src, out, Model("a"), workers=1, resume=True)["accepted"] == 6
    client = ChatClient("http://localhost:1/v1", "m", extra_body={"top_p": 0.5})
    assert client.settings() == {"model": "m", "temperature": 0.8, "max_tokens": 2048, "extra_body": {"top_p": 0.5}}


def test_a_difference_of_exactly_the_threshold_is_not_more_than_it():
    src = " ".join(f"w{i}" for i in range(20))  # one sentence: a paraphrase must differ by more than 30%
    six = " ".join(f"y{i}" if i < 6 else f"w{i}" for i in range(20))  # 6 of 20 words: exactly 30%
    seven = " ".join(f"y{i}" if i < 7 else f"w{i}" for i in range(20))
    job = Paraphrase("classification")
    record = ClassificationRecord(src, "a")
    assert checks.difference(six, src) == 0.3
    assert "differs from the source by 30%" in job.check(record, {"text": six}, [])
    assert job.check(record, {"text": seven}, []) is None


def test_a_run_stopped_before_any_record_leaves_no_progress_file(tmp_path):
    src = retrieval_file(tmp_path, n=3)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SynthesisStopped, match="none of 3 records done"):
        synthesize(Paraphrase("retrieval"), src, out, RefusingLLM("Paraphrase", fatal=True), workers=2)
    assert not os.path.exists(str(out) + ".partial")  # the corrected command needs no --resume
    assert synthesize(Paraphrase("retrieval"), src, out, FakeLLM(), workers=2)["accepted"] == 3
