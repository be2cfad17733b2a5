"""Forward KL from a teacher's top-k log-probabilities (an offline teacher cache) to the student,
student logits never materialised.

The public function: argument checks and the one ``impl=`` dispatch. The parts live beside it:
    topk_divergence_torch.py                 torch path (bounded [BN, BV] blocks) and the row algebra
    kdengine/kernels/topk_divergence.py      Triton path
    reference.py                             materialising reference (oracle, naive baseline)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdengine.losses.budget import DEFAULT_BUDGET_MB_CPU, check_budget, resolve_budget_mb
from kdengine.losses.checks import (
    IGNORE_INDEX,
    ROW_REDUCTIONS,
    check_choice,
    check_label_range,
    check_tensor,
    check_vector,
    resolve_impl,
)
from kdengine.losses.divergences import compute_dtype
from kdengine.losses.settings import TOPK_TAILS as TAILS
from kdengine.losses.topk_rows import PAD_ID

# teacher log-probabilities may exceed 0 by this much (rounding of log p ~ 0), and a row's top-k
# mass sum_k p_k may exceed 1 by MASS_SLACK (fp16 rounding of K entries); more is a caller error
LOGPROB_SLACK = 1e-3
MASS_SLACK = 1e-2


@dataclass(frozen=True)
class TopkDivergenceParams:
    """The non-tensor arguments of one call, passed to the autograd Functions as one value."""

    temperature: float = 1.0
    tail: str = "renormalise"
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    budget_mb: float = DEFAULT_BUDGET_MB_CPU  # resolved; the torch path streams within it

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature


def validate_topk_args(student_hidden, student_weight, teacher_ids, teacher_logprobs, divergence, temperature,
                       tail, weight, labels, reduction, student_bias) -> None:
    """Raise ValueError naming the argument, its value/shape and what was expected."""
    if divergence != "forward_kl":
        raise ValueError(
            f"divergence={divergence!r}: topk_divergence offers only 'forward_kl'. Top-k log-probabilities "
            f"fix the teacher on its k ids and say nothing about how it spreads the rest, so reverse KL, "
            f"JSD and TVD cannot be computed exactly from them; use fused_linear_divergence with the "
            f"teacher's hidden states (a 'hidden' cache) for those")
    check_tensor("student_hidden", student_hidden, 2)
    check_tensor("student_weight", student_weight, 2)
    check_tensor("teacher_logprobs", teacher_logprobs, 2)
    n, d = student_hidden.shape
    v, d_w = student_weight.shape
    if d != d_w:
        raise ValueError(f"hidden size mismatch: student_hidden {tuple(student_hidden.shape)} vs "
                         f"student_weight {tuple(student_weight.shape)} (expected [N, D] and [V, D])")
    if v == 0:
        raise ValueError(f"empty vocabulary: student_weight {tuple(student_weight.shape)}")
    if student_bias is not None and (not isinstance(student_bias, torch.Tensor) or student_bias.shape != (v,)):
        shape = tuple(student_bias.shape) if isinstance(student_bias, torch.Tensor) else type(student_bias).__name__
        raise ValueError(f"student_bias has shape {shape}; expected [V] = ({v},)")
    dev, dtype = student_hidden.device, student_hidden.dtype
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias)):
        if x is not None and (x.device != dev or x.dtype != dtype):
            raise ValueError(f"{name} is {x.dtype} on {x.device}; expected {dtype} on {dev} like student_hidden")
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.dtype not in (torch.int32, torch.int64):
        what = teacher_ids.dtype if isinstance(teacher_ids, torch.Tensor) else type(teacher_ids).__name__
        raise ValueError(f"teacher_ids has dtype {what}; expected torch.int32 or torch.int64")
    if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n or teacher_ids.shape[1] == 0:
        raise ValueError(f"teacher_ids has shape {tuple(teacher_ids.shape)}; expected [N, K] with N = {n}, K >= 1")
    k = teacher_ids.shape[1]
    if k > v:
        raise ValueError(f"teacher_ids has K = {k} ids per row but the vocabulary has V = {v}; expected K <= V")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)}; expected "
                         f"{tuple(teacher_ids.shape)} like teacher_ids")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {dev}")
    if teacher_logprobs.requires_grad:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} requires grad; the teacher is a "
                         f"constant here (call .detach())")
    if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature={temperature}; expected a finite value > 0")
    check_choice("tail", tail, TAILS)
    check_choice("reduction", reduction, ROW_REDUCTIONS)
    if weight is not None:
        check_vector("weight", weight, n, dev)
    if labels is not None:
        check_vector("labels", labels, n, dev, (torch.int64, torch.int32))


def check_topk_values(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, vocab: int) -> None:
    """Value checks of the teacher's top-k; only on CPU tensors, where they cost no device sync.

    On a GPU they are skipped: an id outside [0, V) then matches no vocabulary column and makes its
    row's loss NaN (unless its log-probability is -inf), and duplicate ids give an undefined result.
    """
    if teacher_ids.device.type != "cpu" or teacher_ids.numel() == 0:
        return
    ids = teacher_ids.long()
    pad = ids == PAD_ID
    bad = ~pad & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"teacher_ids[{i}, {j}] = {int(ids[i, j])} is outside [0, {vocab}) "
                         f"and is not the padding id {PAD_ID}")
    srt = torch.where(pad, PAD_ID - torch.arange(ids.shape[1]), ids).sort(-1).values  # padding never equal
    dup = srt[:, 1:] == srt[:, :-1]
    if bool(dup.any()):
        i, j = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"teacher_ids row {i} lists id {int(srt[i, j])} twice; expected distinct ids per row")
    lp = teacher_logprobs.detach().double().masked_fill(pad, -math.inf)
    bad = torch.isnan(lp) | (lp > LOGPROB_SLACK)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"teacher_logprobs[{i}, {j}] = {float(lp[i, j])}; expected a log-probability <= 0 "
                         f"(or -inf for an id with no mass)")
    mass = lp.exp().sum(-1)
    if bool((mass > 1.0 + MASS_SLACK).any()):
        i = int((mass > 1.0 + MASS_SLACK).nonzero()[0, 0])
        raise ValueError(f"teacher_logprobs row {i} has top-k mass sum_k exp(logprob) = {float(mass[i]):.4f} > 1; "
                         f"expected log-probabilities of one distribution (log_softmax, not logits)")


def topk_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "renormalise",
    weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
    student_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    budget_mb: float | None = None,
):
    """Forward KL from the teacher's top-k distribution to the student, over the full vocabulary.

    q = softmax((student_hidden @ student_weight^T + student_bias) / temperature) over all V entries;
    its log-sum-exp is streamed in vocabulary blocks ([N, V] logits never exist). Per row, with
    p_k = exp(teacher_logprobs[k]) on the teacher's ids S:
        tail="renormalise":  sum_k p^_k (log p^_k - log q_k),  p^_k = p_k / sum_k p_k, i.e. the exact
            KL(p^ || q) to the teacher truncated to its top-k and renormalised (the student is not
            renormalised: its mass off S is penalised through log q_k).
        tail="tail":  sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail), the exact KL
            between the two distributions coarsened to the k+1 bins {each id in S, everything else}:
            p_tail = max(0, 1 - sum_k p_k), q_tail = 1 - sum_k q_k (streamed over the columns off S,
            no cancellation). The tail term is 0 when p_tail = 0 or S is the whole vocabulary.
    With K = V (the full sorted teacher distribution) both equal the exact forward KL. No T^2 factor.
    Every argument after the four tensors is keyword-only.

    Args:
        student_hidden: [N, D] selected rows (visual and/or response positions).
        student_weight: [V, D] student lm_head weight, trainable or frozen.
        teacher_ids: [N, K] int32/int64 top-k token ids, distinct per row; -1 is padding (a row
            with fewer than K entries), its log-probability is ignored. A row of padding only has loss 0.
        teacher_logprobs: [N, K] float (fp16/bf16/fp32) log p_t at ``temperature``, no grad; -inf is
            allowed (an id with no mass).
        temperature: the temperature of both distributions (the teacher's was applied when cached).
        tail: renormalise | tail (see above).
        weight: optional [N] per-row weights (treated as constants), applied before reduction.
        labels: optional [N] targets; then the student's cross-entropy (temperature 1, full V) from the
            same vocabulary pass, the mean over rows != ignore_index (0 when there are none).
        reduction: none -> [N] | sum | mean (divides by N; weights do not renormalise).
        impl: auto (triton on CUDA, torch elsewhere) | triton | torch | reference.
        student_bias: optional [V] lm_head bias (trainable or frozen).
        divergence: only "forward_kl"; anything else is a ValueError (top-k cannot give it exactly).
        budget_mb: torch path working memory in MB, which sets its streaming block (default: env
            KDENGINE_LOSS_BUDGET_MB, else as ``fused_linear_divergence``; see kdengine/losses/budget.py).
    Returns:
        div ([N] or scalar), or (div, cross_entropy) when labels is given.
    Checks that need values (ids in [0, V) or -1, distinct ids, log-probabilities <= 0, top-k mass <= 1)
    run on CPU tensors only; see ``check_topk_values`` for what happens on a GPU.
    """
    validate_topk_args(student_hidden, student_weight, teacher_ids, teacher_logprobs, divergence, temperature,
                       tail, weight, labels, reduction, student_bias)
    impl = resolve_impl(impl, student_hidden.device)
    v = student_weight.shape[0]
    check_topk_values(teacher_ids, teacher_logprobs, v)
    if labels is not None:
        check_label_range(labels, ignore_index, v)
    budget, budget_name = resolve_budget_mb(budget_mb, student_hidden.device)
    check_budget(budget, budget_name, student_hidden.shape[0],
                 torch.finfo(compute_dtype(student_hidden.dtype)).bits // 8)
    params = TopkDivergenceParams(float(temperature), tail, ignore_index, reduction, budget)
    if impl == "reference":
        from kdengine.losses.reference import topk_divergence_reference

        return topk_divergence_reference(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                                         temperature=params.temperature, tail=tail, weight=weight, labels=labels,
                                         ignore_index=ignore_index, reduction=reduction, student_bias=student_bias)
    if impl == "torch":
        from kdengine.losses.topk_divergence_torch import TopkDivergenceFunction as function
    else:
        from kdengine.kernels.topk_divergence import TopkDivergenceTriton as function
    div, ce = function.apply(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs.detach(),
                             weight, labels, params)
    return (div, ce) if labels is not None else div
