"""The module DeepSpeed trains: the student's hidden-state forward plus `llava_kd_loss`, and the
teacher's no-grad forward that feeds it.

The loss is computed inside the wrapped module's forward so that, under ZeRO-3, the student's
lm_head weight (read by the fused losses, never called as a module) is gathered with the rest
of the forward (it is registered as an external parameter).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kdengine.cache.objective import topk_kd_loss
from kdengine.cache.reader import CachedTeacher, TopKTargets
from kdengine.losses import DistillSettings, LossWeights, llava_kd_loss
from kdengine.losses.checks import LOSS_TERMS
from kdengine.model import DistillOutputs, distill_forward, vision_features
from kdengine.train.stage_models import Teacher

__all__ = ["StudentObjective", "teacher_outputs"]


class StudentObjective(nn.Module):
    """``forward(batch, teacher_out=None, features=None) -> (loss, terms)``.

    batch: the collator's dict (input_ids, attention_mask, labels [B, L], pixel_values [n_img, 3, H, W]).
    teacher_out: the teacher's `DistillOutputs` on the same batch (None: CE only).
    features: Float[n_img, P, Dv] tower features shared with the teacher (identical frozen towers).
    terms: detached fp32 scalars ce / res / vis / rel / loss.
    """

    def __init__(self, student: nn.Module, weights: LossWeights, settings: DistillSettings, num_image_tokens: int):
        super().__init__()
        self.student = student
        self.weights = weights
        self.settings = settings
        self.num_image_tokens = num_image_tokens

    def forward(self, batch: dict, teacher_out: DistillOutputs | None = None, features: torch.Tensor | None = None):
        out = distill_forward(self.student, batch, vision_features=features)
        loss_fn = topk_kd_loss if isinstance(teacher_out, TopKTargets) else llava_kd_loss  # a top-k cache
        loss, terms = loss_fn(out, teacher_out, self.weights, self.settings, num_image_tokens=self.num_image_tokens)
        for k in self.term_names(teacher_out is not None):  # the same keys on every batch and rank
            terms.setdefault(k, loss.new_zeros((), dtype=torch.float32))
        return loss, terms

    def term_names(self, with_teacher: bool) -> tuple[str, ...]:
        """The terms `llava_kd_loss` returns for this stage: all of LOSS_TERMS, less the distilled
        ones without a teacher and ``rel`` when its weight is 0."""
        if not with_teacher or not self.weights.distills:
            return ("loss", "ce")
        return tuple(k for k in LOSS_TERMS if k != "rel" or self.weights.rel != 0)

    def register_zero3_external(self) -> None:
        """Under ZeRO-3: gather lm_head.weight for this module's forward (the losses read it directly)."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, self.student.get_output_embeddings().weight)


@torch.no_grad()
def teacher_outputs(teacher: Teacher, batch: dict, share_features: bool) -> tuple[DistillOutputs, torch.Tensor | None]:
    """The teacher's hidden states on ``batch`` and, with ``share_features``, the tower features
    both models use (computed once, on the teacher). A `CachedTeacher` gives its cached rows instead."""
    if isinstance(teacher, CachedTeacher):
        return teacher.outputs(batch), None
    features = None
    pixels = batch.get("pixel_values")
    if share_features and pixels is not None and pixels.shape[0] > 0:
        features = vision_features(teacher.model, pixels)
    out = distill_forward(teacher.model, batch, vision_features=features)
    if teacher.sharded:
        out = dataclasses.replace(out, lm_head_weight=teacher.lm_head_weight)
    return out, features
