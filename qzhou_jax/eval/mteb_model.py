"""qzhou-jax models inside the `mteb` package (2.x): an `AbsEncoder` with a `ModelMeta`.

    import mteb
    from qzhou_jax.eval.mteb_model import QZhouMtebModel

    model = QZhouMtebModel.from_pretrained("path/to/model", max_length=1024)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark", "SciFact"]))

Instructions follow QZhou's rules (recipe §2): a task of the shipped MTEB(eng, v2) /
CMTEB(cmn, v1) tables gets its table instruction, other tasks the instruction mteb defines for
them; the instruction goes on queries only for asymmetric retrieval and reranking, and on every
text for symmetric tasks (classification, clustering, STS, pair classification,
summarization, and the named symmetric rerankers / retrieval tasks). `mteb` is imported
only by this module (it is a test / optional dependency).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from qzhou_jax.eval.tasks import is_symmetric, table_entry
from qzhou_jax.tokenizer import format_prompt

# mteb task type -> qzhou-jax type (types not listed are treated as symmetric text tasks)
_TYPES = {"Retrieval": "retrieval", "Reranking": "reranking", "STS": "sts",
          "PairClassification": "pair_classification", "Classification": "classification",
          "Clustering": "clustering", "Summarization": "summarization",
          "InstructionRetrieval": "retrieval", "InstructionReranking": "reranking"}


def model_meta(name: str, *, embed_dim: int | None, max_tokens: int | None, n_parameters: int | None,
               revision: str | None = None, languages: list[str] | None = None) -> ModelMeta:
    """A ModelMeta for a qzhou-jax model (`framework=["JAX"]`, cosine similarity)."""
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=languages,
        n_parameters=n_parameters, memory_usage_mb=None, max_tokens=max_tokens, embed_dim=embed_dim,
        license=None, open_weights=True, public_training_code=None,
        public_training_data=None, framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True, training_datasets=None,
    )


class QZhouMtebModel(AbsEncoder):
    """mteb's encoder interface over a `qzhou_jax.eval.encoder.Encoder` (or anything with
    `encode(texts, instruction=None, progress=False)`).

    `instructions` maps task names to instructions (or is a JSON file of that mapping, the
    layout of QZhou's published tables) and overrides the shipped tables;
    `use_instructions=False` encodes every text as is. The instruction actually used per
    (task, side) is kept in `self.instructions_used` for the record.
    """

    def __init__(self, encoder: Any, *, name: str = "qzhou-jax/model", revision: str | None = None,
                 instructions: Mapping[str, str] | str | os.PathLike | None = None, use_instructions: bool = True,
                 meta: ModelMeta | None = None, progress: bool = False):
        self.model = encoder
        if isinstance(instructions, (str, os.PathLike)):  # a {task: instruction} JSON file
            from qzhou_jax.eval.tasks import read_instruction_map

            instructions = read_instruction_map(instructions)
        self.instructions = dict(instructions or {})
        self.use_instructions = use_instructions
        self.progress = progress
        self.instructions_used: dict[tuple[str, str], str | None] = {}
        if meta is None:
            cfg = getattr(encoder, "cfg", None)
            tok = getattr(encoder, "tokenizer", None)
            meta = model_meta(name if "/" in name else f"qzhou-jax/{name}",
                              embed_dim=getattr(cfg, "output_dim", None),
                              max_tokens=getattr(tok, "max_length", None),
                              n_parameters=cfg.num_params() if cfg is not None else None, revision=revision)
        self.mteb_model_meta = meta

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_length: int = 1024, batch_size: int = 32,
                        dtype: str | None = None, mesh: Any = None, bucket_steps: int = 4, **kwargs: Any
                        ) -> "QZhouMtebModel":
        """Load a saved model folder (HF safetensors or qzhou-jax Orbax) and wrap it."""
        from qzhou_jax.checkpoint import load_pretrained
        from qzhou_jax.eval.encoder import Encoder, length_buckets
        from qzhou_jax.tokenizer import Tokenizer

        overrides = {"compute_dtype": dtype} if dtype else {}
        loaded = load_pretrained(path, mesh=mesh, **overrides)
        tok = Tokenizer(loaded.tokenizer_path, max_length=max_length)
        buckets = length_buckets(max_length, bucket_steps) if bucket_steps else None
        encoder = Encoder(loaded.params, loaded.config, tok, batch_size=batch_size, mesh=mesh, buckets=buckets)
        kwargs.setdefault("name", f"qzhou-jax/{os.path.basename(os.path.normpath(os.fspath(path)))}")
        return cls(encoder, **kwargs)

    def instruction(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        """QZhou's rule: which instruction (if any) the texts of this call get."""
        if not self.use_instructions:
            return None
        name = task_metadata.name
        found = table_entry(name)
        if found is not None:
            symmetric = bool(found[1]["symmetric"])
        else:
            symmetric = is_symmetric(name, _TYPES.get(task_metadata.type, "sts"))
        if not (prompt_type == PromptType.query or symmetric):
            return None  # documents of asymmetric tasks: no instruction (mteb is not asked for one)
        if name in self.instructions:
            return self.instructions[name]
        if found is not None:
            return found[1]["instruction"]
        # the query side's prompt, also for both sides of symmetric tasks (a task whose prompt is a
        # {"query": ...} mapping names none for documents, or for calls without a prompt type)
        return self.get_instruction(task_metadata, PromptType.query) or None

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: qzhou-jax models embed text only; got a batch with "
                                 f"{sorted(batch)}")
            texts.extend(batch["text"])
        instruction = self.instruction(task_metadata, prompt_type)
        side = prompt_type.value if prompt_type is not None else "text"
        self.instructions_used[(task_metadata.name, side)] = instruction
        return np.asarray(self.model.encode(texts, instruction=instruction, progress=self.progress))

    def prompt_for(self, task_name: str, text: str, side: str = "query") -> str:
        """The exact string a text is encoded as, for inspection."""
        return format_prompt(text, self.instructions_used.get((task_name, side)))
