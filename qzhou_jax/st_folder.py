"""The sentence-transformers files of a model folder, written and read back.

    modules.json                         Transformer -> Pooling [-> Normalize]
    sentence_bert_config.json            max_seq_length (sentence-transformers 6 keeps it as
                                         tokenizer_config.json's model_max_length instead)
    1_Pooling/config.json                mean or last-token pooling, prompt included
    config_sentence_transformers.json    prompts ("query" in QZhou's template), truncate_dim

`write` writes them for a model of this package (`checkpoint.export`). From another
folder, `model_fields` reads what the model computes: pooling, normalization and
Matryoshka truncation (`ModelConfig.from_hf` applies them when `config.json` has no
`qzhou_jax` key), and `settings` what sentence-transformers keeps beside it: max_seq_length
and the prompts (`Settings`). Orbax folders and training checkpoints
keep the settings in `sentence_transformers.json` (`SETTINGS_FILE`), so that converting
back to HuggingFace writes the same max_seq_length and prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
from typing import Any, Mapping

from qzhou_jax.tokenizer import PROMPT_TEMPLATE

log = logging.getLogger(__name__)

SETTINGS_FILE = "sentence_transformers.json"
DEFAULT_MAX_SEQ_LENGTH = 1024  # the official QZhou evaluation's truncation
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

# sentence-transformers Pooling modes this package computes (others are refused)
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}
_POOLING_NAMES = {"mean": "mean", "lasttoken": "last"}
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def query_prompt(instruction: str) -> str:
    """QZhou's query prefix: "Instruct: {instruction}\\nQuery: " (the text follows it)."""
    return PROMPT_TEMPLATE.format(instruction=instruction, text="")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What sentence-transformers keeps beside the model: truncation and named prompts."""

    max_seq_length: int | None = None
    prompts: Mapping[str, str] | None = None
    default_prompt_name: str | None = None

    def __post_init__(self):
        if self.max_seq_length is not None and (isinstance(self.max_seq_length, bool)
                                                or not isinstance(self.max_seq_length, int)
                                                or self.max_seq_length <= 0):
            raise ValueError(f"max_seq_length: expected a positive integer, got {self.max_seq_length!r}")
        if self.prompts is not None:
            if not isinstance(self.prompts, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.prompts.items()):
                raise ValueError(f"prompts: expected a mapping of prompt names to strings, got {self.prompts!r}")
            object.__setattr__(self, "prompts", dict(self.prompts))
        if self.default_prompt_name is not None and self.default_prompt_name not in (self.prompts or {}):
            raise ValueError(f"default_prompt_name: {self.default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts or {})}")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def overridden(self, max_seq_length: int | None = None, query_instruction: str | None = None) -> "Settings":
        """These settings with `max_seq_length` and the "query" prompt (QZhou's template around
        `query_instruction`) replaced where given (None: unchanged)."""
        out = self if max_seq_length is None else self.replace(max_seq_length=max_seq_length)
        if query_instruction is None:
            return out
        return out.replace(prompts={**out.resolved_prompts(), "query": query_prompt(query_instruction)})

    def resolved_prompts(self) -> dict[str, str]:
        if self.prompts is not None:
            return dict(self.prompts)
        return {"query": query_prompt(DEFAULT_QUERY_INSTRUCTION), "document": ""}

    def resolved_length(self, max_position_embeddings: int) -> int:
        return min(self.max_seq_length or DEFAULT_MAX_SEQ_LENGTH, max_position_embeddings)

    def to_json(self) -> dict:
        return {"max_seq_length": self.max_seq_length, "prompts": self.prompts,
                "default_prompt_name": self.default_prompt_name}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "Settings":
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _read(path: str) -> Any:
    from qzhou_jax.config import read_json

    return read_json(path)


def _write_json(path: str, obj: Any) -> None:
    from qzhou_jax.config import write_json

    write_json(path, obj)


# ------------------------------------------------------------------ settings file
def save_settings(folder: str, settings: Settings) -> None:
    _write_json(os.path.join(folder, SETTINGS_FILE), settings.to_json())


def load_settings(folder: str) -> Settings | None:
    """The settings kept in `folder` (an Orbax folder, a checkpoints folder), or None."""
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    return Settings.from_json(_read(path), path)


# ------------------------------------------------------------------ HF folders
def write(folder: str, cfg: Any, settings: Settings | None = None) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/, [2_Normalize/],
    config_sentence_transformers.json for the ModelConfig `cfg`.

    Uses the module type names every sentence-transformers release since v2 understands
    (v6 maps `sentence_transformers.models.*` onto its new module paths).
    """
    settings = settings or Settings()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(folder, "modules.json"), modules)
    _write_json(os.path.join(folder, "sentence_bert_config.json"),
                {"max_seq_length": settings.resolved_length(cfg.max_position_embeddings), "do_lower_case": False})
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    _write_json(os.path.join(folder, "1_Pooling", "config.json"), {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": cfg.pooling == "last",
        "include_prompt": True,
    })
    versions = {}  # of the packages installed where the folder was written, as sentence-transformers records
    for name, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(dist)
    st_config = {
        "model_type": "SentenceTransformer",
        "__version__": versions,
        "prompts": settings.resolved_prompts(),
        "default_prompt_name": settings.default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    if cfg.embedding_dim is not None:
        # Matryoshka: sentence-transformers >= 6 truncates to this (releases before it ignore
        # the key: pass truncate_dim= when loading). It truncates after its Normalize module,
        # so its vectors have norms <= 1: the cosine similarities equal ours.
        st_config["truncate_dim"] = int(cfg.embedding_dim)
    _write_json(os.path.join(folder, "config_sentence_transformers.json"), st_config)


def _pooling(path: str) -> str:
    raw = _read(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a JSON object")
    if isinstance(raw.get("pooling_mode"), str):  # the constructor's argument form
        mode = raw["pooling_mode"]
        if mode not in _POOLING_NAMES:
            raise ValueError(f"{path}: pooling_mode {mode!r} is not supported (mean or lasttoken)")
        return _POOLING_NAMES[mode]
    on = [k for k, v in raw.items() if k.startswith("pooling_mode_") and v]
    if len(on) != 1 or on[0] not in _POOLING_FLAGS:
        raise ValueError(f"{path}: pooling {', '.join(on) or '(none set)'} is not supported: qzhou-jax models pool "
                         "by pooling_mode_mean_tokens or pooling_mode_lasttoken, one of them (to use the weights "
                         "with one of those anyway: --pooling for encode/eval/synth, model.pooling for a run)")
    if raw.get("include_prompt") is False:
        log.warning("%s: include_prompt is false, but qzhou-jax pools over the prompt's tokens too: its embeddings "
                    "of prompted texts differ from sentence-transformers'", path)
    return _POOLING_FLAGS[on[0]]


def model_fields(folder: str, pooling: bool = True) -> dict[str, Any]:
    """The model fields a HF folder's sentence-transformers files set: pooling (unless
    `pooling` is false: the caller chooses it), normalize, embedding_dim (truncate_dim); {}
    when it has none.

    A module other than Transformer, Pooling and Normalize (a Dense projection, say) is
    reported and left out: the model then embeds without it.
    """
    modules_path = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_path):
        return {}
    modules = _read(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, Mapping) and isinstance(m.get("type"), str)
                                                for m in modules):
        raise ValueError(f"{modules_path}: expected a list of modules, each with a 'type'")
    fields: dict[str, Any] = {}
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    for m, kind in zip(modules, kinds):
        if kind == "Pooling" and pooling:
            fields["pooling"] = _pooling(os.path.join(folder, m.get("path") or "", "config.json"))
        elif kind not in _KNOWN_MODULES:
            log.warning("%s: ignoring module %r (%s): qzhou-jax embeds with Transformer -> Pooling -> Normalize, so "
                        "its embeddings differ from sentence-transformers'", modules_path, m.get("name"), m["type"])
    if "Transformer" in kinds:
        fields["normalize"] = "Normalize" in kinds
    path = os.path.join(folder, "config_sentence_transformers.json")
    if os.path.isfile(path):
        raw = _read(path)
        if isinstance(raw, Mapping) and raw.get("truncate_dim") is not None:
            fields["embedding_dim"] = raw["truncate_dim"]
    return fields


def _tokenizer_length(folder: str) -> int:
    """The max_seq_length sentence-transformers loads for a folder whose sentence_bert_config.json
    has none (version 6 saves it so, as the tokenizer's model_max_length): that length, capped at
    the model's max_position_embeddings (transformers' defaults where a file has neither)."""
    def field(name: str, key: str, default: int) -> int:
        path = os.path.join(folder, name)
        raw = _read(path) if os.path.isfile(path) else {}
        value = raw.get(key) if isinstance(raw, Mapping) else None
        return default if isinstance(value, bool) or not isinstance(value, (int, float)) else value

    return int(min(field("tokenizer_config.json", "model_max_length", int(1e30)),
                   field("config.json", "max_position_embeddings", 32768)))


def settings(folder: str) -> Settings:
    """max_seq_length and prompts of a HF folder's sentence-transformers files (unset
    where it has none). A sentence-transformers folder without max_seq_length in
    sentence_bert_config.json gets the length sentence-transformers loads (`_tokenizer_length`);
    a plain HF folder's tokenizer length is not one."""
    length = prompts = default = None
    path = os.path.join(folder, "sentence_bert_config.json")
    if os.path.isfile(path):
        raw = _read(path)
        length = raw.get("max_seq_length") if isinstance(raw, Mapping) else None
    if length is None and os.path.isfile(os.path.join(folder, "modules.json")):
        length = _tokenizer_length(folder)
    path = os.path.join(folder, "config_sentence_transformers.json")
    if os.path.isfile(path):
        raw = _read(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: expected a JSON object")
        prompts, default = raw.get("prompts"), raw.get("default_prompt_name")
    try:
        return Settings(length, prompts, default)
    except ValueError as e:
        raise ValueError(f"{folder}: sentence-transformers settings: {e}") from None
