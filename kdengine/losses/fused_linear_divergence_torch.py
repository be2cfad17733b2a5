"""torch path of ``fused_linear_divergence``: an autograd.Function with two schedules (``budget.py``).

One "GEMM unit" = one [N, V, D] lm_head product.
row_chunk (the budget holds a chunk of min(N, 256) rows and the loss is a scalar): per chunk of C rows
    the student and teacher logits [C, V] are computed once and held; passes 1 and 2 below run over
    column slices of the held chunk, and when any input needs grad the chunk's dlogits G (written over
    the student logits) gives dX_chunk = G W and dW += G^T X_chunk, db += column sums of G in the
    forward (gradient-in-forward). Backward only scales them by grad_output: 4 units for a trainable
    head, 3 for a frozen one, 2 without grad. The gradient is that of ``div + ce_weight * ce``; a backward
    whose grad_ce / grad_div differs from ``ce_weight`` recomputes as streaming does (correct, slower).
streaming (smaller budgets, reduction="none"): bounded [BN, BV] logits blocks, recomputed:
    forward   pass 1: online log-sum-exp of student and teacher (+ CE), forward_kl loss online.
              pass 2: loss and per-row ``c`` for the other divergences (see ``divergences.py``).
    backward  one recomputation pass: dlogits block -> dX += G W, dW[block] = G^T X, db[block] = sum G.
    frozen head (no grad for the student weight or bias) with forward_kl: pass 1 also accumulates
    P_s W and P_t W with an online rescale (as flash-attention accumulates its output), so dX is
    ready after a single pass and backward only scales it.
Both schedules share passes 1 and 2 and the dlogits (``_dlogits_block``); they differ only in where a
logits block comes from (``_Logits``: recomputed by GEMM; ``_ChunkLogits``: a slice of the held chunk).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from kdengine.losses.budget import choose_schedule, streaming_block
from kdengine.losses.divergences import (
    as_compute,
    compute_dtype,
    divergence_grad,
    divergence_terms,
    finish_rows,
    row_coefficients,
)

log = logging.getLogger(__name__)
TEACHER_LOGIT_FLOOR = -1e38  # -inf teacher logits are clamped here: exp() is still exactly 0, products stay finite


@dataclass
class BlockPlan:
    """Row/vocab blocking. ``vocab_blocks`` is split at ``vc`` so a block is either compared or CE-only."""

    rows: int
    cols: int
    vc: int
    vocab_blocks: list

    @staticmethod
    def make(n: int, v_total: int, vc: int, rows: int, cols: int) -> "BlockPlan":
        blocks = [(v0, min(v0 + cols, vc)) for v0 in range(0, vc, cols)]
        blocks += [(v0, min(v0 + cols, v_total)) for v0 in range(vc, v_total, cols)]
        return BlockPlan(max(1, rows), cols, vc, blocks)

    @staticmethod
    def streaming(n: int, v_total: int, vc: int, budget_mb: float, dtype: torch.dtype) -> "BlockPlan":
        """Streaming blocks within ``budget_mb`` (``budget.streaming_block``) for inputs of ``dtype``."""
        rows, cols = streaming_block(n, budget_mb, torch.finfo(compute_dtype(dtype)).bits // 8)
        return BlockPlan.make(n, v_total, vc, rows, cols)


def _head_logits(x_r, w, b, v0, v1, out):
    """out [BN, v1 - v0] = x_r w[v0:v1]^T + b[v0:v1] in the compute dtype."""
    w_blk = as_compute(w[v0:v1]).T
    if b is None:
        return torch.mm(x_r, w_blk, out=out)
    return torch.addmm(as_compute(b[v0:v1]), x_r, w_blk, out=out)


def _scale_teacher_(zt, inv_t):
    """Teacher logits / T, -inf clamped to TEACHER_LOGIT_FLOOR, in place."""
    if inv_t != 1.0:
        zt.mul_(inv_t)
    return zt.clamp_min_(TEACHER_LOGIT_FLOOR)


class _Logits:
    """Streaming: logits blocks recomputed by GEMM into two scratch buffers.
    ``get`` returns (raw student logits [BN, BV], teacher logits / T [BN, BV] or None)."""

    def __init__(self, xs, ws, bs, xt, wt, bt, inv_t, plan: BlockPlan):
        self.ws, self.bs, self.wt, self.bt, self.inv_t, self.vc = ws, bs, wt, bt, inv_t, plan.vc
        rows = max(1, min(plan.rows, xs.shape[0]))
        dtype = compute_dtype(xs.dtype)
        self.buf_s = torch.empty(rows * plan.cols, device=xs.device, dtype=dtype)
        self.buf_t = torch.empty(rows * plan.cols, device=xs.device, dtype=dtype)

    def get(self, r0, xs_r, xt_r, v0, v1):
        zt = None
        rows = xs_r.shape[0]
        if v0 < self.vc:
            out = self.buf_t[: rows * (v1 - v0)].view(rows, v1 - v0)
            zt = _scale_teacher_(_head_logits(xt_r, self.wt, self.bt, v0, v1, out), self.inv_t)
        out = self.buf_s[: rows * (v1 - v0)].view(rows, v1 - v0)
        return _head_logits(xs_r, self.ws, self.bs, v0, v1, out), zt


class _ChunkLogits:
    """Row chunk: the chunk's logits held whole, student [C, V_s] and teacher / T [C, Vc], computed once
    per chunk (first ``get`` of a new r0). ``get`` returns column slices (views) of them; the student's
    is overwritten by its dlogits in the gradient sweep. 16-bit weights are converted slice by slice."""

    def __init__(self, xs, ws, bs, xt, wt, bt, inv_t, plan: BlockPlan, v_student: int):
        self.ws, self.bs, self.wt, self.bt, self.inv_t, self.vc = ws, bs, wt, bt, inv_t, plan.vc
        self.v_student = v_student
        self.slice = v_student if ws.dtype == compute_dtype(ws.dtype) else plan.cols
        rows = max(1, min(plan.rows, xs.shape[0]))
        dtype = compute_dtype(xs.dtype)
        self.zs_buf = torch.empty(rows * v_student, device=xs.device, dtype=dtype)
        self.zt_buf = torch.empty(rows * plan.vc, device=xs.device, dtype=dtype)
        self.r0 = None
        self.zs = self.zt = None

    def _fill(self, x_r, w, b, out):
        width = out.shape[1]
        if self.slice >= width:
            return _head_logits(x_r, w, b, 0, width, out)
        for v0 in range(0, width, self.slice):  # 16-bit weights: an fp32 slice at a time
            v1 = min(width, v0 + self.slice)
            out[:, v0:v1] = _head_logits(x_r, w, b, v0, v1, None)
        return out

    def get(self, r0, xs_r, xt_r, v0, v1):
        if r0 != self.r0:
            rows = xs_r.shape[0]
            self.zs = self._fill(xs_r, self.ws, self.bs, self.zs_buf[: rows * self.v_student].view(rows, -1))
            self.zt = _scale_teacher_(self._fill(xt_r, self.wt, self.bt,
                                                 self.zt_buf[: rows * self.vc].view(rows, -1)), self.inv_t)
            self.r0 = r0
        return self.zs[:, v0:v1], (self.zt[:, v0:v1] if v0 < self.vc else None)


class _Online:
    """Online softmax statistics of one row block: running max ``m`` and sum ``l`` [BN], optional
    accumulators rescaled on every max update: ``acc`` [BN] (sum e * value) and ``mat`` [BN, D]
    (sum e W rows). ``e`` lives in a scratch buffer reused across blocks."""

    def __init__(self, rows: int, cols: int, device, dtype, d: int | None = None):
        self.m = torch.full((rows,), -math.inf, device=device, dtype=dtype)
        self.l = torch.zeros(rows, device=device, dtype=dtype)
        self.acc = torch.zeros(rows, device=device, dtype=dtype)
        self.mat = torch.zeros(rows, d, device=device, dtype=dtype) if d is not None else None
        self.buf = torch.empty(rows * cols, device=device, dtype=dtype)

    def update(self, z, scale_z: float = 1.0, value=None, w_blk=None):
        """z [BN, BV] logits (softmax of z * scale_z); value [BN, BV] scratch, accumulated as sum e * value."""
        m_new = torch.maximum(self.m, z.amax(-1) * scale_z)
        m_safe = m_new.nan_to_num(neginf=0.0)  # rows still all -inf keep e = 0
        rescale = torch.exp(self.m - m_safe)
        e = self.buf[: z.numel()].view_as(z)
        if scale_z != 1.0:
            torch.mul(z, scale_z, out=e)
            e.sub_(m_safe[:, None])
        else:
            torch.sub(z, m_safe[:, None], out=e)
        e.exp_()
        self.l.mul_(rescale).add_(e.sum(-1))
        if value is not None:  # value is a scratch block: overwritten by e * value
            self.acc.mul_(rescale).add_(value.mul_(e).sum(-1))
        if self.mat is not None:
            self.mat.mul_(rescale[:, None]).addmm_(e, w_blk)
        self.m = m_new
        return e

    def lse(self) -> torch.Tensor:
        return self.m + self.l.log()

    def shift_and_log_sum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, log l) with lse = m + log l. Log-probabilities taken as (z - m) - log l keep the
        dominant entries exact: z - m is exact near the max, where z - lse would carry lse's
        rounding (|lse| eps, large for large logits) into every entry."""
        return self.m.nan_to_num(neginf=0.0), self.l.log()


def _label_hits(lab_r, v0, v1):
    """(inside [BN] bool, column index [BN] long) of each row's label within block [v0, v1)."""
    inside = (lab_r >= v0) & (lab_r < v1)
    return inside, (lab_r - v0).clamp(0, v1 - v0 - 1).long()


@dataclass
class _RowStats:
    """Per-row [N] statistics the backward needs, and its output-grad coefficients."""

    m_s: torch.Tensor      # student softmax at T: shift (running max) and log-sum, lse_s = m_s + ll_s
    ll_s: torch.Tensor
    m_t: torch.Tensor      # teacher, the same
    ll_t: torch.Tensor
    lse_c: torch.Tensor    # CE softmax (T = 1, full V)
    c: torch.Tensor        # sum_j p_s h (divergences other than forward_kl)
    a_div: torch.Tensor | None = None       # d(output)/d(row divergence) / T
    coef_ce: torch.Tensor | None = None     # d(output)/d(row CE), None without labels
    labels: torch.Tensor | None = None


class HeadGrads:
    """Gradients of the student's hidden rows, lm_head weight and bias [N, D], [V, D], [V], accumulated
    block by block from dlogits g [BN, BV] in the compute dtype (None where no grad is needed)."""

    def __init__(self, needs: tuple, xs, ws, dtype):
        needs_dx, needs_dw, needs_db = needs
        self.dx = torch.zeros(xs.shape, device=xs.device, dtype=dtype) if needs_dx else None
        self.dw = torch.zeros(ws.shape, device=ws.device, dtype=dtype) if needs_dw else None
        self.db = torch.zeros(ws.shape[0], device=ws.device, dtype=dtype) if needs_db else None

    def add(self, g, x_r, ws, row_range, col_range):
        (r0, r1), (v0, v1) = row_range, col_range
        if self.dx is not None:
            self.dx[r0:r1].addmm_(g, as_compute(ws[v0:v1]))
        if self.dw is not None:
            self.dw[v0:v1].addmm_(g.T, x_r)
        if self.db is not None:
            self.db[v0:v1] += g.sum(0)

    def scaled(self, scale: torch.Tensor) -> "HeadGrads":
        """In place: every gradient times the scalar ``scale`` (skipped when it is 1)."""
        if scale.device.type == "meta" or not bool(scale == 1):  # meta (kdengine plan): the multiply's cost counts
            for g in (self.dx, self.dw, self.db):
                if g is not None:
                    g.mul_(scale)
        return self

    def result(self, xs, ws, bs) -> tuple:
        """(dX, dW, db) in the inputs' dtypes."""
        return tuple(g.to(like.dtype) if g is not None else None
                     for g, like in ((self.dx, xs), (self.dw, ws), (self.db, bs)))


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """torch path. forward(xs [N, Ds], ws [V, Ds], bs [V] | None, xt [N, Dt], wt [Vt, Dt], bt [Vt] | None,
    weight [N] | None, labels [N] | None, params: FusedLinearDivergenceParams) -> (div, ce, rows): div is
    [N] for reduction='none' else a scalar; ce a scalar (0 without labels); rows the unweighted per-row
    divergences [N], not differentiable. Gradients flow to xs, ws, bs."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, weight, labels, params):
        n, d = xs.shape
        v, vt = ws.shape[0], wt.shape[0]
        vc = min(v, vt)
        divergence = params.divergence
        has_labels = labels is not None
        v_total = v if has_labels else vc
        inv_t = params.inv_t
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        needs_grad = ctx.needs_input_grad[0] or head_grad
        dev, ct = xs.device, compute_dtype(xs.dtype)
        schedule = choose_schedule(n, v_total, vc, d + xt.shape[1], torch.finfo(ct).bits // 8, params.budget_mb,
                                   params.reduction, ws.dtype == ct)
        log.debug("fused_linear_divergence torch path: schedule=%s rows=%d cols=%d (N=%d, V=%d, Vt=%d, "
                  "budget_mb=%g)", schedule.kind, schedule.rows, schedule.cols, n, v, vt, params.budget_mb)
        plan = BlockPlan.make(n, v_total, vc, schedule.rows, schedule.cols)
        row_chunk = schedule.kind == "row_chunk"
        if row_chunk:
            logits = _ChunkLogits(xs, ws, bs, xt, wt, bt, inv_t, plan, v_total)
        else:
            logits = _Logits(xs, ws, bs, xt, wt, bt, inv_t, plan)
        # streaming, frozen head + forward_kl: the whole gradient in one forward pass (module docstring)
        eager = not row_chunk and ctx.needs_input_grad[0] and not head_grad and divergence == "forward_kl"
        in_forward = row_chunk and needs_grad  # gradient-in-forward
        # CE statistics need their own softmax unless they coincide with the student's
        separate_ce = has_labels and (inv_t != 1.0 or v != vc)

        m_s, ll_s, m_t, ll_t, lse_c, rows_loss, rows_c, z_label = (
            torch.zeros(n, device=dev, dtype=ct) for _ in range(8))
        dx_div = torch.zeros(n, d, device=dev, dtype=ct) if eager else None
        dx_ce = torch.zeros(n, d, device=dev, dtype=ct) if eager and has_labels else None
        diff = torch.empty(plan.rows * plan.cols, device=dev, dtype=ct) if divergence == "forward_kl" else None
        stats = _RowStats(m_s, ll_s, m_t, ll_t, lse_c, rows_c)
        grads = None
        if in_forward:  # the gradient of div + ce_weight * ce at grad_output 1
            w_rows, valid, n_valid = _row_weights(weight, labels, params.ignore_index, ct)
            one = torch.ones((), device=dev, dtype=ct)
            coef_div, stats.coef_ce = row_coefficients(one, one * params.ce_weight, n, params.reduction,
                                                        w_rows, valid, n_valid, ct)
            stats.a_div, stats.labels = coef_div * inv_t, labels
            grads = HeadGrads(ctx.needs_input_grad[:3], xs, ws, ct)

        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            xs_r, xt_r = as_compute(xs[r0:r1]), as_compute(xt[r0:r1])
            rows = r1 - r0
            st_s = _Online(rows, plan.cols, dev, ct, d if eager else None)
            st_t = _Online(rows, plan.cols, dev, ct, d if eager else None)
            st_c = _Online(rows, plan.cols, dev, ct, d if eager else None) if separate_ce else None
            lab_r = labels[r0:r1] if has_labels else None
            for v0, v1 in plan.vocab_blocks:
                zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
                w_blk = as_compute(ws[v0:v1]) if eager else None
                if v0 < vc:
                    value = None
                    if divergence == "forward_kl":  # sum_j e_t (z_t - z_s / T)
                        value = diff[: zt.numel()].view_as(zt)
                        torch.sub(zt, zs_raw, alpha=inv_t, out=value)
                    st_s.update(zs_raw, inv_t, None, w_blk)
                    st_t.update(zt, 1.0, value, w_blk)
                if st_c is not None:
                    st_c.update(zs_raw, 1.0, None, w_blk)
                if has_labels:
                    inside, idx = _label_hits(lab_r, v0, v1)
                    z_label[r0:r1] += torch.where(inside, zs_raw.gather(1, idx[:, None])[:, 0], 0.0)
            m_s[r0:r1], ll_s[r0:r1] = st_s.shift_and_log_sum()
            m_t[r0:r1], ll_t[r0:r1] = st_t.shift_and_log_sum()
            lse_c[r0:r1] = st_c.lse() if st_c is not None else st_s.lse()
            if eager:
                dx_div[r0:r1] = st_s.mat / st_s.l[:, None] - st_t.mat / st_t.l[:, None]
                if has_labels:
                    src = st_c if st_c is not None else st_s
                    valid_r = lab_r != params.ignore_index
                    w_lab = as_compute(ws[torch.where(valid_r, lab_r, 0).long()])
                    dx_ce[r0:r1] = src.mat / src.l[:, None] - w_lab * valid_r[:, None]
            if divergence == "forward_kl":
                # sum_j p_t (t - s) = sum_j p_t (z_t - z_s) + lse_s - lse_t
                # (lse_s - lse_t as (m_s - m_t) + (log l_s - log l_t): no cancellation of two large lse)
                rows_loss[r0:r1] = st_t.acc / st_t.l + (m_s[r0:r1] - m_t[r0:r1]) + (ll_s[r0:r1] - ll_t[r0:r1])
            del st_s, st_t, st_c  # their scratch blocks are free before the next sweeps
            if divergence != "forward_kl":
                _second_pass_rows(plan, (r0, r1), xs_r, xt_r, logits, stats, params, rows_loss)
            if in_forward:
                _chunk_gradient(plan, (r0, r1), xs_r, xt_r, logits, ws, stats, params, grads,
                                fuse_ce=has_labels and not separate_ce)

        div, ce, w_rows, valid, n_valid = finish_rows(rows_loss, lse_c, z_label, weight, labels,
                                                      params.ignore_index, params.reduction)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, m_s, ll_s, m_t, ll_t, lse_c, rows_c, w_rows, labels, valid,
                              n_valid, dx_div, dx_ce)
        ctx.params, ctx.eager, ctx.separate_ce, ctx.grads = params, eager, separate_ce, grads
        rows_out = rows_loss.to(xs.dtype, copy=True)
        ctx.mark_non_differentiable(rows_out)
        return div.to(xs.dtype), ce.to(xs.dtype), rows_out

    @staticmethod
    def backward(ctx, grad_div, grad_ce, _grad_rows):
        (xs, ws, bs, xt, wt, bt, m_s, ll_s, m_t, ll_t, lse_c, rows_c, w_rows, labels, valid, n_valid,
         dx_div, dx_ce) = ctx.saved_tensors
        params = ctx.params
        n = xs.shape[0]
        ct = compute_dtype(xs.dtype)
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None  # handed over once; a second backward recomputes
            if labels is None or _same_ratio(grad_ce, grad_div, params.ce_weight):
                return grads.scaled(grad_div.to(ct)).result(xs, ws, bs) + (None,) * 6
            log.debug("fused_linear_divergence: grad_ce / grad_div = %g / %g differs from ce_weight=%g; "
                      "recomputing the logits for the gradient", float(grad_ce), float(grad_div), params.ce_weight)
        coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, params.reduction, w_rows, valid, n_valid, ct)
        if ctx.eager:
            dxs = (coef_div * params.inv_t)[:, None] * dx_div
            if coef_ce is not None:
                dxs = dxs + coef_ce[:, None] * dx_ce
            return (dxs.to(xs.dtype),) + (None,) * 8

        v, vt = ws.shape[0], wt.shape[0]
        vc = min(v, vt)
        plan = BlockPlan.streaming(n, v if labels is not None else vc, vc, params.budget_mb, xs.dtype)
        logits = _Logits(xs, ws, bs, xt, wt, bt, params.inv_t, plan)
        grads = HeadGrads(ctx.needs_input_grad[:3], xs, ws, ct)
        stats = _RowStats(m_s, ll_s, m_t, ll_t, lse_c, rows_c, coef_div * params.inv_t, coef_ce, labels)
        fuse_ce = coef_ce is not None and not ctx.separate_ce  # CE softmax == student softmax: one exp
        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            xs_r, xt_r = as_compute(xs[r0:r1]), as_compute(xt[r0:r1])
            for v0, v1 in plan.vocab_blocks:
                zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
                g = _dlogits_block(zs_raw, zt, (r0, r1), (v0, v1), plan.vc, stats, params, fuse_ce)
                grads.add(g, xs_r, ws, (r0, r1), (v0, v1))
        return grads.result(xs, ws, bs) + (None,) * 6


def _row_weights(weight, labels, ignore_index, dtype):
    """(w_rows, valid, n_valid) as ``finish_rows`` forms them, known before the rows are computed."""
    w_rows = weight.detach().to(dtype) if weight is not None else None
    if labels is None:
        return w_rows, None, None
    valid = labels != ignore_index
    return w_rows, valid, valid.sum().clamp_min(1)


def _same_ratio(grad_ce, grad_div, ce_weight, rtol=1e-6):
    """grad_ce == ce_weight * grad_div up to rtol (the gradient formed in the forward assumed it).
    On the meta device (``kdengine plan`` runs a step there) values are unknown: the schedule is taken as
    the trainer runs it, with the objective's own ce_weight."""
    if grad_div.device.type == "meta" or grad_ce.device.type == "meta":
        return True
    want = ce_weight * float(grad_div)
    return abs(float(grad_ce) - want) <= rtol * abs(want)


def _chunk_gradient(plan, row_range, xs_r, xt_r, logits, ws, stats, params, grads, fuse_ce):
    """Row chunk, gradient-in-forward: dlogits of each column slice written over the held student logits,
    then dX_chunk = G W, dW += G^T X_chunk, db += sum G over the whole chunk (16-bit W: slice by slice)."""
    r0, r1 = row_range
    for v0, v1 in plan.vocab_blocks:
        zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
        g = _dlogits_block(zs_raw, zt, row_range, (v0, v1), plan.vc, stats, params, fuse_ce)
        if g.data_ptr() != zs_raw.data_ptr():
            zs_raw.copy_(g)
        del g
    g_chunk, width = logits.zs, logits.zs.shape[1]
    for v0 in range(0, width, logits.slice):
        v1 = min(width, v0 + logits.slice)
        grads.add(g_chunk[:, v0:v1], xs_r, ws, row_range, (v0, v1))


def _log_probs_(z, m, ll, r0, r1):
    """In place: z [BN, BV] (already / T) -> log-probabilities (z - m) - log l of rows [r0, r1)."""
    return z.sub_(m[r0:r1, None]).sub_(ll[r0:r1, None])


def _dlogits_block(zs_raw, zt, row_range, col_range, vc, stats: _RowStats, params, fuse_ce):
    """d(output)/d(raw student logits) of one block [BN, BV]; may overwrite zs_raw and zt (last use)."""
    (r0, r1), (v0, v1) = row_range, col_range
    inv_t = params.inv_t
    a = stats.a_div[r0:r1, None]
    c_ce = stats.coef_ce[r0:r1, None] if stats.coef_ce is not None else None
    # CE term with its own softmax (T != 1 or CE-only columns): taken before zs_raw is overwritten
    g_ce = torch.exp(zs_raw - stats.lse_c[r0:r1, None]).mul_(c_ce) if c_ce is not None and not fuse_ce else None
    if v0 < vc and params.divergence == "forward_kl":
        # a (p_s - p_t) [+ c_ce p_s]: exp in place, no new [BN, BV] buffer
        g = _log_probs_(zs_raw.mul_(inv_t), stats.m_s, stats.ll_s, r0, r1).exp_()
        g.mul_(a + c_ce if fuse_ce else a)
        g.sub_(_log_probs_(zt, stats.m_t, stats.ll_t, r0, r1).exp_().mul_(a))
    elif v0 < vc:
        s = _log_probs_(zs_raw.mul_(inv_t), stats.m_s, stats.ll_s, r0, r1)
        t = _log_probs_(zt, stats.m_t, stats.ll_t, r0, r1)
        g = divergence_grad(s, t, stats.c[r0:r1], params.divergence, params.beta).mul_(a)
        if fuse_ce:
            g.add_(s.exp_().mul_(c_ce))
    else:  # CE-only columns beyond the teacher's vocabulary
        g = g_ce
        g_ce = None
    if c_ce is not None:
        if g_ce is not None:
            g.add_(g_ce)
        inside, idx = _label_hits(stats.labels[r0:r1], v0, v1)
        g.scatter_add_(1, idx[:, None], torch.where(inside[:, None], -c_ce, 0.0))
    return g


def _second_pass_rows(plan, row_range, xs_r, xt_r, logits, stats: _RowStats, params, rows_loss):
    """Loss rows and per-row c = sum p_s h (into stats.c) of rows [r0, r1), for divergences that need
    normalised probabilities."""
    r0, r1 = row_range
    for v0, v1 in plan.vocab_blocks:
        if v0 >= plan.vc:
            break
        zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
        s = _log_probs_(zs_raw * params.inv_t, stats.m_s, stats.ll_s, r0, r1)
        t = _log_probs_(zt.clone(), stats.m_t, stats.ll_t, r0, r1)
        elem, h = divergence_terms(s, t, params.divergence, params.beta)
        rows_loss[r0:r1] += elem.sum(-1)
        stats.c[r0:r1] += torch.linalg.vecdot(s.exp_(), h)
