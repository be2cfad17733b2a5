"""The objective's settings (`LossWeights`, `DistillSettings`) and the names they are checked against.

Plain Python, no torch: a training config (``kdengine.train.config``) builds and checks these while it
loads, before torch is imported. ``checks.py``, ``divergences.py`` and ``topk_divergence.py`` take
their names from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BETA_DIVERGENCES", "DEFAULT_BETA", "DIVERGENCES", "DistillSettings", "GRAM_REDUCTIONS", "IMPLS", "LossWeights",
           "TOPK_TAILS"]

IMPLS = ("auto", "triton", "torch", "reference")
# ``reduction=`` of RDist (gram_cosine_loss)
GRAM_REDUCTIONS = ("batch", "sample")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
BETA_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl")
DEFAULT_BETA = 0.5  # the mixing weight of BETA_DIVERGENCES when the caller gives none
# what topk_divergence does with a top-k teacher's leftover mass
TOPK_TAILS = ("renormalise", "tail")


@dataclass
class LossWeights:
    """Weights of the objective's terms (paper defaults: alpha=1, beta=1, gamma=0.5)."""

    ce: float = 1.0
    res: float = 1.0
    vis: float = 1.0
    rel: float = 0.5

    def __post_init__(self):
        for name in ("ce", "res", "vis", "rel"):
            _check_number(name, getattr(self, name))
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: expected weights >= 0")

    @property
    def distills(self) -> bool:
        return any(w != 0 for w in (self.res, self.vis, self.rel))


@dataclass
class DistillSettings:
    """Divergence settings of the distilled terms, checked once here (the config and the losses rely on it)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float | None = None  # jsd / skew_*: the mixing weight (None: 0.5); the other divergences have none
    rdist_reduction: str = "batch"
    impl: str = "auto"
    topk_tail: str = "renormalise"  # a top-k teacher cache's leftover mass: renormalise | tail (topk_divergence)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence = {self.divergence!r}: expected one of {list(DIVERGENCES)}")
        _check_number("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature}: expected > 0")
        if self.beta is not None:
            if self.divergence not in BETA_DIVERGENCES:
                raise ValueError(f"beta = {self.beta!r} has no effect for divergence {self.divergence!r}; set beta "
                                 f"only with {', '.join(BETA_DIVERGENCES)} (or leave it out)")
            _check_number("beta", self.beta)
            if not 0.0 < self.beta < 1.0:
                raise ValueError(f"beta = {self.beta} for {self.divergence}: expected 0 < beta < 1")
        if self.rdist_reduction not in GRAM_REDUCTIONS:
            raise ValueError(f"rdist_reduction = {self.rdist_reduction!r}: expected one of {list(GRAM_REDUCTIONS)}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl = {self.impl!r}: expected one of {list(IMPLS)}")
        if self.topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail = {self.topk_tail!r}: expected one of {list(TOPK_TAILS)}")


def _check_number(name: str, value) -> None:
    """A finite int or float (not a bool), else ValueError in the config's ``key = value: expected`` form."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: expected a finite number")
