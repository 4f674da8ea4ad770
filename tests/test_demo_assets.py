"""The bundled demo dataset and tokenizer (qzhou_jax/assets): format, split hygiene, loading, reproducibility."""
import json
import pathlib
import subprocess
import sys

import pytest

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "qzhou_jax" / "assets"
DEMO = ASSETS / "demo"
TOKDIR = ASSETS / "tokenizer"
FAMILIES = ("retrieval", "sts", "classification")
SPLITS = ("train", "heldout")
LABELS = {"astronomy", "banking", "chemistry", "cooking", "football", "gardening", "history",
          "literature", "medicine", "music", "programming", "technology", "travel", "weather"}
MIN_RECORDS = {("retrieval", "train"): 1200, ("retrieval", "heldout"): 250, ("sts", "train"): 1200,
               ("sts", "heldout"): 300, ("classification", "train"): 1000,
               ("classification", "heldout"): 250}


def load(family, split):
    path = DEMO / f"{family}_{split}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def texts_of(family, rec):
    if family == "retrieval":
        return [rec["query"], *rec["pos"], *rec["neg"]]
    if family == "sts":
        return [rec["text1"], rec["text2"]]
    return [rec["text"]]


def is_text(x):
    return isinstance(x, str) and x.strip() == x and len(x) > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", SPLITS)
def test_files_exist_and_parse(family, split):
    recs = load(family, split)
    assert len(recs) >= MIN_RECORDS[(family, split)]
    assert all(isinstance(r, dict) for r in recs)


@pytest.mark.parametrize("split", SPLITS)
def test_retrieval_fields(split):
    for r in load("retrieval", split):
        assert set(r) == {"query", "pos", "neg", "instruction"}
        assert is_text(r["query"]) and is_text(r["instruction"])
        assert isinstance(r["pos"], list) and len(r["pos"]) == 1 and all(map(is_text, r["pos"]))
        assert isinstance(r["neg"], list) and len(r["neg"]) == 4 and all(map(is_text, r["neg"]))
        assert r["pos"][0] not in r["neg"] and len(set(r["neg"])) == 4


@pytest.mark.parametrize("split", SPLITS)
def test_sts_fields(split):
    scores = []
    for r in load("sts", split):
        assert set(r) == {"text1", "text2", "score"}
        assert is_text(r["text1"]) and is_text(r["text2"]) and r["text1"] != r["text2"]
        assert isinstance(r["score"], float) and 0.0 <= r["score"] <= 5.0
        scores.append(r["score"])
    # the whole range is used
    assert min(scores) < 0.5 and max(scores) > 4.5


@pytest.mark.parametrize("split", SPLITS)
def test_classification_fields(split):
    labels = set()
    for r in load("classification", split):
        assert set(r) == {"text", "label"}
        assert is_text(r["text"]) and isinstance(r["label"], str)
        labels.add(r["label"])
    assert labels == LABELS


def test_both_languages_present():
    recs = load("retrieval", "train")
    zh = sum(any("\u4e00" <= c <= "\u9fff" for c in r["query"]) for r in recs)
    assert 0.1 * len(recs) < zh < 0.5 * len(recs)


def test_train_and_heldout_share_no_texts():
    train = {t for fam in FAMILIES for r in load(fam, "train") for t in texts_of(fam, r)}
    held = {t for fam in FAMILIES for r in load(fam, "heldout") for t in texts_of(fam, r)}
    assert not (train & held)


def test_readme_present():
    text = (DEMO / "README.md").read_text(encoding="utf-8")
    assert "build_demo_assets.py" in text and "Apache-2.0" in text and "synthetic" in text


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKDIR), local_files_only=True)


def test_tokenizer_loads_offline(tokenizer):
    assert len(tokenizer) <= 2048
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 32768
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2]
    # special tokens in text are recognised as single tokens
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"][0] == 1


def test_tokenizer_round_trip_and_no_added_specials(tokenizer):
    x = "Where do Ashford Rovers play? 他们的主场在哪里？ naïve café, 12.5°C 🚀\tend\n"
    ids = tokenizer(x)["input_ids"]
    assert tokenizer.decode(ids) == x
    assert not set(ids) & {0, 1, 2}  # no BOS/EOS added, nothing unknown
    batch = tokenizer(["a", "a longer text"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_tokenized_lengths_reasonable(tokenizer):
    recs = load("retrieval", "heldout")
    q = sorted(len(tokenizer(r["query"])["input_ids"]) for r in recs)
    p = sorted(len(tokenizer(r["pos"][0])["input_ids"]) for r in recs)
    assert 6 <= q[len(q) // 2] <= 30 and 12 <= p[len(p) // 2] <= 80 and p[-1] <= 128


def test_generator_is_deterministic(tmp_path):
    # the CLI entry point, in a fresh interpreter (hash randomisation differs from this process)
    subprocess.run([sys.executable, str(ASSETS / "build_demo_assets.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for sub in ("demo", "tokenizer"):
        made = sorted(p.name for p in (tmp_path / sub).iterdir())
        # the demo folder also holds the demo's run and eval configs (hand-written YAML)
        committed = sorted(p.name for p in (ASSETS / sub).iterdir() if p.suffix != ".yaml")
        assert made == committed
        for name in made:
            assert (tmp_path / sub / name).read_bytes() == (ASSETS / sub / name).read_bytes(), f"{sub}/{name} differs"
