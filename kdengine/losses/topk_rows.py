"""Per-row algebra of ``topk_divergence`` shared by its torch path and its Triton path (a leaf: it imports
only ``divergences.py``, so ``kernels/topk_divergence.py`` needs nothing else from ``kdengine.losses``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdengine.losses.divergences import finish_rows, row_coefficients

PAD_ID = -1  # a teacher_ids entry of -1 is padding: its log-probability is not read


# ----------------------------------------------------------------------------------------------
# row algebra shared by the torch and Triton paths
# ----------------------------------------------------------------------------------------------
@dataclass
class TeacherBins:
    """Teacher side of the per-row loss (compute dtype): w [N, K] (0 on padding), pad [N, K] bool, and [N]
    mass = sum_k w_k, tau (0 under renormalise), const = sum_k w_k log w_k + tau log tau."""

    w: torch.Tensor
    pad: torch.Tensor
    mass: torch.Tensor
    tau: torch.Tensor
    w_log_w: torch.Tensor
    tau_log_tau: torch.Tensor


def teacher_bins(pad: torch.Tensor, logprobs: torch.Tensor, tail: str, dtype=torch.float32) -> TeacherBins:
    """pad [N, K] bool, logprobs [N, K] log p_t (any float dtype) -> TeacherBins in ``dtype``."""
    lp = logprobs.to(dtype).masked_fill(pad, -math.inf)
    log_mass = torch.logsumexp(lp, -1)  # -inf for an all-padding row
    if tail == "renormalise":
        lw = torch.where(torch.isfinite(log_mass)[:, None], lp - log_mass[:, None], -math.inf)
        tau = torch.zeros_like(log_mass)
    else:
        lw = lp
        tau = (-torch.expm1(log_mass)).clamp_min(0.0)  # mass > 1 (rounding) gives tau = 0
    w = lw.exp()
    w_log_w = torch.where(w > 0, w * lw, 0.0).sum(-1)
    tau_log_tau = torch.where(tau > 0, tau * tau.log(), 0.0)
    return TeacherBins(w, pad, w.sum(-1), tau, w_log_w, tau_log_tau)


@dataclass
class TopkRowStats:
    """Per-row [N] statistics the backward needs (m_out/ll_out/tau/q_support: tail policy only)."""

    m: torch.Tensor                        # student softmax at T: lse = m + ll
    ll: torch.Tensor
    lse_c: torch.Tensor                    # CE softmax (T = 1)
    mass: torch.Tensor
    m_out: torch.Tensor | None = None      # the same over the columns off the support
    ll_out: torch.Tensor | None = None
    tau: torch.Tensor | None = None        # tau where the tail bin is used, else 0
    q_support: torch.Tensor | None = None  # Q = sum_{k in S} q_k


def topk_finish(zk, m, ll, out, lse_c, z_label, bins: TeacherBins, weight, labels, params):
    """zk [N, K] raw student logits at the ids (NaN where an id matched no column), [N] m, ll (the
    student's shift and log-sum at T), out = (m_out, ll_out) off the support or None (renormalise),
    lse_c, z_label -> (div, ce, saved), saved = (TopkRowStats, w_rows, valid, n_valid)."""
    lq = (zk * params.inv_t - m[:, None]) - ll[:, None]
    rows = bins.w_log_w - torch.where(bins.w > 0, bins.w * lq, 0.0).sum(-1)
    stats = TopkRowStats(m, ll, lse_c, bins.mass)
    if out is not None:
        m_out, ll_out = out
        used = (bins.tau > 0) & (ll_out > -math.inf)
        log_q_tail = (m_out - m) + (ll_out - ll)
        rows = rows + torch.where(used, bins.tau_log_tau - bins.tau * log_q_tail, 0.0)
        stats.m_out, stats.ll_out = m_out, ll_out
        stats.tau = torch.where(used, bins.tau, 0.0)
        stats.q_support = torch.where(bins.pad, 0.0, lq.exp()).sum(-1)
    div, ce, w_rows, valid, n_valid = finish_rows(rows, lse_c, z_label, weight, labels, params.ignore_index,
                                                  params.reduction)
    return div, ce, (stats, w_rows, valid, n_valid)


def topk_coefficients(grad_div, grad_ce, n, params, w_rows, valid, n_valid, dtype=torch.float32):
    """(a_div [N] = d(output)/d(row loss) / T, coef_ce [N] or None): the chain rule through z / T."""
    coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, params.reduction, w_rows, valid, n_valid, dtype)
    return coef_div * params.inv_t, coef_ce


# ----------------------------------------------------------------------------------------------
# torch path: bounded [BN, BV] logits blocks
# ----------------------------------------------------------------------------------------------
