"""`qzhou-jax convert`: HuggingFace safetensors <-> Orbax, streaming one tensor at a time.

    qzhou-jax convert hf-to-orbax --hf DIR --out DIR [--mesh fsdp=-1] [--dtype bfloat16]
    qzhou-jax convert orbax-to-hf --orbax DIR --out DIR [--dtype bfloat16] [--max-shard-size 5GB]

hf-to-orbax reads single-file or sharded safetensors, with or without the `model.`
prefix (Qwen2ForCausalLM vs bare Qwen2Model/QZhouModel); an `lm_head.weight` is ignored
(an embedding model has no LM head). Each tensor is read, converted to this project's
layout and placed into its sharding on the mesh, then saved, before the next one is read.
Without --dtype the checkpoint keeps the source dtype, so HF -> Orbax -> HF is bit-exact.

orbax-to-hf accepts a folder written by hf-to-orbax or a training checkpoint (an Orbax
CheckpointManager folder: its latest step's `params` item; see `orbax_io`), restores one
parameter at a time onto the mesh and gathers one layer at a time into safetensors shards.

Both carry sentence-transformers' settings across: hf-to-orbax keeps the HF folder's
max_seq_length and prompts (`st_folder.settings`), and orbax-to-hf writes them back, or those a
training run kept beside its checkpoints (the ones its own HF export wrote), unless
--max-seq-length / --query-instruction say otherwise.

Both check their inputs (tokenizer included) before writing anything, write into
`<out>.qzhou-tmp-...` and rename it to `<out>` when everything is written; --overwrite never
replaces a folder that is or holds one of the inputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import Any, Mapping

from jax.sharding import Mesh

from qzhou_jax import st_folder
from qzhou_jax.checkpoint import export, orbax_io
from qzhou_jax.cli_args import positive_int
from qzhou_jax.config import DTYPES, ModelConfig

log = logging.getLogger(__name__)


def single_process(what: str) -> None:
    """The converters write files from this process alone."""
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"{what}: run checkpoint conversion in a single process (found {jax.process_count()})")


def _hf_ignored(names: list[str]) -> list[str]:
    from qzhou_jax.checkpoint.hf import IGNORED_SUFFIXES

    return [n for n in names if n == "lm_head.weight" or n.endswith(IGNORED_SUFFIXES)]


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, mesh: Mesh | None = None,
                rules: Mapping[str, Any] | None = None, dtype: str | None = None, overwrite: bool = False,
                tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Convert a HF checkpoint folder into an Orbax params folder; returns a summary dict.

    Every input check (config, tensor names, shapes, file headers) runs before anything
    is written. tokenizer_dir defaults to the HF folder itself.
    """
    from qzhou_jax.checkpoint.hf import check_tensors, iter_params, source_dtype
    from qzhou_jax.checkpoint.safetensors_io import TensorStore

    single_process("hf-to-orbax")
    export.frugal_host_allocator()
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: HF checkpoint folder not found")
    out = os.path.abspath(os.fspath(out))
    inputs = (hf_dir, tokenizer_dir)
    export._check_output(out, overwrite, inputs)
    store = TensorStore(hf_dir)
    src_dtype = source_dtype(store)
    cfg = ModelConfig.from_hf(hf_dir, param_dtype=dtype or src_dtype)
    settings = st_folder.settings(hf_dir)
    check_tensors(store, cfg, hf_dir)
    ignored = _hf_ignored(store.names())
    for name in ignored:
        log.warning("%s: ignoring tensor %r (%s)", hf_dir, name, "an embedding model has no LM head"
                    if name.endswith("lm_head.weight") else "a buffer the model recomputes")
    if tokenizer_dir is None:
        tokenizer_dir = hf_dir if export.check_tokenizer(hf_dir, out, required=False) else None
    else:
        export.check_tokenizer(tokenizer_dir, out)
    with export.atomic_output_dir(out, overwrite, inputs) as tmp:
        info = orbax_io.write_orbax_folder(
            tmp, cfg, iter_params(store, cfg, mesh, rules, hf_dir), tokenizer_dir=tokenizer_dir,
            source=hf_dir, source_dtype=src_dtype, settings=settings)
    return {"out": out, "config": cfg, "ignored": ignored, "source_dtype": src_dtype,
            "tensors": len(store.names()) - len(ignored), **{k: info[k] for k in ("params", "tokenizer")}}


def orbax_to_hf(src: str | os.PathLike, out: str | os.PathLike, mesh: Mesh | None = None,
                rules: Mapping[str, Any] | None = None, dtype: str | None = None, overwrite: bool = False,
                tokenizer_dir: str | os.PathLike | None = None,
                config: ModelConfig | str | os.PathLike | None = None,
                max_shard_bytes: int = export.DEFAULT_MAX_SHARD_BYTES, max_seq_length: int | None = None,
                query_instruction: str | None = None) -> dict:
    """Convert an Orbax params folder or training checkpoint into a HF folder; returns a summary.

    dtype: tensor dtype in the HF files (default: the stored dtype). max_seq_length and
    query_instruction: sentence-transformers settings (default: those kept with the
    checkpoint, else `st_folder`'s defaults).
    """
    single_process("orbax-to-hf")
    export.frugal_host_allocator()
    out = os.path.abspath(os.fspath(out))
    export._check_output(out, overwrite, (src, tokenizer_dir))
    ckpt = orbax_io.open_params_checkpoint(src, config=config, tokenizer_dir=tokenizer_dir)
    export.check_tokenizer(ckpt.tokenizer_dir, out, required=tokenizer_dir is not None)
    settings = (ckpt.settings or st_folder.Settings()).overridden(max_seq_length, query_instruction)
    dtype = dtype or ckpt.stored_dtype()
    with export.atomic_output_dir(out, overwrite, (src, ckpt.pytree_dir, ckpt.tokenizer_dir)) as tmp:
        files = export.write_hf_folder(tmp, ckpt.lazy(mesh, rules), ckpt.config, dtype, ckpt.tokenizer_dir,
                                       max_shard_bytes, settings)
    return {"out": out, "config": ckpt.config, "files": files, "dtype": dtype, "params": ckpt.pytree_dir,
            "tokenizer": ckpt.tokenizer_dir, "settings": settings}


# ---------------------------------------------------------------------- CLI
def parse_mesh(text: str | None):
    """'data=1,fsdp=-1,tensor=1' -> MeshConfig (missing axes keep their defaults)."""
    from qzhou_jax.sharding import MESH_AXES, MeshConfig

    if not text:
        return MeshConfig()
    sizes = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh: expected axis=size pairs over {MESH_AXES}, got {part!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
    return MeshConfig(**sizes)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as HF; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size: expected a number with an optional unit (e.g. 5GB, 500MB), got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size: must be positive, got {text!r}")
    return value


def _mesh(args: argparse.Namespace) -> Mesh:
    from qzhou_jax.sharding import make_mesh

    return make_mesh(parse_mesh(args.mesh))


def cmd_hf_to_orbax(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    summary = hf_to_orbax(args.hf, args.out, mesh=_mesh(args), dtype=args.dtype, overwrite=args.overwrite,
                          tokenizer_dir=args.tokenizer)
    cfg = summary["config"]
    print(f"wrote {summary['out']}: {summary['tensors']} tensors, {cfg.num_params():,} parameters, "
          f"{cfg.param_dtype} (source {summary['source_dtype']}), tokenizer "
          f"{'copied' if summary['tokenizer'] else 'missing'}, in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def cmd_orbax_to_hf(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    summary = orbax_to_hf(args.orbax, args.out, mesh=_mesh(args), dtype=args.dtype, overwrite=args.overwrite,
                          tokenizer_dir=args.tokenizer, config=args.config,
                          max_shard_bytes=parse_size(args.max_shard_size), max_seq_length=args.max_seq_length,
                          query_instruction=args.query_instruction)
    print(f"wrote {summary['out']}: {len(summary['files'])} safetensors file(s), {summary['dtype']}, "
          f"{summary['config'].num_params():,} parameters, in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `convert hf-to-orbax` and `convert orbax-to-hf` to a CLI's subparsers."""
    c = subparsers.add_parser("convert", help="convert checkpoints: HF safetensors <-> Orbax",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = c.add_subparsers(dest="direction", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,fsdp=-1,tensor=1 (default: all "
                                                    "devices on fsdp)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one of the input)")

    h = sub.add_parser("hf-to-orbax", help="HF safetensors folder -> Orbax params checkpoint")
    h.add_argument("--hf", required=True, help="HF folder: config.json + model.safetensors[.index.json]")
    h.add_argument("--dtype", choices=DTYPES, default=None, help="stored dtype (default: the HF checkpoint's)")
    common(h)
    h.set_defaults(func=cmd_hf_to_orbax)

    o = sub.add_parser("orbax-to-hf", help="Orbax params or training checkpoint -> HF + sentence-transformers folder")
    o.add_argument("--orbax", required=True, help="folder written by hf-to-orbax, or a training checkpoint folder")
    o.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the safetensors (default: as stored)")
    o.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    o.add_argument("--max-seq-length", type=positive_int, default=None,
                   help="sentence-transformers max_seq_length (default: the one kept with the checkpoint, else "
                        f"{st_folder.DEFAULT_MAX_SEQ_LENGTH}; capped at max_position_embeddings)")
    o.add_argument("--query-instruction", default=None,
                   help="instruction of the 'query' prompt (default: the prompt kept with the checkpoint, else "
                        f"{st_folder.DEFAULT_QUERY_INSTRUCTION!r})")
    o.add_argument("--config", default=None,
                   help="model config (qzhou_config.json or HF config.json) for training checkpoints without one")
    common(o)
    o.set_defaults(func=cmd_orbax_to_hf)
    return c


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m qzhou_jax.checkpoint.convert hf-to-orbax ...`)."""
    from qzhou_jax.cli import main as cli_main

    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
