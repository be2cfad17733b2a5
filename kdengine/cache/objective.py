"""The LLaVA-KD objective against a top-k teacher cache, and RDist from stored teacher Gram matrices.

    L = w_ce CE + alpha L_res + beta L_vis + gamma L_rel, as `kdengine.losses.llava_kd_loss`, with
    L_res, L_vis  forward KL over the teacher's cached top-k support (`topk_divergence`), averaged
                  over response / visual rows
    L_rel         1 - cos(R_s, R_t) with R_t the cached teacher Gram of each image
(A hidden-mode cache needs none of this: `CachedTeacher` hands `llava_kd_loss` the cached states.)
"""

from __future__ import annotations

import torch

from kdengine.cache.manifest import CacheError
from kdengine.losses.checks import IGNORE_INDEX, check_choice
from kdengine.losses.gram_cosine import loss_from_stats, weight_gram

__all__ = ["TAILS", "gram_cosine_from_teacher_gram", "topk_kd_loss"]

TAILS = ("renormalise", "tail")


def gram_cosine_from_teacher_gram(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                  teacher_gram: torch.Tensor, vocab_rows: int | None = None,
                                  reduction: str = "batch") -> torch.Tensor:
    """RDist with the teacher side given as Gram matrices, a scalar (as `gram_cosine_loss`).

    Args:
        student_hidden: [n_img, P, Ds] student states at each image's visual positions.
        student_weight: [V, Ds] student lm_head weight (gradients flow when it requires grad).
        teacher_gram:   Float[n_img, P, P] R_t = Z_t Z_t^T of the teacher (no grad).
        vocab_rows:     vocabulary rows R_t was formed over; the student's R_s uses as many (None: V).
        reduction:      batch | sample, as `gram_cosine_loss`.
    """
    check_choice("reduction", reduction, ("batch", "sample"))
    n, p = student_hidden.shape[:2]
    if student_hidden.dim() != 3 or teacher_gram.shape != (n, p, p):
        raise ValueError(f"teacher_gram {tuple(teacher_gram.shape)} and student_hidden {tuple(student_hidden.shape)}: "
                         f"expected [n_img, P, P] and [n_img, P, Ds] with the same n_img, P")
    rows = student_weight.shape[0] if vocab_rows is None else vocab_rows
    if rows > student_weight.shape[0]:
        raise ValueError(f"vocab_rows = {rows} exceeds the student's {student_weight.shape[0]} lm_head rows")
    g = weight_gram(student_weight, rows)  # fp32, float64 for a float64 weight
    h = student_hidden.to(g.dtype)
    rs = (h @ g) @ h.transpose(1, 2)
    fs, ft = rs.flatten(1), teacher_gram.detach().to(g.dtype).flatten(1)
    stats = torch.stack([torch.linalg.vecdot(fs, ft), torch.linalg.vecdot(fs, fs), torch.linalg.vecdot(ft, ft)], -1)
    has_rows = torch.full((n,), p > 0, device=h.device)
    return loss_from_stats(stats, has_rows, reduction).to(student_hidden.dtype)


def topk_kd_loss(student, targets, weights, settings, num_image_tokens: int | None = None,
                 tail: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective of one batch against cached top-k targets; same contract as `llava_kd_loss`.

    student: `DistillOutputs` (hidden [B, L, Ds], lm_head_weight [V, Ds], masks [B, L]);
    targets: `kdengine.cache.reader.TopKTargets` of the same batch; tail: renormalise | tail
    (None: ``settings.topk_tail``).
    Returns (loss, detached terms)."""
    from kdengine.losses.topk_divergence import topk_divergence

    tail = tail or settings.topk_tail
    check_choice("tail", tail, TAILS)
    if settings.divergence != "forward_kl":
        raise CacheError(f"distill.divergence = {settings.divergence!r}: a top-k teacher cache gives forward_kl "
                         f"only (the teacher's distribution off its top-k is unknown); expected forward_kl, "
                         f"or a hidden-mode cache for {settings.divergence}")
    if abs(settings.temperature - targets.temperature) > 1e-12 * max(1.0, targets.temperature):
        raise CacheError(f"distill.temperature = {settings.temperature} but the top-k cache holds log-probabilities "
                         f"at temperature {targets.temperature}; expected equal")
    resp, vis = student.response_mask, student.visual_mask
    rows = resp | vis if weights.vis != 0 else resp
    if bool((rows & ~targets.mask).any()):
        raise CacheError(f"the stage distils {int(rows.sum())} positions but the cache (rows = {targets.rows!r}) "
                         f"holds {int((rows & targets.mask).sum())} of them; expected weights.vis = 0 for a cache "
                         f"without visual rows")
    sel = rows[targets.mask]
    is_resp = resp[rows]
    xs = student.hidden[rows]
    labels = torch.where(is_resp, student.next_labels[rows], IGNORE_INDEX)
    div_rows, ce = topk_divergence(xs, student.lm_head_weight, targets.ids[sel].long(), targets.logprobs[sel].float(),
                                   temperature=settings.temperature, tail=tail, labels=labels, reduction="none",
                                   impl=settings.impl)
    l_res = torch.where(is_resp, div_rows, 0.0).sum() / is_resp.sum().clamp_min(1)
    l_vis = torch.where(is_resp, 0.0, div_rows).sum() / (~is_resp).sum().clamp_min(1)
    total = weights.ce * ce + weights.res * l_res + weights.vis * l_vis
    terms = dict(ce=ce, res=l_res, vis=l_vis)
    if weights.rel != 0:
        terms["rel"] = _cached_rdist(student, targets, num_image_tokens, settings.rdist_reduction)
        total = total + weights.rel * terms["rel"]
    terms["loss"] = total
    return total, {k: v.detach().float() for k, v in terms.items()}


def _cached_rdist(student, targets, p, reduction):
    n = int(student.visual_mask.sum())
    if n == 0:
        return student.hidden.new_zeros((), dtype=torch.float32)
    if targets.gram is None:
        raise CacheError("weights.rel > 0 but the top-k cache holds no teacher Gram matrices (an imported cache); "
                         "expected weights.rel = 0")
    if p is None or p <= 0 or n % p or n // p != targets.gram.shape[0]:
        raise CacheError(f"{n} visual tokens with num_image_tokens = {p} do not match the cache's "
                         f"{targets.gram.shape[0]} teacher Gram matrices; expected one per image")
    hs = student.hidden[student.visual_mask].view(n // p, p, -1)
    return gram_cosine_from_teacher_gram(hs, student.lm_head_weight, targets.gram, targets.vocab_rows, reduction)
