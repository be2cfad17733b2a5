"""Triton path of ``kdengine.losses.fused_linear_divergence``.

Layers: ``_fld_stats`` / ``_fld_rows`` / ``_fld_dlogits`` (@triton.jit; ``_fld_*_kernel`` and ``_fld_*_kernel_fp32``
are their triton.autotune wrappers for 16-bit and fp32 inputs)
-> launchers ``fld_forward_stats`` / ``fld_divergence_rows`` / ``fld_dlogits``
-> ``FusedLinearDivergenceTriton`` (autograd.Function).

Shapes: xs [N, Ds], ws [V, Ds], bs [V] | None; xt [N, Dt], wt [Vt, Dt], bt [Vt] | None; Vc = min(V, Vt).
The lm_head products z_s = xs ws^T + bs and z_t = xt wt^T + bt are computed in [BN, BV] tiles (tl.dot
over BD chunks, fp32 accumulation) and never reach global memory. Every kernel runs on a 2D grid of
row blocks x vocabulary columns, flattened and grouped: GROUP_N consecutive row blocks walk the
columns together, so the programs resident at one time share each W tile (L2 serves the re-reads)
and keep only GROUP_N row blocks of X hot.
    pass 1 (_fld_stats): one program per (row block, vocabulary split of SPLIT columns) writes the
        split's running max m and sum l: student and teacher at temperature T over the first Vc
        columns, the CE's at T = 1 over all V, and forward_kl's sum p_t (z_t - z_s) / T. A small torch
        step combines the splits into a normaliser (M, log L) per row and softmax, L = sum l e^(m - M).
        The later kernels take log p = (z - M) - log L, never z - lse: the dominant entries then do
        not carry lse's rounding (|lse| eps), which matters at large logits. z[label] is one indexed
        dot product.
    pass 2 (_fld_rows), divergences other than forward_kl: per split, the loss rows and
        c = sum p_s h (kdengine/losses/divergences.py), summed over splits in torch (fixed order).
    backward (_fld_dlogits): dL/dz_s tiles of a vocabulary chunk into a [N, chunk] buffer
        (bf16 for bf16 inputs, else fp32; at most CHUNK_BYTES), then dX += G W_chunk,
        dW_chunk = G^T X and d bias_chunk = column sums of G as cuBLAS GEMMs / torch sums.
Matmul units ([N, V, D] GEMMs) per fwd+bwd: forward_kl 2 + 2 recompute + 2 = 6; the other
divergences add pass 2: 8.

Precision: bf16/fp16 tiles run on tensor cores (HMMA on sm_80, HGMMA on sm_90, v_mfma on gfx942)
with fp32 accumulation. fp32 inputs use input_precision="ieee" (exact fp32 products, not tf32:
logits feed exp() and a 1e-3 relative error there is visible in the loss), which compiles to FFMA
on CUDA cores on sm_80/sm_90 (no HMMA/HGMMA) and to v_mfma_f32_16x16x4_f32 (fp32 matrix cores) on
gfx942; float64 is refused (impl="torch" computes in float64).
Under TRITON_INTERPRET=1 (CPU tests) bf16 tiles are upcast before tl.dot: Triton 3.9's interpreter
returns wrong tl.dot results for bf16 operands (fp16/fp32 are exact), and small blocks are used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdengine.kernels.runtime import interpreting
from kdengine.kernels.divergence_terms import _div_terms, _online, _tile_logits
from kdengine.kernels.tuning import configs, fixed_or_tuned
from kdengine.losses.divergences import DIVERGENCES, LOG_FLOOR, finish_rows, row_coefficients

DIV_CODE = {name: i for i, name in enumerate(DIVERGENCES)}  # 0 fkl, 1 rkl, 2 jsd, 3 skew_fkl, 4 skew_rkl, 5 tvd
CHUNK_BYTES = 2**28  # backward dlogits buffer: at most 256 MB (fewer chunks = fewer passes over fp32 dX)
GROUP_N = 16  # row blocks that walk the vocabulary together (see the module docstring)
BLOCK_NAMES = ("BN", "BV", "BD")
# (blocks, num_warps, num_stages); BV divides SPLIT_COLS. Every entry compiles for sm_80 and sm_90
# without register spills (ptxas: 0 bytes stack and spill) in its dtype: the 16-bit list with
# HMMA / HGMMA tensor-core dots; fp32's FFMA dots hold their operands in registers, so fp32 gets
# its own list of smaller tiles. 8-warp and 128-wide tiles spill (255 registers) in these kernels, and
# so do BD = 32 with 64 x 64 and 32 x 64 / 64 x 32 tiles on sm_80 (ptxas settles at 168 registers).
# BN=64 BV=64 BD=16 w4 s3 spilled 8 bytes in fld_dlogits (jsd, fp16) on sm_80, and BN=16 BV=32 BD=32 w2 s3
# in fld_rows (jsd, fp32): both dropped (KDENGINE_FULL_COMPILE=1 compiles every divergence)
FLD_CONFIGS = configs([
    ({"BN": 64, "BV": 64, "BD": 64}, 4, 2),
    ({"BN": 64, "BV": 64, "BD": 64}, 4, 3),
    ({"BN": 64, "BV": 64, "BD": 64}, 4, 4),
])
FLD_CONFIGS_FP32 = configs([
    ({"BN": 16, "BV": 32, "BD": 16}, 4, 3),
    ({"BN": 16, "BV": 32, "BD": 32}, 4, 2),
    ({"BN": 16, "BV": 32, "BD": 32}, 4, 3),
])
# pass 1 (_fld_stats) holds three online softmaxes and spilled 8-16 bytes on sm_80 with BD = 64 at 3-4
# stages (16-bit) and with BD = 32 (fp32) from the lists above: it takes its own lists, BD = 16
FLD_STATS_CONFIGS = configs([
    ({"BN": 64, "BV": 64, "BD": 16}, 4, 2),
    ({"BN": 64, "BV": 64, "BD": 16}, 4, 3),
    ({"BN": 64, "BV": 64, "BD": 16}, 4, 4),
    ({"BN": 64, "BV": 64, "BD": 64}, 4, 2),
])
# fp32 pass 1: only these two of the configs tried compile spill-free on sm_80 (BN=32 BV=16 w4 s3 and
# BN=16 BV=16 w2 s3 spilled 8-16 bytes), so fp32 keeps two rather than four that spill
FLD_STATS_CONFIGS_FP32 = configs([
    ({"BN": 16, "BV": 32, "BD": 16}, 4, 3),
    ({"BN": 16, "BV": 16, "BD": 16}, 4, 3),
])
# tuning key: the reduction dims and V (tensor dtypes are appended by triton.autotune); the block
# names only take part when a launch fixes them (see kernels/tuning.py)
FLD_KEY = ["DS", "DT", "V", *BLOCK_NAMES]
INTERPRET_BLOCKS = {"BN": 16, "BV": 32, "BD": 16}  # the interpreter's cost is per program
SPLIT_COLS = 2048  # pass 1/2 vocabulary split per program on a GPU (a multiple of every BV)
INTERPRET_SPLIT_COLS = 64  # under the interpreter: several splits even at test vocabularies


def _tuned(fn, lists=(FLD_CONFIGS, FLD_CONFIGS_FP32)):
    """(16-bit, fp32) autotuned launch objects of one kernel; launchers pick by the input dtype."""
    return tuple(triton.autotune(configs=c, key=FLD_KEY, prune_configs_by=fixed_or_tuned(BLOCK_NAMES))(fn)
                 for c in lists)


_BIAS_FLAGS = {"HAS_BS": lambda a: a["p_bs"] is not None, "HAS_BT": lambda a: a["p_bt"] is not None}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_ids(pid, N, n_cols, BN: tl.constexpr, GROUP_N: tl.constexpr):
    """(row block, column block) of flat program id ``pid``: GROUP_N row blocks share each column block."""
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(tl.cdiv(N, BN) - first, GROUP_N)
    i_n = first + (pid % per_group) % size
    i_c = (pid % per_group) // size
    return i_n.to(tl.int64), i_c.to(tl.int64)


@triton.heuristics(_BIAS_FLAGS)
@triton.jit
def _fld_stats(
    p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, p_part,
    N, V, VC, VTOT, DS, DT, inv_t, split, n_split,
    stride_xs, stride_ws, stride_xt, stride_wt,
    SEPARATE_CE: tl.constexpr, FKL: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    UPCAST: tl.constexpr, GROUP_N: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """Partial statistics of rows [BN] over vocabulary split [i_s * split, (i_s + 1) * split).

    p_part [7, n_split, N] fp32: the split's (m, l) of the student and teacher (T, columns < VC) and of
    the CE (T = 1, columns < V; only with SEPARATE_CE) and, with FKL, sum p_t (z_t - z_s) / T under
    the split's teacher softmax.
    Dots: HMMA (sm_80) / HGMMA (sm_90) / v_mfma (gfx942) for bf16/fp16; fp32 ("ieee") is FFMA on
    sm_80/sm_90 and v_mfma_f32_*_f32 on gfx942.
    """
    i_n, i_s = _grouped_ids(tl.program_id(0), N, n_split, BN, GROUP_N)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_s = tl.full((BN,), float("-inf"), tl.float32)
    l_s = tl.zeros((BN,), tl.float32)
    m_t = tl.full((BN,), float("-inf"), tl.float32)
    l_t = tl.zeros((BN,), tl.float32)
    a_t = tl.zeros((BN,), tl.float32)
    m_c = tl.full((BN,), float("-inf"), tl.float32)
    l_c = tl.zeros((BN,), tl.float32)
    v_lo = i_s * split
    for v0 in range(v_lo, tl.minimum(v_lo + split, VTOT), BV):
        o_v = v0 + tl.arange(0, BV)
        m_vs = o_v < V
        m_vc = o_v < VC
        zs_raw = _tile_logits(p_xs, p_ws, p_bs, o_n, o_v, m_n, m_vs, DS, stride_xs, stride_ws, HAS_BS, UPCAST,
                              BN, BV, BD)
        if SEPARATE_CE:
            m_c, l_c, _, _, _ = _online(m_c, l_c, tl.where(m_vs[None, :], zs_raw, float("-inf")))
        if v0 < VC:
            zs = tl.where(m_vc[None, :], zs_raw * inv_t, float("-inf"))
            m_s, l_s, _, _, _ = _online(m_s, l_s, zs)
            zt = _tile_logits(p_xt, p_wt, p_bt, o_n, o_v, m_n, m_vc, DT, stride_xt, stride_wt, HAS_BT, UPCAST,
                              BN, BV, BD)
            zt = tl.where(m_vc[None, :], zt * inv_t, float("-inf"))
            m_t, l_t, scale_t, e_t, _ = _online(m_t, l_t, zt)
            if FKL:  # e_t > 0 only at finite teacher entries of compared columns, where zs is finite
                a_t = a_t * scale_t + tl.sum(tl.where(e_t > 0, e_t * (zt - zs), 0.0), axis=1)
    p_out = p_part + i_s * N + o_n
    stride_k = n_split * N
    tl.store(p_out, m_s, mask=m_n)
    tl.store(p_out + stride_k, l_s, mask=m_n)
    tl.store(p_out + 2 * stride_k, m_t, mask=m_n)
    tl.store(p_out + 3 * stride_k, l_t, mask=m_n)
    if SEPARATE_CE:
        tl.store(p_out + 4 * stride_k, m_c, mask=m_n)
        tl.store(p_out + 5 * stride_k, l_c, mask=m_n)
    if FKL:
        tl.store(p_out + 6 * stride_k, tl.where(l_t > 0, a_t / l_t, 0.0), mask=m_n)


@triton.jit
def _load_normaliser(p_nrm, o_n, m_n, N):
    """(M, log L) [BN] of rows o_n from a [2, N] normaliser."""
    return tl.load(p_nrm + o_n, mask=m_n, other=0.0), tl.load(p_nrm + N + o_n, mask=m_n, other=0.0)


@triton.jit
def _tile_logprobs(p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, o_n, m_n, o_v, m_vs, m_vc, mx_s, ll_s, mx_t, ll_t, DS, DT,
                   inv_t, stride_xs, stride_ws, stride_xt, stride_wt, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                   UPCAST: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Student raw logits and the (s, t) log-probabilities (z / T - M) - log L of a tile; columns >= Vc
    hold s = t = 0."""
    zs_raw = _tile_logits(p_xs, p_ws, p_bs, o_n, o_v, m_n, m_vs, DS, stride_xs, stride_ws, HAS_BS, UPCAST,
                          BN, BV, BD)
    s = tl.where(m_vc[None, :], (zs_raw * inv_t - mx_s[:, None]) - ll_s[:, None], 0.0)
    zt = _tile_logits(p_xt, p_wt, p_bt, o_n, o_v, m_n, m_vc, DT, stride_xt, stride_wt, HAS_BT, UPCAST,
                      BN, BV, BD)
    t = tl.where(m_vc[None, :], (zt * inv_t - mx_t[:, None]) - ll_t[:, None], 0.0)
    return zs_raw, s, t


@triton.heuristics(_BIAS_FLAGS)
@triton.jit
def _fld_rows(
    p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, p_nrm_s, p_nrm_t, p_part,
    N, V, VC, DS, DT, inv_t, beta, split, n_split,
    stride_xs, stride_ws, stride_xt, stride_wt,
    DIV: tl.constexpr, LOG_FLOOR: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    UPCAST: tl.constexpr, GROUP_N: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """p_part [2, n_split, N] fp32: the split's sum of loss terms and of p_s h (rows, c).

    Dots: HMMA / HGMMA / v_mfma for bf16/fp16; fp32 ("ieee") is FFMA on sm_80/sm_90 and
    v_mfma_f32_*_f32 on gfx942.
    """
    i_n, i_s = _grouped_ids(tl.program_id(0), N, n_split, BN, GROUP_N)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    mx_s, ll_s = _load_normaliser(p_nrm_s, o_n, m_n, N)
    mx_t, ll_t = _load_normaliser(p_nrm_t, o_n, m_n, N)
    rows = tl.zeros((BN,), tl.float32)
    c = tl.zeros((BN,), tl.float32)
    v_lo = i_s * split
    for v0 in range(v_lo, tl.minimum(v_lo + split, VC), BV):
        o_v = v0 + tl.arange(0, BV)
        m_vc = o_v < VC
        _, s, t = _tile_logprobs(p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, o_n, m_n, o_v, o_v < V, m_vc, mx_s, ll_s,
                                 mx_t, ll_t, DS, DT, inv_t, stride_xs, stride_ws, stride_xt, stride_wt, HAS_BS, HAS_BT, UPCAST,
                                 BN, BV, BD)
        elem, h = _div_terms(s, t, beta, LOG_FLOOR, DIV)
        rows += tl.sum(tl.where(m_vc[None, :], elem, 0.0), axis=1)
        c += tl.sum(tl.where(m_vc[None, :], tl.exp(s) * h, 0.0), axis=1)
    p_out = p_part + i_s * N + o_n
    tl.store(p_out, rows, mask=m_n)
    tl.store(p_out + n_split * N, c, mask=m_n)


@triton.heuristics(_BIAS_FLAGS)
@triton.jit
def _fld_dlogits(
    p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, p_labels, p_nrm_s, p_nrm_t, p_nrm_c, p_c, p_coef_div, p_coef_ce, p_g,
    N, V, VC, DS, DT, inv_t, beta, v_start, v_stop, stride_g,
    stride_xs, stride_ws, stride_xt, stride_wt,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, LOG_FLOOR: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, UPCAST: tl.constexpr, GROUP_N: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop) into g[:, v - v_start] (g's dtype).

    Dots: HMMA / HGMMA / v_mfma for bf16/fp16; fp32 ("ieee") is FFMA on sm_80/sm_90 and
    v_mfma_f32_*_f32 on gfx942.
    """
    i_n, i_v = _grouped_ids(tl.program_id(0), N, tl.cdiv(v_stop - v_start, BV), BN, GROUP_N)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_v = v_start + i_v * BV + tl.arange(0, BV)
    m_vs = (o_v < v_stop) & (o_v < V)
    m_vc = m_vs & (o_v < VC)
    mx_s, ll_s = _load_normaliser(p_nrm_s, o_n, m_n, N)
    mx_t, ll_t = _load_normaliser(p_nrm_t, o_n, m_n, N)
    coef = tl.load(p_coef_div + o_n, mask=m_n, other=0.0) * inv_t
    zs_raw, s, t = _tile_logprobs(p_xs, p_ws, p_bs, p_xt, p_wt, p_bt, o_n, m_n, o_v, m_vs, m_vc, mx_s, ll_s,
                                  mx_t, ll_t, DS, DT, inv_t, stride_xs, stride_ws, stride_xt, stride_wt, HAS_BS, HAS_BT, UPCAST,
                                  BN, BV, BD)
    p_s = tl.exp(s)
    if DIV == 0:
        g = p_s - tl.exp(t)
    else:
        c = tl.load(p_c + o_n, mask=m_n, other=0.0)
        _, h = _div_terms(s, t, beta, LOG_FLOOR, DIV)
        g = p_s * (h - c[:, None])
    g = tl.where(m_vc[None, :], g * coef[:, None], 0.0)
    if HAS_LABELS:
        mx_c, ll_c = _load_normaliser(p_nrm_c, o_n, m_n, N)
        coef_ce = tl.load(p_coef_ce + o_n, mask=m_n, other=0.0)
        b_lab = tl.load(p_labels + o_n, mask=m_n, other=-1)
        p_ce = tl.exp((zs_raw - mx_c[:, None]) - ll_c[:, None])
        onehot = tl.where(o_v[None, :] == b_lab[:, None], 1.0, 0.0)
        g += tl.where(m_vs[None, :], (p_ce - onehot) * coef_ce[:, None], 0.0)
    o_g = o_n[:, None] * stride_g + (o_v - v_start)[None, :]
    tl.store(p_g + o_g, g.to(p_g.dtype.element_ty), mask=m_n[:, None] & (o_v < v_stop)[None, :])


_fld_stats_kernel, _fld_stats_kernel_fp32 = _tuned(_fld_stats, (FLD_STATS_CONFIGS, FLD_STATS_CONFIGS_FP32))
_fld_rows_kernel, _fld_rows_kernel_fp32 = _tuned(_fld_rows)
_fld_dlogits_kernel, _fld_dlogits_kernel_fp32 = _tuned(_fld_dlogits)


# ----------------------------------------------------------------------------------------------
# launchers (no device checks and no host syncs: they also run on meta tensors)
# ----------------------------------------------------------------------------------------------
def _launch_meta(dtype: torch.dtype) -> dict:
    """Keyword arguments every launch shares: fixed small blocks under the interpreter, else none (tuned)."""
    meta = {"UPCAST": interpreting() and dtype == torch.bfloat16, "GROUP_N": GROUP_N}
    return {**meta, **INTERPRET_BLOCKS} if interpreting() else meta


def _split_cols() -> int:
    return INTERPRET_SPLIT_COLS if interpreting() else SPLIT_COLS


def _split_grid(n: int, n_split: int):
    return lambda meta: (triton.cdiv(n, meta["BN"]) * n_split,)


def fld_forward_stats(xs, ws, bs, xt, wt, bt, labels, inv_t, fkl, separate_ce):
    """Pass 1. xs [N, Ds], ws [V, Ds], bs [V] | None, xt [N, Dt], wt [Vt, Dt], bt [Vt] | None, labels [N] | None
    (contiguous). Returns the normalisers nrm_s, nrm_t, nrm_c (fp32 [2, N]: max M and log L, see the module
    docstring; nrm_c is nrm_s without a separate CE softmax), z_label [N] (0 without labels) and rows [N]
    (forward_kl rows, else zeros)."""
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    vc = min(v, vt)
    vtot = v if separate_ce else vc
    split = _split_cols()
    n_split = triton.cdiv(vtot, split)
    part = torch.zeros(7, n_split, n, device=xs.device, dtype=torch.float32)
    if n > 0:
        kernel = _fld_stats_kernel_fp32 if xs.dtype == torch.float32 else _fld_stats_kernel
        kernel[_split_grid(n, n_split)](
            xs, ws, bs, xt, wt, bt, part, n, v, vc, vtot, xs.shape[1], xt.shape[1], inv_t, split, n_split,
            xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
            SEPARATE_CE=separate_ce, FKL=fkl, **_launch_meta(xs.dtype),
        )
    nrm_s, nrm_t = _normaliser(part[0], part[1]), _normaliser(part[2], part[3])
    nrm_c = _normaliser(part[4], part[5]) if separate_ce else nrm_s
    rows = torch.zeros(n, device=xs.device, dtype=torch.float32)
    if fkl:  # sum_j p_t (z_t - z_s) / T + lse_s - lse_t, each split weighted by its share of the teacher mass;
        # lse_s - lse_t is taken as (M_s - M_t) + (log L_s - log L_t) (close teacher and student)
        share = part[3] * torch.exp(part[2] - nrm_t[0].clamp_min(torch.finfo(torch.float32).min) - nrm_t[1])
        rows = (share * part[6]).sum(0) + (nrm_s[0] - nrm_t[0]) + (nrm_s[1] - nrm_t[1])
    z_label = torch.zeros_like(rows) if labels is None else _label_logits(xs, ws, bs, labels, v)
    return nrm_s, nrm_t, nrm_c, z_label, rows


def _normaliser(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Per-split running max m and sum l [S, N] -> fp32 [2, N]: (M, log L), M = max_s m, L = sum_s l e^(m - M)."""
    big = m.amax(0)
    total = (l * torch.exp(m - big.clamp_min(torch.finfo(torch.float32).min))).sum(0)
    return torch.stack([big, total.log()])


def _label_logits(xs, ws, bs, labels, v):
    """z_s[n, labels[n]] in fp32 [N] (0 where the label is out of range, e.g. ignore_index)."""
    inside = (labels >= 0) & (labels < v)
    idx = torch.where(inside, labels, 0).long()
    z = torch.linalg.vecdot(xs.float(), ws.index_select(0, idx).float())
    if bs is not None:
        z = z + bs.index_select(0, idx).float()
    return torch.where(inside, z, 0.0)


def fld_divergence_rows(xs, ws, bs, xt, wt, bt, nrm_s, nrm_t, inv_t, divergence, beta):
    """Pass 2: (rows [N], c [N]) fp32 for a divergence other than forward_kl."""
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    vc = min(v, vt)
    split = _split_cols()
    n_split = triton.cdiv(vc, split)
    part = torch.zeros(2, n_split, n, device=xs.device, dtype=torch.float32)
    if n > 0:
        kernel = _fld_rows_kernel_fp32 if xs.dtype == torch.float32 else _fld_rows_kernel
        kernel[_split_grid(n, n_split)](
            xs, ws, bs, xt, wt, bt, nrm_s, nrm_t, part, n, v, vc, xs.shape[1], xt.shape[1], inv_t, beta,
            split, n_split, xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
            DIV=DIV_CODE[divergence], LOG_FLOOR=LOG_FLOOR, **_launch_meta(xs.dtype),
        )
    rows, c = part.sum(1, dtype=torch.float64).float()  # fixed-order sum over splits
    return rows, c


def fld_dlogits(xs, ws, bs, xt, wt, bt, labels, nrm_s, nrm_t, nrm_c, c, coef_div, coef_ce, inv_t, divergence,
                beta, v_start, v_stop, out):
    """dL/d(raw student logits) for vocab columns [v_start, v_stop) into out[:, :v_stop - v_start]."""
    n, v, vt = xs.shape[0], ws.shape[0], wt.shape[0]
    width = v_stop - v_start
    g = out[:, :width]
    has_labels = labels is not None
    grid = lambda meta: (triton.cdiv(n, meta["BN"]) * triton.cdiv(width, meta["BV"]),)  # noqa: E731
    kernel = _fld_dlogits_kernel_fp32 if xs.dtype == torch.float32 else _fld_dlogits_kernel
    kernel[grid](
        xs, ws, bs, xt, wt, bt, labels if has_labels else c, nrm_s, nrm_t, nrm_c, c, coef_div,
        coef_ce if has_labels else c, g, n, v, min(v, vt), xs.shape[1], xt.shape[1], inv_t, beta,
        v_start, v_stop, g.stride(0), xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0),
        DIV=DIV_CODE[divergence], HAS_LABELS=has_labels, LOG_FLOOR=LOG_FLOOR, **_launch_meta(xs.dtype),
    )
    return g


def _check_dtype(xs: torch.Tensor) -> None:
    if xs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"impl='triton' takes float32/bfloat16/float16 inputs and computes in fp32, got {xs.dtype}; "
                         f"use impl='torch' (computes in float64 for float64 inputs) or cast the inputs")


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor | None) -> None:
    """acc (fp32) += a @ b. 16-bit a, b: an fp32-output GEMM into ``tmp`` (acc's shape) on CUDA, so the
    products accumulate in fp32 and stay on tensor cores (torch's addmm with out_dtype wants a 16-bit acc)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type in ("cuda", "meta"):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32, out=tmp))
    else:  # CPU (interpreter tests): no fp32-output kernel for 16-bit operands
        acc.add_(a @ b)


class FusedLinearDivergenceTriton(torch.autograd.Function):
    """Triton path; same contract as ``FusedLinearDivergenceFunction`` (returns (div, ce)).

    forward(xs [N, Ds], ws [V, Ds], bs [V] | None, xt [N, Dt], wt [Vt, Dt], bt [Vt] | None, weight [N] | None,
    labels [N] | None, params: FusedLinearDivergenceParams). Gradients: xs, ws, bs.
    """

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, weight, labels, params):
        _check_dtype(xs)
        xs, ws, xt, wt = (x.contiguous() for x in (xs, ws, xt, wt))
        bs, bt, labels = (x.contiguous() if x is not None else None for x in (bs, bt, labels))
        v, vc = ws.shape[0], min(ws.shape[0], wt.shape[0])
        fkl = params.divergence == "forward_kl"
        separate_ce = labels is not None and (params.temperature != 1.0 or v != vc)
        nrm_s, nrm_t, nrm_c, z_label, rows = fld_forward_stats(xs, ws, bs, xt, wt, bt, labels, params.inv_t, fkl,
                                                               separate_ce)
        c = torch.zeros_like(rows)
        if not fkl:
            rows, c = fld_divergence_rows(xs, ws, bs, xt, wt, bt, nrm_s, nrm_t, params.inv_t, params.divergence,
                                          params.beta)
        div, ce, w_rows, valid, n_valid = finish_rows(rows, nrm_c[0] + nrm_c[1], z_label, weight, labels,
                                                      params.ignore_index, params.reduction)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, labels, nrm_s, nrm_t, nrm_c, c, w_rows, valid, n_valid)
        ctx.params = params
        return div.to(xs.dtype), ce.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_div, grad_ce):
        xs, ws, bs, xt, wt, bt, labels, nrm_s, nrm_t, nrm_c, c, w_rows, valid, n_valid = ctx.saved_tensors
        params = ctx.params
        n = xs.shape[0]
        coef_div, coef_ce = row_coefficients(grad_div, grad_ce, n, params.reduction, w_rows, valid, n_valid)
        coef_div = coef_div.contiguous()
        coef_ce = coef_ce.float().contiguous() if coef_ce is not None else None
        v = ws.shape[0]
        vtot = v if labels is not None else min(v, wt.shape[0])
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        dev = xs.device
        dxs = torch.zeros(xs.shape, device=dev, dtype=torch.float32) if needs_dx else None
        dws = torch.zeros(ws.shape, device=dev, dtype=ws.dtype) if needs_dw else None
        dbs = torch.zeros(v, device=dev, dtype=torch.float32) if needs_db else None
        # G in bf16 for bf16 inputs (tensor-core GEMMs); fp16's range would flush small dlogits to zero
        g_dtype = torch.bfloat16 if xs.dtype == torch.bfloat16 else torch.float32
        chunk = max(256, min(vtot, CHUNK_BYTES // g_dtype.itemsize // max(n, 1)) // 256 * 256)
        buf = torch.empty(n, chunk, device=dev, dtype=g_dtype) if n > 0 else None
        x_g = xs.to(g_dtype)
        tmp = torch.empty_like(dxs) if dxs is not None and g_dtype != torch.float32 else None
        for v0 in range(0, vtot if n > 0 else 0, chunk):
            v1 = min(vtot, v0 + chunk)
            g = fld_dlogits(xs, ws, bs, xt, wt, bt, labels, nrm_s, nrm_t, nrm_c, c, coef_div, coef_ce,
                            params.inv_t, params.divergence, params.beta, v0, v1, buf)
            if dxs is not None:
                _add_matmul(dxs, g, ws[v0:v1].to(g_dtype), tmp)
            if dws is not None:
                if ws.dtype == g_dtype:
                    torch.mm(g.T, x_g, out=dws[v0:v1])
                else:
                    dws[v0:v1] = (g.T @ x_g).to(ws.dtype)
            if dbs is not None:
                dbs[v0:v1] = g.sum(0, dtype=torch.float32)
        return (dxs.to(xs.dtype) if dxs is not None else None, dws,
                dbs.to(bs.dtype) if dbs is not None else None) + (None,) * 6
