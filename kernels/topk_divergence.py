"""Triton path of ``kdengine.losses.topk_divergence`` (the algebra: ``kdengine/losses/topk_divergence_torch.py``;
the row epilogue both paths share: ``kdengine/losses/topk_rows.py``).

Layers: ``_topk_fwd_kernel`` / ``_topk_bwd_kernel`` (@triton.jit, sharing ``_walk_support``)
-> launchers ``topk_forward_stats`` / ``topk_dlogits`` -> ``TopkDivergenceTriton`` (autograd.Function).

The teacher's ids are sorted per row once (padding -1 becomes a sentinel past every column), so
the ids that fall in a vocabulary tile are a contiguous run of the sorted row. ``_walk_support``
steps a per-row pointer through that run, one id per step (a [BN, BV] compare), as many steps as
the tile's busiest row holds ids: with K << V a tile usually holds none, and the walk costs far
less than the tile's lm_head product.
    forward (_topk_fwd_kernel): each program owns BN rows and streams the vocabulary in BV tiles:
        z = x W^T + b (tl.dot over BD chunks, fp32 accumulation), online lse of z / T, the
        gather z[id] for each id in the tile, and (tail policy) the online lse of the columns
        off the support; lse_c (T = 1) and z[label] for the CE. Logits never reach global memory.
    backward (_topk_bwd_kernel): dlogits tiles of a vocabulary chunk into a [N, chunk] buffer (the
        only [N, *] intermediate, of bounded width), then dX += G W_chunk, dW_chunk = G^T X,
        db_chunk = sum_n G. A tile finds its run's start by a binary search of the sorted row.
Under TRITON_INTERPRET=1 bf16 tiles are upcast before tl.dot (Triton 3.9's interpreter gets bf16
dots wrong) and small blocks are used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdengine.kernels.runtime import interpreting
from kdengine.kernels.divergence_terms import _online, _tile_logits
from kdengine.losses.topk_rows import PAD_ID, teacher_bins, topk_coefficients, topk_finish

NO_ID = 2**30  # sorted-id sentinel: padding and loads past K; larger than any column
CHUNK_ELEMS = 2**24  # backward dlogits buffer: at most this many fp32 elements (64 MB)


def _blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BN, BV, BD): small blocks under the CPU interpreter (its cost is per program); on a GPU the
    largest tiles that compile without register spills on sm_80 and sm_90 (benchmarks/gpu_compile.py):
    16-bit tiles run on tensor cores, fp32's FFMA dots hold their operands in registers and take
    narrower row blocks."""
    if interpreting():
        return (16, 32, 16)
    return (16, 64, 32) if dtype == torch.float32 else (32, 64, 32)


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are upcast before tl.dot under the interpreter (Triton 3.9 gets bf16 dots wrong there)."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def _walk_support(p_ids, p_w, p_zk, o_n, m_n, o_v, v_hi, K, ptr, z,
                  LOAD_W: tl.constexpr, STORE_Z: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                  NO_ID: tl.constexpr):
    """Walk each row's sorted ids below v_hi from position ptr [BN] over the tile columns o_v [BV].

    Returns (on_s [BN, BV]: the column is a top-k id, w_col [BN, BV]: its teacher weight w (if
    LOAD_W), ptr past the walked ids). STORE_Z writes the tile's raw logits z at each id to p_zk.
    """
    cnt = tl.zeros((BN, BV), dtype=tl.int32)
    w_col = tl.zeros((BN, BV), dtype=tl.float32)
    o_k = o_n * K + ptr
    b_id = tl.load(p_ids + o_k, mask=m_n & (ptr < K), other=NO_ID)
    act = b_id < v_hi
    while tl.max(act.to(tl.int32), axis=0) > 0:
        hit = (o_v[None, :] == b_id[:, None]) & act[:, None]
        cnt += hit.to(tl.int32)
        if LOAD_W:
            b_w = tl.load(p_w + o_k, mask=act, other=0.0)
            w_col += tl.where(hit, b_w[:, None], 0.0)
        if STORE_Z:
            found = tl.sum(hit.to(tl.int32), axis=1) > 0
            tl.store(p_zk + o_k, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=found)
        ptr += act.to(tl.int32)
        o_k = o_n * K + ptr
        b_id = tl.load(p_ids + o_k, mask=m_n & (ptr < K), other=NO_ID)
        act = b_id < v_hi
    return cnt > 0, w_col, ptr


@triton.jit
def _lower_bound(p_ids, o_n, m_n, K, x, SEARCH_STEPS: tl.constexpr, BN: tl.constexpr, NO_ID: tl.constexpr):
    """[BN] int32: per row, the first position of the sorted ids whose id is >= x (K if none);
    a binary search of SEARCH_STEPS = bit length of K steps."""
    lo = tl.zeros((BN,), tl.int32)
    hi = tl.zeros((BN,), tl.int32) + K
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(p_ids + o_n * K + mid, mask=m_n & (mid < K), other=NO_ID) < x
        open_ = lo < hi
        lo = tl.where(open_ & below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    return lo


@triton.jit
def _topk_fwd_kernel(
    p_x, p_w, p_b, p_ids, p_labels, p_zk, p_m, p_ll, p_m_out, p_ll_out, p_lse_c, p_zlab,
    N, V, D, K, inv_t, stride_x, stride_w,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, SEPARATE_CE: tl.constexpr, TAIL: tl.constexpr,
    UPCAST: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, NO_ID: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_s = tl.full((BN,), float("-inf"), tl.float32)
    l_s = tl.zeros((BN,), tl.float32)
    m_o = tl.full((BN,), float("-inf"), tl.float32)
    l_o = tl.zeros((BN,), tl.float32)
    m_c = tl.full((BN,), float("-inf"), tl.float32)
    l_c = tl.zeros((BN,), tl.float32)
    z_lab = tl.zeros((BN,), tl.float32)
    ptr = tl.zeros((BN,), tl.int32)
    if HAS_LABELS:
        b_lab = tl.load(p_labels + o_n, mask=m_n, other=-1)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        z = _tile_logits(p_x, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_x, stride_w, HAS_BIAS, UPCAST, BN, BV, BD)
        zs = tl.where(m_v[None, :], z * inv_t, float("-inf"))
        m_s, l_s, _, _, _ = _online(m_s, l_s, zs)
        on_s, _, ptr = _walk_support(p_ids, p_zk, p_zk, o_n, m_n, o_v, tl.minimum(v0 + BV, V), K, ptr, z,
                                     False, True, BN, BV, NO_ID)
        if TAIL:
            m_o, l_o, _, _, _ = _online(m_o, l_o, tl.where(on_s, float("-inf"), zs))
        if SEPARATE_CE:
            m_c, l_c, _, _, _ = _online(m_c, l_c, tl.where(m_v[None, :], z, float("-inf")))
        if HAS_LABELS:
            hit = (o_v[None, :] == b_lab[:, None]) & m_v[None, :]
            z_lab += tl.sum(tl.where(hit, z, 0.0), axis=1)
    # shift and log-sum kept apart (see topk_divergence_torch.py); l >= 1 once a column was seen
    ll_s = tl.log(tl.maximum(l_s, 1.0))
    tl.store(p_m + o_n, m_s, mask=m_n)
    tl.store(p_ll + o_n, ll_s, mask=m_n)
    if TAIL:  # no column off the support (S = V): shift 0, log-sum -inf
        tl.store(p_m_out + o_n, tl.where(l_o > 0, m_o, 0.0), mask=m_n)
        tl.store(p_ll_out + o_n, tl.where(l_o > 0, tl.log(tl.maximum(l_o, 1.0)), float("-inf")), mask=m_n)
    if SEPARATE_CE:
        tl.store(p_lse_c + o_n, m_c + tl.log(l_c), mask=m_n)
    else:
        tl.store(p_lse_c + o_n, m_s + ll_s, mask=m_n)
    if HAS_LABELS:
        tl.store(p_zlab + o_n, z_lab, mask=m_n)


@triton.jit
def _topk_bwd_kernel(
    p_x, p_w, p_b, p_ids, p_wk, p_labels, p_m, p_ll, p_m_out, p_ll_out, p_lse_c, p_mass, p_tau, p_qs, p_a_div,
    p_coef_ce,
    p_g, N, V, D, K, inv_t, v_start, v_stop, stride_g, stride_x, stride_w,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, TAIL: tl.constexpr, UPCAST: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, SEARCH_STEPS: tl.constexpr, NO_ID: tl.constexpr,
):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop) into g[:, v - v_start]."""
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    v_lo = v_start + i_v * BV
    o_v = v_lo + tl.arange(0, BV)
    v_hi = tl.minimum(tl.minimum(v_lo + BV, v_stop), V)
    m_v = o_v < v_hi
    z = _tile_logits(p_x, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_x, stride_w, HAS_BIAS, UPCAST, BN, BV, BD)
    b_m = tl.load(p_m + o_n, mask=m_n, other=0.0)
    b_ll = tl.load(p_ll + o_n, mask=m_n, other=0.0)
    mass = tl.load(p_mass + o_n, mask=m_n, other=0.0)
    q = tl.exp((z * inv_t - b_m[:, None]) - b_ll[:, None])
    ptr = _lower_bound(p_ids, o_n, m_n, K, v_lo, SEARCH_STEPS, BN, NO_ID)
    on_s, w_col, _ = _walk_support(p_ids, p_wk, p_wk, o_n, m_n, o_v, v_hi, K, ptr, z, True, False, BN, BV, NO_ID)
    g = q * mass[:, None] - w_col
    if TAIL:
        m_out = tl.load(p_m_out + o_n, mask=m_n, other=0.0)
        ll_out = tl.load(p_ll_out + o_n, mask=m_n, other=0.0)
        tau = tl.load(p_tau + o_n, mask=m_n, other=0.0)
        q_s = tl.load(p_qs + o_n, mask=m_n, other=0.0)
        # q_j / q_tail off the support (<= 1 there; clamped where it is not used)
        r = tl.exp(tl.minimum((z * inv_t - m_out[:, None]) - ll_out[:, None], 0.0))
        g += tau[:, None] * tl.where(on_s, q, -q_s[:, None] * r)
    g = g * tl.load(p_a_div + o_n, mask=m_n, other=0.0)[:, None]
    if HAS_LABELS:
        lse_c = tl.load(p_lse_c + o_n, mask=m_n, other=0.0)
        coef_ce = tl.load(p_coef_ce + o_n, mask=m_n, other=0.0)
        b_lab = tl.load(p_labels + o_n, mask=m_n, other=-1)
        onehot = tl.where(o_v[None, :] == b_lab[:, None], 1.0, 0.0)
        g += (tl.exp(z - lse_c[:, None]) - onehot) * coef_ce[:, None]
    g = tl.where(m_v[None, :], g, 0.0)
    o_g = o_n[:, None] * stride_g + (o_v - v_start)[None, :]
    tl.store(p_g + o_g, g, mask=m_n[:, None] & (o_v < v_stop)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def sort_support(ids: torch.Tensor, *per_id: torch.Tensor):
    """ids [N, K] -> (int32 ids sorted ascending per row with padding as NO_ID, each of per_id [N, K]
    permuted alike)."""
    keyed = torch.where(ids == PAD_ID, NO_ID, ids.long())
    srt, perm = keyed.sort(-1)
    return (srt.to(torch.int32).contiguous(), *(x.gather(1, perm).contiguous() for x in per_id))


def topk_forward_stats(x, w, b, ids_sorted, labels, inv_t, tail, separate_ce):
    """x [N, D], w [V, D], b [V] | None, ids_sorted [N, K] int32 (``sort_support``), labels [N] | None.
    Returns zk [N, K] fp32 raw logits at the ids (NaN where an id matched no column), and fp32 [N]
    m, ll (shift and log-sum of z / T over V), m_out, ll_out (the same off the support; zeros unless
    tail), lse_c (T = 1), z_label."""
    n, v, k = x.shape[0], w.shape[0], ids_sorted.shape[1]
    zk = torch.full((n, k), math.nan, device=x.device, dtype=torch.float32)
    out = [torch.zeros(n, device=x.device, dtype=torch.float32) for _ in range(6)]
    BN, BV, BD = _blocks(x.dtype)
    if n > 0:
        _topk_fwd_kernel[(triton.cdiv(n, BN),)](
            x, w, b if b is not None else x, ids_sorted, labels if labels is not None else ids_sorted, zk, *out,
            n, v, x.shape[1], k, inv_t, x.stride(0), w.stride(0),
            HAS_BIAS=b is not None, HAS_LABELS=labels is not None, SEPARATE_CE=separate_ce, TAIL=tail,
            UPCAST=_upcast(x.dtype), BN=BN, BV=BV, BD=BD, NO_ID=NO_ID,
        )
    return zk, *out


def topk_dlogits(x, w, b, ids_sorted, w_sorted, labels, stats, a_div, coef_ce, inv_t, v_start, v_stop, out):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop): fp32 [N, v_stop - v_start] in ``out``.
    stats: TopkRowStats; a_div [N] = d(output)/d(row loss) / T; coef_ce [N] | None."""
    n, v, k = x.shape[0], w.shape[0], ids_sorted.shape[1]
    width = v_stop - v_start
    g = out[:, :width]
    tail = stats.m_out is not None
    dummy = stats.m
    BN, BV, BD = _blocks(x.dtype)
    _topk_bwd_kernel[(triton.cdiv(n, BN), triton.cdiv(width, BV))](
        x, w, b if b is not None else x, ids_sorted, w_sorted, labels if labels is not None else ids_sorted,
        stats.m, stats.ll, stats.m_out if tail else dummy, stats.ll_out if tail else dummy, stats.lse_c,
        stats.mass, stats.tau if tail else dummy,
        stats.q_support if tail else dummy, a_div, coef_ce if coef_ce is not None else dummy,
        g, n, v, x.shape[1], k, inv_t, v_start, v_stop, g.stride(0), x.stride(0), w.stride(0),
        HAS_BIAS=b is not None, HAS_LABELS=labels is not None, TAIL=tail, UPCAST=_upcast(x.dtype),
        BN=BN, BV=BV, BD=BD, SEARCH_STEPS=int(k).bit_length(), NO_ID=NO_ID,
    )
    return g


class TopkDivergenceTriton(torch.autograd.Function):
    """Triton path; same contract as ``TopkDivergenceFunction`` (returns (div, ce)).
    forward(xs [N, D], ws [V, D], bs [V] | None, ids [N, K], logprobs [N, K], weight, labels, params)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, ids, logprobs, weight, labels, params):
        if xs.dtype == torch.float64:
            raise ValueError("impl='triton' computes in fp32 and takes fp16/bf16/fp32 inputs, got torch.float64; "
                             "use impl='torch' or cast the inputs")
        xs, ws = xs.contiguous(), ws.contiguous()
        bs = bs.contiguous() if bs is not None else None
        labels = labels.contiguous() if labels is not None else None
        tail = params.tail == "tail"
        separate_ce = labels is not None and params.temperature != 1.0
        ids_sorted, lp_sorted = sort_support(ids, logprobs)
        bins = teacher_bins(ids_sorted == NO_ID, lp_sorted, params.tail)
        zk, m, ll, m_out, ll_out, lse_c, z_label = topk_forward_stats(xs, ws, bs, ids_sorted, labels, params.inv_t,
                                                                      tail, separate_ce)
        div, ce, (stats, *rest) = topk_finish(zk, m, ll, (m_out, ll_out) if tail else None, lse_c, z_label, bins,
                                              weight, labels, params)
        ctx.save_for_backward(xs, ws, bs, ids_sorted, bins.w.contiguous(), labels, *rest)
        ctx.params, ctx.stats = params, stats
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        xs, ws, bs, ids_sorted, w_sorted, labels, w_rows, valid, n_valid = ctx.saved_tensors
        params, stats = ctx.params, ctx.stats
        n, v = xs.shape[0], ws.shape[0]
        a_div, coef_ce = topk_coefficients(grad_div, grad_ce, n, params, w_rows, valid, n_valid)
        a_div = a_div.contiguous()
        coef_ce = coef_ce.float().contiguous() if coef_ce is not None else None
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        dxs = torch.zeros(xs.shape, device=xs.device, dtype=torch.float32) if needs_dx else None
        dws = torch.zeros(ws.shape, device=ws.device, dtype=ws.dtype) if needs_dw else None
        dbs = torch.zeros(v, device=ws.device, dtype=ws.dtype) if needs_db else None
        bv = _blocks(xs.dtype)[1]
        chunk = max(bv, min(v, (CHUNK_ELEMS // max(n, 1)) // bv * bv))
        buf = torch.empty(n, chunk, device=xs.device, dtype=torch.float32) if n > 0 else None
        xs32 = xs.float()
        for v0 in range(0, v if n > 0 else 0, chunk):
            v1 = min(v, v0 + chunk)
            g = topk_dlogits(xs, ws, bs, ids_sorted, w_sorted, labels, stats, a_div, coef_ce, params.inv_t,
                             v0, v1, buf)
            if dxs is not None:
                dxs.addmm_(g, ws[v0:v1].float())
            if dws is not None:
                dws[v0:v1] = (g.T @ xs32).to(ws.dtype)
            if dbs is not None:
                dbs[v0:v1] = g.sum(0).to(ws.dtype)
        return (dxs.to(xs.dtype) if dxs is not None else None, dws, dbs) + (None,) * 5
