"""torch path of ``topk_divergence`` and the row algebra both fast paths share.

Notation of one row (z = raw student logits x W^T + b over the full vocabulary V, T the temperature):
    q_j = softmax(z / T)_j,  lse = LSE_j(z_j / T) = m + log l,  lq_k = (z_{id_k} / T - m) - log l
    (the running max m and the log-sum log l are kept apart: z / T - m is exact near the max, where
    z / T - lse would carry lse's rounding into every entry)                          (student)
    S = the row's top-k ids (padding excluded),  w_k = the teacher weight of entry k     (teacher)
    renormalise:  w_k = p_k / sum_k p_k,  tau = 0
    tail:         w_k = p_k,  tau = max(0, 1 - sum_k p_k) the teacher's leftover mass,
                  q_tail = sum_{j not in S} q_j = exp(lse_out - lse), lse_out = LSE over j not in S
                  (= m_out + log l_out; log l_out = -inf when S is all of V)
    row loss  L = sum_k w_k (log w_k - lq_k) + [tail bin] tau (log tau - log q_tail)
The tail bin is used when tau > 0 and S is not the whole vocabulary. ``lse_out`` is streamed over
the columns outside S (never 1 - sum q, which cancels when the student puts its mass on S).

Gradient with respect to z / T, with M = sum_k w_k and Q = sum_{k in S} q_k:
    g_j = M q_j - w_j + tau * (q_j                          if j in S
                               -Q exp(z_j / T - lse_out)    otherwise)
(w_j = the teacher weight of column j, 0 off S). It is a dense per-row softmax term plus
corrections on the K support columns, so a backward pass needs per-row statistics only.
"""

from __future__ import annotations

import math

import torch

from kdengine.losses.divergences import as_compute, compute_dtype
from kdengine.losses.fused_linear_divergence_torch import BlockPlan, HeadGrads, _label_hits, _Online
from kdengine.losses.topk_rows import PAD_ID, TopkRowStats, teacher_bins, topk_coefficients, topk_finish

def _block_logits(x_r, w, b, v0, v1):
    """[BN, v1 - v0] raw logits of one block in x_r's (compute) dtype."""
    w_blk = as_compute(w[v0:v1]).T
    return x_r @ w_blk if b is None else torch.addmm(as_compute(b[v0:v1]), x_r, w_blk)


def _support_cols(ids_r, v0, v1):
    """(inside [BN, K] bool, col [BN, K] long): each id's column in block [v0, v1), or the dummy
    column v1 - v0 (one past the block) for ids outside it, so scatters never collide with a real one."""
    inside = (ids_r >= v0) & (ids_r < v1)
    return inside, torch.where(inside, ids_r - v0, v1 - v0).long()


def _on_support(col, bn, bv):
    """[BN, BV] bool: the column is one of the row's top-k ids."""
    return torch.zeros(bn, bv + 1, dtype=torch.bool, device=col.device).scatter_(1, col, True)[:, :bv]


class TopkDivergenceFunction(torch.autograd.Function):
    """torch path. forward(xs [N, D], ws [V, D], bs [V] | None, ids [N, K] int, logprobs [N, K],
    weight [N] | None, labels [N] | None, params: TopkDivergenceParams) -> (div, ce): div is [N] for
    reduction='none' else a scalar; ce a scalar (0 without labels). Gradients flow to xs, ws, bs.
    Computes in fp32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, ids, logprobs, weight, labels, params):
        n, v = xs.shape[0], ws.shape[0]
        dev, ct, inv_t = xs.device, compute_dtype(xs.dtype), params.inv_t
        tail = params.tail == "tail"
        separate_ce = labels is not None and inv_t != 1.0
        plan = BlockPlan.streaming(n, v, v, params.budget_mb, xs.dtype)
        bins = teacher_bins(ids == PAD_ID, logprobs, params.tail, ct)
        zk = torch.full(ids.shape, math.nan, device=dev, dtype=ct)
        m, ll, m_out, ll_out, lse_c, z_label = (torch.zeros(n, device=dev, dtype=ct) for _ in range(6))
        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            x_r, ids_r = as_compute(xs[r0:r1]), ids[r0:r1]
            st = _Online(r1 - r0, plan.cols, dev, ct)
            st_out = _Online(r1 - r0, plan.cols, dev, ct) if tail else None
            st_c = _Online(r1 - r0, plan.cols, dev, ct) if separate_ce else None
            for v0, v1 in plan.vocab_blocks:
                z = _block_logits(x_r, ws, bs, v0, v1)
                st.update(z, inv_t)
                inside, col = _support_cols(ids_r, v0, v1)
                zk[r0:r1] = torch.where(inside, z.gather(1, col.clamp_max(v1 - v0 - 1)), zk[r0:r1])
                if tail:
                    st_out.update(z.masked_fill(_on_support(col, r1 - r0, v1 - v0), -math.inf), inv_t)
                if st_c is not None:
                    st_c.update(z)
                if labels is not None:
                    inside, idx = _label_hits(labels[r0:r1], v0, v1)
                    z_label[r0:r1] += torch.where(inside, z.gather(1, idx[:, None])[:, 0], 0.0)
            m[r0:r1], ll[r0:r1] = st.shift_and_log_sum()
            if tail:
                m_out[r0:r1], ll_out[r0:r1] = st_out.shift_and_log_sum()
            lse_c[r0:r1] = st_c.lse() if st_c is not None else m[r0:r1] + ll[r0:r1]
        div, ce, (stats, *rest) = topk_finish(zk, m, ll, (m_out, ll_out) if tail else None, lse_c, z_label, bins,
                                              weight, labels, params)
        ctx.save_for_backward(xs, ws, bs, ids, bins.w, labels, *rest)
        ctx.params, ctx.plan, ctx.stats, ctx.separate_ce = params, plan, stats, separate_ce
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        xs, ws, bs, ids, w_teacher, labels, w_rows, valid, n_valid = ctx.saved_tensors
        params, plan, stats = ctx.params, ctx.plan, ctx.stats
        n = xs.shape[0]
        ct = compute_dtype(xs.dtype)
        a_div, coef_ce = topk_coefficients(grad_div, grad_ce, n, params, w_rows, valid, n_valid, ct)
        grads = HeadGrads(ctx.needs_input_grad[:3], xs, ws, ct)
        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            x_r = as_compute(xs[r0:r1])
            for v0, v1 in plan.vocab_blocks:
                z = _block_logits(x_r, ws, bs, v0, v1)
                g = _dlogits_block(z, ids[r0:r1], w_teacher[r0:r1], (r0, r1), (v0, v1), stats, a_div, coef_ce,
                                   labels, params.inv_t, ctx.separate_ce)
                grads.add(g, x_r, ws, (r0, r1), (v0, v1))
        return grads.result(xs, ws, bs) + (None,) * 5


def _dlogits_block(z, ids_r, w_r, row_range, col_range, stats: TopkRowStats, a_div, coef_ce, labels, inv_t,
                   separate_ce):
    """d(output)/d(raw student logits) of one block [BN, BV] (module docstring); overwrites z."""
    (r0, r1), (v0, v1) = row_range, col_range
    bn, bv = r1 - r0, v1 - v0
    g_ce = None
    if coef_ce is not None and separate_ce:  # CE softmax at T = 1, taken before z is scaled
        g_ce = torch.exp(z - stats.lse_c[r0:r1, None]).mul_(coef_ce[r0:r1, None])
    zt = z.mul_(inv_t)
    q = torch.exp((zt - stats.m[r0:r1, None]) - stats.ll[r0:r1, None])
    inside, col = _support_cols(ids_r, v0, v1)
    w_col = z.new_zeros(bn, bv + 1).scatter_add_(1, col, torch.where(inside, w_r, 0.0))[:, :bv]
    g = q * stats.mass[r0:r1, None] - w_col
    if stats.m_out is not None:
        # q_j / q_tail off the support (<= 1 there; clamped where it is not used)
        r = zt.sub_(stats.m_out[r0:r1, None]).sub_(stats.ll_out[r0:r1, None]).clamp_max_(0.0).exp_()
        off = r.mul_(-stats.q_support[r0:r1, None])
        g += stats.tau[r0:r1, None] * torch.where(_on_support(col, bn, bv), q, off)
    g.mul_(a_div[r0:r1, None])
    if coef_ce is not None:
        g.add_(g_ce if g_ce is not None else q.mul_(coef_ce[r0:r1, None]))
        inside, idx = _label_hits(labels[r0:r1], v0, v1)
        g.scatter_add_(1, idx[:, None], torch.where(inside[:, None], -coef_ce[r0:r1, None], 0.0))
    return g
