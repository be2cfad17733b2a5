"""Triton path of ``kdengine.losses.fused_linear_divergence``.

Layers: ``_fld_fwd_kernel`` / ``_fld_rows_kernel`` / ``_fld_bwd_kernel`` (@triton.jit)
-> launchers ``fld_forward_stats`` / ``fld_divergence_rows`` / ``fld_dlogits``
-> ``FusedLinearDivergenceTriton`` (autograd.Function).

Each forward program owns BN rows and streams the vocabulary in BV blocks: the lm_head products
z_s = x_s W_s^T and z_t = x_t W_t^T are computed tile by tile (tl.dot over BD chunks, fp32
accumulation) and folded into online log-sum-exps; logits never reach global memory.
    pass 1 (_fld_fwd_kernel):  lse_s, lse_t (temperature T, first Vc = min(V, Vt) entries),
                               lse_c (T = 1, full V, for the CE), z[label], forward_kl rows online.
    pass 2 (_fld_rows_kernel): rows of the other divergences and c = sum p_s h (divergences.py).
    backward (_fld_bwd_kernel): dlogits tiles of a vocabulary chunk into a [N, chunk] buffer, then
                               dX += G W_chunk and dW_chunk = G^T X as two GEMMs; the buffer is the
                               only [N, *] intermediate and its width is bounded.
Under TRITON_INTERPRET=1 (CPU tests) bf16 tiles are upcast before tl.dot: Triton 3.9's interpreter
returns wrong tl.dot results for bf16 operands (fp16/fp32 are exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdengine.kernels import interpreting
from kdengine.kernels.divergence_terms import _div_terms, _online
from kdengine.losses.divergences import DIVERGENCES, LOG_FLOOR, finish_rows, row_coefficients

DIV_CODE = {name: i for i, name in enumerate(DIVERGENCES)}  # 0 fkl, 1 rkl, 2 jsd, 3 skew_fkl, 4 skew_rkl, 5 tvd


def _blocks() -> tuple[int, int, int]:
    """(BN, BV, BD): GPU defaults, and small blocks under the CPU interpreter (its cost is per program)."""
    return (16, 32, 16) if interpreting() else (64, 128, 64)


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are upcast before tl.dot under the interpreter (Triton 3.9 gets bf16 dots wrong there)."""
    return interpreting() and dtype == torch.bfloat16
CHUNK_ELEMS = 2**24  # backward dlogits buffer: at most this many fp32 elements (64 MB)
# fp32 inputs use exact fp32 products ("ieee"), not tf32: logits feed exp() and a 1e-3 relative
# error there is visible in the loss. bf16/fp16 tiles run on tensor cores with fp32 accumulation.


@triton.jit
def _tile_logits(p_x, p_w, o_n, o_v, m_n, m_v, D, stride_xn, stride_wv, BD: tl.constexpr,
                 UPCAST: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr = "ieee"):
    """[BN, BV] fp32 tile of x @ w^T, looping over D in BD chunks."""
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc += tl.dot(b_x, tl.trans(b_w), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fld_fwd_kernel(
    p_xs, p_ws, p_xt, p_wt, p_labels,
    p_lse_s, p_lse_t, p_lse_c, p_zlab, p_rows,
    N, V, VC, VTOT, DS, DT, inv_t,
    stride_xs, stride_ws, stride_xt, stride_wt,
    HAS_LABELS: tl.constexpr, SEPARATE_CE: tl.constexpr, FKL: tl.constexpr, UPCAST: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_s = tl.full((BN,), float("-inf"), tl.float32)
    l_s = tl.zeros((BN,), tl.float32)
    m_t = tl.full((BN,), float("-inf"), tl.float32)
    l_t = tl.zeros((BN,), tl.float32)
    a_t = tl.zeros((BN,), tl.float32)
    m_c = tl.full((BN,), float("-inf"), tl.float32)
    l_c = tl.zeros((BN,), tl.float32)
    z_lab = tl.zeros((BN,), tl.float32)
    if HAS_LABELS:
        b_lab = tl.load(p_labels + o_n, mask=m_n, other=-1)
    for v0 in range(0, VTOT, BV):
        o_v = v0 + tl.arange(0, BV)
        m_vs = o_v < V
        m_vc = o_v < VC
        zs_raw = _tile_logits(p_xs, p_ws, o_n, o_v, m_n, m_vs, DS, stride_xs, stride_ws, BD, UPCAST, BN, BV)
        if v0 < VC:
            zt = _tile_logits(p_xt, p_wt, o_n, o_v, m_n, m_vc, DT, stride_xt, stride_wt, BD, UPCAST, BN, BV) * inv_t
            zs = zs_raw * inv_t
            diff = zt - zs  # used only where e_t > 0 (finite teacher entries in range)
            zt = tl.where(m_vc[None, :], zt, float("-inf"))
            zs = tl.where(m_vc[None, :], zs, float("-inf"))
            m_s, l_s, _, _, _ = _online(m_s, l_s, zs)
            m_t, l_t, scale_t, e_t, _ = _online(m_t, l_t, zt)
            if FKL:
                a_t = a_t * scale_t + tl.sum(tl.where(e_t > 0, e_t * diff, 0.0), axis=1)
        if SEPARATE_CE:
            zc = tl.where(m_vs[None, :], zs_raw, float("-inf"))
            m_c, l_c, _, _, _ = _online(m_c, l_c, zc)
        if HAS_LABELS:
            hit = (o_v[None, :] == b_lab[:, None]) & m_vs[None, :]
            z_lab += tl.sum(tl.where(hit, zs_raw, 0.0), axis=1)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(p_lse_s + o_n, lse_s, mask=m_n)
    tl.store(p_lse_t + o_n, lse_t, mask=m_n)
    if SEPARATE_CE:
        tl.store(p_lse_c + o_n, m_c + tl.log(l_c), mask=m_n)
    else:
        tl.store(p_lse_c + o_n, lse_s, mask=m_n)
    if HAS_LABELS:
        tl.store(p_zlab + o_n, z_lab, mask=m_n)
    if FKL:
        tl.store(p_rows + o_n, a_t / l_t + lse_s - lse_t, mask=m_n)


@triton.jit
def _fld_tile_logprobs(p_xs, p_ws, p_xt, p_wt, o_n, m_n, o_v, m_vs, m_vc, lse_s, lse_t, DS, DT, inv_t,
                       stride_xs, stride_ws, stride_xt, stride_wt, UPCAST: tl.constexpr,
                       BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Student raw logits and the (s, t) log-probabilities of a tile; columns >= Vc hold s = t = 0."""
    zs_raw = _tile_logits(p_xs, p_ws, o_n, o_v, m_n, m_vs, DS, stride_xs, stride_ws, BD, UPCAST, BN, BV)
    zt = _tile_logits(p_xt, p_wt, o_n, o_v, m_n, m_vc, DT, stride_xt, stride_wt, BD, UPCAST, BN, BV)
    s = tl.where(m_vc[None, :], zs_raw * inv_t - lse_s[:, None], 0.0)
    t = tl.where(m_vc[None, :], zt * inv_t - lse_t[:, None], 0.0)
    return zs_raw, s, t


@triton.jit
def _fld_rows_kernel(
    p_xs, p_ws, p_xt, p_wt, p_lse_s, p_lse_t, p_rows, p_c,
    N, V, VC, DS, DT, inv_t, beta,
    stride_xs, stride_ws, stride_xt, stride_wt,
    DIV: tl.constexpr, LOG_FLOOR: tl.constexpr, UPCAST: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    lse_s = tl.load(p_lse_s + o_n, mask=m_n, other=0.0)
    lse_t = tl.load(p_lse_t + o_n, mask=m_n, other=0.0)
    rows = tl.zeros((BN,), tl.float32)
    c = tl.zeros((BN,), tl.float32)
    for v0 in range(0, VC, BV):
        o_v = v0 + tl.arange(0, BV)
        m_vc = o_v < VC
        _, s, t = _fld_tile_logprobs(p_xs, p_ws, p_xt, p_wt, o_n, m_n, o_v, o_v < V, m_vc, lse_s, lse_t,
                                     DS, DT, inv_t, stride_xs, stride_ws, stride_xt, stride_wt, UPCAST, BN, BV, BD)
        elem, h = _div_terms(s, t, beta, LOG_FLOOR, DIV)
        rows += tl.sum(tl.where(m_vc[None, :], elem, 0.0), axis=1)
        c += tl.sum(tl.where(m_vc[None, :], tl.exp(s) * h, 0.0), axis=1)
    tl.store(p_rows + o_n, rows, mask=m_n)
    tl.store(p_c + o_n, c, mask=m_n)


@triton.jit
def _fld_bwd_kernel(
    p_xs, p_ws, p_xt, p_wt, p_labels, p_lse_s, p_lse_t, p_lse_c, p_c, p_coef_div, p_coef_ce, p_g,
    N, V, VC, DS, DT, inv_t, beta, v_start, v_stop, stride_g,
    stride_xs, stride_ws, stride_xt, stride_wt,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, LOG_FLOOR: tl.constexpr, UPCAST: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop) into g[:, v - v_start]."""
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_v = v_start + i_v * BV + tl.arange(0, BV)
    m_vs = (o_v < v_stop) & (o_v < V)
    m_vc = m_vs & (o_v < VC)
    lse_s = tl.load(p_lse_s + o_n, mask=m_n, other=0.0)
    lse_t = tl.load(p_lse_t + o_n, mask=m_n, other=0.0)
    coef = tl.load(p_coef_div + o_n, mask=m_n, other=0.0) * inv_t
    zs_raw, s, t = _fld_tile_logprobs(p_xs, p_ws, p_xt, p_wt, o_n, m_n, o_v, m_vs, m_vc, lse_s, lse_t,
                                      DS, DT, inv_t, stride_xs, stride_ws, stride_xt, stride_wt, UPCAST, BN, BV, BD)
    p_s = tl.exp(s)
    if DIV == 0:
        g = p_s - tl.exp(t)
    else:
        c = tl.load(p_c + o_n, mask=m_n, other=0.0)
        _, h = _div_terms(s, t, beta, LOG_FLOOR, DIV)
        g = p_s * (h - c[:, None])
    g = tl.where(m_vc[None, :], g * coef[:, None], 0.0)
    if HAS_LABELS:
        lse_c = tl.load(p_lse_c + o_n, mask=m_n, other=0.0)
        coef_ce = tl.load(p_coef_ce + o_n, mask=m_n, other=0.0)
        b_lab = tl.load(p_labels + o_n, mask=m_n, other=-1)
        p_c_ = tl.exp(zs_raw - lse_c[:, None])
        onehot = tl.where(o_v[None, :] == b_lab[:, None], 1.0, 0.0)
        g += tl.where(m_vs[None, :], (p_c_ - onehot) * coef_ce[:, None], 0.0)
    o_g = o_n[:, None] * stride_g + (o_v - v_start)[None, :]
    tl.store(p_g + o_g, g, mask=m_n[:, None] & (o_v < v_stop)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _contig(*xs):
    return [x.contiguous() for x in xs]


def fld_forward_stats(xs, ws, xt, wt, labels, inv_t, fkl, separate_ce):
    """Pass 1. xs [N, Ds], ws [V, Ds], xt [N, Dt], wt [Vt, Dt], labels [N] or None.
    Returns fp32 [N] each: lse_s, lse_t, lse_c, z_label, rows (forward_kl rows, else zeros)."""
    xs, ws, xt, wt = _contig(xs, ws, xt, wt)
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    vc = min(v, vt)
    vtot = v if labels is not None else vc
    out = [torch.zeros(n, device=xs.device, dtype=torch.float32) for _ in range(5)]
    lab = labels.contiguous() if labels is not None else out[0]
    BN, BV, BD = _blocks()
    grid = (triton.cdiv(n, BN),)
    if n > 0:
        _fld_fwd_kernel[grid](
            xs, ws, xt, wt, lab, *out, n, v, vc, vtot, xs.shape[1], xt.shape[1], inv_t,
            xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
            HAS_LABELS=labels is not None, SEPARATE_CE=separate_ce, FKL=fkl,
            UPCAST=_upcast(xs.dtype), BN=BN, BV=BV, BD=BD,
        )
    return out


def fld_divergence_rows(xs, ws, xt, wt, lse_s, lse_t, inv_t, divergence, beta):
    """Pass 2: (rows [N], c [N]) fp32 for a divergence other than forward_kl."""
    xs, ws, xt, wt = _contig(xs, ws, xt, wt)
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    rows = torch.zeros(n, device=xs.device, dtype=torch.float32)
    c = torch.zeros_like(rows)
    BN, BV, BD = _blocks()
    if n > 0:
        _fld_rows_kernel[(triton.cdiv(n, BN),)](
            xs, ws, xt, wt, lse_s, lse_t, rows, c, n, v, min(v, vt), xs.shape[1], xt.shape[1], inv_t, beta,
            xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
            DIV=DIV_CODE[divergence], LOG_FLOOR=LOG_FLOOR, UPCAST=_upcast(xs.dtype),
            BN=BN, BV=BV, BD=BD,
        )
    return rows, c


def fld_dlogits(xs, ws, xt, wt, labels, lse_s, lse_t, lse_c, c, coef_div, coef_ce, inv_t, divergence, beta,
                v_start, v_stop, out=None):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop): fp32 [N, v_stop - v_start]."""
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    width = v_stop - v_start
    g = out[:, :width] if out is not None else torch.empty(n, width, device=xs.device, dtype=torch.float32)
    has_labels = labels is not None
    dummy = lse_s
    BN, BV, BD = _blocks()
    grid = (triton.cdiv(n, BN), triton.cdiv(width, BV))
    _fld_bwd_kernel[grid](
        xs, ws, xt, wt, labels if has_labels else dummy, lse_s, lse_t, lse_c, c, coef_div,
        coef_ce if has_labels else dummy, g, n, v, min(v, vt), xs.shape[1], xt.shape[1], inv_t, beta,
        v_start, v_stop, g.stride(0), xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
        DIV=DIV_CODE[divergence], HAS_LABELS=has_labels, LOG_FLOOR=LOG_FLOOR,
        UPCAST=_upcast(xs.dtype), BN=BN, BV=BV, BD=BD,
    )
    return g


class FusedLinearDivergenceTriton(torch.autograd.Function):
    """Triton path; same contract as ``FusedLinearDivergenceFunction`` (returns (div, ce)).
    forward(xs, ws, bs, xt, wt, bt, weight, labels, params); bs/bt (lm_head biases) must be None here."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, weight, labels, params):
        if xs.dtype == torch.float64:
            raise ValueError("impl='triton' computes in fp32 and takes fp16/bf16/fp32 inputs, got torch.float64; "
                             "use impl='torch' (computes in float64) or cast the inputs")
        xs, ws, xt, wt = _contig(xs, ws, xt, wt)
        v, vc = ws.shape[0], min(ws.shape[0], wt.shape[0])
        inv_t = params.inv_t
        fkl = params.divergence == "forward_kl"
        separate_ce = labels is not None and (params.temperature != 1.0 or v != vc)
        lse_s, lse_t, lse_c, z_label, rows = fld_forward_stats(xs, ws, xt, wt, labels, inv_t, fkl, separate_ce)
        c = torch.zeros_like(rows)
        if not fkl:
            rows, c = fld_divergence_rows(xs, ws, xt, wt, lse_s, lse_t, inv_t, params.divergence, params.beta)
        div, ce, w_rows, valid, n_valid = finish_rows(rows, lse_c, z_label, weight, labels, params.ignore_index,
                                                      params.reduction)
        ctx.save_for_backward(xs, ws, xt, wt, labels, lse_s, lse_t, lse_c, c, w_rows, valid, n_valid)
        ctx.params = params
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        xs, ws, xt, wt, labels, lse_s, lse_t, lse_c, c, w_rows, valid, n_valid = ctx.saved_tensors
        params = ctx.params
        n = xs.shape[0]
        coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, params.reduction, w_rows, valid, n_valid)
        coef_div = coef_div.contiguous()
        coef_ce = coef_ce.float().contiguous() if coef_ce is not None else None
        v = ws.shape[0]
        vtot = v if labels is not None else min(v, wt.shape[0])
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dxs = torch.zeros(xs.shape, device=xs.device, dtype=torch.float32) if needs_dx else None
        dws = torch.zeros(ws.shape, device=ws.device, dtype=ws.dtype) if needs_dw else None
        bv = _blocks()[1]
        chunk = max(bv, min(vtot, (CHUNK_ELEMS // max(n, 1)) // bv * bv))
        buf = torch.empty(n, chunk, device=xs.device, dtype=torch.float32) if n > 0 else None
        xs32 = xs.float()
        for v0 in range(0, vtot if n > 0 else 0, chunk):
            v1 = min(vtot, v0 + chunk)
            g = fld_dlogits(xs, ws, xt, wt, labels, lse_s, lse_t, lse_c, c, coef_div, coef_ce, params.inv_t,
                            params.divergence, params.beta, v0, v1, out=buf)
            if dxs is not None:
                dxs.addmm_(g, ws[v0:v1].float())
            if dws is not None:
                dws[v0:v1] = (g.T @ xs32).to(ws.dtype)
        return (dxs.to(xs.dtype) if dxs is not None else None, dws) + (None,) * 7
