"""Distillation losses: fused vocab-chunked divergences (MDist), Gram-cosine RDist, the
top-k divergence for an offline teacher cache, and LLaVADI's hidden-state and affinity terms.

    from kdengine.losses import fused_linear_divergence, gram_cosine_loss, topk_divergence

Each op is laid out the same way: ``<op>.py`` (public function, argument checks, the one
``impl=`` dispatch), ``<op>_torch.py`` (bounded-memory torch path), ``kdengine/kernels/<op>.py``
(Triton path), and its materialising reference in ``reference.py``. ``checks.py`` and
``divergences.py`` are leaves shared by all of them.

Names load on first use (PEP 562), so ``kdengine.losses.settings`` (the objective's settings, which
a training config checks) imports without torch.
"""

import sys
import types

from kdengine.lazy import lazy_getattr

_EXPORTS = {
    "DIVERGENCES": "settings", "DistillSettings": "settings", "LossWeights": "settings",
    "affinity_loss": "affinity_loss", "affinity_loss_batched": "affinity_loss",
    "feature_loss": "feature_loss",
    "fused_linear_divergence": "fused_linear_divergence",
    "fused_linear_divergence_reference": "reference",
    "gram_cosine_loss": "gram_cosine",
    "linear_cross_entropy": "objective", "llava_kd_loss": "objective",
    "topk_divergence": "topk_divergence",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """Loading a submodule binds it onto its package; ``fused_linear_divergence`` and ``topk_divergence``
    are both a submodule and the function it exports, and the package attribute stays the function."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
