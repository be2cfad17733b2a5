"""LLaVA model assembly: build, choose trainable components, and hidden-state forward for distillation."""

from kdengine.model.build import (
    TINY_STUDENT,
    TINY_TEACHER,
    ModelSpec,
    Runtime,
    TinySpec,
    build_model,
    build_tiny,
    compose_llava,
    load_llava,
    num_image_tokens,
    resolve_runtime,
    tiny_spec,
)
from kdengine.model.forward import (
    DistillOutputs,
    check_compatible,
    check_tokenizers,
    distill_forward,
    same_vision_tower,
    vision_features,
)
from kdengine.model.freeze import (
    COMPONENTS,
    component_modules,
    format_param_summary,
    param_summary,
    set_trainable,
)

__all__ = [
    "COMPONENTS",
    "DistillOutputs",
    "ModelSpec",
    "Runtime",
    "TINY_STUDENT",
    "TINY_TEACHER",
    "TinySpec",
    "build_model",
    "build_tiny",
    "check_compatible",
    "check_tokenizers",
    "component_modules",
    "compose_llava",
    "distill_forward",
    "format_param_summary",
    "load_llava",
    "num_image_tokens",
    "param_summary",
    "resolve_runtime",
    "same_vision_tower",
    "set_trainable",
    "tiny_spec",
    "vision_features",
]
