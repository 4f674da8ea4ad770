"""Typed configuration.

`ModelConfig` holds every Qwen2 architecture field plus the embedding-model choices
(attention direction, pooling, normalization) and the execution policy (dtypes, remat,
layer scan, attention kernel). It reads and writes HuggingFace `config.json` files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import IO, Any, Iterator, Literal

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("bidirectional", "causal")
POOLINGS = ("mean", "last")
REMAT_POLICIES = ("none", "full", "dots", "attn", "mlp")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")


# special-token ids a config.json carries: kept for the export, not used by the encoder
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen2/Qwen2.5 decoder used as a text encoder.

    Architecture fields keep HuggingFace's names. `head_dim` defaults to
    hidden_size // num_attention_heads (Qwen2's rule).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Special-token ids of the source's config.json. An encoder does not use them (padding is the
    # attention mask's); they are kept so that an HF export writes back what the import read.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Embedding-model choices.
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True
    embedding_dim: int | None = None  # Matryoshka truncation (None: hidden_size)
    # Execution policy.
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: Literal["none", "full", "dots", "attn", "mlp"] = "none"
    remat_layers: int | None = None  # layers under `remat` (None: all); the others use "dots"
    scan_layers: bool = True  # False: unrolled (README, "Models in Python": faster and smaller on
    #                           GPU with remat_layers; on CPU remat then saves no memory; on TPU
    #                           `qzhou-jax plan` shows which is smaller)
    attention_impl: Literal["xla", "cudnn", "splash"] = "xla"  # cudnn: GPU; splash: TPU (model/splash.py)
    # dtype the weight-gradient matmuls write (None: the compute dtype), and so the dtype in which
    # weight and bias gradients are summed over data-parallel devices (qwen2.project; README, "What
    # crosses the network"); "float32" under 16-bit compute doubles that traffic
    weight_grad_dtype: str | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"num_attention_heads: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads} (set head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):  # as JSON gives it (a frozen config holds a tuple)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.weight_grad_dtype == self.compute_dtype:  # saved as null: follows a later compute_dtype
            object.__setattr__(self, "weight_grad_dtype", None)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        choices = {"attention": ATTENTION_KINDS, "pooling": POOLINGS, "remat": REMAT_POLICIES,
                   "attention_impl": ATTENTION_IMPLS, "param_dtype": DTYPES, "compute_dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.embedding_dim is not None and not 0 < self.embedding_dim <= self.hidden_size:
            raise ValueError(
                f"embedding_dim: must be in 1..hidden_size ({self.hidden_size}), got {self.embedding_dim}"
            )
        if self.remat_layers is not None and (
                not isinstance(self.remat_layers, int) or isinstance(self.remat_layers, bool)
                or not 0 <= self.remat_layers <= self.num_hidden_layers):
            raise ValueError(f"remat_layers: expected an integer in 0..num_hidden_layers "
                             f"({self.num_hidden_layers}) or null, got {self.remat_layers!r}")
        if self.remat_layers is not None and self.remat in ("none", "dots"):
            raise ValueError(f"remat_layers: the layers it leaves out run under 'dots'; it needs remat "
                             f"'full', 'mlp' or 'attn', got remat {self.remat!r}")
        if self.weight_grad_dtype not in (None, "float32"):  # the compute dtype itself is stored as None
            raise ValueError(f"weight_grad_dtype: expected null (the compute dtype), float32 or the compute dtype "
                             f"({self.compute_dtype}), got {self.weight_grad_dtype!r}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if value is not None and not (ids and all(map(_is_token_id, ids))):
                raise ValueError(f"{name}: expected null, a token id or (eos_token_id) a list of them, got {value!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        if ("num_attention_heads" in changes or "hidden_size" in changes) and "head_dim" not in changes:
            changes["head_dim"] = None  # re-derive hidden_size // num_attention_heads
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------- derived quantities
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def output_dim(self) -> int:
        return self.embedding_dim or self.hidden_size

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the encoder (no LM head), from the shapes alone."""
        e = self.hidden_size
        per_layer = (
            e * self.q_size + self.q_size          # q_proj + bias
            + 2 * (e * self.kv_size + self.kv_size)  # k_proj, v_proj + biases
            + self.q_size * e                      # o_proj
            + 3 * e * self.intermediate_size       # gate, up, down
            + 2 * e                                # two RMSNorms
        )
        total = self.num_hidden_layers * per_layer + e
        if include_embedding:
            total += self.vocab_size * e
        return total

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Model FLOPs per token: 2 (6 when training) x non-embedding params + attention."""
        dense = self.num_params(include_embedding=False)
        attn = 4 * self.num_hidden_layers * seq_len * self.q_size  # QK^T and PV, full (bidirectional)
        factor = 3 if training else 1
        return factor * (2 * dense + attn)

    # --------------------------------------------------------------- HF bridge
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, **overrides: Any) -> "ModelConfig":
        """Build from a HuggingFace Qwen2 `config.json` (a path, a folder or a dict).

        `is_causal: false` selects bidirectional attention, `true` causal; when the field is
        absent, a folder's kind decides (`unstated_attention`), a dict gets the embedding
        default, bidirectional.
        `rope_theta` is read from transformers-5 `rope_parameters` (a top-level one that differs
        is reported and, as in transformers, not used) or else top-level. Pooling,
        normalization, Matryoshka truncation and the compute dtype come from the `qzhou_jax`
        key this package writes, or else from the folder's sentence-transformers files (`st_folder.model_fields`).
        """
        where = "config"
        if isinstance(source, dict):
            raw = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            raw = read_json(path, "no config.json found")
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got a JSON {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise ValueError(f"{where}: model_type must be 'qwen2', got {model_type!r}")

        def need(name: str):
            if name not in raw or raw[name] is None:
                raise ValueError(f"{where}: missing field {name!r}")
            return raw[name]

        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {name}: expected a number, got {value!r}")
            return float(value)

        def mapping(name: str) -> dict:
            value = raw.get(name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{where}: {name}: expected a JSON object or null, got {value!r}")
            return value or {}

        def flag(name: str, default: bool) -> bool:
            value = raw.get(name)
            if value is None:
                return default
            if not isinstance(value, bool):  # bool("false") is True
                raise ValueError(f"{where}: {name}: expected true or false, got {value!r}")
            return value

        rope_params = mapping("rope_parameters")
        # transformers 5 builds RoPE from rope_parameters and takes the top-level rope_theta
        # only where that dict has none
        rope_theta, top_theta = rope_params.get("rope_theta"), raw.get("rope_theta")
        if rope_theta is None:
            rope_theta = top_theta
        elif top_theta is not None and number("rope_theta", top_theta) != number("rope_parameters.rope_theta",
                                                                                  rope_theta):
            log.warning("%s: rope_theta %s (top level) and rope_parameters' rope_theta %s differ: using %s, "
                        "as transformers does", where, top_theta, rope_theta, rope_theta)
        if rope_theta is None:
            raise ValueError(f"{where}: missing field 'rope_theta' (top level or in rope_parameters)")
        rope_theta = number("rope_theta", rope_theta)
        scaling = mapping("rope_scaling")
        rope_type = scaling.get("rope_type", scaling.get("type")) or rope_params.get("rope_type", "default")
        if rope_type not in (None, "default"):
            raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported (only default RoPE)")
        if flag("use_sliding_window", False):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act must be 'silu', got {act!r}")

        fields = dict(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=raw.get("num_key_value_heads") or need("num_attention_heads"),
            head_dim=raw.get("head_dim"),
            max_position_embeddings=32768 if raw.get("max_position_embeddings") is None  # transformers' default
            else raw["max_position_embeddings"],
            rms_norm_eps=number("rms_norm_eps", need("rms_norm_eps")),
            rope_theta=rope_theta,
            tie_word_embeddings=flag("tie_word_embeddings", False),
            initializer_range=number("initializer_range", raw.get("initializer_range", 0.02)),
            **token_ids(raw, where),
        )
        if raw.get("is_causal") is not None:
            fields["attention"] = "causal" if raw["is_causal"] else "bidirectional"
        elif not isinstance(source, dict) and "attention" not in overrides and "qzhou_jax" not in raw:
            fields["attention"] = unstated_attention(raw, os.path.dirname(where), where)
        qz = raw.get("qzhou_jax")
        if qz is not None and not isinstance(qz, dict):
            raise ValueError(f"{where}: qzhou_jax: expected a JSON object, got {qz!r}")
        if qz is None and not isinstance(source, dict):
            # another library's embedding model: sentence-transformers' files say how it pools
            from qzhou_jax import st_folder

            qz = st_folder.model_fields(os.path.dirname(where), pooling="pooling" not in overrides)
        for key in ("pooling", "normalize", "embedding_dim", "compute_dtype"):
            if key in (qz or {}):
                fields[key] = qz[key]
        fields.update(overrides)
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self, torch_dtype: str = "float32") -> dict:
        """A HuggingFace `config.json` dict loadable by transformers' Qwen2Model."""
        return {
            "architectures": ["Qwen2Model"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            **{name: list(value) if isinstance(value, tuple) else value
               for name in TOKEN_ID_FIELDS if (value := getattr(self, name)) is not None},
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "is_causal": self.attention == "causal",
            "dtype": torch_dtype,
            # the embedding choices, and the dtype the model was trained to compute in (so that
            # its HF export and its checkpoints embed alike)
            "qzhou_jax": {"pooling": self.pooling, "normalize": self.normalize,
                          "embedding_dim": self.embedding_dim, "compute_dtype": self.compute_dtype},
        }

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def token_ids(raw: dict, where: str) -> dict:
    """The bos/eos/pad_token_id a config.json states (eos_token_id may be a list). Values that are
    not token ids (`pad_token_id: -1`, an empty list), which transformers tolerates and an encoder
    never uses, are left out with a warning."""
    ids = {}
    for name in TOKEN_ID_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if _is_token_id(value) or (name == "eos_token_id" and isinstance(value, list) and value
                                   and all(map(_is_token_id, value))):
            ids[name] = value
        else:
            log.warning("%s: ignoring %s %r (not a token id; an encoder does not use it)", where, name, value)
    return ids


def unstated_attention(raw: dict, folder: str, where: str) -> str:
    """The attention of a HF folder whose config.json has no is_causal (transformers then
    attends causally): causal for a sentence-transformers folder (modules.json), so that it embeds
    as sentence-transformers computes; bidirectional, QZhou's architecture, for a base LM (an
    init_from) and, with a warning, for a model with its own code (auto_map), which may do either."""
    if raw.get("auto_map"):
        log.warning("%s: no is_causal, and the model runs its own code (auto_map): whether it attends causally or "
                    "bidirectionally is unknown; assuming bidirectional. Choose with --attention (encode, eval, "
                    "synth), model.attention (a training run) or is_causal in config.json (convert)", where)
        return "bidirectional"
    if os.path.isfile(os.path.join(folder, "modules.json")):
        log.info("%s: no is_causal: causal attention, as transformers and sentence-transformers compute for this "
                 "sentence-transformers folder (--attention or model.attention bidirectional for the other)", where)
        return "causal"
    log.info("%s: no is_causal: bidirectional attention, QZhou's (transformers attends causally; --attention or "
             "model.attention causal for that)", where)
    return "bidirectional"


_QWEN25_SMALL = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1_000_000.0, tie_word_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train on a laptop CPU; vocabulary matches the shipped demo tokenizer.
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_theta=10_000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(_QWEN25_SMALL, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN25_SMALL, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(_QWEN25_SMALL, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False),
}


# ------------------------------------------------------- YAML -> dataclasses
# Every config section is a frozen dataclass; these helpers build one from plain data
# (YAML), checking every key and type and naming the key's path in any error, before
# any device work starts.

def python_scalars(obj: Any) -> None:
    """Turn a (frozen) dataclass's numpy scalar fields (a sweep over np.linspace) into Python
    numbers, so that checks and YAML dumps see the plain types."""
    import numpy as np

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.generic):
            object.__setattr__(obj, f.name, v.item())


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the key's path (e.g. `train.lr`)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, f"{path}.{k}"): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys, wrong types and missing
    required fields raise ConfigError naming the key's path; the dataclass's own checks
    run after (their ValueError is re-raised with the path as prefix)."""
    import typing

    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if path and not msg.startswith((f"{path}.", f"{path}:", f"{path}[")):
            head = re.split(r"[.\[/]", msg.split(":", 1)[0], maxsplit=1)[0]
            msg = f"{path}.{msg}" if head in fields else f"{path}: {msg}"
        raise ConfigError(msg) from None


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain data (tuples become lists), the inverse of `from_dict`."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_json(path: str, missing: str = "file not found") -> Any:
    """A JSON file's content; errors name the file (`missing`: the message when it is absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


@contextlib.contextmanager
def naming_the_file(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised without a file name inside the block (a write() on a full disk: "[Errno
    28] No space left on device") names `path`, so that the message says which disk."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
        if e.filename is None and " requested and " in str(e):  # numpy's short write has no errno
            raise OSError(f"{os.fspath(path)}: {e} (a short write: is the disk full?)") from e
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """The file's data on disk (a file closed without a sync of its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and new names in `folder` durable; a no-op where the filesystem cannot
    sync a folder (some network filesystems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file open on a temporary name next to `path` (`.<name>.tmp<pid>`). When the block ends,
    the data is synced to disk and renamed over `path`, and the rename is synced too: readers,
    and a run after the host crashed, see the old file or the whole new one. When the block
    fails, the temporary file is removed and `path` is untouched. An OSError without a file
    name (a full disk) names `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with naming_the_file(path):
            with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON with `atomic_write`: readers never see half a file."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def unique_keys_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: `path: a` then `path: b` would train on b)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:  # a list or mapping as a key: PyYAML's own error follows
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return Loader


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from a file; errors name the file (and line for syntax errors)."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=unique_keys_loader())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `key.path=value` strings (values parsed as YAML: `train.lr=2e-5`,
    `data.datasets.0.batch_size=16` or `data.datasets[0].batch_size=16`, `model.remat=full`,
    `eval.tasks=null`; mappings and lists only in flow style, `{...}` / `[...]`, so
    `instruction=Query: find it` stays a text) to a copy of `data`."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "Query: find it" is a text; a mapping or list is written {...} / [...]
        if isinstance(value, dict) and re.fullmatch(r"\{\w+\}", raw.strip()):
            value = raw  # a placeholder such as {assets}, not a mapping
        parts = re.sub(r"\[(\d+)\]", r".\1", key.strip()).split(".")  # data.datasets[0].x as errors name it
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {where}: no list item {part!r} (the list has {len(node)})")
                node = node[int(part)]
            else:
                if node.get(part) is None:  # absent, or an empty section (`checkpoint:` with nothing under it)
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {where} is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}: no list item {last!r} (the list has {len(node)})")
            node[int(last)] = value
        else:
            node[last] = value
    return data
