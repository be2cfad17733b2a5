"""Choose the trainable components of a LLaVA model and count (trainable) parameters.

Components: "vision_tower", "projector", "language_model" (the decoder plus lm_head; a tied
lm_head shares the embedding Parameter and is counted once).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers import LlavaForConditionalGeneration

from kdengine.model.spec import COMPONENTS

__all__ = [
    "COMPONENTS",
    "component_modules",
    "format_param_summary",
    "param_summary",
    "set_trainable",
]


def component_modules(model: LlavaForConditionalGeneration) -> dict[str, list[nn.Module]]:
    """Component name -> the modules that make it up."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise ValueError(f"expected a LlavaForConditionalGeneration, got {type(model).__name__}")
    inner = model.model
    return {
        "vision_tower": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "language_model": [inner.language_model, model.lm_head],
    }


def _names(components: Iterable[str]) -> list[str]:
    components = [components] if isinstance(components, str) else list(components)
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ValueError(f"unknown model components {bad}; expected names from {list(COMPONENTS)}")
    return components


def set_trainable(model: LlavaForConditionalGeneration, components: Iterable[str] | str) -> None:
    """Make exactly the named components trainable and freeze the rest
    (e.g. ("projector",) for LLaVA pre-training, ("projector", "language_model") for fine-tuning)."""
    train = set(_names(components))
    parts = component_modules(model)
    for name in sorted(parts, key=lambda c: c in train):  # frozen ones first: a shared Parameter ends trainable
        for module in parts[name]:
            module.requires_grad_(name in train)


def param_summary(model: LlavaForConditionalGeneration) -> dict[str, dict[str, int]]:
    """{component: {"total": n, "trainable": n}} for each component, "other" (parameters outside
    the known components, normally absent) and "all". Shared Parameters count once."""
    seen: set[int] = set()
    out: dict[str, dict[str, int]] = {}
    for name, modules in component_modules(model).items():
        out[name] = _count((p for m in modules for p in m.parameters()), seen)
    other = _count(model.parameters(), seen)
    if other["total"]:
        out["other"] = other
    out["all"] = {k: sum(v[k] for v in out.values()) for k in ("total", "trainable")}
    return out


def _count(params: Iterable[nn.Parameter], seen: set[int]) -> dict[str, int]:
    total = trainable = 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


def format_param_summary(summary: dict[str, dict[str, int]]) -> str:
    """A small fixed-width table of `param_summary` output."""
    lines = [f"{'component':<16}{'total':>14}{'trainable':>14}{'%':>8}"]
    for name, c in summary.items():
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        lines.append(f"{name:<16}{c['total']:>14,}{c['trainable']:>14,}{pct:>7.1f}%")
    return "\n".join(lines)
