"""Fused lm_head + divergence (+ student cross-entropy) without materialising [N, V] logits.

The public function: argument checks and the one ``impl=`` dispatch. The parts live beside it:
    fused_linear_divergence_torch.py     torch path (row chunks or streaming blocks, see budget.py)
    budget.py                            the working-memory budget and the schedule it allows
    kdengine/kernels/fused_linear_divergence.py   Triton path
    reference.py                         materialising reference (oracle, naive baseline)
    divergences.py                       the divergence algebra and the per-row epilogue
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdengine.losses.checks import (
    IGNORE_INDEX,
    ROW_REDUCTIONS,
    check_choice,
    check_devices_dtypes_frozen_teacher,
    check_label_range,
    check_tensor,
    check_vector,
    resolve_impl,
)
from kdengine.losses.budget import DEFAULT_BUDGET_MB_CPU, check_budget, resolve_budget_mb
from kdengine.losses.divergences import DEFAULT_BETA, DIVERGENCES, compute_dtype, reduce_rows, resolve_beta
from kdengine.losses.reference import fused_linear_divergence_reference


@dataclass(frozen=True)
class FusedLinearDivergenceParams:
    """The non-tensor arguments of one call, passed to the autograd Functions as one value."""

    divergence: str = "forward_kl"
    beta: float = DEFAULT_BETA  # resolved: read only by the divergences that mix
    temperature: float = 1.0
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    budget_mb: float = DEFAULT_BUDGET_MB_CPU  # resolved (argument, env or device default)
    ce_weight: float = 1.0

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature


def validate_divergence_args(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, beta,
                             temperature, weight, labels, reduction, student_bias=None, teacher_bias=None) -> None:
    """Raise ValueError naming the argument, its value/shape and what was expected."""
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        check_tensor(name, x, 2)
    n, ds = student_hidden.shape
    v, ds_w = student_weight.shape
    nt, dt = teacher_hidden.shape
    vt, dt_w = teacher_weight.shape
    if ds != ds_w:
        raise ValueError(f"student hidden size mismatch: student_hidden {tuple(student_hidden.shape)} "
                         f"vs student_weight {tuple(student_weight.shape)} (expected [N, Ds] and [V, Ds])")
    if dt != dt_w:
        raise ValueError(f"teacher hidden size mismatch: teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"vs teacher_weight {tuple(teacher_weight.shape)} (expected [N, Dt] and [Vt, Dt])")
    if nt != n:
        raise ValueError(f"row count mismatch: student_hidden {tuple(student_hidden.shape)} vs "
                         f"teacher_hidden {tuple(teacher_hidden.shape)} (both must have N rows)")
    if v == 0 or vt == 0:
        raise ValueError(f"empty vocabulary: student_weight {tuple(student_weight.shape)}, "
                         f"teacher_weight {tuple(teacher_weight.shape)}")
    check_devices_dtypes_frozen_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight)
    dev = student_hidden.device
    for name, b, dim, rows in (("student_bias", student_bias, "V", v), ("teacher_bias", teacher_bias, "Vt", vt)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor) or b.shape != (rows,):
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{name} has shape {shape}; expected [{dim}] = ({rows},)")
        if b.device != dev or b.dtype != student_hidden.dtype:
            raise ValueError(f"{name} is {b.dtype} on {b.device}; expected {student_hidden.dtype} on {dev}")
    if teacher_bias is not None and teacher_bias.requires_grad:
        raise ValueError(f"teacher_bias {tuple(teacher_bias.shape)} requires grad; the teacher must be frozen")
    check_choice("divergence", divergence, DIVERGENCES)
    resolve_beta(divergence, beta)
    if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature={temperature}; expected a finite value > 0")
    check_choice("reduction", reduction, ROW_REDUCTIONS)
    if weight is not None:
        check_vector("weight", weight, n, dev)
    if labels is not None:
        check_vector("labels", labels, n, dev, (torch.int64, torch.int32))


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
    budget_mb: float | None = None,
    ce_weight: float = 1.0,
    return_rows: bool = False,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
):
    """Divergence between teacher and student next-token distributions, logits never materialised.

    p = softmax((hidden @ weight^T + bias) / temperature) over the first min(V, Vt) vocabulary entries
    (both renormalised there). No T^2 factor is applied. Every argument after the four tensors is
    keyword-only.

    Args:
        student_hidden: [N, Ds] selected rows (visual and/or response positions).
        student_weight: [V, Ds] student lm_head weight, trainable or frozen.
        teacher_hidden: [N, Dt], no grad.
        teacher_weight: [Vt, Dt], no grad.
        divergence: forward_kl = KL(p_t||p_s) | reverse_kl = KL(p_s||p_t) |
            jsd = beta KL(p_t||m) + (1-beta) KL(p_s||m), m = beta p_t + (1-beta) p_s |
            skew_forward_kl = KL(p_t || beta p_t + (1-beta) p_s) |
            skew_reverse_kl = KL(p_s || beta p_s + (1-beta) p_t) | tvd = 0.5 sum |p_t - p_s|.
        beta: mixing weight in (0, 1) of jsd and the skew divergences; None: 0.5. Given with
            forward_kl, reverse_kl or tvd (which have none) it is a ValueError, not ignored.
        weight: optional [N] per-row weights (treated as constants), applied before reduction.
        labels: optional [N] targets; then the student's cross-entropy (temperature 1, full V) is
            computed in the same vocabulary pass and returned as the mean over rows != ignore_index
            (0 when there are none).
        reduction: none -> [N] | sum | mean (divides by N; weights do not renormalise).
        impl: auto (triton on CUDA, torch elsewhere) | triton | torch | reference.
        budget_mb: working memory in MB the torch path may use beyond the inputs and their gradients
            (default: env KDENGINE_LOSS_BUDGET_MB, else 512 on CPU and min(1024, free device memory / 8)
            on CUDA). When it holds a chunk of min(N, 256) rows' logits and reduction is sum or mean,
            rows run in chunks whose logits are computed once and the gradient is formed in the forward
            (4 lm_head GEMMs for a trainable head, 3 frozen); otherwise logits blocks are streamed and
            recomputed in the backward (6-8 GEMMs). See ``kdengine/losses/budget.py``. Below the
            smallest streaming block it is a ValueError. The Triton path streams and ignores it.
        ce_weight: the weight of the CE in the caller's loss, loss = div + ce_weight * ce (with labels).
            The row-chunk schedule forms that gradient in the forward; a backward whose grad_ce / grad_div
            differs recomputes the logits (correct, slower).
        return_rows: also return the unweighted per-row divergences [N], detached (for metrics), last.
        student_bias: optional [V] lm_head bias of the student (trainable or frozen).
        teacher_bias: optional [Vt] lm_head bias of the teacher, no grad.
    Returns:
        div ([N] or scalar), or (div, cross_entropy) when labels is given; (..., rows) with return_rows.
    """
    validate_divergence_args(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence,
                             beta, temperature, weight, labels, reduction, student_bias, teacher_bias)
    impl = resolve_impl(impl, student_hidden.device)
    if labels is not None:
        check_label_range(labels, ignore_index, student_weight.shape[0])
    budget, budget_name = resolve_budget_mb(budget_mb, student_hidden.device)
    check_budget(budget, budget_name, student_hidden.shape[0],
                 torch.finfo(compute_dtype(student_hidden.dtype)).bits // 8)
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not math.isfinite(ce_weight):
        raise ValueError(f"ce_weight={ce_weight!r}; expected a finite number")
    params = FusedLinearDivergenceParams(
        divergence, resolve_beta(divergence, beta), float(temperature), ignore_index, reduction, budget,
        float(ce_weight))
    if impl == "torch":
        from kdengine.losses.fused_linear_divergence_torch import FusedLinearDivergenceFunction

        div, ce, rows = FusedLinearDivergenceFunction.apply(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, weight,
            labels, params)
    else:
        if return_rows:  # these impls stream anyway: per-row values, weighted and reduced here
            params = FusedLinearDivergenceParams(**{**params.__dict__, "reduction": "none"})
        if impl == "reference":
            out = fused_linear_divergence_reference(
                student_hidden, student_weight, teacher_hidden, teacher_weight, divergence=divergence, beta=beta,
                temperature=params.temperature, weight=None if return_rows else weight, labels=labels,
                ignore_index=ignore_index, reduction=params.reduction, student_bias=student_bias,
                teacher_bias=teacher_bias)
            div, ce = out if labels is not None else (out, None)
        else:
            from kdengine.kernels.fused_linear_divergence import FusedLinearDivergenceTriton

            div, ce = FusedLinearDivergenceTriton.apply(
                student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                None if return_rows else weight, labels, params)
        rows = None
        if return_rows:
            rows = div.detach()
            div = reduce_rows(div * weight.to(div.dtype) if weight is not None else div, reduction)
    out = (div, ce) if labels is not None else (div,)
    if return_rows:
        out = out + (rows,)
    return out if len(out) > 1 else out[0]
