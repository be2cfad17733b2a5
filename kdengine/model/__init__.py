"""LLaVA model assembly: build, choose trainable components, and hidden-state forward for distillation.

Names load on first use (PEP 562), so ``kdengine.model.spec`` (the specs a training config checks)
imports without torch or transformers.
"""

from kdengine.lazy import lazy_getattr

_EXPORTS = {
    "COMPONENTS": "spec", "ModelSpec": "spec", "TINY_STUDENT": "spec", "TINY_TEACHER": "spec", "TinySpec": "spec",
    "tiny_spec": "spec",
    "Runtime": "build", "build_model": "build", "build_tiny": "build", "compose_llava": "build",
    "load_llava": "build", "num_image_tokens": "build", "resolve_runtime": "build",
    "DistillOutputs": "forward", "check_compatible": "forward", "check_tokenizers": "forward",
    "distill_forward": "forward", "same_vision_tower": "forward", "vision_features": "forward",
    "component_modules": "freeze", "format_param_summary": "freeze", "param_summary": "freeze",
    "set_trainable": "freeze",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
