"""Triton kernels for the Gram-cosine RDist loss (Gram matrices of visual-token logits).

For one sample with P visual tokens, logits Z = H W^T [P, V] are never formed. With
G = W^T W [D, D] and A = H @ G [P, D] (fp32, computed in torch by the caller),

    R = Z Z^T = H G H^T,   R[i, j] = A[i] . H[j]        R: [P, P]

and the loss needs, per sample, the three statistics of the student (s) and teacher (t)
Gram matrices plus, in backward, products (coef_t R_t - coef_s R_s) @ M. Both kernels
recompute [BP, BP] tiles of R_s and R_t from A and H in registers; no [P, P] buffer is
ever written to global memory.

Layers in this file:
    _gram_tile                  @triton.jit helper: one fp32 [BP, BP] tile of A @ H^T
    _gram_stats_kernel          forward statistics, one program per (j-block, i-block, sample)
    _gram_grad_matmul_kernel    backward product, one program per (Dm-block, i-block, sample)
    gram_stats / gram_grad_matmul                      launchers (validation, allocation, grid)
    (float64 oracles: gram_stats_reference / gram_grad_matmul_reference in kdengine/losses/reference.py)
    GramStatsTriton             autograd.Function (H_s, G_s, H_t, G_t) -> stats, used by
                                kdengine.losses.gram_cosine with impl="triton"

Rows that are masked out must already be zero in both H and A (the caller zeroes them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdengine.kernels.runtime import interpreting
from kdengine.kernels.tuning import configs, fixed_or_tuned


GRAM_BLOCKS = ("BP", "BD", "BDM")
# (blocks, num_warps, num_stages): every entry compiles for sm_80 and sm_90 without register spills
# in fp32 (the path GramStatsTriton takes: A is fp32, so H is upcast) and in bf16 / fp16.
# (ptxas: 0 bytes stack and spill; HMMA / HGMMA / v_mfma in bf16 and fp16; fp32 "ieee" is FFMA on
# sm_80/sm_90).
# The backward product holds an R tile and an output tile: BP = 64 or BDM = 64 spills there.
GRAM_STATS_CONFIGS = configs([
    ({"BP": 32, "BD": 16}, 4, 3),
    ({"BP": 32, "BD": 16}, 4, 4),
    ({"BP": 64, "BD": 16}, 4, 3),
    ({"BP": 64, "BD": 16}, 4, 2),  # BP=64 BD=32 spilled 8 bytes on sm_80 in fp32
])
GRAM_GRAD_CONFIGS = configs([
    ({"BP": 32, "BD": 16, "BDM": 16}, 4, 3),
    ({"BP": 32, "BD": 16, "BDM": 32}, 4, 2),
    ({"BP": 32, "BD": 16, "BDM": 32}, 4, 3),
    ({"BP": 32, "BD": 32, "BDM": 32}, 4, 3),
])
# Small blocks under the interpreter keep the numpy work per program small and still exercise
# every mask on test shapes.
INTERPRET_BLOCKS = {"BP": 16, "BD": 16, "BDM": 16}
MIN_BP = 16  # smallest BP of any config: the forward's partial buffer is sized for it


FIXED_BLOCKS = {"BP": 32, "BD": 16, "BDM": 32}  # on a GPU, for block sizes a caller fixes only in part


def _fixed_blocks(names: tuple[str, ...], **given) -> dict:
    """Block sizes a launch fixes: the caller's (the rest filled in), all of them under the interpreter,
    else none (the autotuner picks)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given and not interpreting():
        return {}
    base = INTERPRET_BLOCKS if interpreting() else FIXED_BLOCKS
    blocks = {n: given.get(n, base[n]) for n in names}
    _check_blocks(blocks["BP"], blocks["BD"], blocks.get("BDM"))
    return blocks


INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _needs_upcast(dtype_a: torch.dtype, dtype_h: torch.dtype) -> bool:
    """True unless both operands share a 16-bit dtype that tl.dot can take natively.

    fp32 (no-op cast), fp64 and mixed pairs go to fp32. bf16 is always upcast under the
    interpreter, whose tl.dot returns garbage on bf16 operands (Triton 3.9).
    """
    if dtype_a != dtype_h:
        return True
    if dtype_a == torch.float16:
        return False
    if dtype_a == torch.bfloat16:
        return interpreting()
    return True


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gram_tile(
    a, h, stride_a_p, stride_h_p, D,
    o_i, o_j, m_i, m_j,
    BP: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile R[o_i, o_j] = A[o_i, :D] @ H[o_j, :D]^T; `a`, `h` point at the sample's row 0."""
    b_r = tl.zeros([BP, BP], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        p_a = a + o_i[:, None] * stride_a_p + o_d[None, :]
        p_h = h + o_j[:, None] * stride_h_p + o_d[None, :]
        b_a = tl.load(p_a, mask=m_i[:, None] & m_d[None, :], other=0.0)
        b_h = tl.load(p_h, mask=m_j[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_h = b_h.to(tl.float32)
        b_r = tl.dot(b_a, tl.trans(b_h), b_r, input_precision=DOT_PRECISION)
    return b_r


@triton.autotune(configs=GRAM_STATS_CONFIGS, key=["P", "Ds", "Dt", "BP", "BD"],
                 prune_configs_by=fixed_or_tuned(GRAM_BLOCKS))
@triton.heuristics({
    "UPCAST_S": lambda args: _needs_upcast(args["a_s"].dtype, args["h_s"].dtype),
    "UPCAST_T": lambda args: _needs_upcast(args["a_t"].dtype, args["h_t"].dtype),
})
@triton.jit
def _gram_stats_kernel(
    a_s, h_s, a_t, h_t, partial,
    P, Ds, Dt, stride_pb,
    stride_as_b, stride_as_p, stride_hs_b, stride_hs_p,
    stride_at_b, stride_at_p, stride_ht_b, stride_ht_p,
    BP: tl.constexpr, BD: tl.constexpr, SYMMETRIC: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """partial[b, i * NB + j] = [sum R_s*R_t, sum R_s^2, sum R_t^2] over tile (i, j) of sample b,
    NB = cdiv(P, BP); partial [B, >= NB^2, 3] has row stride stride_pb.

    SYMMETRIC: only tiles j >= i run (the others keep the zeros the launcher allocated),
    off-diagonal tiles count twice. Dots: bf16/fp16 pairs compile to HMMA (sm_80) / HGMMA (sm_90) /
    v_mfma (gfx942); fp32 (and upcast) operands with DOT_PRECISION="ieee" compile to FFMA on CUDA
    cores on sm_80/sm_90 (no tensor-core instruction) and to v_mfma_f32_*_f32 on gfx942.
    """
    i_j = tl.program_id(0).to(tl.int64)
    i_i = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    if SYMMETRIC:
        if i_j < i_i:
            return

    o_i = i_i * BP + tl.arange(0, BP)
    o_j = i_j * BP + tl.arange(0, BP)
    m_i = o_i < P
    m_j = o_j < P

    b_rs = _gram_tile(a_s + i_b * stride_as_b, h_s + i_b * stride_hs_b, stride_as_p, stride_hs_p, Ds,
                      o_i, o_j, m_i, m_j, BP, BD, UPCAST_S, DOT_PRECISION)
    b_rt = _gram_tile(a_t + i_b * stride_at_b, h_t + i_b * stride_ht_b, stride_at_p, stride_ht_p, Dt,
                      o_i, o_j, m_i, m_j, BP, BD, UPCAST_T, DOT_PRECISION)

    b_st = tl.sum(b_rs * b_rt)
    b_ss = tl.sum(b_rs * b_rs)
    b_tt = tl.sum(b_rt * b_rt)
    if SYMMETRIC:
        if i_j > i_i:
            b_st = b_st * 2.0
            b_ss = b_ss * 2.0
            b_tt = b_tt * 2.0

    p_out = partial + i_b * stride_pb + (i_i * tl.cdiv(P, BP) + i_j) * 3
    tl.store(p_out, b_st)
    tl.store(p_out + 1, b_ss)
    tl.store(p_out + 2, b_tt)


@triton.autotune(configs=GRAM_GRAD_CONFIGS, key=["P", "Ds", "Dt", "Dm", "BP", "BD", "BDM"],
                 prune_configs_by=fixed_or_tuned(GRAM_BLOCKS))
@triton.heuristics({
    "UPCAST_S": lambda args: _needs_upcast(args["a_s"].dtype, args["h_s"].dtype),
    "UPCAST_T": lambda args: _needs_upcast(args["a_t"].dtype, args["h_t"].dtype),
})
@triton.jit
def _gram_grad_matmul_kernel(
    a_s, h_s, a_t, h_t, coef_t, coef_s, m, out,
    P, Ds, Dt, Dm,
    stride_as_b, stride_as_p, stride_hs_b, stride_hs_p,
    stride_at_b, stride_at_p, stride_ht_b, stride_ht_p,
    stride_m_b, stride_m_p, stride_o_b, stride_o_p,
    BP: tl.constexpr, BD: tl.constexpr, BDM: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr, DOT_PRECISION: tl.constexpr, LOWP_M: tl.constexpr,
):
    """out[b, I, K] = sum_J (coef_t[b] R_t[I, J] - coef_s[b] R_s[I, J]) @ m[b, J, K] (fp32 accumulation).

    The (R_t, R_s) combination is fp32. By default the product with m is an fp32 dot: with
    DOT_PRECISION="ieee" FFMA on sm_80/sm_90, v_mfma_f32_*_f32 on gfx942. LOWP_M (bf16 m only):
    the combination is rounded to bf16 and the dot runs on HMMA / HGMMA / v_mfma. The R tiles
    themselves use HMMA / HGMMA / v_mfma for bf16/fp16 A and H.
    """
    i_k = tl.program_id(0).to(tl.int64)
    i_i = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)

    o_i = i_i * BP + tl.arange(0, BP)
    o_k = i_k * BDM + tl.arange(0, BDM)
    m_i = o_i < P
    m_k = o_k < Dm

    b_ct = tl.load(coef_t + i_b)
    b_cs = tl.load(coef_s + i_b)
    p_as = a_s + i_b * stride_as_b
    p_hs = h_s + i_b * stride_hs_b
    p_at = a_t + i_b * stride_at_b
    p_ht = h_t + i_b * stride_ht_b

    b_o = tl.zeros([BP, BDM], dtype=tl.float32)
    for i_j in range(0, tl.cdiv(P, BP)):
        o_j = i_j * BP + tl.arange(0, BP)
        m_j = o_j < P
        b_rs = _gram_tile(p_as, p_hs, stride_as_p, stride_hs_p, Ds, o_i, o_j, m_i, m_j,
                          BP, BD, UPCAST_S, DOT_PRECISION)
        b_rt = _gram_tile(p_at, p_ht, stride_at_p, stride_ht_p, Dt, o_i, o_j, m_i, m_j,
                          BP, BD, UPCAST_T, DOT_PRECISION)
        b_c = b_ct * b_rt - b_cs * b_rs
        p_m = m + i_b * stride_m_b + o_j[:, None] * stride_m_p + o_k[None, :]
        b_m = tl.load(p_m, mask=m_j[:, None] & m_k[None, :], other=0.0)
        if LOWP_M:
            b_o = tl.dot(b_c.to(b_m.dtype), b_m, b_o)
        else:
            b_o = tl.dot(b_c, b_m.to(tl.float32), b_o, input_precision=DOT_PRECISION)

    p_o = out + i_b * stride_o_b + o_i[:, None] * stride_o_p + o_k[None, :]
    tl.store(p_o, b_o, mask=m_i[:, None] & m_k[None, :])


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_gram_inputs(named: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Check a_s, h_s, a_t, h_t (+ optional m): rank 3, floating, shared B/P and device.

    Returns (B, P).
    """
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [B, P, D] (3 dims), got shape {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    ref_name, ref = next(iter(named.items()))
    B, P = ref.shape[:2]
    for name, x in named.items():
        if tuple(x.shape[:2]) != (B, P):
            raise ValueError(
                f"{name} has [B, P] = {tuple(x.shape[:2])} (shape {_shape(x)}), expected "
                f"{(B, P)} from {ref_name} (shape {_shape(ref)})")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device}, expected {ref.device} like {ref_name}")
    for a_name, h_name in (("a_s", "h_s"), ("a_t", "h_t")):
        if named[a_name].shape[2] != named[h_name].shape[2]:
            raise ValueError(
                f"{a_name} and {h_name} must share D, got {a_name} {_shape(named[a_name])} "
                f"and {h_name} {_shape(named[h_name])}")
    if not interpreting() and ref.device.type not in ("cuda", "meta"):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {ref.device}")
    return B, P


def _check_blocks(BP: int, BD: int, BDM: int | None) -> None:
    for name, v in (("BP", BP), ("BD", BD), ("BDM", BDM)):
        if v is None:
            continue
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {v}")


def _check_precision(input_precision: str) -> None:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; B and P strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def gram_stats(
    a_s: torch.Tensor, h_s: torch.Tensor, a_t: torch.Tensor, h_t: torch.Tensor,
    *, symmetric: bool = True, BP: int | None = None, BD: int | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Per-sample statistics of the student and teacher Gram matrices.

    Args:
        a_s, h_s: [B, P, Ds] student A = H @ G and H (any float dtype; computed in fp32).
        a_t, h_t: [B, P, Dt] teacher A and H.
        symmetric: assume R = A @ H^T is symmetric (true when A = H @ G with symmetric
            G = W^T W) and run only the tiles j >= i. Pass False for arbitrary A.
        BP, BD: block sizes (powers of two >= 16); default 64/32 on GPU, 16/16 interpreted.
        input_precision: tl.dot precision for fp32 operands ("ieee" default; "tf32" is
            faster on tensor cores at ~1e-3 relative error).

    Returns:
        Float32 [B, 3]: [sum_ij R_s*R_t, sum_ij R_s^2, sum_ij R_t^2] with
        R_s = a_s[b] @ h_s[b]^T, R_t = a_t[b] @ h_t[b]^T ([P, P], never materialised).
    """
    B, P = _check_gram_inputs({"a_s": a_s, "h_s": h_s, "a_t": a_t, "h_t": h_t})
    _check_precision(input_precision)
    blocks = _fixed_blocks(("BP", "BD"), BP=BP, BD=BD)
    if B == 0 or P == 0:
        return torch.zeros(B, 3, dtype=torch.float32, device=a_s.device)
    a_s, h_s, a_t, h_t = (_rows_contiguous(x) for x in (a_s, h_s, a_t, h_t))
    nb = triton.cdiv(P, min(MIN_BP, blocks.get("BP", MIN_BP)))  # tiles per side at the smallest BP
    partial = torch.zeros(B, nb * nb, 3, dtype=torch.float32, device=a_s.device)
    grid = lambda meta: (triton.cdiv(P, meta["BP"]), triton.cdiv(P, meta["BP"]), B)  # noqa: E731
    _gram_stats_kernel[grid](
        a_s, h_s, a_t, h_t, partial,
        P, a_s.shape[2], a_t.shape[2], partial.stride(0),
        *_strides(a_s), *_strides(h_s), *_strides(a_t), *_strides(h_t),
        SYMMETRIC=bool(symmetric), DOT_PRECISION=input_precision, **blocks,
    )
    # Fixed-order reduction of the partials (unused tiles stay 0): deterministic, no atomics.
    return partial.sum(dim=1, dtype=torch.float64).to(torch.float32)


def gram_grad_matmul(
    a_s: torch.Tensor, h_s: torch.Tensor, a_t: torch.Tensor, h_t: torch.Tensor,
    coef_t: torch.Tensor, coef_s: torch.Tensor, m: torch.Tensor,
    *, BP: int | None = None, BD: int | None = None, BDM: int | None = None,
    input_precision: str = "ieee", lowp_m: bool = False,
) -> torch.Tensor:
    """out[b] = (coef_t[b] * R_t[b] - coef_s[b] * R_s[b]) @ m[b], R tiles recomputed on the fly.

    Args:
        a_s, h_s: [B, P, Ds]; a_t, h_t: [B, P, Dt] (any float dtype; computed in fp32).
        coef_t, coef_s: [B] per-sample scalars (cast to fp32).
        m: [B, P, Dm] right-hand side (any float dtype; cast to fp32 in the kernel).
        BP, BD, BDM: block sizes (powers of two >= 16); default 64/32/64 on GPU, 16/16/16
            interpreted. Each Dm-block recomputes its R tiles, so the R work is repeated
            ceil(Dm / BDM) times: concatenate right-hand sides into one m rather than calling twice.
        input_precision: tl.dot precision for fp32 operands (see `gram_stats`).
        lowp_m: with a bf16 m, round the R combination to bf16 and run its product with m on tensor
            cores (bf16-level error instead of fp32's); ignored for other dtypes and under the interpreter.

    Returns:
        Float32 [B, P, Dm]. R is used as computed (A @ H^T), no symmetry is assumed.
    """
    B, P = _check_gram_inputs({"a_s": a_s, "h_s": h_s, "a_t": a_t, "h_t": h_t, "m": m})
    for name, c in (("coef_t", coef_t), ("coef_s", coef_s)):
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (B,):
            raise ValueError(f"{name} must be a tensor of shape ({B},) (one scalar per sample), got {_shape(c)}")
        if c.device != a_s.device:
            raise ValueError(f"{name} is on {c.device}, expected {a_s.device} like a_s")
    _check_precision(input_precision)
    blocks = _fixed_blocks(GRAM_BLOCKS, BP=BP, BD=BD, BDM=BDM)
    Dm = m.shape[2]
    out = torch.empty(B, P, Dm, dtype=torch.float32, device=a_s.device)
    if out.numel() == 0:
        return out
    a_s, h_s, a_t, h_t, m = (_rows_contiguous(x) for x in (a_s, h_s, a_t, h_t, m))
    coef_t = coef_t.to(torch.float32).contiguous()
    coef_s = coef_s.to(torch.float32).contiguous()
    grid = lambda meta: (triton.cdiv(Dm, meta["BDM"]), triton.cdiv(P, meta["BP"]), B)  # noqa: E731
    _gram_grad_matmul_kernel[grid](
        a_s, h_s, a_t, h_t, coef_t, coef_s, m, out,
        P, a_s.shape[2], a_t.shape[2], Dm,
        *_strides(a_s), *_strides(h_s), *_strides(a_t), *_strides(h_t),
        *_strides(m), *_strides(out),
        DOT_PRECISION=input_precision, LOWP_M=bool(lowp_m) and m.dtype == torch.bfloat16 and not interpreting(),
        **blocks,
    )
    return out


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def _a_dtype(h_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if h_dtype == torch.bfloat16 else torch.float32


def _dot_precision(h_dtype: torch.dtype) -> str:
    """fp16 H: A stays fp32 (fp16's range could overflow) and the fp32 dots run as tf32 on tensor cores;
    tf32 keeps fp16's 10-bit mantissa, so every fp16 value of H is exact and A is rounded as fp16 would
    round it, without the overflow. Everything else: "ieee" (bf16 tiles are native 16-bit dots)."""
    return "tf32" if h_dtype == torch.float16 and not interpreting() else "ieee"


ROW_BLOCK_BYTES = 16 << 20  # a 16-bit H is upcast to fp32 this many bytes of rows at a time


def _row_blocks(h: torch.Tensor):
    """(b, i, j) for every sample b and row range [i, j) of at most ROW_BLOCK_BYTES of fp32 (>= 1 row)."""
    step = max(1, ROW_BLOCK_BYTES // (4 * max(h.shape[2], 1)))
    return ((b, i, min(i + step, h.shape[1])) for b in range(h.shape[0]) for i in range(0, h.shape[1], step))


def _times_gram(h: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A = H G [B, P, D] in ``dtype``, computed in fp32; a non-fp32 H is upcast one row block at a time."""
    g = g.float()
    if h.dtype == torch.float32:
        return (h @ g).to(dtype)
    a = torch.empty(h.shape, dtype=dtype, device=h.device)
    for b, i, j in _row_blocks(h):
        a[b, i:j] = h[b, i:j].float() @ g
    return a


def _gram_of_rows(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sum_b H[b]^T R[b] [D, Dr] in fp32 (R fp32); a non-fp32 H is upcast one row block at a time."""
    if h.dtype == torch.float32:
        return torch.einsum("bpi,bpj->ij", h, r)
    out = torch.zeros(h.shape[2], r.shape[2], dtype=torch.float32, device=h.device)
    for b, i, j in _row_blocks(h):
        out.addmm_(h[b, i:j].float().T, r[b, i:j])
    return out


class GramStatsTriton(torch.autograd.Function):
    """stats [B, 3] = (<R_s, R_t>, |R_s|^2, |R_t|^2) with R = H G H^T, gradients into H_s and G_s.

    forward(h_s [B, P, Ds], g_s [Ds, Ds], h_t [B, P, Dt], g_t [Dt, Dt]) -> Float32 [B, 3].
    G must be symmetric (G = W^T W) and masked rows of H zero. The teacher (h_t, g_t) takes no
    gradient. Backward, with dR_s = g_st R_t + 2 g_ss R_s (symmetric) from grad_stats [B, 3]:
        dH_s = 2 dR_s A_s,  dG_s = sum_b H_s^T dR_s H_s,
    both from one `gram_grad_matmul` over m = [A_s | H_s] (the R tiles are recomputed once).
    A = H G is computed in fp32 and stored in bf16 for bf16 H, so the dots run on tensor cores (A and
    the backward's R combination rounded to bf16). For fp16 H, A stays fp32 (fp16's range could
    overflow) and the dots are tf32 on tensor cores (``_dot_precision``); for fp32 H every dot is fp32
    "ieee" (FFMA).
    """

    @staticmethod
    def forward(ctx, h_s, g_s, h_t, g_t):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise ValueError("GramStatsTriton: h_t / g_t (teacher) must not require grad")
        a_s = _times_gram(h_s, g_s, _a_dtype(h_s.dtype))
        a_t = _times_gram(h_t, g_t, _a_dtype(h_t.dtype))
        stats = gram_stats(a_s, h_s, a_t, h_t, symmetric=True, input_precision=_dot_precision(h_s.dtype))
        ctx.save_for_backward(a_s, h_s, a_t, h_t)
        ctx.g_dtype = g_s.dtype
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        a_s, h_s, a_t, h_t = ctx.saved_tensors
        need_h, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_g):
            return None, None, None, None
        grad_stats = grad_stats.float()
        coef_t = grad_stats[:, 0].contiguous()
        coef_s = (-2.0 * grad_stats[:, 1]).contiguous()
        parts = ([a_s] if need_h else []) + ([h_s] if need_g else [])
        m = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        out = gram_grad_matmul(a_s, h_s, a_t, h_t, coef_t, coef_s, m, lowp_m=True,  # dR_s @ m
                               input_precision=_dot_precision(h_s.dtype))
        ds = a_s.shape[2]
        grad_h = (2.0 * out[..., :ds]).to(h_s.dtype) if need_h else None
        grad_g = None
        if need_g:
            dr_h = out[..., -ds:]
            grad_g = _gram_of_rows(h_s, dr_h).to(ctx.g_dtype)
        return grad_h, grad_g, None, None
