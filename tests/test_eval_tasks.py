"""Task definitions, instruction tables, bad input, the demo task file and `qzhou-jax eval`."""

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from qzhou_jax import cli
from qzhou_jax.config import ModelConfig
from qzhou_jax.eval.encoder import Encoder, length_buckets
from qzhou_jax.eval.run import check_result_names, evaluate, summary_table, write_results
from qzhou_jax.eval.tasks import TaskSpec, instruction_tables, is_symmetric, load_task_specs, metric_names
from qzhou_jax.tokenizer import ASSETS, DEMO_TOKENIZER, Tokenizer, format_prompt

DEMO_TASKS = os.path.join(ASSETS, "demo", "tasks.yaml")


class RecordingEncoder:
    """Deterministic embeddings from the prompt string; remembers every (text, instruction)."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, instruction=None, progress=False):
        self.seen += [(t, instruction) for t in texts]
        out = [np.random.default_rng(abs(hash(format_prompt(t, instruction))) % 2**32).standard_normal(8)
               for t in texts]
        return np.asarray(out, np.float32).reshape(len(texts), 8)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ tables
def test_instruction_tables_match_spec_section_2():
    tables = instruction_tables()
    eng, cmn = tables["MTEB(eng, v2)"], tables["CMTEB(cmn, v1)"]
    assert len(eng) == 41 and len(cmn) == 31
    sts = "Retrieve semantically similar text"
    for name in ("STS12", "STS17", "SICK-R", "BIOSSES", "STSBenchmark"):
        assert eng[name]["instruction"] == sts and eng[name]["symmetric"]
    for name in ("ATEC", "BQ", "LCQMC", "PAWSX", "STSB", "AFQMC", "QBQTC"):
        assert cmn[name]["instruction"] == sts
    assert cmn["Ocnli"]["instruction"] == cmn["Cmnli"]["instruction"] == sts + "."
    banking = "Given a online banking query, find the corresponding intents"
    assert eng["Banking77Classification"]["instruction"] == banking
    assert eng["ArguAna"]["instruction"] == "Given a claim, find documents that refute the claim"
    assert eng["SCIDOCS"]["instruction"] == ("Given a scientific paper title, retrieve paper abstracts that are cited "
                                             "by the given paper")
    fiqa = "Given a financial question, retrieve user replies that best answer the question"
    assert eng["FiQA2018"]["instruction"] == fiqa
    assert eng["TRECCOVID"]["instruction"] == "Given a query on COVID-19, retrieve documents that answer the query"
    web = "Given a web search query, retrieve relevant passages that answer the query"
    assert cmn["MMarcoRetrieval"]["instruction"] == web
    assert cmn["TNews"]["instruction"] == "Classify the fine-grained category of the given news title"
    assert cmn["IFlyTek"]["instruction"] == "Given an App description text, find the appropriate fine-grained category"
    chinese = "Given a Chinese search query, retrieve web passages that answer the question"
    for name in ("T2Retrieval", "DuRetrieval"):
        assert cmn[name]["instruction"] == chinese
    assert cmn["CLSClusteringS2S"]["instruction"] == "Identify the main category of scholar papers based on the titles"
    # who gets the instruction
    for table in tables.values():
        for name, e in table.items():
            assert e["symmetric"] == is_symmetric(name, e["type"]), name
    assert not eng["SCIDOCS"]["symmetric"] and eng["ArguAna"]["symmetric"] and eng["AskUbuntuDupQuestions"]["symmetric"]
    assert eng["CQADupstackUnixRetrieval"]["symmetric"] and cmn["T2Reranking"]["symmetric"]
    assert not cmn["T2Retrieval"]["symmetric"]


def test_names_from_the_tables_and_unknown_names():
    specs = load_task_specs("STSBenchmark, T2Retrieval,TNews")
    sts, t2, tnews = specs
    assert (sts.type, sts.split, sts.main_score, sts.language) == ("sts", "test", "cosine_spearman", ("eng-Latn",))
    assert (t2.type, t2.split, t2.symmetric, t2.option("ignore_identical_ids")) == ("retrieval", "dev", False, True)
    assert (tnews.split, tnews.option("samples_per_label")) == ("validation", 32)
    assert not sts.has_data
    with pytest.raises(ValueError, match="no data"):
        sts.check_files()
    with pytest.raises(ValueError, match=r"unknown task 'STSBenchmarkk'.*MTEB\(eng, v2\).*mteb_eng_v2.json.*"
                                         r"CMTEB\(cmn, v1\).*did you mean STSBenchmark"):
        load_task_specs("STSBenchmarkk")
    with pytest.raises(ValueError, match="appears twice"):
        load_task_specs(["TNews", "TNews"])


def test_data_dir_layout(tmp_path):
    (tmp_path / "STSBenchmark").mkdir()
    _write(tmp_path / "STSBenchmark" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.0},
                                                     {"sentence1": "c", "sentence2": "d", "score": 2.0},
                                                     {"sentence1": "e", "sentence2": "a", "score": 0.5}])
    (spec,) = load_task_specs("STSBenchmark", data_dir=tmp_path)
    assert spec.files == {"path": str(tmp_path / "STSBenchmark" / "test.jsonl")}
    enc = RecordingEncoder()
    result = evaluate([spec], enc)["STSBenchmark"]
    assert {i for _, i in enc.seen} == {"Retrieve semantically similar text"}  # symmetric: both sides
    assert result["qzhou_jax"]["task"]["name"] == "STSBenchmark"


# ------------------------------------------------------------------ task files
def test_task_file_paths_defaults_and_overrides(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "pairs.jsonl", [{"text1": "a", "text2": "b", "label": 1}, {"text1": "a", "text2": "c", "label": 0}])
    task_file = tmp_path / "conf" / "tasks.yaml"
    task_file.parent.mkdir()
    task_file.write_text(
        "defaults: {language: deu-Latn}\n"
        "tasks:\n"
        "  - name: pairs\n    type: pair_classification\n    path: ../data/pairs.jsonl\n    split: dev\n"
        "  - name: SprintDuplicateQuestions\n    path: ../data/pairs.jsonl\n    instruction: null\n")
    own, sprint = load_task_specs(str(task_file))
    assert own.files["path"] == str(data / "pairs.jsonl") and own.split == "dev" and own.language == ("deu-Latn",)
    assert own.symmetric and own.instruction is None and own.main_score == "max_ap"
    assert sprint.type == "pair_classification" and sprint.instruction is None and sprint.main_score == "max_ap"
    assert sprint.source == str(task_file)


@pytest.mark.parametrize("text,message", [
    ("- name: x\n  type: sts\n  pathh: a.jsonl\n", r"tasks.yaml: task 1 \('x'\): unknown key\(s\) 'pathh'"),
    ("- name: x\n  type: ranking\n  path: a.jsonl\n", r"tasks.yaml: task 'x': type 'ranking' is not one of"),
    ("- name: x\n  path: a.jsonl\n", r"tasks.yaml: task 1 \('x'\): unknown task 'x': not in the instruction tables"),
    ("- name: x\n  type: classification\n  path: a.jsonl\n", "classification needs a 'train' file"),
    ("- name: x\n  type: sts\n  path: a.jsonl\n  options: {n_experiments: 3}\n",
     "option 'n_experiments' does not apply"),
    ("- {type: sts}\n", "tasks.yaml: task 1: missing 'name'"),
    ("tasks: [\n", r"tasks.yaml:\d+: not valid YAML"),
    ("[]\n", "no tasks"),
])
def test_bad_task_files(tmp_path, text, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_task_specs(str(path))


def test_missing_data_file_names_the_task(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("- name: mine\n  type: sts\n  path: nowhere.jsonl\n")
    (spec,) = load_task_specs(str(path))
    with pytest.raises(FileNotFoundError, match=r"tasks.yaml: task 'mine': path .*nowhere.jsonl: no such file"):
        evaluate([spec], RecordingEncoder())


# ------------------------------------------------------------------ bad data
def _beir(root, corpus, queries, qrels):
    (root / "qrels").mkdir(parents=True)
    _write(root / "corpus.jsonl", corpus)
    _write(root / "queries.jsonl", queries)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels))
    return TaskSpec(name="b", type="retrieval", files={"path": str(root)})


CORPUS = [{"_id": "d1", "title": "", "text": "one"}, {"_id": "d2", "title": "T", "text": "two"}]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]


@pytest.mark.parametrize("corpus,queries,qrels,message", [
    (CORPUS, QUERIES, ["q1\td1\t1", "q2\td9\t1"], r"qrels/test.tsv:3: corpus-id 'd9' is not in .*corpus.jsonl"),
    (CORPUS, QUERIES, ["q7\td1\t1"], r"qrels/test.tsv:2: query-id 'q7' is not in .*queries.jsonl"),
    ([], QUERIES, ["q1\td1\t1"], r"corpus.jsonl: no documents \(empty corpus\)"),
    (CORPUS + [{"_id": "d1", "text": "again"}], QUERIES, ["q1\td1\t1"], r"corpus.jsonl:3: .*duplicate.*'d1'"),
    (CORPUS, QUERIES, ["q1\td1\tmany"], r"qrels/test.tsv:2: .*score.*'many'"),
    ([{"_id": "d1"}], QUERIES, ["q1\td1\t1"], r"corpus.jsonl:1: field 'text': missing"),
])
def test_bad_beir_input_names_file_and_id(tmp_path, corpus, queries, qrels, message):
    spec = _beir(tmp_path / "beir", corpus, queries, qrels)
    with pytest.raises(ValueError, match=message):
        evaluate([spec], RecordingEncoder())


@pytest.mark.parametrize("task_type,rows,message", [
    ("classification", [{"text": "a", "label": "x"}, {"text": "b"}], r"train.jsonl:2: missing field 'label'"),
    ("classification", [{"text": "a", "label": None}], r"train.jsonl:1: field 'label' must be a string or an integer"),
    ("retrieval", [{"query": "q", "pos": [], "neg": ["n"]}], r"data.jsonl:1: no positive passages"),
    ("retrieval", [{"query": "q", "neg": ["n"]}], r"data.jsonl:1: missing field 'pos' or 'positive'"),
    ("sts", [{"text1": "a", "text2": "b", "score": "high"}], r"data.jsonl:1: field 'score' must be a finite number"),
    ("sts", ["{broken"], r"data.jsonl:1: not valid JSON"),
    ("pair_classification", [{"text1": "a", "text2": "b", "label": 2}], r"data.jsonl:1: field 'label' must be 0 or 1"),
    ("clustering", [{"text": "a"}], r"data.jsonl:1: missing field 'label' or 'labels'"),
    ("sts", [], r"data.jsonl: no records \(empty file\)"),
    ("sts", [{"text1": "a", "text2": "b", "score": 3}], r"data.jsonl: 1 pair, all with score 3; STS .* at least two"),
    ("sts", [{"text1": "a", "text2": "b", "score": 2}, {"text1": "c", "text2": "d", "score": 2.0}],
     r"data.jsonl: 2 pairs, all with score 2;"),
    ("clustering", [{"text": "a", "label": 1}, {"text": "b", "label": 2}],
     r"^task 't': \S*data.jsonl: 2 texts x max_fraction_of_documents_to_embed 0.1 leaves none"),
])
def test_bad_jsonl_input_names_file_and_line(tmp_path, task_type, rows, message):
    if task_type == "classification":
        _write(tmp_path / "data.jsonl", [{"text": "t", "label": "x"}])
        _write(tmp_path / "train.jsonl", rows)
        files = {"path": str(tmp_path / "data.jsonl"), "train": str(tmp_path / "train.jsonl")}
    else:
        _write(tmp_path / "data.jsonl", rows)
        files = {"path": str(tmp_path / "data.jsonl")}
    options = {"max_fraction_of_documents_to_embed": 0.1} if task_type == "clustering" else {}
    spec = TaskSpec(name="t", type=task_type, files=files, options=options)
    with pytest.raises(ValueError, match=message):
        evaluate([spec], RecordingEncoder())


# ------------------------------------------------------------------ instruction rule in evaluation
def test_retrieval_records_instruction_sides(tmp_path):
    rows = [{"query": "q1", "pos": ["p1"], "neg": ["n1", "p2"], "instruction": "Find it"},
            {"query": "q2", "pos": ["p2"], "neg": ["p1"]}]
    _write(tmp_path / "r.jsonl", rows)
    enc = RecordingEncoder()
    asym = TaskSpec(name="r", type="retrieval", files={"path": str(tmp_path / "r.jsonl")}, instruction="Default")
    result = evaluate([asym], enc)["r"]
    assert ("q1", "Find it") in enc.seen and ("q2", "Default") in enc.seen  # a record's own instruction wins
    assert {i for t, i in enc.seen if t.startswith(("p", "n"))} == {None}  # documents: nothing
    assert result["qzhou_jax"]["counts"]["num_documents"] == 3  # union of pos and neg, deduplicated
    # symmetric: documents get the instruction the queries get, which must then be one
    sym = TaskSpec(name="ArguAna", type="retrieval", files={"path": str(tmp_path / "r.jsonl")}, instruction="Same")
    assert sym.symmetric
    with pytest.raises(ValueError, match=r"symmetric but its queries get 2 different instructions .*'Find it', "
                                         r"'Same'"):
        evaluate([sym], RecordingEncoder())
    rows[0]["instruction"] = "  "  # blank: none, as in training records, so the task's
    _write(tmp_path / "r.jsonl", rows)
    enc = RecordingEncoder()
    evaluate([sym], enc)
    assert {i for _, i in enc.seen} == {"Same"}
    rows[1]["instruction"] = rows[0]["instruction"] = "Find it"  # the records' own, on both sides
    _write(tmp_path / "r.jsonl", rows)
    enc = RecordingEncoder()
    evaluate([sym], enc)
    assert {i for _, i in enc.seen} == {"Find it"}
    rows[1]["instruction"] = "Other"  # without instructions, records' own ones do not matter either
    _write(tmp_path / "r.jsonl", rows)
    enc = RecordingEncoder()
    evaluate([sym], enc, use_instructions=False)
    assert {i for _, i in enc.seen} == {None}
    enc = RecordingEncoder()
    evaluate([asym], enc, use_instructions=False)
    assert {i for _, i in enc.seen} == {None}


def test_records_retrieval_metric_by_hand(tmp_path):
    _write(tmp_path / "r.jsonl", [{"query": "a", "pos": ["A"], "neg": ["B"]}, {"query": "b", "pos": ["B"], "neg": []}])

    class Exact:
        def encode(self, texts, instruction=None, progress=False):
            return np.array([[1.0, 0.0] if t.lower() == "a" else [0.0, 1.0] for t in texts])

    spec = TaskSpec(name="r", type="retrieval", files={"path": str(tmp_path / "r.jsonl")},
                    options={"k_values": [1, 2]}, main_score="ndcg_at_1")
    scores = evaluate([spec], Exact())["r"]["scores"]["test"][0]
    assert scores["ndcg_at_1"] == 1.0 and scores["mrr_at_2"] == 1.0 and scores["precision_at_2"] == 0.5
    assert scores["main_score"] == 1.0
    with pytest.raises(ValueError, match=r"task 'r': main_score 'ndcg_at_10' is not among the retrieval metrics"):
        TaskSpec(name="r", type="retrieval", files={"path": str(tmp_path / "r.jsonl")}, options={"k_values": [1]})


# ------------------------------------------------------------------ encoder buckets
def test_length_buckets():
    assert length_buckets(512, 1) == (16, 32, 64, 128, 256, 512)
    b = length_buckets(1024, 4)
    assert b[0] == 16 and b[-1] == 1024 and all(x % 8 == 0 for x in b)
    assert all(b2 / b1 <= 1.25 for b1, b2 in zip(b[4:], b[5:]))
    with pytest.raises(ValueError):
        length_buckets(64, 0)


# ------------------------------------------------------------------ demo tasks and the CLI
def test_demo_task_file_runs_in_seconds():
    from qzhou_jax.model import create_model

    cfg = ModelConfig.preset("tiny", compute_dtype="float32")
    params = create_model(cfg, seed=0).encoder.params()
    tok = Tokenizer(DEMO_TOKENIZER, max_length=64)
    specs = load_task_specs(DEMO_TASKS)
    assert [s.type for s in specs] == ["retrieval", "sts", "classification"]
    t0 = time.perf_counter()
    results = evaluate(specs, Encoder(params, cfg, tok, batch_size=32))
    assert time.perf_counter() - t0 < 60  # about 3 s once compiled, 10 s with compilation, on 2 idle cores
    for name, r in results.items():
        assert np.isfinite(r["main_score"]), name
        assert r["qzhou_jax"]["encoding"]["max_length"] == 64
    assert results["demo-retrieval"]["qzhou_jax"]["instructions"]["query"] == (
        "Given a question, retrieve passages that answer the question")
    table = summary_table(results)
    assert "demo-sts" in table and "mean (types)" in table
    for spec in specs:  # what main_score may be, checked when tasks are read, is what evaluators report
        assert _scalar_metrics(results[spec.name]) <= metric_names(spec.type, spec.options), spec.type


def _scalar_metrics(result):
    (split,) = result["scores"].values()
    return {k for k, v in split[0].items() if isinstance(v, (int, float)) and k != "main_score"}


def test_metric_names_are_what_the_other_evaluators_report(tmp_path):
    pairs = [{"text1": f"a{i}", "text2": f"b{i}", "label": i % 2} for i in range(12)]
    _write(tmp_path / "pairs.jsonl", pairs)
    _write(tmp_path / "clusters.jsonl", [{"text": f"t{i}", "label": f"c{i % 3}"} for i in range(60)])
    _write(tmp_path / "summ.jsonl", [{"text": "x", "human_summaries": ["h1", "h2"],
                                      "machine_summaries": [f"m{j}" for j in range(4)], "relevance": [1, 2, 3, 4]}])
    specs = [TaskSpec(name="p", type="pair_classification", files={"path": str(tmp_path / "pairs.jsonl")}),
             TaskSpec(name="c", type="clustering", files={"path": str(tmp_path / "clusters.jsonl")},
                      options={"n_clusters": 2, "max_documents_per_cluster": 20}),
             TaskSpec(name="s", type="summarization", files={"path": str(tmp_path / "summ.jsonl")})]
    results = evaluate(specs, RecordingEncoder())
    for spec in specs:
        assert _scalar_metrics(results[spec.name]) <= metric_names(spec.type, spec.options), spec.type


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_eval_cli_writes_results_and_table(model_dir, tmp_path, capsys):
    demo = os.path.dirname(DEMO_TASKS)
    tasks = tmp_path / "tasks.json"  # the demo's retrieval and STS tasks (classification: see above)
    tasks.write_text(json.dumps([
        {"name": "demo-retrieval", "type": "retrieval", "path": f"{demo}/retrieval_heldout.jsonl"},
        {"name": "demo-sts", "type": "sts", "path": f"{demo}/sts_heldout.jsonl",
         "instruction": "Retrieve semantically similar text"}]))
    out = tmp_path / "results.json"
    # an instruction file in the published tables' layout replaces the instructions it names
    table = tmp_path / "instructions.json"
    table.write_text(json.dumps({"demo-sts": "Find sentences that mean the same", "STSBenchmark": None}))
    rc = cli.main(["eval", "--model", str(model_dir), "--tasks", str(tasks), "--output", str(out),
                   "--results-dir", str(tmp_path / "per_task"), "--max-length", "32", "--bucket-steps", "0",
                   "--dtype", "float32", "--quiet", "--instructions", str(table)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "demo-sts" in captured.out and "cosine_spearman" in captured.out
    assert "names no instruction for demo-retrieval: they keep their own" in captured.err
    results = json.loads(out.read_text())
    assert list(results) == ["demo-retrieval", "demo-sts"]
    r = results["demo-sts"]
    assert r["qzhou_jax"]["model"]["path"] == str(model_dir)
    assert r["qzhou_jax"]["encoding"]["max_length"] == 32
    assert r["qzhou_jax"]["instructions"] == {"text1": "Find sentences that mean the same",
                                              "text2": "Find sentences that mean the same"}
    assert r["qzhou_jax"]["encoding"]["devices"] == 8  # data-parallel over the 8 simulated devices
    assert sorted(p.name for p in (tmp_path / "per_task").iterdir()) == ["demo-retrieval.json", "demo-sts.json"]
    assert not [p for p in tmp_path.rglob("*.tmp*")]


def test_instruction_files_in_the_published_layout(tmp_path, capsys):
    from qzhou_jax.eval.tasks import read_instruction_map, with_instructions

    path = tmp_path / "task_to_instructions.json"
    path.write_text(json.dumps({"STSBenchmark": "Find similar text", "SCIDOCS": "", "Banking77Classification": None}))
    table = read_instruction_map(path)
    specs = with_instructions(load_task_specs("STSBenchmark,SCIDOCS,TRECCOVID"), table)
    assert [s.instruction for s in specs] == ["Find similar text", None,
                                              "Given a query on COVID-19, retrieve documents that answer the query"]
    assert specs[0].symmetric and not specs[1].symmetric  # who gets it stays the table's rule
    for text, message in [("[]", "non-empty JSON object"), ('{"a": 1}', "task 'a': the instruction must be"),
                          ('{"a": "x",\n', ":2: not valid JSON")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_instruction_map(path)
    # a bad instruction file stops the command before the model loads (there is none here)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": "demo-sts", "type": "sts",
                                  "path": f"{os.path.dirname(DEMO_TASKS)}/sts_heldout.jsonl"}]))
    rc = cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", str(tasks), "--instructions",
                   str(path)])
    assert rc == 2 and f"{path}:2: not valid JSON" in capsys.readouterr().err


def test_eval_cli_bad_task_name_fails_before_loading(tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", "NoSuchTask", "--output",
                   str(tmp_path / "r.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown task 'NoSuchTask'" in err and "mteb_eng_v2.json" in err
    assert not (tmp_path / "r.json").exists()


def test_write_results_is_atomic(tmp_path):
    results = {"a/b": {"main_score": 1.0}}
    (path,) = write_results(results, tmp_path / "out", per_task=True)
    assert os.path.basename(path) == "a_b.json"
    write_results(results, tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text()) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.json", "out"]


def test_encoder_fine_buckets_same_embeddings_less_padding(model_dir):
    from qzhou_jax.checkpoint import load_pretrained

    cfg, params, tok_path = load_pretrained(model_dir, compute_dtype="float32")
    tok = Tokenizer(tok_path, max_length=64)
    texts = [json.loads(line)["text1"] for line in open(os.path.join(ASSETS, "demo", "sts_heldout.jsonl"))][:64]
    coarse = Encoder(params, cfg, tok, batch_size=16)
    fine = Encoder(params, cfg, tok, batch_size=16, buckets=length_buckets(64, 2))
    np.testing.assert_allclose(fine.encode(texts, instruction="Find it"), coarse.encode(texts, instruction="Find it"),
                               atol=2e-6)
    assert fine.padding_fraction < coarse.padding_fraction
    info = fine.describe()
    assert info["max_length"] == 64 and info["buckets"] == [16, 24, 32, 48, 64] and info["embedding_dim"] == 32
    with pytest.raises(ValueError, match="largest bucket 48 is below the tokenizer's max_length 64"):
        Encoder(params, cfg, tok, buckets=(16, 48))


def test_mteb_wrapper_from_pretrained(model_dir):
    import mteb
    from mteb.mocks import MockRetrievalTask, MockSTSTask

    from qzhou_jax.eval.mteb_model import QZhouMtebModel

    model = QZhouMtebModel.from_pretrained(model_dir, max_length=32, bucket_steps=0)
    meta = model.mteb_model_meta
    assert meta.name == "qzhou-jax/model" and meta.framework == ["JAX"]
    assert meta.embed_dim == 32 and meta.max_tokens == 32 and meta.n_parameters > 0
    results = mteb.evaluate(model, [MockSTSTask(), MockRetrievalTask()], cache=None, raise_error=True,
                            show_progress_bar=False)
    assert all(np.isfinite(r.get_score()) for r in results.task_results)


# ------------------------------------------------------------------ bad values, caught before encoding
@pytest.mark.parametrize("task_type,options,message", [
    ("retrieval", {"k_values": []}, r"option 'k_values': expected a non-empty list of positive integers, got \[\]"),
    ("retrieval", {"k_values": [0, 10]}, r"option 'k_values': expected a non-empty list"),
    ("classification", {"n_experiments": 0}, r"option 'n_experiments': expected a positive integer, got 0"),
    ("classification", {"samples_per_label": 0}, "option 'samples_per_label'"),
    ("sts", {"seed": "abc"}, r"option 'seed': expected an integer in \[0, 2\*\*32\), got 'abc'"),
    ("classification", {"seed": -1}, r"option 'seed': expected an integer in \[0, 2\*\*32\), got -1"),
    ("clustering", {"protocol": "fast"}, r"option 'protocol': expected 'bootstrap' or 'legacy'"),
    ("clustering", {"max_fraction_of_documents_to_embed": 2},
     r"option 'max_fraction_of_documents_to_embed': expected a fraction in \(0, 1\]"),
])
def test_option_values_are_checked_when_the_task_is_read(task_type, options, message):
    files = {"path": "x.jsonl", "train": "t.jsonl"} if task_type == "classification" else {"path": "x.jsonl"}
    with pytest.raises(ValueError, match=r"task 't': " + message):
        TaskSpec(name="t", type=task_type, files=files, options=options)


def test_main_score_is_checked_when_the_task_is_read():
    with pytest.raises(ValueError, match=r"task 't': main_score 'spearman_cos' is not among the sts metrics"):
        TaskSpec(name="t", type="sts", files={"path": "x.jsonl"}, main_score="spearman_cos")
    assert TaskSpec(name="t", type="clustering", files={"path": "x"}, main_score="ami").main_score == "ami"
    with pytest.raises(ValueError, match="main_score 'ami' is not among the clustering metrics"):
        TaskSpec(name="t", type="clustering", files={"path": "x"}, main_score="ami", options={"protocol": "legacy"})


def test_unknown_field_names_the_task():
    with pytest.raises(ValueError, match=r"task 't': fields: unknown field 'sentence1' for sts tasks"):
        TaskSpec(name="t", type="sts", files={"path": "x.jsonl"}, fields={"sentence1": "a"})


def test_missing_qrels_of_the_split_fail_before_any_encoding(tmp_path):
    spec = _beir(tmp_path / "beir", CORPUS, QUERIES, ["q1\td1\t1"])
    ok = TaskSpec(name="first", type="sts", files={"path": str(tmp_path / "sts.jsonl")})
    _write(tmp_path / "sts.jsonl", [{"text1": "a", "text2": "b", "score": 1.0}, {"text1": "c", "text2": "d", "score": 0}])
    enc = RecordingEncoder()
    with pytest.raises(FileNotFoundError, match=r"task 'b': .*qrels/dev.tsv: no such file \(split 'dev'\)"):
        evaluate([ok, dataclasses.replace(spec, split="dev")], enc)
    assert enc.seen == []


def test_non_finite_gold_scores_name_the_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text1": "a", "text2": "b", "score": 1}\n'
                                         '{"text1": "c", "text2": "d", "score": NaN}\n')
    spec = TaskSpec(name="t", type="sts", files={"path": str(tmp_path / "data.jsonl")})
    with pytest.raises(ValueError, match=r"data.jsonl:2: field 'score' must be a finite number, got nan"):
        evaluate([spec], RecordingEncoder())


def test_test_labels_missing_from_training_are_warned_about(tmp_path, caplog):
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    _write(tmp_path / "test.jsonl", [{"text": f"u{i}", "label": "abz"[i % 3]} for i in range(6)])
    spec = TaskSpec(name="c", type="classification", options={"n_experiments": 1},
                    files={"path": str(tmp_path / "test.jsonl"), "train": str(tmp_path / "train.jsonl")})
    with caplog.at_level("WARNING"):
        evaluate([spec], RecordingEncoder())
    assert "test.jsonl: 2 test record(s) carry labels the training file" in caplog.text
    assert "('z')" in caplog.text


def test_tasks_whose_result_files_would_collide(tmp_path):
    specs = [TaskSpec(name=n, type="sts", files={"path": "x.jsonl"}) for n in ("sick/a", "sick_a")]
    with pytest.raises(ValueError, match=r"task 'sick_a': its result file sick_a.json would overwrite task 'sick/a'"):
        check_result_names(specs)


def test_eval_cli_checks_output_and_numbers_before_loading(tmp_path, capsys):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": "s", "type": "sts", "path": str(tmp_path / "s.jsonl")}]))
    _write(tmp_path / "s.jsonl", [{"text1": "a", "text2": "b", "score": 1.0}])
    (tmp_path / "out").mkdir()
    rc = cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", str(tasks), "--output",
                   str(tmp_path / "out")])
    assert rc == 2 and "--output" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", str(tasks), "--mesh", "bogus"])
    assert rc == 2 and "--mesh: expected axis=size pairs" in capsys.readouterr().err
    for flag, value in (("--batch-size", "0"), ("--max-length", "0"), ("--bucket-steps", "-1")):
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--model", "m", "--tasks", str(tasks), flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_eval_cli_keeps_finished_tasks_when_a_later_one_fails(model_dir, tmp_path, capsys):
    demo = os.path.dirname(DEMO_TASKS)
    tasks = tmp_path / "tasks.json"
    (tmp_path / "bad.jsonl").write_text('{"text1": "a", "text2": "b", "score": 1}\n{broken\n')
    tasks.write_text(json.dumps([
        {"name": "demo-sts", "type": "sts", "path": f"{demo}/sts_heldout.jsonl"},
        {"name": "bad-line", "type": "sts", "path": str(tmp_path / "bad.jsonl")}]))
    out = tmp_path / "results.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--tasks", str(tasks), "--output", str(out),
                   "--max-length", "32", "--bucket-steps", "0", "--dtype", "float32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2: not valid JSON" in err
    assert "wrote the 1 finished task(s)" in err and list(json.loads(out.read_text())) == ["demo-sts"]


def test_the_official_evaluation_length_is_every_default():
    """recipe §6: texts are cut at 1024 tokens in QZhou's evaluation; every entry point that
    embeds for evaluation or export defaults to it (and HF models compute in bfloat16, as trained)."""
    import inspect

    from qzhou_jax import st_folder
    from qzhou_jax.config import ModelConfig
    from qzhou_jax.eval.mteb_model import QZhouMtebModel
    from qzhou_jax.train.config import EvalConfig

    parser = cli.build_parser()
    assert parser.parse_args(["eval", "--model", "m", "--tasks", "t"]).max_length == 1024
    assert parser.parse_args(["encode", "--model", "m", "--input", "i", "--output", "o"]).max_length == 1024
    assert EvalConfig().max_length == 1024 and st_folder.DEFAULT_MAX_SEQ_LENGTH == 1024
    assert inspect.signature(QZhouMtebModel.from_pretrained).parameters["max_length"].default == 1024
    hf = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e4}
    assert ModelConfig.from_hf(hf).compute_dtype == "bfloat16"
