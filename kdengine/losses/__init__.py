"""Distillation losses: fused vocab-chunked divergences (MDist), Gram-cosine RDist, and the
top-k divergence for an offline teacher cache.

    from kdengine.losses import fused_linear_divergence, gram_cosine_loss, topk_divergence

Each op is laid out the same way: ``<op>.py`` (public function, argument checks, the one
``impl=`` dispatch), ``<op>_torch.py`` (bounded-memory torch path), ``kdengine/kernels/<op>.py``
(Triton path), and its materialising reference in ``reference.py``. ``checks.py`` and
``divergences.py`` are leaves shared by all of them.
"""

from kdengine.losses.divergences import DIVERGENCES
from kdengine.losses.fused_linear_divergence import fused_linear_divergence
from kdengine.losses.reference import fused_linear_divergence_reference
from kdengine.losses.gram_cosine import gram_cosine_loss
from kdengine.losses.objective import DistillSettings, LossWeights, linear_cross_entropy, llava_kd_loss
from kdengine.losses.topk_divergence import topk_divergence

__all__ = [
    "DIVERGENCES",
    "DistillSettings",
    "LossWeights",
    "fused_linear_divergence",
    "fused_linear_divergence_reference",
    "gram_cosine_loss",
    "linear_cross_entropy",
    "llava_kd_loss",
    "topk_divergence",
]
