"""recipe §4 transforms, and the `qzhou-jax data` command end to end (in process)."""

from collections import Counter
from pathlib import Path

import pytest

from hf_utils import write_jsonl
from qzhou_jax.cli import main
from qzhou_jax.data.records import (
    BadRecords, ClassificationRecord, PairRecord, RecordError, RetrievalRecord, iter_rows,
)
from qzhou_jax.data.sources import JsonlSource
from qzhou_jax.tokenizer import Tokenizer, format_prompt
from qzhou_jax.data.transforms import (
    RC_PROMPT, binary_labels, claim_evidence_to_retrieval, classification_to_triplets, conversation_to_retrieval,
    nli_to_scored_pairs, reading_comprehension_to_retrieval, sts_with_swapped, title_body_to_retrieval,
    triplets_to_retrieval,
)


DEMO = Path(__file__).resolve().parents[1] / "qzhou_jax" / "assets" / "demo"


# ----------------------------------------------------------------------------------------- pairs

def test_sts_with_swapped():
    out = list(sts_with_swapped([{"text1": "a", "text2": "b", "score": 4.5}, PairRecord("c", "c", 1.0)]))
    assert out == [PairRecord("a", "b", 4.5), PairRecord("b", "a", 4.5), PairRecord("c", "c", 1.0),
                   PairRecord("c", "c", 1.0)]
    out = list(sts_with_swapped([{"sentence1": "x", "sentence2": "y", "score": "2"}],
                                fields={"text1": "sentence1", "text2": "sentence2"}))
    assert out == [PairRecord("x", "y", 2.0), PairRecord("y", "x", 2.0)]
    with pytest.raises(RecordError, match="^row 2: field 'score': not a number"):
        list(sts_with_swapped([{"text1": "a", "text2": "b", "score": 1}, {"text1": "a", "text2": "b", "score": "?"}]))


def test_nli_labels_and_directions():
    rows = [{"premise": "p", "hypothesis": "h1", "label": "entailment"},
            {"premise": "p", "hypothesis": "h2", "label": "NEUTRAL"},
            {"premise": "p", "hypothesis": "h3", "label": "contradiction"}]
    out = list(nli_to_scored_pairs(rows))
    assert out == [PairRecord("p", "h1", 2.0), PairRecord("h1", "p", 2.0), PairRecord("p", "h2", 1.0),
                   PairRecord("h2", "p", 1.0), PairRecord("p", "h3", 0.0), PairRecord("h3", "p", 0.0)]
    assert len(list(nli_to_scored_pairs(rows, both_directions=False))) == 3


def test_nli_integer_conventions():
    rows = [{"premise": "p", "hypothesis": h, "label": k} for k, h in enumerate(["a", "b", "c"])]
    snli = [r.score for r in nli_to_scored_pairs(rows, int_labels="snli", both_directions=False)]
    clue = [r.score for r in nli_to_scored_pairs(rows, int_labels="clue", both_directions=False)]
    assert snli == [2.0, 1.0, 0.0]  # 0 entailment, 1 neutral, 2 contradiction
    assert clue == [1.0, 2.0, 0.0]  # 0 neutral, 1 entailment, 2 contradiction
    assert [r.score for r in nli_to_scored_pairs([{"premise": "p", "hypothesis": "h", "label": "1"}],
                                                 int_labels="snli", both_directions=False)] == [1.0]
    floats = [{"premise": "p", "hypothesis": "h", "label": k} for k in (0.0, 2.0)]  # a float-typed label column
    assert [r.score for r in nli_to_scored_pairs(floats, int_labels="snli", both_directions=False)] == [2.0, 0.0]
    with pytest.raises(RecordError, match="unknown NLI label 1.5"):
        list(nli_to_scored_pairs([{"premise": "p", "hypothesis": "h", "label": 1.5}], int_labels="snli"))
    with pytest.raises(RecordError, match="row 1: field 'label': integer label 0 is ambiguous"):
        list(nli_to_scored_pairs(rows))
    with pytest.raises(ValueError, match="int_labels must be one of"):
        nli_to_scored_pairs(rows, int_labels="mnli")


@pytest.mark.parametrize("label,what", [("maybe", "unknown NLI label 'maybe'"), ("-", "no gold label"),
                                        (-1, "no gold label"), (-1.0, "no gold label"), (3, "unknown NLI label 3")])
def test_nli_bad_labels(tmp_path, label, what):
    path = write_jsonl(tmp_path / "nli.jsonl", [{"premise": "p", "hypothesis": "h", "label": "neutral"},
                                                {"premise": "p", "hypothesis": "h", "label": label}])
    with pytest.raises(RecordError) as e:
        list(nli_to_scored_pairs(iter_rows(path), int_labels="snli"))
    assert str(e.value).startswith(f"{path}:2: field 'label': ") and what in str(e.value)
    errors = BadRecords(skip=True)
    assert len(list(nli_to_scored_pairs(iter_rows(path, errors), int_labels="snli", errors=errors))) == 2
    assert errors.count == 1


def test_binary_labels():
    rows = [{"text1": "a", "text2": "b", "label": v} for v in ["true", "No", "YES", "false", 1, 0, True, "1", "0"]]
    assert [r.score for r in binary_labels(rows, both_directions=False)] == [1, 0, 1, 0, 1, 0, 1, 1, 0]
    assert list(binary_labels(rows[:1])) == [PairRecord("a", "b", 1.0), PairRecord("b", "a", 1.0)]
    out = list(binary_labels([{"sentence1": "x", "sentence2": "y", "score": 1}],
                             fields={"text1": "sentence1", "text2": "sentence2", "label": "score"}))
    assert out[0] == PairRecord("x", "y", 1.0)
    with pytest.raises(RecordError, match="row 1: field 'label': not a binary label: 2"):
        list(binary_labels([{"text1": "a", "text2": "b", "label": 2}]))


# ------------------------------------------------------------------------------ classification

def test_classification_to_triplets():
    rows = [{"text": f"{lab}-{i}", "label": lab} for lab in "abc" for i in range(4)]
    rows += [{"text": "lonely", "label": "d"}, {"text": "a-0", "label": "a"}]  # single-text label; a duplicate
    stats = {}
    out = classification_to_triplets(rows, num_negatives=3, seed=7, stats=stats)
    assert len(out) == 12 and stats["records"] == 12
    assert stats["dropped_labels"] == {"d": 1} and stats["duplicates"] == 1 and stats["labels"] == 4
    for r in out:
        lab = r.query.split("-")[0]
        assert r.pos[0] != r.query and r.pos[0].split("-")[0] == lab
        assert len(r.neg) == 3 and len(set(r.neg)) == 3
        assert all(not n.startswith(lab) for n in r.neg)
    assert [r.query for r in out] == [row["text"] for row in rows[:12]]
    assert out == classification_to_triplets(rows, num_negatives=3, seed=7)  # deterministic per seed
    assert out != classification_to_triplets(rows, num_negatives=3, seed=8)
    # a dominant label: fewer other-label texts than asked, all of them are used
    skew = [{"text": f"big{i}", "label": "big"} for i in range(50)] + [{"text": "s1", "label": "s"},
                                                                         {"text": "s2", "label": "s"}]
    out = classification_to_triplets(skew, num_negatives=4, seed=0, instruction="Classify")
    assert all(sorted(r.neg) == ["s1", "s2"] for r in out if r.query.startswith("big"))
    assert out[0].instruction == "Classify"
    with pytest.raises(ValueError, match="at least two labels"):
        classification_to_triplets([ClassificationRecord("a", "x"), ClassificationRecord("b", "x")])


# ------------------------------------------------------------------------------------- retrieval

def test_title_body_and_triplets():
    out = list(title_body_to_retrieval([{"title": "T", "body": "B"}, {"title": "T2", "abstract": "A"}][:1],
                                       instruction="Given a title, find the body"))
    assert out == [RetrievalRecord("T", ("B",), (), "Given a title, find the body")]
    out = list(title_body_to_retrieval([{"title": "T2", "abstract": "A", "instruction": "own"}],
                                       fields={"pos": "abstract"}, instruction="default"))
    assert out == [RetrievalRecord("T2", ("A",), (), "own")]
    with pytest.raises(RecordError, match=r"row 1: field 'body': missing \(the record has: title, abstract\)"):
        list(title_body_to_retrieval([{"title": "T2", "abstract": "A"}]))
    out = list(triplets_to_retrieval([{"anchor": "a", "positive": "p", "negative": "n"},
                                      {"anchor": "b", "positive": "q"}]))
    assert out == [RetrievalRecord("a", ("p",), ("n",)), RetrievalRecord("b", ("q",), ())]


def test_conversation_to_retrieval():
    openai = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi?"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    out = list(conversation_to_retrieval([openai, sharegpt]))
    assert out == [RetrievalRecord("hi?", ("hello",)), RetrievalRecord("2+2?", ("4",)), RetrievalRecord("q", ("a",))]
    assert len(list(conversation_to_retrieval([openai], first_turn_only=True))) == 1
    tools = {"messages": [{"role": "user", "content": "weather in Paris?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                          {"role": "tool", "tool_call_id": "1", "content": "{\"temp\": 21}"},
                          {"role": "assistant", "content": "It is 21 degrees."}]}
    assert list(conversation_to_retrieval([tools])) == [RetrievalRecord("weather in Paris?", ("It is 21 degrees.",))]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    with pytest.raises(RecordError, match="row 1: field 'messages': item 1: whitespace-only text"):
        list(conversation_to_retrieval([bad]))
    with pytest.raises(RecordError, match="no user turn followed by an assistant turn"):
        list(conversation_to_retrieval([{"messages": [{"role": "assistant", "content": "x"}]}]))
    with pytest.raises(RecordError, match="turn 0: unknown role 'narrator'"):
        list(conversation_to_retrieval([{"messages": [{"role": "narrator", "content": "x"}]}]))
    with pytest.raises(RecordError, match="field 'dialog': missing"):
        list(conversation_to_retrieval([sharegpt], fields={"messages": "dialog"}))


def test_reading_comprehension_to_retrieval():
    rows = [{"context": "北京是中国的首都。", "question": "中国的首都是哪里？", "answer": "北京"},
            {"context": "C", "question": "Q", "answers": {"text": ["x", "x", "y"], "answer_start": [0, 0, 3]}}]
    out = list(reading_comprehension_to_retrieval(rows[:1]))
    assert out == [RetrievalRecord("北京是中国的首都。\n请阅读上述文章，回答下列问题：中国的首都是哪里？", ("北京",))]
    assert RC_PROMPT == "\n请阅读上述文章，回答下列问题："
    out = list(reading_comprehension_to_retrieval(rows[1:], fields={"answer": "answers"}))
    assert out[0].pos == ("x", "y")
    errors = BadRecords(skip=True)
    unanswerable = {"context": "C", "question": "Q", "answer": {"text": [], "answer_start": []}}
    assert list(reading_comprehension_to_retrieval([unanswerable], errors=errors)) == []
    assert errors.count == 1 and "field 'answer': no answer" in errors.examples[0]


def test_reading_comprehension_cuts_long_contexts_around_the_answer():
    """A context past the query token limit would lose the prompt and the question in training;
    max_context_chars keeps a window around the answer (SQuAD's answer_start when it points at
    the answer, else its first occurrence), and the beginning when the answer is not there."""
    context = "".join(f"第{i}句话。" for i in range(100)) + "答案在这里。" + "".join(f"后{i}。" for i in range(100))
    rows = [{"context": context, "question": "答案在哪里？", "answer": "答案在这里"},
            {"context": "x" * 500 + "ANSWER" + "y" * 500 + "ANSWER", "question": "Q",
             "answer": {"text": ["ANSWER"], "answer_start": [1006]}},
            {"context": "z" * 500, "question": "Q", "answer": "not in it"},
            {"context": "short", "question": "Q", "answer": "s"}]
    stats = {}
    out = list(reading_comprehension_to_retrieval(rows, max_context_chars=50, stats=stats))
    first = out[0].query
    assert first.endswith(RC_PROMPT + "答案在哪里？") and "答案在这里" in first
    assert len(first) == 50 + len(RC_PROMPT + "答案在哪里？")
    assert out[1].query == "y" * 44 + "ANSWER" + RC_PROMPT + "Q"  # the occurrence answer_start names
    assert out[2].query == "z" * 50 + RC_PROMPT + "Q" and out[3].query == "short" + RC_PROMPT + "Q"
    assert stats == {"contexts_cut": 3, "answer_outside_window": 1}
    with pytest.raises(ValueError, match="max_context_chars"):
        list(reading_comprehension_to_retrieval(rows, max_context_chars=0))


def test_claim_evidence_to_retrieval():
    rows = [{"claim": "c1", "evidence": "e1", "label": "SUPPORTS"},
            {"claim": "c1", "evidence": ["e2", "e3"], "label": "REFUTES"},
            {"claim": "c2", "evidence": "e4", "label": "refutes"},
            {"claim": "c1", "evidence": "e5", "label": "NOT ENOUGH INFO"},
            {"claim": "c3", "evidence": "e6", "label": "support"}]
    stats = {}
    out = claim_evidence_to_retrieval(rows, instruction="Given a claim, find evidence", stats=stats)
    assert out == [RetrievalRecord("c1", ("e1",), ("e2", "e3"), "Given a claim, find evidence"),
                   RetrievalRecord("c3", ("e6",), (), "Given a claim, find evidence")]
    assert stats == {"claims": 3, "records": 2, "without_support": 1, "not_enough_info": 1}
    with pytest.raises(RecordError, match="row 1: field 'label': unknown label 'MAYBE'"):
        claim_evidence_to_retrieval([{"claim": "c", "evidence": "e", "label": "MAYBE"}])


# ------------------------------------------------------------------------------ shared datasets

def test_snli_and_ocnli_pairs(shared_data):
    for path, n in [("training/snli/dev_pairs.jsonl", 9842), ("training/ocnli_fewclue/test_public.jsonl", 2520)]:
        out = list(nli_to_scored_pairs(iter_rows(shared_data / path)))
        assert len(out) == 2 * n
        if "snli" in path:
            assert Counter(r.score for r in out) == {2.0: 2 * 3329, 1.0: 2 * 3235, 0.0: 2 * 3278}
        else:
            assert Counter(r.score for r in out) == {2.0: 1680, 1.0: 1680, 0.0: 1680}


def test_stsb_swapped_and_snli_triplets(shared_data):
    out = list(sts_with_swapped(iter_rows(shared_data / "sts/stsb_en/train.jsonl"),
                                fields={"text1": "sentence1", "text2": "sentence2"}))
    assert len(out) == 2 * 5749 and out[1] == PairRecord(out[0].text2, out[0].text1, out[0].score)
    assert min(r.score for r in out) == 0.0 and max(r.score for r in out) == 5.0
    trip = list(triplets_to_retrieval(iter_rows(shared_data / "training/snli/triplets.jsonl")))
    assert len(trip) == 5864 and all(len(r.pos) == 1 and len(r.neg) == 1 for r in trip)
    pawsx = list(binary_labels(iter_rows(shared_data / "zh_pairs/pawsx/dev.jsonl"), both_directions=False,
                               fields={"text1": "sentence1", "text2": "sentence2", "label": "score"}))
    assert Counter(r.score for r in pawsx) == {0.0: 1147, 1.0: 853}


def test_banking77_triplets(shared_data):
    stats = {}
    out = classification_to_triplets(iter_rows(shared_data / "classification/banking77/train.jsonl"),
                                     num_negatives=4, seed=0, stats=stats)
    assert len(out) == 10003 and stats["labels"] == 77 and stats["dropped_labels"] == {}
    assert all(len(r.neg) == 4 for r in out)


# ------------------------------------------------------------------------------ command line

def test_cli_transform_end_to_end(tmp_path, capsys):
    src = write_jsonl(tmp_path / "nli.jsonl", [{"s1": "a", "s2": "b", "gold": "entailment"},
                                              {"s1": "c", "s2": "d", "gold": "contradiction"}])
    out = tmp_path / "pairs.jsonl"
    rc = main(["data", "transform", "nli", "--input", str(src), "--output", str(out),
               "--fields", "text1=s1", "text2=s2", "--fields", "label=gold"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().err
    pairs = JsonlSource(out, "sts")
    assert [pairs[i] for i in range(4)] == [PairRecord("a", "b", 2), PairRecord("b", "a", 2),
                                            PairRecord("c", "d", 0), PairRecord("d", "c", 0)]
    # an existing output is kept unless --overwrite
    before = out.read_bytes()
    assert main(["data", "transform", "nli", "--input", str(src), "--output", str(out), "--fields", "text1=s1",
                 "text2=s2", "label=gold", "--one-direction"]) == 2
    assert "output exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["data", "transform", "nli", "--input", str(src), "--output", str(out), "--fields", "text1=s1",
                 "text2=s2", "label=gold", "--one-direction", "--overwrite"]) == 0
    assert len(JsonlSource(out, "sts")) == 2


def test_cli_failing_run_leaves_no_output(tmp_path, capsys):
    rows = [{"text": f"t{i}", "label": "x" if i % 2 else "y"} for i in range(10)]
    src = write_jsonl(tmp_path / "cls.jsonl", rows[:6] + ['{"text": "", "label": "x"}'] + rows[6:])
    out = tmp_path / "triplets.jsonl"
    assert main(["data", "transform", "classification-triplets", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:7: field 'text': empty text" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cls.jsonl"]
    rc = main(["data", "transform", "classification-triplets", "--input", str(src), "--output", str(out),
               "--skip-bad-records", "--num-negatives", "2", "--seed", "3", "--instruction", "Classify"])
    assert rc == 0 and "1 bad rows skipped" in capsys.readouterr().err
    recs = list(JsonlSource(out, "retrieval"))
    assert len(recs) == 10 and all(len(r.neg) == 2 and r.instruction == "Classify" for r in recs)


def test_cli_an_empty_result_unwritable_folder_or_sigterm_keep_the_old_output(tmp_path, capsys, monkeypatch):
    """No records (an empty input, or every row skipped) is an error that keeps an existing output;
    an output folder that cannot be written fails before any work; SIGTERM unwinds as Ctrl-C does
    (exit 143, the temporary file removed, the old output kept, the signal's handler restored)."""
    import os
    import signal

    from qzhou_jax.data import records

    old = tmp_path / "keep.jsonl"
    old.write_text("good old output\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_rows = write_jsonl(tmp_path / "bad.jsonl", [{"a": 1}, {"b": 2}])
    for src, extra in ((empty, []), (bad_rows, ["--skip-bad-records"])):
        assert main(["data", "transform", "sts-swap", "--input", str(src), "--output", str(old), "--overwrite",
                     *extra]) == 2
        assert f"{src}: no sts records to write" in capsys.readouterr().err
        assert old.read_text() == "good old output\n"
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"text": t, "label": "x"} for t in "abc"])
    assert main(["data", "transform", "classification-triplets", "--input", str(one_label), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert f"{one_label}: negatives need texts of at least two labels, got only 'x'" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"text1": "a", "text2": "b", "score": 1.0}])
    with monkeypatch.context() as m:
        m.setattr(records.os, "access", lambda *a: False)
        assert main(["data", "transform", "sts-swap", "--input", str(src), "--output", str(old), "--overwrite"]) == 2
    assert f"{old}: cannot write in {tmp_path} (no write permission)" in capsys.readouterr().err

    real = records.write_jsonl

    def killed_midway(path, recs):
        with open(path, "w") as f:
            f.write('{"half": ')
        os.kill(os.getpid(), signal.SIGTERM)
        return real(path, recs)  # the handler raises before this line finishes

    monkeypatch.setattr(records, "write_jsonl", killed_midway)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "transform", "sts-swap", "--input", str(src), "--output", str(old), "--overwrite"]) == 143
    assert "terminated" in capsys.readouterr().err
    assert old.read_text() == "good old output\n" and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert signal.getsignal(signal.SIGTERM) == before


def test_cli_other_kinds_and_errors(tmp_path, capsys):
    src = write_jsonl(tmp_path / "rc.jsonl", [{"context": "C", "question": "Q", "answer": "A"}])
    out = tmp_path / "rc_out.jsonl"
    assert main(["data", "transform", "reading-comprehension", "--input", str(src), "--output", str(out)]) == 0
    assert JsonlSource(out, "retrieval")[0] == RetrievalRecord("C" + RC_PROMPT + "Q", ("A",))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a?"},
                                                               {"role": "assistant", "content": "A"},
                                                               {"role": "user", "content": "b?"},
                                                               {"role": "assistant", "content": "B"}]}])
    for flag, n in (([], 2), (["--first-turn-only"], 1)):
        assert main(["data", "transform", "conversation", "--input", str(chat), "--output", str(out),
                     "--overwrite", *flag]) == 0
        assert len(JsonlSource(out, "retrieval")) == n
    x = str(tmp_path / "x")
    bad = [["data", "transform", "nli", "--input", str(src), "--output", x, "--fields", "oops"],
           ["data", "transform", "nli", "--input", str(src), "--output", x, "--fields", "query=a"],
           ["data", "transform", "sts-swap", "--input", str(src), "--output", x, "--instruction", "i"],
           ["data", "transform", "title-body", "--input", str(tmp_path / "none.jsonl"), "--output", x],
           ["data", "transform", "reading-comprehension", "--input", str(src), "--output", x, "--num-negatives", "0"],
           ["data", "check", "--task", "retrieval", "--input", str(src), "--tokenizer", str(tmp_path / "none")]]
    for argv, msg in zip(bad, ["expected OURS=THEIRS", "unknown field 'query' for nli", "--instruction does not apply",
                               "no such file", "--num-negatives applies to classification-triplets only",
                               "no tokenizer_config.json"]):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_check(tmp_path, capsys):
    assert main(["data", "check", "--task", "classification", "--input", str(DEMO / "classification_train.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "1200 classification records" in text and "labels: 14" in text
    assert main(["data", "check", "--task", "retrieval", "--input", str(DEMO / "retrieval_train.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "1482 retrieval records" in out and "listed negatives that are a positive of their query" in out
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q", "pos": ["a"], "neg": ["b", "x"]},
                                                    {"query": "q", "pos": ["b"]}, {"query": "r", "pos": ["x"]}])
    assert main(["data", "check", "--task", "retrieval", "--input", str(pairs)]) == 0
    assert "queries in several records: 1; listed negatives that are a positive of their query " \
           "(left out in training): 1" in capsys.readouterr().out
    assert main(["data", "check", "--task", "sts", "--input", str(DEMO / "sts_train.jsonl")]) == 0
    assert "scores: min 0" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"anchor": "a", "positive": "p"}, {"anchor": "b"}])
    assert main(["data", "check", "--task", "retrieval", "--input", str(bad), "--fields", "query=anchor",
                 "pos=positive"]) == 2
    assert f"{bad}:2: field 'positive': missing" in capsys.readouterr().err
    assert main(["data", "check", "--task", "retrieval", "--input", str(bad), "--fields", "query=anchor",
                 "pos=positive", "--skip-bad-records"]) == 0
    assert "1 retrieval records, 1 bad records skipped" in capsys.readouterr().out
    # token lengths against the training limits (cut from the end), prompts included
    tok = str(DEMO.parent / "tokenizer")
    long = write_jsonl(tmp_path / "long.jsonl", [{"query": "word " * (40 * k), "pos": ["p"]} for k in range(1, 5)])
    assert main(["data", "check", "--task", "retrieval", "--input", str(long), "--tokenizer", tok,
                 "--query-max-length", "100", "--instruction", "Find it"]) == 0
    out = capsys.readouterr().out
    ids = Tokenizer(tok, max_length=10_000).encode([format_prompt("word " * (40 * k), "Find it") for k in range(1, 5)])
    over = sum(len(x) > 100 for x in ids)
    assert 0 < over < 4 and "queries: p50 " in out and f"{over} ({over / 4:.1%}) longer than 100 tokens" in out
    assert "passages: p50 " in out and "0 (0.0%) longer than 1536 tokens" in out
    # --symmetric: passages carry the instruction too, as a symmetric dataset trains them
    plain, prompted = (len(Tokenizer(tok).encode([format_prompt("p", i)])[0]) for i in (None, "Find it"))
    assert main(["data", "check", "--task", "retrieval", "--input", str(long), "--tokenizer", tok,
                 "--instruction", "Find it", "--symmetric"]) == 0
    assert f"passages: p50 {prompted}, " in capsys.readouterr().out and prompted > plain
