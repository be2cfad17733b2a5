"""Fused lm_head + divergence (+ student cross-entropy) without materialising [N, V] logits.

Layers, top to bottom:
    fused_linear_divergence()          functional API: validation and the single ``impl=`` dispatch
    FusedLinearDivergenceFunction      torch path: autograd.Function over bounded [BN, BV] logits blocks
    fused_linear_divergence_reference  plain PyTorch that materialises logits (test oracle, baseline)
The Triton path lives in ``kdengine.kernels.fused_linear_divergence``.

Passes of the torch path (one "matmul unit" = one [N, V, D] GEMM):
    forward   pass 1: online log-sum-exp of student and teacher (+ CE), forward_kl loss online.
              pass 2: loss and per-row ``c`` for the other divergences (see ``divergences.py``).
    backward  one recomputation pass: dlogits block -> dX += G W, dW[block] = G^T X.
    frozen head (student_weight.requires_grad False) with forward_kl: pass 1 also accumulates
    P_s W and P_t W with an online rescale (as flash-attention accumulates its output), so dX is
    ready after a single pass and backward only scales it.
``cache_mb`` keeps logits blocks from the forward for the backward (trades memory for the
recomputation); ``block_mb`` bounds the per-block working set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from kdengine.losses.divergences import BETA_DIVERGENCES, DIVERGENCES, LOG_FLOOR, divergence_terms, divergence_grad

IMPLS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("none", "sum", "mean")
# Number of [BN, BV] fp32 temporaries alive at once in a block step (measured: see benchmarks/losses.py).
_BLOCK_TEMPORARIES = 6
DEFAULT_BLOCK_MB = float(os.environ.get("KDENGINE_LOSS_BLOCK_MB", 32))
DEFAULT_CACHE_MB = float(os.environ.get("KDENGINE_LOSS_CACHE_MB", 0))
MAX_BLOCK_ROWS = 1024


# ----------------------------------------------------------------------------------------------
# validation (shared by every impl, runs before anything heavy)
# ----------------------------------------------------------------------------------------------
def _check_matrix(name: str, x: torch.Tensor, ndim: int = 2) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def check_devices_dtypes_frozen_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    """One device and dtype for all four tensors, and no grad on the teacher's (shared by both losses)."""
    dev, dtype = student_hidden.device, student_hidden.dtype
    for name, x in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight)):
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {dev}")
        if x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but student_hidden has {dtype}; cast them to one dtype")
    for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if x.requires_grad:
            raise ValueError(f"{name} {tuple(x.shape)} requires grad; the teacher must be frozen "
                             f"(call .detach() or run the teacher under torch.no_grad())")


def validate_divergence_args(
    student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, beta, temperature,
    weight, labels, reduction, impl,
) -> None:
    """Raise ValueError naming the argument, its value/shape and what was expected."""
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        _check_matrix(name, x)
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
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    if divergence in BETA_DIVERGENCES and not (0.0 < float(beta) < 1.0):
        raise ValueError(f"beta={beta} for divergence={divergence!r}; expected 0 < beta < 1")
    if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature={temperature}; expected a finite value > 0")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (n,):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight has shape {shape}; expected [N] = ({n},)")
        if weight.device != dev:
            raise ValueError(f"weight is on {weight.device} but student_hidden is on {dev}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels has shape {shape}; expected [N] = ({n},)")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels has dtype {labels.dtype}; expected torch.int64")
        if labels.device != dev:
            raise ValueError(f"labels is on {labels.device} but student_hidden is on {dev}")


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Range check of labels; only on CPU tensors, where it costs no device sync."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) "
                         f"and is not ignore_index={ignore_index}")


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


# ----------------------------------------------------------------------------------------------
# reference: materialises logits (the oracle and the naive baseline)
# ----------------------------------------------------------------------------------------------
def fused_linear_divergence_reference(
    student_hidden, student_weight, teacher_hidden, teacher_weight, divergence="forward_kl", beta=0.5,
    temperature=1.0, weight=None, labels=None, ignore_index=-100, reduction="mean",
):
    """Plain PyTorch, full [N, V] logits in fp32 (float64 if given float64). Same contract as the API."""
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    vc = min(student_weight.shape[0], teacher_weight.shape[0])
    zs_full = (student_hidden @ student_weight.T).to(compute)
    zt = (teacher_hidden @ teacher_weight[:vc].T).to(compute)
    s = torch.log_softmax(zs_full[:, :vc] / temperature, dim=-1)
    t = torch.log_softmax(zt / temperature, dim=-1)
    p_s, p_t = s.exp(), t.exp()
    t_floor = t.clamp_min(LOG_FLOOR)
    zero = torch.zeros((), dtype=compute, device=s.device)

    def kl_pos(p, log_p, log_q):  # sum p (log p - log q) with 0 log 0 = 0
        return torch.where(p > 0, p * (log_p - log_q), zero).sum(-1)

    if divergence == "forward_kl":
        rows = kl_pos(p_t, t_floor, s)
    elif divergence == "reverse_kl":
        rows = kl_pos(p_s, s, t_floor)
    elif divergence in ("jsd", "skew_forward_kl"):
        log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        fwd = kl_pos(p_t, t, log_m)
        rows = fwd if divergence == "skew_forward_kl" else beta * fwd + (1 - beta) * kl_pos(p_s, s, log_m)
    elif divergence == "skew_reverse_kl":
        log_m = torch.logsumexp(torch.stack([s + math.log(beta), t + math.log(1 - beta)]), dim=0)
        rows = kl_pos(p_s, s, log_m)
    elif divergence == "tvd":
        rows = 0.5 * (p_t - p_s).abs().sum(-1)
    else:
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    if weight is not None:
        rows = rows * weight.to(compute)
    div = _reduce(rows, reduction)
    if labels is None:
        return div.to(student_hidden.dtype)
    ce = torch.nn.functional.cross_entropy(zs_full, labels.long(), ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum().clamp_min(1)
    return div.to(student_hidden.dtype), (ce / n_valid).to(student_hidden.dtype)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(rows.shape[0], 1) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------
# torch path: bounded logits blocks
# ----------------------------------------------------------------------------------------------
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


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


class _Logits:
    """Logits blocks of one call. Recomputed into two scratch buffers, or kept from the first pass
    while ``cache_bytes`` lasts (teacher block first: it is the wider GEMM to redo).
    ``get`` returns (raw student logits [BN, BV], teacher logits / T [BN, BV] or None)."""

    def __init__(self, xs, ws, xt, wt, inv_t, plan: BlockPlan, cache_bytes: int):
        self.ws, self.wt, self.inv_t, self.vc = ws, wt, inv_t, plan.vc
        self.budget = cache_bytes
        self.cache: dict = {}
        rows = max(1, min(plan.rows, xs.shape[0]))
        self.buf_s = torch.empty(rows * plan.cols, device=xs.device)
        self.buf_t = torch.empty(rows * plan.cols, device=xs.device)

    def _mm(self, x_r, w, v0, v1, key, buf):
        nbytes = x_r.shape[0] * (v1 - v0) * 4
        if key in self.cache:
            return self.cache[key], False
        w_blk = _as_f32(w[v0:v1]).T
        if nbytes <= self.budget:
            self.budget -= nbytes
            z = self.cache[key] = x_r @ w_blk
            return z, True
        out = buf[: x_r.shape[0] * (v1 - v0)].view(x_r.shape[0], v1 - v0)
        return torch.mm(x_r, w_blk, out=out), True

    def get(self, r0, xs_r, xt_r, v0, v1, writable=False):
        """writable=True (last use, in backward): cached blocks are handed over and forgotten."""
        zt = None
        if v0 < self.vc:
            zt, fresh = self._mm(xt_r, self.wt, v0, v1, ("t", r0, v0), self.buf_t)
            if fresh:
                if self.inv_t != 1.0:
                    zt.mul_(self.inv_t)
                zt.clamp_min_(TEACHER_LOGIT_FLOOR)
        zs, _ = self._mm(xs_r, self.ws, v0, v1, ("s", r0, v0), self.buf_s)
        if writable:
            self.cache.pop(("t", r0, v0), None)
            self.cache.pop(("s", r0, v0), None)
        return zs, zt


class _Online:
    """Online softmax statistics of one row block: running max ``m`` and sum ``l`` [BN], optional
    accumulators rescaled on every max update: ``acc`` [BN] (sum e * value) and ``mat`` [BN, D]
    (sum e W rows). ``e`` lives in a scratch buffer reused across blocks."""

    def __init__(self, rows: int, cols: int, device, d: int | None = None):
        self.m = torch.full((rows,), -math.inf, device=device)
        self.l = torch.zeros(rows, device=device)
        self.acc = torch.zeros(rows, device=device)
        self.mat = torch.zeros(rows, d, device=device) if d is not None else None
        self.buf = torch.empty(rows * cols, device=device)

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


def finish_rows(rows_loss, lse_c, z_label, weight, labels, ignore_index, reduction):
    """Per-row statistics -> (div, ce, w_rows, valid, n_valid); shared by the torch and Triton paths.

    rows_loss, lse_c, z_label: [N] fp32. ce = mean over rows with label != ignore_index (0 if none).
    """
    w_rows = _as_f32(weight.detach()) if weight is not None else None
    div = _reduce(rows_loss * w_rows if w_rows is not None else rows_loss, reduction)
    if labels is None:
        return div, torch.zeros((), device=rows_loss.device), w_rows, None, None
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)
    ce = torch.where(valid, lse_c - z_label, 0.0).sum() / n_valid
    return div, ce, w_rows, valid, n_valid


def row_coefficients(grad_div, grad_ce, n, reduction, w_rows, valid, n_valid):
    """d(output)/d(row divergence) and d(output)/d(row CE) as [N] fp32 vectors (CE: None without labels)."""
    coef_div = grad_div.float().expand(n)
    if reduction == "mean":
        coef_div = coef_div / max(n, 1)
    if w_rows is not None:
        coef_div = coef_div * w_rows
    coef_ce = grad_ce.float() * valid / n_valid if valid is not None else None
    return coef_div, coef_ce


def _label_hits(lab_r, v0, v1):
    """(inside [BN] bool, column index [BN] long) of each row's label within block [v0, v1)."""
    inside = (lab_r >= v0) & (lab_r < v1)
    return inside, (lab_r - v0).clamp(0, v1 - v0 - 1).long()


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """torch path. Returns (div, ce): div is [N] for reduction='none' else a scalar; ce a scalar
    (0 when labels is None). Gradients flow to student_hidden and student_weight only."""

    @staticmethod
    def forward(ctx, xs, ws, xt, wt, divergence, beta, temperature, weight, labels, ignore_index,
                reduction, block_mb, cache_mb):
        n, d = xs.shape
        v, vt = ws.shape[0], wt.shape[0]
        vc = min(v, vt)
        has_labels = labels is not None
        plan = BlockPlan.make(n, v if has_labels else vc, vc, block_mb)
        inv_t = 1.0 / float(temperature)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # frozen head + forward_kl: the whole gradient in one forward pass (see module docstring)
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] and divergence == "forward_kl"
        # CE statistics need their own softmax unless they coincide with the student's
        separate_ce = has_labels and (inv_t != 1.0 or v != vc)
        dev = xs.device
        reuse = divergence != "forward_kl" or (needs_grad and not eager)
        logits = _Logits(xs, ws, xt, wt, inv_t, plan, int(cache_mb * 2**20) if reuse else 0)

        lse_s, lse_t, lse_c, rows_loss, rows_c, z_label = (torch.zeros(n, device=dev) for _ in range(6))
        dx_div = torch.zeros(n, d, device=dev) if eager else None
        dx_ce = torch.zeros(n, d, device=dev) if eager and has_labels else None
        diff = torch.empty(plan.rows * plan.cols, device=dev) if divergence == "forward_kl" else None

        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            xs_r, xt_r = _as_f32(xs[r0:r1]), _as_f32(xt[r0:r1])
            rows = r1 - r0
            st_s = _Online(rows, plan.cols, dev, d if eager else None)
            st_t = _Online(rows, plan.cols, dev, d if eager else None)
            st_c = _Online(rows, plan.cols, dev, d if eager else None) if separate_ce else None
            lab_r = labels[r0:r1] if has_labels else None
            for v0, v1 in plan.vocab_blocks:
                zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
                w_blk = _as_f32(ws[v0:v1]) if eager else None
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
            lse_s[r0:r1] = st_s.lse()
            lse_t[r0:r1] = st_t.lse()
            lse_c[r0:r1] = st_c.lse() if st_c is not None else lse_s[r0:r1]
            if eager:
                dx_div[r0:r1] = st_s.mat / st_s.l[:, None] - st_t.mat / st_t.l[:, None]
                if has_labels:
                    src = st_c if st_c is not None else st_s
                    valid = lab_r != ignore_index
                    dx_ce[r0:r1] = src.mat / src.l[:, None] - _as_f32(ws[torch.where(valid, lab_r, 0).long()]) * valid[:, None]
            if divergence == "forward_kl":
                # sum_j p_t (t - s) = sum_j p_t (z_t - z_s) + lse_s - lse_t
                rows_loss[r0:r1] = st_t.acc / st_t.l + lse_s[r0:r1] - lse_t[r0:r1]

        if divergence != "forward_kl":
            _second_pass(plan, n, logits, xs, xt, lse_s, lse_t, inv_t, divergence, beta, rows_loss, rows_c)

        div, ce, w_rows, valid, n_valid = finish_rows(rows_loss, lse_c, z_label, weight, labels,
                                                      ignore_index, reduction)
        ctx.save_for_backward(xs, ws, xt, wt, lse_s, lse_t, lse_c, rows_c, w_rows, labels, valid, n_valid,
                              dx_div, dx_ce)
        ctx.cfg = (divergence, beta, inv_t, reduction, plan, eager, separate_ce)
        ctx.logits = logits if needs_grad and not eager else None
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        (xs, ws, xt, wt, lse_s, lse_t, lse_c, rows_c, w_rows, labels, valid, n_valid,
         dx_div, dx_ce) = ctx.saved_tensors
        divergence, beta, inv_t, reduction, plan, eager, separate_ce = ctx.cfg
        n, d = xs.shape
        coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, reduction, w_rows, valid, n_valid)
        if eager:
            dxs = (coef_div * inv_t)[:, None] * dx_div
            if coef_ce is not None:
                dxs = dxs + coef_ce[:, None] * dx_ce
            return (dxs.to(xs.dtype),) + (None,) * 12

        logits, ctx.logits = ctx.logits, None
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dxs = torch.zeros(n, d, device=xs.device) if needs_dx else None
        dws = torch.zeros(ws.shape, device=ws.device) if needs_dw else None
        a_div = coef_div * inv_t  # chain rule through z / T
        fuse_ce = coef_ce is not None and not separate_ce  # CE softmax == student softmax: one exp
        for r0 in range(0, n, plan.rows):
            r1 = min(n, r0 + plan.rows)
            xs_r, xt_r = _as_f32(xs[r0:r1]), _as_f32(xt[r0:r1])
            for v0, v1 in plan.vocab_blocks:
                zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1, writable=True)
                g = _dlogits_block(zs_raw, zt, v0, v1, r0, r1, plan.vc, inv_t, lse_s, lse_t, lse_c, rows_c,
                                   a_div, coef_ce, labels, divergence, beta, fuse_ce)
                if dxs is not None:
                    dxs[r0:r1].addmm_(g, _as_f32(ws[v0:v1]))
                if dws is not None:
                    dws[v0:v1].addmm_(g.T, xs_r)
        return (dxs.to(xs.dtype) if dxs is not None else None,
                dws.to(ws.dtype) if dws is not None else None) + (None,) * 11


def _dlogits_block(zs_raw, zt, v0, v1, r0, r1, vc, inv_t, lse_s, lse_t, lse_c, rows_c, a_div, coef_ce,
                   labels, divergence, beta, fuse_ce):
    """d(output)/d(raw student logits) of one block [BN, BV]; may overwrite zs_raw and zt (last use)."""
    a = a_div[r0:r1, None]
    c_ce = coef_ce[r0:r1, None] if coef_ce is not None else None
    # CE term with its own softmax (T != 1 or CE-only columns): taken before zs_raw is overwritten
    g_ce = torch.exp(zs_raw - lse_c[r0:r1, None]).mul_(c_ce) if c_ce is not None and not fuse_ce else None
    if v0 < vc and divergence == "forward_kl":
        # a (p_s - p_t) [+ c_ce p_s]: exp in place, no new [BN, BV] buffer
        g = zs_raw.mul_(inv_t).sub_(lse_s[r0:r1, None]).exp_()
        g.mul_(a + c_ce if fuse_ce else a)
        g.sub_(zt.sub_(lse_t[r0:r1, None]).exp_().mul_(a))
    elif v0 < vc:
        s = zs_raw.mul_(inv_t).sub_(lse_s[r0:r1, None])
        g = divergence_grad(s, zt.sub_(lse_t[r0:r1, None]), rows_c[r0:r1], divergence, beta).mul_(a)
        if fuse_ce:
            g.add_(s.exp_().mul_(c_ce))
    else:  # CE-only columns beyond the teacher's vocabulary
        g = g_ce
        g_ce = None
    if c_ce is not None:
        if g_ce is not None:
            g.add_(g_ce)
        inside, idx = _label_hits(labels[r0:r1], v0, v1)
        g.scatter_add_(1, idx[:, None], torch.where(inside[:, None], -c_ce, 0.0))
    return g


def _second_pass(plan, n, logits, xs, xt, lse_s, lse_t, inv_t, divergence, beta, rows_loss, rows_c):
    """Loss rows and per-row c = sum p_s h for divergences that need normalised probabilities."""
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        xs_r, xt_r = _as_f32(xs[r0:r1]), _as_f32(xt[r0:r1])
        for v0, v1 in plan.vocab_blocks:
            if v0 >= plan.vc:
                break
            zs_raw, zt = logits.get(r0, xs_r, xt_r, v0, v1)
            s = zs_raw * inv_t - lse_s[r0:r1, None]
            t = zt - lse_t[r0:r1, None]
            elem, h = divergence_terms(s, t, divergence, beta)
            rows_loss[r0:r1] += elem.sum(-1)
            rows_c[r0:r1] += torch.linalg.vecdot(s.exp_(), h)


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------
def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    block_mb: float | None = None,
    cache_mb: float | None = None,
):
    """Divergence between teacher and student next-token distributions, logits never materialised.

    p = softmax(hidden @ weight^T / temperature) over the first min(V, Vt) vocabulary entries
    (both renormalised there). No T^2 factor is applied.

    Args:
        student_hidden: [N, Ds] selected rows (visual and/or response positions).
        student_weight: [V, Ds] student lm_head weight, trainable or frozen.
        teacher_hidden: [N, Dt], no grad.
        teacher_weight: [Vt, Dt], no grad.
        divergence: forward_kl = KL(p_t||p_s) | reverse_kl = KL(p_s||p_t) |
            jsd = beta KL(p_t||m) + (1-beta) KL(p_s||m), m = beta p_t + (1-beta) p_s |
            skew_forward_kl = KL(p_t || beta p_t + (1-beta) p_s) |
            skew_reverse_kl = KL(p_s || beta p_s + (1-beta) p_t) | tvd = 0.5 sum |p_t - p_s|.
        beta: mixing weight in (0, 1) for jsd and the skew divergences.
        weight: optional [N] per-row weights (treated as constants), applied before reduction.
        labels: optional [N] targets; then the student's cross-entropy (temperature 1, full V) is
            computed in the same vocabulary pass and returned as the mean over rows != ignore_index
            (0 when there are none).
        reduction: none -> [N] | sum | mean (divides by N; weights do not renormalise).
        impl: auto (triton on CUDA, torch elsewhere) | triton | torch | reference.
        block_mb: torch path working-set budget per block (env KDENGINE_LOSS_BLOCK_MB, default 32).
        cache_mb: logits kept from forward for backward, saving the recomputation
            (env KDENGINE_LOSS_CACHE_MB, default 0).
    Returns:
        div ([N] or scalar), or (div, cross_entropy) when labels is given.
    """
    validate_divergence_args(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence,
                             beta, temperature, weight, labels, reduction, impl)
    if labels is not None:
        check_label_range(labels, ignore_index, student_weight.shape[0])
    impl = resolve_impl(impl, student_hidden.device)
    args = (divergence, float(beta), float(temperature), weight, labels, ignore_index, reduction)
    if impl == "reference":
        return fused_linear_divergence_reference(student_hidden, student_weight, teacher_hidden,
                                                 teacher_weight, *args)
    block_mb = DEFAULT_BLOCK_MB if block_mb is None else float(block_mb)
    cache_mb = DEFAULT_CACHE_MB if cache_mb is None else float(cache_mb)
    if impl == "torch":
        div, ce = FusedLinearDivergenceFunction.apply(student_hidden, student_weight, teacher_hidden,
                                                      teacher_weight, *args, block_mb, cache_mb)
    else:
        from kdengine.kernels.fused_linear_divergence import FusedLinearDivergenceTriton

        div, ce = FusedLinearDivergenceTriton.apply(student_hidden, student_weight, teacher_hidden,
                                                    teacher_weight, *args)
    return (div, ce) if labels is not None else div
