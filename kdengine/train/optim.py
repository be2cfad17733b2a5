"""AdamW over the trainable parameters and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["WarmupCosine", "build_optimizer"]


class WarmupCosine:
    """LR factor at optimizer step s (0-based) of ``total``: linear warmup over
    ``ceil(warmup_ratio * total)`` steps to 1, then cosine decay towards 0. Picklable
    (plain attributes), so LambdaLR state round-trips through checkpoints."""

    def __init__(self, total: int, warmup_ratio: float):
        self.total = total
        self.warmup = math.ceil(warmup_ratio * total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over parameters with requires_grad; weight decay on matrices only (not biases, norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: expected the stage's components to have requires_grad=True")
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
