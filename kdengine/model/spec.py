"""Model specs: where a model's first weights come from (`ModelSpec`, the ``models`` section of a
training config), the tiny models' sizes and the trainable component names.

Plain Python, no torch or transformers: a training config builds and checks these while it loads.
``kdengine.model.build`` builds models from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["COMPONENTS", "DTYPES", "ModelSpec", "TINY_STUDENT", "TINY_TEACHER", "TinySpec", "tiny_spec"]

# Parameter dtypes a spec may ask for (torch dtype names).
DTYPES = ("float32", "bfloat16", "float16")
# What `kdengine.model.freeze.set_trainable` can train.
COMPONENTS = ("vision_tower", "projector", "language_model")


@dataclass
class TinySpec:
    """Sizes of a tiny SigLIP + Qwen2 LLaVA built from config only (vocabulary from a tokenizer)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    max_positions: int = 2048
    tie_word_embeddings: bool = False
    # lm_head / embedding rows are len(tokenizer) rounded up to this multiple (1 = exact).
    pad_vocab_to_multiple_of: int = 1
    # Separate seeds so two tiny models with equal vision sizes share identical tower weights.
    vision_seed: int = 0
    seed: int = 0


# Tiny defaults: one tower (config and weights: same vision_seed), 64 image tokens, and a
# teacher LM wider and deeper than the student: ~4.3x its parameters at the synthetic corpus'
# vocabulary (~530 tokens), ~3.8x at 1k (embeddings scale with width, blocks with width^2 x depth).
TINY_STUDENT = TinySpec(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=256, seed=1)
TINY_TEACHER = TinySpec(text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=320, seed=2)


@dataclass
class ModelSpec:
    """Where a model comes from and how it runs (the ``models`` section of a training config).

    source: "llava" (``path``), "composed" (``vision_tower`` + ``language_model``) or
    "tiny" (``tokenizer`` + ``tiny``). device/dtype/attn_implementation None -> `resolve_runtime`.
    """

    source: Literal["llava", "composed", "tiny"]
    path: str | None = None
    vision_tower: str | None = None
    language_model: str | None = None
    tokenizer: str | None = None
    tiny: TinySpec = field(default_factory=TinySpec)
    image_token: str = "<image>"
    projector_seed: int = 0
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None

    def validate(self) -> None:
        """Raise ValueError if the fields needed by ``source`` are missing."""
        need = {"llava": ("path",), "composed": ("vision_tower", "language_model"), "tiny": ("tokenizer",)}
        if self.source not in need:
            raise ValueError(f"model spec source={self.source!r}; expected one of {sorted(need)}")
        missing = [k for k in need[self.source] if not getattr(self, k)]
        if missing:
            raise ValueError(f"model spec with source={self.source!r} needs {missing} set")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"model spec dtype={self.dtype!r}; expected one of {sorted(DTYPES)} or None")


def tiny_spec(role: Literal["teacher", "student"], tokenizer: str, **overrides: Any) -> ModelSpec:
    """The embedded default tiny teacher or student spec on a tokenizer directory."""
    sizes = {"teacher": TINY_TEACHER, "student": TINY_STUDENT}
    if role not in sizes:
        raise ValueError(f"tiny role={role!r}; expected 'teacher' or 'student'")
    return ModelSpec(source="tiny", tokenizer=tokenizer, tiny=dataclasses.replace(sizes[role]), **overrides)
