"""Distillation losses: fused vocab-chunked divergences (MDist) and Gram-cosine RDist.

    from kdengine.losses import fused_linear_divergence, gram_cosine_loss
"""

from kdengine.losses.divergences import DIVERGENCES
from kdengine.losses.fused_linear_divergence import fused_linear_divergence
from kdengine.losses.reference import fused_linear_divergence_reference
from kdengine.losses.gram_cosine import gram_cosine_loss
from kdengine.losses.objective import DistillSettings, LossWeights, linear_cross_entropy, llava_kd_loss

__all__ = [
    "DIVERGENCES",
    "DistillSettings",
    "LossWeights",
    "fused_linear_divergence",
    "fused_linear_divergence_reference",
    "gram_cosine_loss",
    "linear_cross_entropy",
    "llava_kd_loss",
]
