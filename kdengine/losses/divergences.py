"""Algebra of the six divergences: elementwise terms and gradients (torch path; mirrored by
``kdengine/kernels/divergence_terms.py``), and the per-row epilogue shared by the torch and Triton paths.
A leaf module: it imports nothing from kdengine, so every path can use it without cycles.

Notation (one row, one vocabulary block): ``s = log p_s`` and ``t = log p_t`` are the student and
teacher log-probabilities at temperature T over the compared vocabulary (the first min(V, Vt)
entries, renormalised there). ``t`` may be ``-inf`` (masked teacher vocabulary).

Every divergence L(p_t, p_s) of a row is ``sum_j elem_j`` and its gradient with respect to the
student logits z_s (at temperature T, i.e. z_s = raw / T) is

    forward_kl:   dL/dz_s = p_s - p_t
    otherwise:    dL/dz_s = p_s * (h - c),   c = sum_j p_s,j * h_j   (a per-row scalar)

so a backward pass needs only per-row statistics (log-sum-exps and ``c``) plus one recomputation of
each logits block. No T^2 factor is applied anywhere (multiply the loss yourself if you want it).

Log-ratio convention: every finite teacher log-probability is used exactly, also where p_t
underflows (t = z_t / T - LSE_t is finite in log space). Only masked vocabulary entries (teacher
logit -inf; the torch path clamps those to -1e38, so any t <= MASKED_BELOW counts as masked) are
exact zeros of p_t: terms weighted by p_t are 0 there, and in the log-ratio terms of the reverse
divergences their log p_t is taken as ``LOG_FLOOR = log(smallest normal fp32)`` (about -87.3), a
large finite penalty instead of ``inf``.
"""

from __future__ import annotations

import math

import torch

from kdengine.losses.settings import BETA_DIVERGENCES, DEFAULT_BETA, DIVERGENCES  # noqa: F401 (re-exported)

LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
MASKED_BELOW = -1e37  # a teacher log-probability at or below this is a masked vocabulary entry


def resolve_beta(divergence: str, beta: float | None) -> float:
    """The mixing weight ``divergence`` computes with: ``beta``, or DEFAULT_BETA for None.

    Raises ValueError for a beta given to a divergence that has none (it would be ignored) and for one
    outside (0, 1). ``divergence`` must already be one of DIVERGENCES.
    """
    if beta is None:
        return DEFAULT_BETA
    if divergence not in BETA_DIVERGENCES:
        raise ValueError(f"beta={beta!r} has no effect for divergence {divergence!r}; pass beta only with "
                         f"{', '.join(BETA_DIVERGENCES)}")
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(beta, (bool, str)) or not 0.0 < value < 1.0:
        raise ValueError(f"beta={beta!r} for divergence={divergence!r}; expected 0 < beta < 1")
    return value


def teacher_log_ratio(t: torch.Tensor) -> torch.Tensor:
    """t for the log-ratio terms: exact where finite, LOG_FLOOR at masked entries."""
    return torch.where(t > MASKED_BELOW, t, torch.full((), LOG_FLOOR, dtype=t.dtype, device=t.device))


def _log_mix(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * exp(a) + (1 - beta) * exp(b)), stable for -inf entries of ``a``."""
    return torch.logaddexp(a + math.log(beta), b + math.log1p(-beta))


def _times_pos(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x with the convention 0 * (anything) = 0 (x may be -inf where p == 0)."""
    return torch.where(p > 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


def divergence_terms(
    s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float, need_h: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise loss terms and gradient factor of one block.

    Args:
        s: [BN, BV] student log-probabilities (finite), fp32 or float64.
        t: [BN, BV] teacher log-probabilities (masked entries: -inf or <= MASKED_BELOW).
    Returns:
        elem: [BN, BV], the row loss is ``elem.sum(-1)`` over all blocks.
        h: [BN, BV] gradient factor (see module docstring), ``None`` for forward_kl or if not need_h.
    """
    p_s = s.exp()
    p_t = t.exp()
    t_log = teacher_log_ratio(t)
    h = None
    if divergence == "forward_kl":
        elem = _times_pos(p_t, t_log - s)
    elif divergence == "reverse_kl":
        diff = s - t_log
        elem = p_s * diff
        h = diff
    elif divergence == "jsd":
        log_m = _log_mix(t, s, beta)
        elem = beta * _times_pos(p_t, t - log_m) + (1.0 - beta) * p_s * (s - log_m)
        h = (1.0 - beta) * (s - log_m) if need_h else None
    elif divergence == "skew_forward_kl":
        log_m = _log_mix(t, s, beta)
        elem = _times_pos(p_t, t - log_m)
        h = -(1.0 - beta) * (t - log_m).exp() if need_h else None
    elif divergence == "skew_reverse_kl":
        log_m = _log_mix(s, t, beta)
        ratio = s - log_m
        elem = p_s * ratio
        h = ratio - beta * ratio.exp() if need_h else None
    elif divergence == "tvd":
        # subgradient at a tie p_s == p_t: 0 (torch.sign(0) = 0), in every impl
        elem = 0.5 * (p_t - p_s).abs()
        h = 0.5 * torch.sign(p_s - p_t) if need_h else None
    else:  # validated by the caller; kept as a guard for direct use
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    return elem, h


def divergence_grad(
    s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """dL/dz_s for one block: [BN, BV]; ``c`` is the per-row [BN] statistic from the forward pass."""
    p_s = s.exp()
    if divergence == "forward_kl":
        return p_s.sub_(t.exp())
    _, h = divergence_terms(s, t, divergence, beta)
    return p_s.mul_(h.sub_(c[:, None]))


# ----------------------------------------------------------------------------------------------
# per-row epilogue: [N] statistics -> outputs, and output grads -> [N] coefficients
# ----------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of an input dtype: float64 stays float64, everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_compute(x: torch.Tensor) -> torch.Tensor:
    """x in its compute dtype (fp32, or float64 for float64 inputs); no copy when it already is."""
    return x if x.dtype == compute_dtype(x.dtype) else x.float()


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """none -> [N]; sum; mean divides by N (0 for N = 0)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(rows.shape[0], 1) if reduction == "mean" else total


def finish_rows(rows_loss, lse_c, z_label, weight, labels, ignore_index, reduction):
    """Per-row statistics -> (div, ce, w_rows, valid, n_valid).

    rows_loss, lse_c, z_label: [N] fp32. ce = mean over rows with label != ignore_index (0 if none).
    """
    w_rows = weight.detach().to(rows_loss.dtype) if weight is not None else None
    div = reduce_rows(rows_loss * w_rows if w_rows is not None else rows_loss, reduction)
    if labels is None:
        return div, rows_loss.new_zeros(()), w_rows, None, None
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)
    ce = torch.where(valid, lse_c - z_label, 0.0).sum() / n_valid
    return div, ce, w_rows, valid, n_valid


def row_coefficients(grad_div, grad_ce, n, reduction, w_rows, valid, n_valid, dtype=torch.float32):
    """d(output)/d(row divergence) and d(output)/d(row CE) as [N] vectors of ``dtype`` (CE: None without labels)."""
    grad_div, grad_ce = grad_div.to(dtype), grad_ce.to(dtype)
    coef_div = grad_div.expand(n)
    if reduction == "mean":
        coef_div = coef_div / max(n, 1)
    if w_rows is not None:
        coef_div = coef_div * w_rows
    coef_ce = grad_ce * valid / n_valid if valid is not None else None
    return coef_div, coef_ce
