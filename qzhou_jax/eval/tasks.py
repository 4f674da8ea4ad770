"""Task definitions as data: type, files, language, instruction, who gets the instruction.

A task comes from a task file (YAML or JSON) or by name from the shipped instruction tables
(MTEB(eng, v2) and CMTEB(cmn, v1), see `qzhou_jax/assets/instructions/README.md`):

    specs = load_task_specs("tasks.yaml")                # a task file
    specs = load_task_specs("STSBenchmark,T2Retrieval")  # names from the tables
    specs = load_task_specs(["STSBenchmark"], data_dir="data")  # data/STSBenchmark/test.jsonl

A task file is a list of tasks, or a mapping with `tasks` (the list) and optional `defaults`
(keys applied to every task). Each task:

    - name: scifact                 # required; a table name brings its type, instruction, ...
      type: retrieval               # retrieval, reranking, sts, pair_classification,
                                    # classification, clustering, summarization
      path: data/scifact            # BEIR folder or JSONL file (relative to the task file)
      train: train.jsonl            # classification only: the logistic regression's data
      format: beir                  # retrieval: beir (a folder) or records (a file); inferred
      split: test                   # split name in the results (BEIR: which qrels file)
      language: eng-Latn            # or a list
      instruction: "Given a ..."    # null: no instruction
      symmetric: false              # instruction on both sides; default from recipe §2
      main_score: ndcg_at_10        # default per type
      fields: {text1: sentence1}    # field names in the files
      options: {k_values: [1, 10]}  # protocol settings, see OPTIONS

Instruction rule (recipe §2): asymmetric retrieval and reranking put the instruction on
queries only; symmetric tasks (every classification, clustering, STS, pair-classification and
summarization task, and the rerankers / retrieval tasks in SYMMETRIC_TASKS) put the same
instruction on both sides.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from qzhou_jax.config import read_json
from qzhou_jax.eval.data import DEFAULT_FIELDS
from qzhou_jax.tokenizer import ASSETS

TASK_TYPES = ("retrieval", "reranking", "sts", "pair_classification", "classification", "clustering",
              "summarization")
SYMMETRIC_TYPES = frozenset({"sts", "pair_classification", "classification", "clustering", "summarization"})
SYMMETRIC_TASKS = frozenset({
    "AskUbuntuDupQuestions", "MindSmallReranking", "MMarcoReranking", "T2Reranking", "CMedQAv1-reranking",
    "CMedQAv2-reranking", "ArguAna", "CQADupstackGamingRetrieval", "CQADupstackUnixRetrieval",
})
# reranking records whose query is a list of texts: metrics of each record's candidates ranked by
# their best score over its texts (mteb's max_over_subqueries, MindSmallReranking's main score)
SUBQUERIES = "max_over_subqueries_"
MAIN_SCORES = {"retrieval": "ndcg_at_10", "reranking": "map_at_1000", "sts": "cosine_spearman",
               "summarization": "cosine_spearman", "pair_classification": "max_ap",
               "classification": "accuracy", "clustering": "v_measure"}
# option -> (types it applies to, default); defaults are mteb 2.x's
OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "k_values": (("retrieval", "reranking"), [1, 3, 5, 10, 20, 100, 1000]),
    "ignore_identical_ids": (("retrieval", "reranking"), False),
    "n_experiments": (("classification",), 10),
    "samples_per_label": (("classification",), 8),
    "max_iter": (("classification",), 100),
    "train_split": (("classification",), "train"),
    "protocol": (("clustering",), "bootstrap"),
    "max_fraction_of_documents_to_embed": (("clustering",), 0.04),
    "max_document_to_embed": (("clustering",), None),
    "max_documents_per_cluster": (("clustering",), 16384),
    "n_clusters": (("clustering",), 10),
    "k_mean_batch_size": (("clustering",), 512),
    "max_depth": (("clustering",), None),
    "clustering_batch_size": (("clustering",), 500),
    "seed": (TASK_TYPES, 42),
}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _optional_positive_int(v: Any) -> bool:
    return v is None or _positive_int(v)


# option -> (check, what a good value is)
_OPTION_CHECKS: dict[str, tuple[Any, str]] = {
    "k_values": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive_int, v)),
                 "a non-empty list of positive integers"),
    "ignore_identical_ids": (lambda v: isinstance(v, bool), "true or false"),
    "n_experiments": (_positive_int, "a positive integer"),
    "samples_per_label": (_positive_int, "a positive integer"),
    "max_iter": (_positive_int, "a positive integer"),
    "train_split": (lambda v: isinstance(v, str) and v != "", "a split name"),
    "protocol": (lambda v: v in ("bootstrap", "legacy"), "'bootstrap' or 'legacy'"),
    "max_fraction_of_documents_to_embed": (lambda v: v is None or (isinstance(v, (int, float))
                                                                   and not isinstance(v, bool) and 0 < v <= 1),
                                           "a fraction in (0, 1], or null"),
    "max_document_to_embed": (_optional_positive_int, "a positive integer or null"),
    "max_documents_per_cluster": (_positive_int, "a positive integer"),
    "n_clusters": (_positive_int, "a positive integer"),
    "k_mean_batch_size": (_positive_int, "a positive integer"),
    "max_depth": (_optional_positive_int, "a positive integer or null"),
    "clustering_batch_size": (_positive_int, "a positive integer"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
             "an integer in [0, 2**32)"),
}



def metric_names(task_type: str, options: Mapping[str, Any] | None = None) -> set[str]:
    """The scalar metrics the evaluator of `task_type` reports (mteb's names): what `main_score`
    may be, checked when the task is read rather than after it has been encoded."""
    options = options or {}
    if task_type in ("retrieval", "reranking"):
        ks = options.get("k_values", OPTIONS["k_values"][1])
        names = {f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr", "hit_rate") for k in ks}
        return names | {SUBQUERIES + n for n in names} if task_type == "reranking" else names
    if task_type == "sts":
        return {f"{f}_{c}" for f in ("cosine", "manhattan", "euclidean") for c in ("pearson", "spearman")} | {
            "pearson", "spearman"}
    if task_type == "summarization":
        return {f"{f}_{c}" for f in ("cosine", "dot") for c in ("pearson", "spearman")} | {"pearson", "spearman"}
    if task_type == "pair_classification":
        metrics = ("accuracy", "f1", "precision", "recall", "ap")
        return {f"{f}_{m}" for f in ("similarity", "cosine", "manhattan", "euclidean", "dot", "max") for m in metrics}
    if task_type == "classification":
        return {f"{m}{w}" for m in ("f1", "precision", "recall", "ap") for w in ("", "_weighted")} | {"accuracy"}
    if task_type == "clustering":
        return {"v_measure", "v_measure_std"} | (
            {"ami", "ami_std"} if options.get("protocol", OPTIONS["protocol"][1]) == "bootstrap" else set())
    raise ValueError(f"unknown task type {task_type!r}")


TABLES = {
    "MTEB(eng, v2)": os.path.join(ASSETS, "instructions", "mteb_eng_v2.json"),
    "CMTEB(cmn, v1)": os.path.join(ASSETS, "instructions", "cmteb_cmn_v1.json"),
}
_ENTRY_KEYS = {"name", "type", "path", "train", "files", "format", "split", "language", "instruction", "symmetric",
               "main_score", "fields", "options", "hf_subset"}


def is_symmetric(name: str, task_type: str) -> bool:
    """recipe §2: does the document side get the instruction too?"""
    return task_type in SYMMETRIC_TYPES or name in SYMMETRIC_TASKS


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    `files` maps roles to absolute paths: `path` (the evaluated data: a BEIR folder or a JSONL
    file) and, for classification, `train`. `instruction` is None for no instruction;
    retrieval records may carry their own per-query instruction, which then wins for that
    query. `symmetric` None means recipe §2's rule; `main_score` "" means the type's
    default. `source` says where the spec came from (task file or table), for messages.
    """

    name: str
    type: str
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    format: str = ""
    language: tuple[str, ...] = ("eng-Latn",)
    instruction: str | None = None
    symmetric: bool | None = None
    main_score: str = ""
    split: str = "test"
    hf_subset: str = "default"
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        where = f"{self.source}: task {self.name!r}" if self.source else f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"{self.source or 'task'}: a task needs a non-empty 'name'")
        if self.type not in TASK_TYPES:
            raise ValueError(f"{where}: type {self.type!r} is not one of {', '.join(TASK_TYPES)}")
        lang = self.language
        lang = (lang,) if isinstance(lang, str) else tuple(lang)
        if not lang or not all(isinstance(x, str) and x for x in lang):
            raise ValueError(f"{where}: language must be a string or a list of strings, got {self.language!r}")
        object.__setattr__(self, "language", lang)
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise ValueError(f"{where}: instruction must be a string or null, got {self.instruction!r}")
        if self.instruction == "":
            object.__setattr__(self, "instruction", None)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", is_symmetric(self.name, self.type))
        elif not isinstance(self.symmetric, bool):
            raise ValueError(f"{where}: symmetric must be true or false, got {self.symmetric!r}")
        if not self.main_score:
            object.__setattr__(self, "main_score", MAIN_SCORES[self.type])
        fmt = self.format
        if self.type == "retrieval":
            if not fmt:
                path = self.files.get("path")
                fmt = "beir" if path and os.path.isdir(path) else "records"
            if fmt not in ("beir", "records"):
                raise ValueError(f"{where}: format {fmt!r}: retrieval reads 'beir' (a folder) or 'records' (JSONL)")
        elif fmt not in ("", "jsonl"):
            raise ValueError(f"{where}: format {fmt!r}: {self.type} tasks read JSONL files")
        object.__setattr__(self, "format", fmt or "jsonl")
        for role in self.files:
            if role not in ("path", "train", "qrels"):
                raise ValueError(f"{where}: unknown file role {role!r} (known: path, train, qrels)")
        if self.type == "classification" and self.files and "train" not in self.files:
            raise ValueError(f"{where}: classification needs a 'train' file (the classifier's training data) "
                             "besides 'path'")
        for key, value in self.options.items():
            types = OPTIONS.get(key, ((), None))[0]
            if self.type not in types:
                known = sorted(k for k, (t, _) in OPTIONS.items() if self.type in t)
                raise ValueError(f"{where}: option {key!r} does not apply to {self.type} tasks (known: {known})")
            check, want = _OPTION_CHECKS[key]
            if not check(value):
                raise ValueError(f"{where}: option {key!r}: expected {want}, got {value!r}")
        known = metric_names(self.type, self.options)
        if self.main_score not in known:
            raise ValueError(f"{where}: main_score {self.main_score!r} is not among the {self.type} metrics "
                             f"({', '.join(sorted(known))})")
        if not isinstance(self.fields, Mapping) or not all(isinstance(v, str) and v for v in self.fields.values()):
            raise ValueError(f"{where}: fields must map field names to the data's names, got {self.fields!r}")
        for key in self.fields:
            if key not in DEFAULT_FIELDS[self.type]:
                raise ValueError(f"{where}: fields: unknown field {key!r} for {self.type} tasks "
                                 f"(known: {sorted(DEFAULT_FIELDS[self.type])})")

    @property
    def where(self) -> str:
        """'<task file>: task <name>' for messages."""
        return f"{self.source}: task {self.name!r}" if self.source else f"task {self.name!r}"

    def option(self, key: str) -> Any:
        return self.options.get(key, OPTIONS[key][1])

    @property
    def has_data(self) -> bool:
        return "path" in self.files

    def check_files(self) -> None:
        """Fail early, naming the task, when a data file or folder is missing."""
        where = self.where
        if not self.has_data:
            raise ValueError(f"{where}: no data: give 'path' in a task file (or --data-dir holding "
                             f"{self.name}/) to evaluate it here, or run it through mteb with "
                             "qzhou_jax.eval.mteb_model.QZhouMtebModel")
        for role, path in self.files.items():
            want_dir = role == "path" and self.format == "beir"
            ok = os.path.isdir(path) if want_dir else os.path.isfile(path)
            if not ok:
                raise FileNotFoundError(f"{where}: {role} {path}: no such {'folder' if want_dir else 'file'}")
        if self.format == "beir":  # the folder's files, and the qrels of the evaluated split
            folder = self.files["path"]
            needed = [os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl")]
            if "qrels" not in self.files:
                needed.append(os.path.join(folder, "qrels", f"{self.split}.tsv"))
            for path in needed:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{where}: {path}: no such file (split {self.split!r})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["language"] = list(self.language)
        d["files"] = dict(self.files)
        d["fields"] = dict(self.fields)
        d["options"] = {k: self.option(k) for k, (types, _) in OPTIONS.items() if self.type in types}
        return d


# ------------------------------------------------------------------ instruction tables
@functools.lru_cache(maxsize=None)
def instruction_tables() -> dict[str, dict[str, dict[str, Any]]]:
    """benchmark -> task name -> entry (type, instruction, symmetric, language, splits, ...)."""
    out = {}
    for bench, path in TABLES.items():
        with open(path, encoding="utf-8") as f:
            out[bench] = json.load(f)["tasks"]
    return out


def table_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    for bench, tasks in instruction_tables().items():
        if name in tasks:
            return bench, tasks[name]
    return None


def instruction_for(name: str) -> str | None:
    """QZhou's instruction for a task of the tables (None if the task is not there)."""
    found = table_entry(name)
    return None if found is None else found[1]["instruction"]


def _unknown_name(name: str, source: str = "") -> ValueError:
    names = [n for tasks in instruction_tables().values() for n in tasks]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    tables = " or ".join(f"{b} ({p})" for b, p in TABLES.items())
    prefix = f"{source}: " if source else ""
    return ValueError(f"{prefix}unknown task {name!r}: not in the instruction tables {tables}{hint}; "
                      "define it in a task file with 'type' and 'path'")


def _spec_from_table(name: str, overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    bench, e = table_entry(name)  # type: ignore[misc]
    splits = e.get("splits") or ["test"]
    base = {
        "name": name, "type": e["type"], "instruction": e["instruction"], "symmetric": e["symmetric"],
        "language": e["language"], "main_score": e["main_score"], "hf_subset": e.get("hf_subset", "default"),
        "split": "test" if "test" in splits else splits[0], "options": dict(e.get("options", {})),
    }
    if "options" in overrides:
        base["options"].update(overrides["options"] or {})
        overrides = {k: v for k, v in overrides.items() if k != "options"}
    base.update(overrides)
    base["source"] = source or bench
    return base


def _data_files(spec: dict[str, Any], data_dir: str) -> dict[str, str]:
    """Files of a named task under data_dir/<name>/: a BEIR folder (retrieval) or <split>.jsonl
    (+ train.jsonl for classification)."""
    folder = os.path.join(data_dir, spec["name"])
    if spec["type"] == "retrieval" and os.path.isfile(os.path.join(folder, "corpus.jsonl")):
        return {"path": folder}
    files = {"path": os.path.join(folder, f"{spec.get('split', 'test')}.jsonl")}
    if spec["type"] == "classification":
        files["train"] = os.path.join(folder, f"{spec.get('options', {}).get('train_split', 'train')}.jsonl")
    return files


def _resolve(path: Any, base: str, where: str, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: {key} must be a path string, got {path!r}")
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _from_entry(entry: Any, index: int, source: str, base: str, data_dir: str | None) -> TaskSpec:
    where = f"{source or 'tasks'}: task {index + 1}"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping (name, type, path, ...), got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: missing 'name'")
    where = f"{source or 'tasks'}: task {index + 1} ({name!r})"
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(sorted(_ENTRY_KEYS))})")
    d = dict(entry)
    files = dict(d.pop("files", None) or {})
    for role in ("path", "train"):
        if role in d:
            files[role] = d.pop(role)
    if table_entry(name) is not None:
        d = _spec_from_table(name, d, source)
    elif "type" not in d:
        raise _unknown_name(name, where)
    files = {role: _resolve(p, base, where, role) for role, p in files.items()}
    if not files and data_dir:
        files = _data_files(d, data_dir)
    d["files"] = files
    d.setdefault("source", source or "tasks")
    for key in ("fields", "options"):
        if key in d and d[key] is not None and not isinstance(d[key], dict):
            raise ValueError(f"{where}: {key} must be a mapping")
        d[key] = dict(d.get(key) or {})
    try:
        return TaskSpec(**d)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def _read_task_file(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    import yaml

    from qzhou_jax.config import unique_keys_loader

    try:
        return yaml.load(text, Loader=unique_keys_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None


def load_task_file(path: str | os.PathLike, data_dir: str | None = None) -> list[TaskSpec]:
    """The tasks of a YAML/JSON task file; relative paths resolve against its folder."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: task file not found")
    doc = _read_task_file(path)
    defaults: dict[str, Any] = {}
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"tasks", "defaults"})
        if unknown or "tasks" not in doc:
            raise ValueError(f"{path}: a task file is a list of tasks or a mapping with 'tasks' (and optional "
                             f"'defaults'); found keys {sorted(doc)}")
        defaults = doc.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"{path}: 'defaults' must be a mapping")
        doc = doc["tasks"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: no tasks (expected a non-empty list)")
    base = os.path.dirname(path)
    entries = [{**defaults, **(e if isinstance(e, dict) else {"name": e})} if defaults else e for e in doc]
    return [_from_entry(e, i, path, base, data_dir) for i, e in enumerate(entries)]


def load_task_specs(arg: str | os.PathLike | Iterable[Any], data_dir: str | os.PathLike | None = None
                    ) -> list[TaskSpec]:
    """Task specs from a task file path, a comma-separated string of names, or a list of
    names / TaskSpecs / task mappings. Names come from the instruction tables; with
    `data_dir`, a named task's data is looked up in data_dir/<name>/ (BEIR folder, or
    <split>.jsonl and train.jsonl)."""
    data_dir = os.path.abspath(os.fspath(data_dir)) if data_dir is not None else None
    if isinstance(arg, os.PathLike) or (isinstance(arg, str) and (
            os.path.isfile(arg) or arg.endswith((".yaml", ".yml", ".json")))):
        specs = load_task_file(arg, data_dir)
    else:
        items: Sequence[Any] = [s.strip() for s in arg.split(",") if s.strip()] if isinstance(arg, str) else list(arg)
        if not items:
            raise ValueError("tasks: no task given")
        specs = []
        for i, item in enumerate(items):
            if isinstance(item, TaskSpec):
                specs.append(item)
            elif isinstance(item, str) and table_entry(item) is None:
                raise _unknown_name(item)
            else:
                specs.append(_from_entry(item, i, "", os.getcwd(), data_dir))
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"{s.source}: task name {s.name!r} appears twice; names must be unique")
        seen.add(s.name)
    return specs


def read_instruction_map(path: str | os.PathLike) -> dict[str, str | None]:
    """A `{task name: instruction}` JSON file, the layout of QZhou's published tables
    (`task_to_instructions_v2.json`, `instruction_map`); null or "" means no instruction."""
    path = os.fspath(path)
    doc = read_json(path, "instruction file not found")
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{path}: an instruction file is a non-empty JSON object mapping task names to "
                         "instructions")
    for name, value in doc.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: task {name!r}: the instruction must be a string or null, got {value!r}")
    return {name: value or None for name, value in doc.items()}


def with_instructions(specs: Sequence[TaskSpec], instructions: Mapping[str, str | None]) -> list[TaskSpec]:
    """`specs` with the instruction of every task named in `instructions` replaced (which sides get
    it stays recipe §2's rule, or the task's `symmetric`); the others unchanged."""
    return [dataclasses.replace(s, instruction=instructions[s.name]) if s.name in instructions else s
            for s in specs]
