"""Records, JSONL / BEIR / TFDS sources: validation with file:line and field, random access, pickling."""

import json
import logging
import math
import os
import pickle
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hf_utils import write_jsonl
from qzhou_jax.data.beir import BeirSource, doc_text, load_corpus, load_qrels, load_queries
from qzhou_jax.data.records import (
    ClassificationRecord, PairRecord, RecordError, RetrievalRecord, iter_rows, parse_record, record_to_dict,
    write_records,
)
from qzhou_jax.data.sources import JsonlSource, ListSource, Source, open_source


DEMO = Path(__file__).resolve().parents[1] / "qzhou_jax" / "assets" / "demo"


# ------------------------------------------------------------------------------ parse_record

def test_parse_each_family():
    r = parse_record({"query": "q", "pos": ["p1", "p2"], "neg": ["n"], "instruction": "Find it"}, "retrieval")
    assert r == RetrievalRecord("q", ("p1", "p2"), ("n",), "Find it")
    r = parse_record({"query": "q", "pos": "p"}, "retrieval")  # pos as a string; neg, instruction optional
    assert r == RetrievalRecord("q", ("p",), (), None)
    assert parse_record({"query": "q", "pos": "p", "neg": None, "instruction": " "}, "retrieval").instruction is None
    assert parse_record({"text1": "a", "text2": "b", "score": 3}, "sts") == PairRecord("a", "b", 3.0)
    assert parse_record({"text1": "a", "text2": "b", "score": "3.5"}, "sts").score == 3.5
    assert parse_record({"text": "t", "label": 3}, "classification") == ClassificationRecord("t", "3")
    assert parse_record({"text": "t", "label": 3.0}, "classification").label == "3"
    assert parse_record({"text": "t", "label": True}, "classification").label == "true"


def test_field_mapping():
    obj = {"anchor": "a", "positive": "p", "negative": ["n1", "n2"]}
    r = parse_record(obj, "retrieval", {"query": "anchor", "pos": "positive", "neg": "negative"})
    assert r == RetrievalRecord("a", ("p",), ("n1", "n2"))
    r = parse_record({"sentence1": "x", "sentence2": "y", "score": 1}, "sts", {"text1": "sentence1",
                                                                              "text2": "sentence2"})
    assert (r.text1, r.text2) == ("x", "y")
    with pytest.raises(ValueError, match="unknown field 'anchor' for retrieval"):
        parse_record(obj, "retrieval", {"anchor": "query"})
    with pytest.raises(ValueError, match="unknown task family"):
        parse_record(obj, "nli")


@pytest.mark.parametrize("family,obj,field,what", [
    ("retrieval", {"pos": ["p"]}, "query", "missing"),
    ("retrieval", {"query": "q"}, "pos", "missing"),
    ("retrieval", {"query": "", "pos": ["p"]}, "query", "empty text"),
    ("retrieval", {"query": "  \n", "pos": ["p"]}, "query", "whitespace-only"),
    ("retrieval", {"query": 5, "pos": ["p"]}, "query", "must be a string"),
    ("retrieval", {"query": "q", "pos": []}, "pos", "empty list"),
    ("retrieval", {"query": "q", "pos": ["p", ""]}, "pos", "item 1: empty text"),
    ("retrieval", {"query": "q", "pos": ["p"], "neg": [None]}, "neg", "item 0: must be a string"),
    ("retrieval", {"query": "q", "pos": {"a": 1}}, "pos", "string or a list"),
    ("retrieval", {"query": "q", "pos": "p", "instruction": 3}, "instruction", "must be a string"),
    ("sts", {"text1": "a", "text2": "b", "score": "n/a"}, "score", "not a number"),
    ("sts", {"text1": "a", "text2": "b", "score": True}, "score", "must be a number"),
    ("sts", {"text1": "a", "text2": "b", "score": float("nan")}, "score", "not a finite number"),
    ("sts", {"text1": "a", "text2": "b", "score": "inf"}, "score", "not a finite number"),
    ("sts", {"text1": "a", "text2": "b", "score": None}, "score", "must be a number"),
    ("sts", {"text1": "a", "text2": "b"}, "score", "missing"),
    ("classification", {"text": "t", "label": ""}, "label", "empty label"),
    ("classification", {"text": "t", "label": 0.5}, "label", "string or an integer"),
    ("classification", {"text": "t", "label": [1]}, "label", "string or an integer"),
])
def test_bad_values_name_location_and_field(family, obj, field, what):
    with pytest.raises(RecordError) as e:
        parse_record(obj, family, where="data.jsonl:7")
    msg = str(e.value)
    assert msg.startswith(f"data.jsonl:7: field {field!r}: "), msg
    assert what in msg


def test_missing_field_lists_the_record_keys_and_uses_the_data_name():
    with pytest.raises(RecordError, match=r"f.jsonl:2: field 'anchor': missing \(the record has: query, pos\)"):
        parse_record({"query": "q", "pos": "p"}, "retrieval", {"query": "anchor"}, "f.jsonl:2")
    with pytest.raises(RecordError, match="f.jsonl:3: expected a JSON object, got a list"):
        parse_record(["q"], "retrieval", where="f.jsonl:3")


def test_record_to_dict_round_trip():
    for r, fam in [(RetrievalRecord("q", ("p",), ("n",), "i"), "retrieval"), (RetrievalRecord("q", ["p"]), "retrieval"),
                   (PairRecord("a", "b", 2.5), "sts"), (ClassificationRecord("t", "x"), "classification")]:
        assert parse_record(json.loads(json.dumps(record_to_dict(r))), fam) == r
    assert "instruction" not in record_to_dict(RetrievalRecord("q", ("p",)))


# ------------------------------------------------------------------------------ JsonlSource

def test_demo_files_validate():
    for fam, name, n in [("retrieval", "retrieval_train", 1482), ("sts", "sts_train", 1500),
                         ("classification", "classification_train", 1200)]:
        s = JsonlSource(DEMO / f"{name}.jsonl", fam)
        assert len(s) == n and s.name == name and s.skipped == 0 and isinstance(s, Source)
    assert len(s.label_names) == 14 and s.labels.dtype == np.int32 and s.labels.max() == 13


def test_random_access_equals_sequential_parse(tmp_path):
    rows = [{"query": f"q{i} ünïcode 中文", "pos": [f"p{i}"], "neg": [f"n{i}"] * (i % 3)} for i in range(50)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(r)
        if i % 7 == 0:
            lines.append("   ")  # blank lines are skipped
    path = write_jsonl(tmp_path / "r.jsonl", lines)
    src = JsonlSource(path, "retrieval")
    expected = [parse_record(obj, "retrieval", where=w) for w, obj in iter_rows(path)]
    assert len(src) == len(expected) == 50
    assert src.offsets.dtype == np.int64 and not src.offsets.flags.writeable
    for i in np.random.default_rng(0).permutation(50):
        assert src[np.int64(i)] == expected[i]
    assert list(src) == expected  # iteration stops at IndexError
    assert src[-1] == expected[-1] and src[-50] == expected[0]
    for bad in (50, -51):
        with pytest.raises(IndexError):
            src[bad]
    with pytest.raises(TypeError):
        src["1"]


def test_last_line_without_newline_crlf_and_bom(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\r\n\r\n{"text": "b", "label": 2}')
    src = JsonlSource(path, "classification")
    assert [src[0], src[1]] == [ClassificationRecord("a", "x"), ClassificationRecord("b", "2")]
    assert src.label_names == ["2", "x"] and src.labels.tolist() == [1, 0]


BAD_LINES = [  # (line, field named in the message or None, words in the message)
    ('{"text1": "a", "text2": "b", "score": 1', None, "not valid JSON (Expecting ',' delimiter at column 40)"),
    ('{"text1": "a", "score": 1}', "text2", "missing"),
    ('{"text1": "", "text2": "b", "score": 1}', "text1", "empty text"),
    ('{"text1": "a", "text2": "b", "score": "high"}', "score", "not a number"),
    ('{"text1": "a", "text2": "b", "text1": "c", "score": 1}', "text1", "given twice in one object"),
    ('{"text1": "a", "text2": "b", "score": "1_000"}', "score", "not a number: '1_000'"),
    # a lone UTF-16 surrogate escape parses to a str that UTF-8 cannot encode (hashing, tokenizing)
    ('{"text1": "a\\ud800b", "text2": "b", "score": 1}', None, "lone surrogate"),
    # json.loads' and float()'s other errors: OverflowError, ValueError, RecursionError naming no line
    ('{"text1": "a", "text2": "b", "score": 1' + "0" * 400 + "}", "score", "not a finite number"),
    ('{"text1": "a", "text2": "b", "score": 1' + "0" * 5000 + "}", None, "not valid JSON (Exceeds the limit"),
    ('{"text1": ' + "[" * 10_000 + "]" * 10_000 + "}", None, "not valid JSON (maximum recursion depth"),
]


@pytest.mark.parametrize("line,field,what", BAD_LINES,
                         ids=lambda v: v[:40] + "..." if isinstance(v, str) and len(v) > 80 else None)
def test_bad_line_stops_with_file_line_and_field(tmp_path, line, field, what):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text1": "a", "text2": "b", "score": 1}, "", line])
    with pytest.raises(RecordError) as e:
        JsonlSource(path, "sts")
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert what in msg
    if field:
        assert f"field {field!r}" in msg


def test_bad_lines_skipped_and_counted(tmp_path, caplog):
    good = {"text1": "a", "text2": "b", "score": 1}
    path = write_jsonl(tmp_path / "s.jsonl", [good] + [b[0] for b in BAD_LINES] + [good, "[1, 2]"])
    with open(path, "ab") as f:
        f.write(b'{"text1": "\xff", "text2": "b", "score": 1}\n')
    with caplog.at_level(logging.WARNING):
        src = JsonlSource(path, "sts", skip_bad_records=True)
    bad = len(BAD_LINES) + 2  # and "[1, 2]" and the invalid UTF-8 line
    assert len(src) == 2 and src.skipped == bad
    assert [src[0], src[1]] == [PairRecord("a", "b", 1.0)] * 2
    assert f"skipped {bad} bad records" in caplog.text and f"{path}:2: not valid JSON" in caplog.text
    assert f"{path}:3: field 'text2': missing" in caplog.text


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(RecordError, match=f"{path}:2: not valid UTF-8"):
        JsonlSource(path, "classification")


def test_eval_and_encode_readers_take_a_bom_and_name_the_line_of_bad_utf8(tmp_path):
    from qzhou_jax.data.jsonl import read_texts
    from qzhou_jax.eval.data import load_pairs

    path = tmp_path / "sts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text1": "a", "text2": "b", "score": 1}\r\n\r\n{"text1": "c", "text2": "d", "score": 2}')
    assert load_pairs(str(path), "sts").values == [1.0, 2.0]
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(b'\xef\xbb\xbf"first"\n{"text": "second"}\n')
    assert read_texts(texts) == ["first", "second"]
    texts.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=f"{texts}:2: not valid UTF-8"):
        read_texts(texts)


def test_reads_from_threads(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"text {i} " * (i % 50 + 1), "label": str(i % 7)}
                                              for i in range(400)])
    src = JsonlSource(path, "classification")
    expected = [src[i] for i in range(len(src))]
    order = np.random.default_rng(1).integers(0, len(src), 4000)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(src.__getitem__, order))
    assert got == [expected[i] for i in order]


def test_empty_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(RecordError, match=f"{empty}: no records \\(empty file\\)"):
        JsonlSource(empty, "retrieval")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"x": 1}', "nope"])
    with pytest.raises(RecordError, match="all 2 non-blank lines are bad"):
        JsonlSource(bad, "retrieval", skip_bad_records=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        JsonlSource(tmp_path / "missing.jsonl", "retrieval")
    with pytest.raises(ValueError, match="unknown task family"):
        JsonlSource(empty, "pairs")


def test_pickle_copy_reads_without_the_parent_handle(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": f"l{i % 3}"} for i in range(20)])
    src = JsonlSource(path, "classification", name="cls")
    first = src[3]  # opens the handle in this process
    state = src.__getstate__()
    assert state["_file"] is None and "_lock" not in state
    copy = pickle.loads(pickle.dumps(src))
    assert copy.name == "cls" and len(copy) == 20 and copy[3] == first and copy[-1] == src[-1]
    assert copy.labels.tolist() == src.labels.tolist() and copy.label_names == ["l0", "l1", "l2"]
    src._pid = -1  # as after a fork: the handle is reopened, not shared
    old = src._file
    assert src[4] == copy[4] and src._file is not old
    src.close()
    copy.close()


def test_file_changed_after_scan_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}])
    src = JsonlSource(path, "classification")
    write_jsonl(path, [{"text": "a much longer text now", "label": "x"}])
    with pytest.raises(RecordError, match="changed after it was scanned"):
        src[0]


def test_list_source_and_from_dicts():
    recs = [ClassificationRecord("a", "x"), ClassificationRecord("b", "y"), ClassificationRecord("c", "x")]
    s = ListSource(recs, name="mem")
    assert s.family == "classification" and len(s) == 3 and s[-1] == recs[-1] and isinstance(s, Source)
    assert s.label_names == ["x", "y"] and s.labels.tolist() == [0, 1, 0]
    with pytest.raises(TypeError, match="record 1 is a PairRecord"):
        ListSource([recs[0], PairRecord("a", "b", 1.0)])
    with pytest.raises(ValueError, match="no records"):
        ListSource([])
    with pytest.raises(RecordError, match="mem:2: field 'pos': missing"):
        ListSource.from_dicts([{"query": "q", "pos": "p"}, {"query": "q"}], "retrieval", name="mem")
    s = ListSource.from_dicts([{"anchor": "q", "positive": "p"}], "retrieval", {"query": "anchor", "pos": "positive"})
    assert s[0] == RetrievalRecord("q", ("p",))
    assert pickle.loads(pickle.dumps(s))[0] == s[0]


def test_open_source(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"s1": "a", "s2": "b", "score": 2}])
    s = open_source({"task": "sts", "path": str(path), "fields": {"text1": "s1", "text2": "s2"}, "weight": 3})
    assert isinstance(s, JsonlSource) and s.name == "pairs" and s[0] == PairRecord("a", "b", 2.0)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text1": "a", "text2": "b", "score": 2}])
    s = open_source({"task": "sts", "path": plain, "name": "stsb", "format": "jsonl", "skip_bad_records": True})
    assert s.name == "stsb" and len(s) == 1
    for spec, match in [({"task": "nli", "path": path}, "task must be one of"),
                        ({"task": "sts"}, "no path"),
                        ({"task": "sts", "path": path, "format": "csv"}, "unknown format"),
                        ({"task": "sts", "path": tmp_path}, "BEIR folders hold retrieval data")]:
        with pytest.raises(ValueError, match=match):
            open_source(spec)


def test_write_records_is_atomic_and_does_not_clobber(tmp_path):
    out = tmp_path / "out.jsonl"

    def records(fail_at=None):
        for i in range(5):
            if i == fail_at:
                raise RecordError("in.jsonl:4: field 'x': bad")
            yield PairRecord(f"a{i}", "b", float(i))

    with pytest.raises(RecordError):
        write_records(out, records(fail_at=3))
    assert not out.exists() and os.listdir(tmp_path) == []
    assert write_records(out, records()) == 5
    assert [r.score for r in JsonlSource(out, "sts")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="output exists"):
        write_records(out, records())
    assert write_records(out, [PairRecord("x", "y", 1)], overwrite=True) == 1


# ------------------------------------------------------------------------------ BEIR

def make_beir(folder: Path, corpus=None, queries=None, qrels=None, split="train") -> Path:
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Title one", "text": "Text one."},
        {"_id": "d2", "title": "", "text": "Text two."},
        {"_id": 3, "text": "Text three."},  # integer id, no title
        {"_id": "d4", "title": "Unused", "text": "Never relevant."}]
    queries = queries if queries is not None else [
        {"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}, {"_id": "q3", "text": "third?"},
        {"_id": "q4", "text": "not in qrels"}]
    qrels = qrels if qrels is not None else [("q2", "3", 1), ("q1", "d1", 1), ("q1", "d2", 2), ("q3", "d2", 0)]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + ["\t".join(map(str, r)) for r in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_beir_source_small(tmp_path):
    folder = make_beir(tmp_path / "mini")
    src = BeirSource(folder)
    assert src.name == "mini" and src.family == "retrieval" and len(src) == 2
    # queries.jsonl order; positives in qrels order; title joined with a space when non-empty (mteb)
    assert src[0] == RetrievalRecord("first?", ("Title one Text one.", "Text two."), ())
    assert src[1] == RetrievalRecord("second?", ("Text three.",), ())
    assert src.queries_without_positive == 1 and src.num_qrels == 4
    assert BeirSource(folder, title_sep="\n", instruction="Find")[0].pos[0] == "Title one\nText one."
    assert BeirSource(folder, instruction="Find")[0].instruction == "Find"
    assert open_source({"task": "retrieval", "path": folder})[1] == src[1]
    assert load_qrels(folder, "train") == {"q2": {"3": 1}, "q1": {"d1": 1, "d2": 2}, "q3": {"d2": 0}}
    assert load_queries(folder)["q4"] == "not in qrels"
    tsv = folder / "qrels" / "train.tsv"  # a BOM (spreadsheet exports) and CRLF line ends
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes().replace(b"\n", b"\r\n"))
    assert load_qrels(folder, "train") == {"q2": {"3": 1}, "q1": {"d1": 1, "d2": 2}, "q3": {"d2": 0}}
    assert load_corpus(folder / "corpus.jsonl", keep={"3"}) == {"3": {"title": "", "text": "Text three."}}
    assert doc_text({"title": "T", "text": ""}) == "T"
    assert doc_text({"title": "", "text": " body "}) == "body" and doc_text({"title": " T", "text": "b "}) == "T b"


def test_beir_errors_name_file_line_and_id(tmp_path):
    f = make_beir(tmp_path / "a", qrels=[("q1", "d1", 1), ("q9", "d1", 1)])
    with pytest.raises(RecordError, match=r"qrels/train.tsv:3: field 'query-id': 'q9' is not in .*queries.jsonl"):
        BeirSource(f)
    f = make_beir(tmp_path / "b", qrels=[("q1", "d1", 1), ("q2", "nope", 0)])
    with pytest.raises(RecordError, match=r"train.tsv:3: field 'corpus-id': 'nope' is not in .*corpus.jsonl"):
        BeirSource(f)
    f = make_beir(tmp_path / "c", corpus=[{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}])
    dup = r"corpus.jsonl:2: field '_id': duplicate document id 'd1' \(first on line 1\)"
    with pytest.raises(RecordError, match=dup):
        BeirSource(f)
    f = make_beir(tmp_path / "d", queries=[{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}])
    with pytest.raises(RecordError, match=r"queries.jsonl:2: field '_id': duplicate query id 'q1'"):
        BeirSource(f)
    f = make_beir(tmp_path / "e", corpus=[])
    with pytest.raises(RecordError, match=r"corpus.jsonl: no documents \(empty corpus\)"):
        BeirSource(f)
    f = make_beir(tmp_path / "f", qrels=[("q1", "d1", 1), ("q1", "d1", 1)])
    with pytest.raises(RecordError, match=r"train.tsv:3: duplicate qrel .*first at line 2"):
        BeirSource(f)
    f = make_beir(tmp_path / "g", qrels=[("q1", "d1", "x")])
    with pytest.raises(RecordError, match=r"train.tsv:2: field 'score': not a number"):
        BeirSource(f)
    f = make_beir(tmp_path / "h", corpus=[{"_id": "d1", "title": "", "text": " "}], qrels=[("q1", "d1", 1)])
    with pytest.raises(RecordError, match=r"train.tsv:2: field 'corpus-id': document 'd1' .* has no title and no text"):
        BeirSource(f)
    f = make_beir(tmp_path / "i", qrels=[("q1", "d1", 0)])
    with pytest.raises(RecordError, match="no query has a qrel with score > 0"):
        BeirSource(f)
    f = make_beir(tmp_path / "j", corpus=[{"_id": "d1", "title": "t"}])
    with pytest.raises(RecordError, match=r"corpus.jsonl:1: field 'text': missing"):
        BeirSource(f)
    with pytest.raises(FileNotFoundError, match=r"qrels/test.tsv: no such file .*splits here: train"):
        BeirSource(make_beir(tmp_path / "k"), split="test")
    os.remove(tmp_path / "k" / "queries.jsonl")
    with pytest.raises(FileNotFoundError, match="queries.jsonl: no such file"):
        BeirSource(tmp_path / "k")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        BeirSource(tmp_path / "nothing")


def test_beir_scifact(shared_data):
    folder = shared_data / "retrieval" / "scifact_beir"
    src = BeirSource(folder, split="train")
    assert len(src) == 809 and src.num_qrels == 919 and src.queries_without_positive == 0
    assert sum(len(r.pos) for r in src.records) == 919
    assert all(r.neg == () and r.instruction is None for r in src.records)
    qrels = load_qrels(folder, "train")
    assert sum(len(v) for v in qrels.values()) == 919 and len(qrels) == 809
    assert len(load_corpus(folder)) == 5183


# ------------------------------------------------------------------------------ TFDS

class _ClassLabel:
    def __init__(self, names):
        self.names = names


class _FakeDataSource:
    def __init__(self, examples, features):
        self.examples = examples
        self.dataset_info = types.SimpleNamespace(features=features)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


@pytest.fixture
def fake_tfds(monkeypatch):
    """A stand-in `tensorflow_datasets` module with `data_source` (the real one is an optional extra)."""
    datasets = {
        ("news", "train"): _FakeDataSource(
            [{"text": np.bytes_("Stocks rise".encode()), "label": np.int64(1)},
             {"text": "Goal!".encode(), "label": np.int64(2)},
             {"text": b"", "label": np.int64(0)},
             {"text": b"Rain again", "label": np.int64(0)}],
            {"text": object(), "label": _ClassLabel(["weather", "business", "sports"])}),
        ("pairs", "validation"): _FakeDataSource(
            [{"sentence1": b"a", "sentence2": b"b", "score": np.float32(3.5)},
             {"sentence1": b"c", "sentence2": b"d", "score": np.float32(1.0)}], {}),
        ("qa", "train"): _FakeDataSource(
            [{"query": b"q", "pos": np.array([b"p1", b"p2"], dtype=object), "neg": np.array([], dtype=object)}], {}),
    }
    calls = []

    def data_source(name, split, data_dir=None):
        calls.append((name, split, data_dir))
        return datasets[name, split]

    mod = types.ModuleType("tensorflow_datasets")
    mod.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod)
    return calls


def test_tfds_source_with_a_fake_module(fake_tfds):
    from qzhou_jax.data.tfds_source import TfdsSource

    with pytest.raises(RecordError, match=r"tfds:news/train\[2\]: field 'text': empty text"):
        TfdsSource("news", "train", "classification")
    src = TfdsSource("news", "train", "classification", skip_bad_records=True, data_dir="/d")
    assert fake_tfds[-1] == ("news", "train", "/d")
    assert len(src) == 3 and src.skipped == 1 and src.name == "news/train"
    # ClassLabel ids become class names; the bad example is skipped in the index
    assert [src[i] for i in range(3)] == [ClassificationRecord("Stocks rise", "business"),
                                          ClassificationRecord("Goal!", "sports"),
                                          ClassificationRecord("Rain again", "weather")]
    assert src.label_names == ["business", "sports", "weather"] and src.labels.tolist() == [0, 1, 2]
    copy = pickle.loads(pickle.dumps(src))
    assert copy._ds is None and copy[-1] == src[-1]

    pairs = open_source({"task": "sts", "format": "tfds", "path": "pairs", "split": "validation", "name": "stsb",
                         "fields": {"text1": "sentence1", "text2": "sentence2"}})
    assert pairs.name == "stsb" and pairs[0] == PairRecord("a", "b", 3.5) and isinstance(pairs[0].score, float)
    qa = TfdsSource("qa", "train", "retrieval")
    assert qa[0] == RetrievalRecord("q", ("p1", "p2"), ())


def test_tfds_missing_says_how_to_install(monkeypatch):
    from qzhou_jax.data.tfds_source import TfdsSource

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "qzhou-jax\[tfds\]"'):
        TfdsSource("news", "train", "classification")


def test_scores_stay_finite_floats():
    r = parse_record({"text1": "a", "text2": "b", "score": "  4 "}, "sts")
    assert r.score == 4.0 and math.isfinite(r.score)
