"""torch path of ``fused_linear_divergence``: an autograd.Function over bounded [BN, BV] logits blocks.

Passes (one "matmul unit" = one [N, V, D] GEMM):
    forward   pass 1: online log-sum-exp of student and teacher (+ CE), forward_kl loss online.
              pass 2: loss and per-row ``c`` for the other divergences (see ``divergences.py``).
    backward  one recomputation pass: dlogits block -> dX += G W, dW[block] = G^T X, db[block] = sum G.
    frozen head (no grad for the student weight or bias) with forward_kl: pass 1 also accumulates
    P_s W and P_t W with an online rescale (as flash-attention accumulates its output), so dX is
    ready after a single pass and backward only scales it.
``cache_mb`` keeps logits blocks from the forward for the backward (trades memory for the
recomputation); ``block_mb`` bounds the per-block working set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdengine.losses.divergences import as_compute, compute_dtype, divergence_grad, divergence_terms, finish_rows, row_coefficients

# Number of [BN, BV] fp32 temporaries alive at once in a block step (measured: see benchmarks/losses.py).
_BLOCK_TEMPORARIES = 6
MAX_BLOCK_ROWS = 1024
TEACHER_LOGIT_FLOOR = -1e38  # -inf teacher logits are clamped here: exp() is still exactly 0, products stay finite


@dataclass
class BlockPlan:
    """Row/vocab blocking. ``vocab_blocks`` is split at ``vc`` so a block is either compared or CE-only."""

    rows: int
    cols: int
    vc: int
    vocab_blocks: list

    @staticmethod
    def make(n: int, v_total: int, vc: int, block_mb: float) -> "BlockPlan":
        rows = max(1, min(n, MAX_BLOCK_ROWS))
        elems = int(block_mb * 2**20 / 4 / _BLOCK_TEMPORARIES)
        cols = max(256, min(65536, (elems // rows) // 256 * 256))
        blocks = [(v0, min(v0 + cols, vc)) for v0 in range(0, vc, cols)]
        blocks += [(v0, min(v0 + cols, v_total)) for v0 in range(vc, v_total, cols)]
        return BlockPlan(rows, cols, vc, blocks)


class _Logits:
    """Logits blocks of one call. Recomputed into two scratch buffers, or kept from the first pass
    while ``cache_bytes`` lasts (teacher block first: it is the wider GEMM to redo).
    ``get`` returns (raw student logits [BN, BV], teacher logits / T [BN, BV] or None)."""

    def __init__(self, xs, ws, bs, xt, wt, bt, inv_t, plan: BlockPlan, cache_bytes: int):
        self.ws, self.bs, self.wt, self.bt, self.inv_t, self.vc = ws, bs, wt, bt, inv_t, plan.vc
        self.budget = cache_bytes
        self.cache: dict = {}
        rows = max(1, min(plan.rows, xs.shape[0]))
        dtype = compute_dtype(xs.dtype)
        self.buf_s = torch.empty(rows * plan.cols, device=xs.device, dtype=dtype)
        self.buf_t = torch.empty(rows * plan.cols, device=xs.device, dtype=dtype)

    def _mm(self, x_r, w, b, v0, v1, key, buf):
        if key in self.cache:
            return self.cache[key], False
        w_blk = as_compute(w[v0:v1]).T
        nbytes = x_r.shape[0] * (v1 - v0) * x_r.element_size()
        if nbytes <= self.budget:
            self.budget -= nbytes
            out = self.cache[key] = torch.empty(x_r.shape[0], v1 - v0, device=x_r.device, dtype=x_r.dtype)
        else:
            out = buf[: x_r.shape[0] * (v1 - v0)].view(x_r.shape[0], v1 - v0)
        if b is None:
            return torch.mm(x_r, w_blk, out=out), True
        return torch.addmm(as_compute(b[v0:v1]), x_r, w_blk, out=out), True

    def get(self, r0, xs_r, xt_r, v0, v1, writable=False):
        """writable=True (last use, in backward): cached blocks are handed over and forgotten."""
        zt = None
        if v0 < self.vc:
            zt, fresh = self._mm(xt_r, self.wt, self.bt, v0, v1, ("t", r0, v0), self.buf_t)
            if fresh:
                if self.inv_t != 1.0:
                    zt.mul_(self.inv_t)
                zt.clamp_min_(TEACHER_LOGIT_FLOOR)
        zs, _ = self._mm(xs_r, self.ws, self.bs, v0, v1, ("s", r0, v0), self.buf_s)
        if writable:
            self.cache.pop(("t", r0, v0), None)
            self.cache.pop(("s", r0, v0), None)
        return zs, zt


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

    def result(self, xs, ws, bs) -> tuple:
        """(dX, dW, db) in the inputs' dtypes."""
        return tuple(g.to(like.dtype) if g is not None else None
                     for g, like in ((self.dx, xs), (self.dw, ws), (self.db, bs)))


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """torch path. forward(xs [N, Ds], ws [V, Ds], bs [V] | None, xt [N, Dt], wt [Vt, Dt], bt [Vt] | None,
    weight [N] | None, labels [N] | None, params: FusedLinearDivergenceParams) -> (div, ce): div is [N]
    for reduction='none' else a scalar; ce a scalar (0 without labels). Gradients flow to xs, ws, bs."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, weight, labels, params):
        n, d = xs.shape
        v, vt = ws.shape[0], wt.shape[0]
        vc = min(v, vt)
        divergence = params.divergence
        has_labels = labels is not None
        plan = BlockPlan.make(n, v if has_labels else vc, vc, params.block_mb)
        inv_t = params.inv_t
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        needs_grad = ctx.needs_input_grad[0] or head_grad
        # frozen head + forward_kl: the whole gradient in one forward pass (see module docstring)
        eager = ctx.needs_input_grad[0] and not head_grad and divergence == "forward_kl"
        # CE statistics need their own softmax unless they coincide with the student's
        separate_ce = has_labels and (inv_t != 1.0 or v != vc)
        dev, ct = xs.device, compute_dtype(xs.dtype)
        reuse = divergence != "forward_kl" or (needs_grad and not eager)
        logits = _Logits(xs, ws, bs, xt, wt, bt, inv_t, plan, int(params.cache_mb * 2**20) if reuse else 0)

        m_s, ll_s, m_t, ll_t, lse_c, rows_loss, rows_c, z_label = (
            torch.zeros(n, device=dev, dtype=ct) for _ in range(8))
        dx_div = torch.zeros(n, d, device=dev, dtype=ct) if eager else None
        dx_ce = torch.zeros(n, d, device=dev, dtype=ct) if eager and has_labels else None
        diff = torch.empty(plan.rows * plan.cols, device=dev, dtype=ct) if divergence == "forward_kl" else None

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
                    valid = lab_r != params.ignore_index
                    w_lab = as_compute(ws[torch.where(valid, lab_r, 0).long()])
                    dx_ce[r0:r1] = src.mat / src.l[:, None] - w_lab * valid[:, None]
            if divergence == "forward_kl":
                # sum_j p_t (t - s) = sum_j p_t (z_t - z_s) + lse_s - lse_t
                # (lse_s - lse_t as (m_s - m_t) + (log l_s - log l_t): no cancellation of two large lse)
                rows_loss[r0:r1] = st_t.acc / st_t.l + (m_s[r0:r1] - m_t[r0:r1]) + (ll_s[r0:r1] - ll_t[r0:r1])

        stats = _RowStats(m_s, ll_s, m_t, ll_t, lse_c, rows_c)
        if divergence != "forward_kl":
            _second_pass(plan, n, logits, xs, xt, stats, params, rows_loss)

        div, ce, w_rows, valid, n_valid = finish_rows(rows_loss, lse_c, z_label, weight, labels,
                                                      params.ignore_index, params.reduction)
        ctx.save_for_backward(xs, ws, bs, xt, m_s, ll_s, m_t, ll_t, lse_c, rows_c, w_rows, labels, valid,
                              n_valid, dx_div, dx_ce)
        ctx.params, ctx.plan, ctx.eager, ctx.separate_ce = params, plan, eager, separate_ce
        ctx.logits = logits if needs_grad and not eager else None
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        (xs, ws, bs, xt, m_s, ll_s, m_t, ll_t, lse_c, rows_c, w_rows, labels, valid, n_valid,
         dx_div, dx_ce) = ctx.saved_tensors
        params, plan = ctx.params, ctx.plan
        n = xs.shape[0]
        ct = compute_dtype(xs.dtype)
        coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, params.reduction, w_rows, valid, n_valid, ct)
        if ctx.eager:
            dxs = (coef_div * params.inv_t)[:, None] * dx_div
            if coef_ce is not None:
                dxs = dxs + coef_ce[:, None] * dx_ce
            return (dxs.to(xs.dtype),) + (None,) * 8

        logits = ctx.logits  # cached blocks are handed over (popped) on use; a second backward recomputes
        grads = HeadGrads(ctx.needs_input_grad[:3], xs, ws, ct)
        stats = _RowStats(m_s, ll_s, m_t, ll_t, lse_c, rows_c, coef_div * params.inv_t, coef_ce, labels)
        fuse_ce = coef_ce is not None and not ctx.separate_ce  # CE softmax == student softmax: one exp
        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            xs_r, xt_r = as_compute(xs[r0:r1]), as_compute(xt[r0:r1])
            for v0, v1 in plan.vocab_blocks:
                zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1, writable=True)
                g = _dlogits_block(zs_raw, zt, (r0, r1), (v0, v1), plan.vc, stats, params, fuse_ce)
                grads.add(g, xs_r, ws, (r0, r1), (v0, v1))
        return grads.result(xs, ws, bs) + (None,) * 6


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


def _second_pass(plan, n, logits, xs, xt, stats: _RowStats, params, rows_loss):
    """Loss rows and per-row c = sum p_s h (into stats.c) for divergences that need normalised probabilities."""
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        xs_r, xt_r = as_compute(xs[r0:r1]), as_compute(xt[r0:r1])
        for v0, v1 in plan.vocab_blocks:
            if v0 >= plan.vc:
                break
            zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
            s = _log_probs_(zs_raw * params.inv_t, stats.m_s, stats.ll_s, r0, r1)
            t = _log_probs_(zt.clone(), stats.m_t, stats.ll_t, r0, r1)
            elem, h = divergence_terms(s, t, params.divergence, params.beta)
            rows_loss[r0:r1] += elem.sum(-1)
            stats.c[r0:r1] += torch.linalg.vecdot(s.exp_(), h)
