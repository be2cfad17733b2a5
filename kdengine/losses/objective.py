"""The LLaVA-KD objective from the fused losses: L = w_ce CE + alpha L_res + beta L_vis + gamma L_rel.

    L_res  divergence averaged over response tokens (next-token aligned)
    L_vis  divergence averaged over visual-token positions
    L_rel  Gram-cosine RDist over each image's visual tokens
One fused_linear_divergence call covers the response and visual rows and gives the student's CE
from the same vocabulary pass; neither model ever produces [tokens, V] logits. It returns one scalar,
alpha L_res + beta L_vis (the weights and the means over rows as per-row ``weight=``), so the torch
path can form the gradient in the forward (see kdengine/losses/budget.py); L_res and L_vis themselves
are reported detached, for the metrics.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kdengine.losses.checks import IGNORE_INDEX
from kdengine.losses.fused_linear_divergence import fused_linear_divergence
from kdengine.losses.gram_cosine import gram_cosine_loss
from kdengine.losses.settings import DistillSettings, LossWeights  # torch-free, for the config


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_rows: int = 1024) -> torch.Tensor:
    """Mean CE of hidden [N, D] @ weight[V, D]^T against labels [N] (ignore -100), logits [chunk, V]
    at a time with recomputation in backward (memory bounded by chunk_rows * V). 0 for no rows."""
    valid = labels != IGNORE_INDEX
    total = hidden.new_zeros((), dtype=torch.float32)
    for r0 in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[r0:r0 + chunk_rows], labels[r0:r0 + chunk_rows]
        total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False)
    return total / valid.sum().clamp_min(1)


def _ce_sum(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


def llava_kd_loss(student, teacher, weights: LossWeights, settings: DistillSettings,
                  num_image_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective of one batch.

    Args:
        student, teacher: ``kdengine.model.DistillOutputs`` (teacher may be None for CE-only stages):
            hidden [B, L, D], lm_head_weight [V, D], visual_mask / response_mask [B, L], next_labels [B, L].
        num_image_tokens: P, visual tokens per image (needed when weights.rel != 0).
    Returns:
        (total loss, detached terms {"ce", "res", "vis", "rel", "loss"}).
    """
    resp, vis = student.response_mask, student.visual_mask
    terms = {}
    if teacher is None or not weights.distills:
        ce = linear_cross_entropy(student.hidden[resp], student.lm_head_weight, student.next_labels[resp])
        total = weights.ce * ce
        terms.update(ce=ce)
    else:
        if teacher.hidden.shape[:2] != student.hidden.shape[:2] or not torch.equal(teacher.visual_mask, vis):
            raise ValueError(f"teacher batch {tuple(teacher.hidden.shape[:2])} does not line up with the "
                             f"student's {tuple(student.hidden.shape[:2])} (same tokenization expected)")
        rows = resp | vis if weights.vis != 0 else resp
        is_resp = resp[rows]
        xs = student.hidden[rows]
        xt = teacher.hidden[rows].detach().to(xs.dtype)
        wt = _frozen(teacher.lm_head_weight, xs.dtype)
        labels = torch.where(is_resp, student.next_labels[rows], IGNORE_INDEX)
        n_res = is_resp.sum().clamp_min(1)
        n_vis = (~is_resp).sum().clamp_min(1)
        # the res/vis weights and their means as row weights: one scalar loss, whose gradient the torch
        # path's row-chunk schedule forms in the forward (ce_weight tells it the CE's share)
        wdt = torch.float64 if xs.dtype == torch.float64 else torch.float32
        row_weight = torch.where(is_resp, weights.res / n_res.to(wdt), weights.vis / n_vis.to(wdt))
        div, ce, div_rows = fused_linear_divergence(
            xs, student.lm_head_weight, xt, wt, divergence=settings.divergence, beta=settings.beta,
            temperature=settings.temperature, weight=row_weight, labels=labels, reduction="sum",
            ce_weight=weights.ce, return_rows=True, impl=settings.impl)
        l_res = torch.where(is_resp, div_rows, 0.0).sum() / n_res  # detached per-term values, for the metrics
        l_vis = torch.where(is_resp, 0.0, div_rows).sum() / n_vis
        total = weights.ce * ce + div
        terms.update(ce=ce, res=l_res, vis=l_vis)
        if weights.rel != 0:
            l_rel = _rdist(student, teacher, num_image_tokens, settings)
            total = total + weights.rel * l_rel
            terms["rel"] = l_rel
    terms["loss"] = total
    return total, {k: v.detach().float() for k, v in terms.items()}


def _rdist(student, teacher, p, settings):
    """RDist over images: visual rows regrouped as [n_img, P, D] (every image has exactly P tokens)."""
    vis = student.visual_mask
    if p is None or p <= 0:
        raise ValueError(f"num_image_tokens={p}; RDist needs the visual tokens per image (> 0)")
    n = int(vis.sum())
    if n == 0:  # a text-only batch: no image, no relation to distil
        return student.hidden.new_zeros((), dtype=torch.float32)
    if n % p:
        raise ValueError(f"{n} visual tokens in the batch is not a multiple of num_image_tokens={p}")
    hs = student.hidden[vis].view(n // p, p, -1)
    ht = teacher.hidden[vis].detach().to(hs.dtype).view(n // p, p, -1)
    return gram_cosine_loss(hs, student.lm_head_weight, ht, _frozen(teacher.lm_head_weight, hs.dtype),
                            reduction=settings.rdist_reduction, impl=settings.impl)


def _frozen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's weight as a no-grad tensor of ``dtype``: the Parameter itself when it already is one,
    so RDist's W^T W cache (keyed on the tensor object) hits on every step instead of recomputing."""
    if not weight.requires_grad and weight.dtype == dtype:
        return weight
    return weight.detach().to(dtype)
