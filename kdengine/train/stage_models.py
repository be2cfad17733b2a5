"""Models of a stage: the student (the model a stage trains) from its spec or from the previous
stage's directory, the frozen teacher (loaded once, reused while later stages need it), and the
GPU-only patches (Liger-Kernel, activation checkpointing).
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from kdengine.model import ModelSpec, build_model
from kdengine.train.config import EngineConfig

__all__ = ["Teacher", "TeacherCache", "apply_patches", "load_model"]


def load_model(spec: ModelSpec, init_dir: str | None, device: torch.device):
    """(model, processor) from ``init_dir`` (a stage output, llava format) or else from ``spec``,
    on ``device`` with the runtime dtype (bf16 on CUDA, fp32 on CPU) unless the spec fixes one."""
    if init_dir is not None:
        spec = dataclasses.replace(spec, source="llava", path=init_dir)
    return build_model(dataclasses.replace(spec, device=str(device)))


def apply_patches(model, engine: EngineConfig, device: torch.device) -> list[str]:
    """Liger-Kernel RMSNorm/SwiGLU/RoPE on the language model (CUDA only, when installed) and
    activation checkpointing (any device). Returns what was applied, for the log."""
    applied = []
    if device.type == "cuda" and engine.liger:
        applied += _liger(model)
    if engine.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied.append("activation checkpointing")
    return applied


def _liger(model) -> list[str]:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2
    except ImportError:
        return []
    patch = {"qwen2": apply_liger_kernel_to_qwen2, "llama": apply_liger_kernel_to_llama}
    kind = model.config.text_config.model_type
    if kind not in patch:
        return []
    # The LM head never runs (the fused losses read lm_head.weight), so no Liger cross-entropy.
    patch[kind](rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                model=model.model.language_model)
    return [f"liger-kernel ({kind}: rope, rms_norm, swiglu)"]


@dataclasses.dataclass
class Teacher:
    """A frozen teacher. ``lm_head_weight`` is the full head (gathered once when sharded);
    ``engine`` keeps the ZeRO-3 inference hooks alive when sharded, else None."""

    model: object
    processor: object
    lm_head_weight: torch.Tensor
    sharded: bool = False
    engine: object = None


class TeacherCache:
    """The frozen teacher: loaded on first use, kept while later stages use the same weights."""

    def __init__(self):
        self.key: tuple | None = None
        self.teacher: Teacher | None = None

    def get(self, key: tuple, spec: ModelSpec, init_dir: str | None, device: torch.device, shard: bool) -> Teacher:
        if self.key != key:
            self.release()
            model, processor = load_model(spec, init_dir, device)
            model.eval().requires_grad_(False)
            if shard:
                self.teacher = _zero3_inference(model, processor)
            else:
                self.teacher = Teacher(model, processor, model.get_output_embeddings().weight.detach())
            self.key = key
        return self.teacher

    def release(self) -> None:
        self.key = self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _zero3_inference(model, processor) -> Teacher:
    """Partition a frozen model's parameters over the ranks (ZeRO-3 inference: each layer is
    gathered for its own forward); the LM head, read directly by the losses, is gathered once."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16}}
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.module.eval()
    head = engine.module.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([head]):
        full = head.data.detach().clone()
    return Teacher(engine.module, processor, full, sharded=True, engine=engine)
