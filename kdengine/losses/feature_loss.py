"""Hidden-state alignment (LLaVADI's feature distillation): the student's projected rows against the teacher's.

With P the feature projector and h_s, h_t the selected rows ([N, Dt] after projection):
    cosine  per row 1 - cos(P(h_s), h_t), cos = <a, b> / (max(|a|, eps) max(|b|, eps)), eps = NORM_EPS
    mse     per row mean over the Dt dims of (P(h_s) - h_t)^2
A zero row has cos = 0 (loss 1) through the eps clamp, with a finite gradient (at most 1/eps per unit of
upstream gradient), so padding or dead rows never give NaN. Memory is O(N * Dt): no vocabulary dimension.
"""

from __future__ import annotations

import torch

from kdengine.losses.checks import ROW_REDUCTIONS, check_choice, check_tensor

FEATURE_METRICS = ("cosine", "mse")
NORM_EPS = 1e-8  # lower clamp of each row's L2 norm in the cosine (and in the affinity's normalisation)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float (16-bit included) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_frozen(name: str, x: torch.Tensor) -> None:
    if x.requires_grad:
        raise ValueError(f"{name} {tuple(x.shape)} requires grad; the teacher must be frozen "
                         f"(call .detach() or run the teacher under torch.no_grad())")


def validate_feature_args(projected_student, teacher, metric, weight, reduction) -> None:
    """Raise ValueError naming the argument, its shape or value and what was expected."""
    check_tensor("projected_student", projected_student, 2)
    check_tensor("teacher", teacher, 2)
    n, dt = projected_student.shape
    if dt == 0:
        raise ValueError(f"projected_student has shape {tuple(projected_student.shape)}; expected [N, Dt] with Dt >= 1")
    if teacher.shape != projected_student.shape:
        raise ValueError(f"teacher has shape {tuple(teacher.shape)} but projected_student has "
                         f"{tuple(projected_student.shape)}; expected both [N, Dt] (project the student first)")
    if teacher.device != projected_student.device:
        raise ValueError(f"teacher is on {teacher.device} but projected_student is on {projected_student.device}")
    if teacher.dtype != projected_student.dtype:
        raise ValueError(f"teacher has dtype {teacher.dtype} but projected_student has {projected_student.dtype}; "
                         f"cast them to one dtype")
    check_frozen("teacher", teacher)
    check_choice("metric", metric, FEATURE_METRICS)
    check_choice("reduction", reduction, ROW_REDUCTIONS)
    if weight is not None:
        check_row_weight(weight, n, projected_student.device)


def check_row_weight(weight, n: int, device: torch.device) -> None:
    """An [n] real (float, int or bool) tensor on ``device``; values >= 0 checked on CPU only (no device sync)."""
    if not isinstance(weight, torch.Tensor) or weight.shape != (n,):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight has shape {shape}; expected [N] = ({n},)")
    if weight.is_complex():
        raise ValueError(f"weight has dtype {weight.dtype}; expected a real (float, int or bool) tensor")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but projected_student is on {device}")
    if weight.device.type == "cpu" and n and not bool((weight >= 0).all()):
        i = int((~(weight >= 0)).nonzero()[0, 0])
        raise ValueError(f"weight[{i}] = {float(weight[i])}; expected weights >= 0")


def feature_rows(s: torch.Tensor, t: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row losses [N] of compute-dtype rows s, t [N, Dt] (see the module docstring)."""
    if metric == "cosine":
        ns = torch.linalg.vector_norm(s, dim=-1).clamp_min(NORM_EPS)
        nt = torch.linalg.vector_norm(t, dim=-1).clamp_min(NORM_EPS)
        return 1.0 - torch.linalg.vecdot(s, t) / (ns * nt)
    d = s - t
    return torch.linalg.vecdot(d, d) / s.shape[-1]


def reduce_weighted(rows: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """none -> [N] (times the weights); sum; mean = sum(w * row) / sum(w), 0 when sum(w) == 0 (N when unweighted)."""
    if weight is not None:
        w = weight.detach().to(rows.dtype)
        rows = rows * w
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(rows.shape[0], 1)
    denom = w.sum()
    nonzero = denom != 0
    return torch.where(nonzero, total / torch.where(nonzero, denom, 1.0), 0.0)


def feature_loss(
    projected_student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    metric: str = "cosine",
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hidden-state alignment loss. Every argument after the two tensors is keyword-only.

    Args:
        projected_student: [N, Dt] the student's rows after the feature projector (gradients flow).
        teacher: [N, Dt] the teacher's rows, same dtype and device, no grad (a ValueError otherwise).
        metric: cosine (1 - cos per row; norms clamped below at NORM_EPS = 1e-8, so a zero row has
            cos = 0 and a finite gradient) | mse (mean over the Dt dims of the squared difference per row).
        weight: optional [N] per-row weights >= 0 (float, int or bool; no gradient flows into them).
            The weighted mean is sum(w * row) / sum(w), and 0 when sum(w) == 0; ``sum`` is sum(w * row)
            and ``none`` returns w * row.
        reduction: mean (over rows; 0 for N = 0, zero gradients) | sum | none ([N]).
    Returns:
        The loss in the input dtype, computed in fp32 (float64 for float64 inputs).
    """
    validate_feature_args(projected_student, teacher, metric, weight, reduction)
    dtype = compute_dtype(projected_student)
    rows = feature_rows(projected_student.to(dtype), teacher.to(dtype), metric)
    return reduce_weighted(rows, weight, reduction).to(projected_student.dtype)
