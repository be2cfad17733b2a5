"""RDist: 1 - cosine between teacher and student Gram matrices of visual-token logits.

For sample b with valid visual rows H_b [P, D] and logits Z_b = H_b W^T [P, V] (first
min(V, Vt) vocabulary rows; raw logits: no temperature, no softmax), R_b = Z_b Z_b^T.
Since R_b = H_b (W^T W) H_b^T, everything runs through the D x D matrix G = W^T W, which is cached
for frozen weights (the teacher always, the student in DPT): the per-step cost is then
independent of V and [B, P, V] never exists. G is fp32 (float64 for float64 weights) and is formed
without an fp32 copy of a 16-bit W: row blocks of 16 MB are upcast in turn (or, on CUDA, one GEMM
with fp32 output); a trainable W is saved as is and dW = W (dG + dG^T) is one GEMM (``weight_gram``).

Every impl produces the per-sample statistics S [B, 3] = (<R_s, R_t>, |R_s|^2, |R_t|^2);
``loss_from_stats`` turns them into the loss, so the reductions are written once:
    batch:  1 - sum_b <R_s,R_t> / (sqrt(sum_b |R_s|^2) sqrt(sum_b |R_t|^2))  (one cosine over all
            samples' flattened Gram matrices, as the public LLaVA-KD code does)
    sample: mean over samples with >= 1 valid row of (1 - cos_b)
Samples with no valid row contribute nothing; with none at all the loss is 0 (zero gradients).

Impls behind ``impl=`` (this file holds the API, the G cache and the loss from statistics):
    reference  materialises Z [B, P, V] and R [B, P, P] (oracle, naive baseline; reference.py)
    torch      autograd over the P x P form (R = (H G) H^T, P <= D) or the D x D form
               (<R_s,R_t> = tr(G_s C G_t C^T), C = H_s^T H_t; P > D): no [P, V] anywhere
               (gram_cosine_torch.py)
    triton     blocked kernels (kdengine.kernels.gram_cosine): R tiles recomputed from A = H G and H,
               neither [P, V] nor [P, P] in memory (long visual sequences, video)
"""

from __future__ import annotations

import weakref

import torch
from torch.autograd.function import once_differentiable

from kdengine.losses.checks import GRAM_REDUCTIONS, IMPLS, check_choice, check_devices_dtypes_frozen_teacher, resolve_impl
from kdengine.losses.gram_cosine_torch import gram_stats_torch
from kdengine.losses.reference import gram_cosine_stats_reference

_GRAM_CACHE: list = []  # (weakref to weight, version, rows, G), most recent last
_GRAM_CACHE_SIZE = 4


def validate_gram_args(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, reduction, impl):
    """Raise ValueError naming the argument, its shape and what was expected."""
    for name, x, nd in (("student_hidden", student_hidden, 3), ("student_weight", student_weight, 2),
                        ("teacher_hidden", teacher_hidden, 3), ("teacher_weight", teacher_weight, 2)):
        if not isinstance(x, torch.Tensor) or x.dim() != nd or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {shape}; expected a floating tensor with {nd} dims")
    b, p, ds = student_hidden.shape
    if teacher_hidden.shape[:2] != (b, p):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                         f"{tuple(student_hidden.shape)} must agree on [B, P]")
    if student_weight.shape[1] != ds:
        raise ValueError(f"student hidden size mismatch: student_hidden {tuple(student_hidden.shape)} "
                         f"vs student_weight {tuple(student_weight.shape)} (expected [B, P, Ds] and [V, Ds])")
    if teacher_weight.shape[1] != teacher_hidden.shape[2]:
        raise ValueError(f"teacher hidden size mismatch: teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"vs teacher_weight {tuple(teacher_weight.shape)} (expected [B, P, Dt] and [Vt, Dt])")
    check_devices_dtypes_frozen_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight)
    dev = student_hidden.device
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (b, p) or mask.dtype != torch.bool:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask has shape {shape}; expected a bool tensor [B, P] = ({b}, {p})")
        if mask.device != dev:
            raise ValueError(f"mask is on {mask.device} but student_hidden is on {dev}")
    check_choice("reduction", reduction, GRAM_REDUCTIONS)
    check_choice("impl", impl, IMPLS)


BLOCK_BYTES = 16 << 20  # a 16-bit weight is upcast to fp32 this many bytes of rows at a time (G: one such
# temporary live; dW: two, the upcast block and its product)


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype G = W^T W is computed and returned in: float64 for float64 weights, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(rows: int, cols: int):
    """Row ranges [i, j) of at most BLOCK_BYTES of fp32 each (at least one row)."""
    step = max(1, BLOCK_BYTES // (4 * max(cols, 1)))
    return ((i, min(i + step, rows)) for i in range(0, rows, step))


def _gram(w: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """w^T w [D, D] in ``gram_dtype(w.dtype)``, with no copy of the whole of a 16-bit ``w``.

    fp32 / float64: one GEMM on w itself. bf16 / fp16: the products are exact in fp32 and sum in fp32,
    by one GEMM with fp32 output on CUDA (``torch.mm(..., out_dtype=torch.float32)``; ``fused``) or,
    where that is missing (CPU), by fp32 GEMMs over row blocks of BLOCK_BYTES accumulated into G.
    """
    dtype = gram_dtype(w.dtype)
    if w.dtype == dtype:
        return w.T @ w
    if fused is None:
        fused = w.device.type == "cuda"
    if fused:
        try:
            return torch.mm(w.T, w, out_dtype=dtype)
        except (NotImplementedError, RuntimeError):  # no fp32-output kernel for this dtype / device
            pass
    g = w.new_zeros(w.shape[1], w.shape[1], dtype=dtype)
    for i, j in _row_blocks(w.shape[0], w.shape[1]):
        b = w[i:j].to(dtype)
        g.addmm_(b.T, b)
        del b  # freed before the next block is upcast
    return g


def _gram_weight_grad(weight: torch.Tensor, rows: int, s: torch.Tensor) -> torch.Tensor:
    """dW = W[:rows] S (S = dG + dG^T) in the weight's dtype and shape, rows past ``rows`` zero: one GEMM,
    over row blocks for a 16-bit weight (each block upcast, multiplied in fp32, written in the weight's dtype)."""
    grad = weight.new_empty(weight.shape) if rows == weight.shape[0] else weight.new_zeros(weight.shape)
    if weight.dtype == s.dtype:
        torch.mm(weight[:rows], s, out=grad[:rows])
        return grad
    for i, j in _row_blocks(rows, weight.shape[1]):
        grad[i:j] = weight[i:j].to(s.dtype) @ s
    return grad


class _WeightGram(torch.autograd.Function):
    """G = W[:rows]^T W[:rows] of a trainable weight. Saves W itself (no upcast copy) and computes
    dW = W (dG + dG^T) as one GEMM in backward."""

    @staticmethod
    def forward(ctx, weight, rows):
        ctx.save_for_backward(weight)
        ctx.rows = rows
        return _gram(weight[:rows])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_g = grad_g.to(gram_dtype(weight.dtype))
        return _gram_weight_grad(weight, ctx.rows, grad_g + grad_g.T), None


def weight_gram(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """G = W[:rows]^T W[:rows], [D, D], in fp32 (float64 for a float64 weight), never upcasting the whole weight.

    A weight that requires grad goes through ``_WeightGram`` (hand-written backward, W saved as is).
    Frozen weights are cached: an entry holds a weak reference to the tensor object and its
    ``_version``, so an in-place update, or a new tensor that reuses the storage address, misses.
    """
    if weight.requires_grad:
        return _WeightGram.apply(weight, rows)
    for i, (ref, version, n, g) in enumerate(_GRAM_CACHE):
        if ref() is weight and version == weight._version and n == rows:
            _GRAM_CACHE.append(_GRAM_CACHE.pop(i))
            return g
    g = _gram(weight[:rows])
    _GRAM_CACHE.append((weakref.ref(weight), weight._version, rows, g))
    del _GRAM_CACHE[:-_GRAM_CACHE_SIZE]
    return g


def loss_from_stats(stats: torch.Tensor, has_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """stats [B, 3] = (<R_s,R_t>, |R_s|^2, |R_t|^2); has_rows [B] bool -> scalar loss (float64 math)."""
    st = stats.double()
    tiny = torch.finfo(torch.float64).tiny
    if reduction == "batch":
        st = st.sum(0, keepdim=True)
        has_rows = has_rows.any(0, keepdim=True)
    # rows without data get a dummy denominator of 1 (not sqrt(0): its gradient is inf) and weight 0
    st = torch.where(has_rows[:, None], st, 1.0)
    dot, ns, nt = st.unbind(-1)
    per = torch.where(has_rows, 1.0 - dot / (ns.sqrt() * nt.sqrt()).clamp_min(tiny), 0.0)
    return per.sum() / has_rows.sum().clamp_min(1)


def gram_cosine_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batch",
    impl: str = "auto",
) -> torch.Tensor:
    """RDist loss, a scalar. Every argument after the four tensors is keyword-only.

    Args:
        student_hidden: [B, P, Ds] hidden states at visual positions.
        student_weight: [V, Ds] student lm_head weight (gradients flow when it requires grad).
        teacher_hidden: [B, P, Dt], no grad.
        teacher_weight: [Vt, Dt], no grad.
        mask: optional [B, P] bool, valid visual rows per sample.
        reduction: batch | sample (see module docstring).
        impl: auto (triton on CUDA, torch elsewhere) | triton | torch | reference.
    """
    validate_gram_args(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, reduction, impl)
    impl = resolve_impl(impl, student_hidden.device)
    vc = min(student_weight.shape[0], teacher_weight.shape[0])
    if mask is None:
        has_rows = torch.full(student_hidden.shape[:1], student_hidden.shape[1] > 0, device=student_hidden.device)
        hs, ht = student_hidden, teacher_hidden
    else:  # masked rows are zeroed: they then add nothing to any Gram entry
        has_rows = mask.any(1)
        hs = student_hidden * mask[..., None]
        ht = teacher_hidden * mask[..., None]
    if impl == "reference":
        stats = gram_cosine_stats_reference(hs, student_weight, ht, teacher_weight, vc)
    else:
        gs = weight_gram(student_weight, vc)
        gt = weight_gram(teacher_weight, vc)
        if impl == "torch":
            stats = gram_stats_torch(hs.to(gs.dtype), gs, ht.to(gt.dtype), gt)  # fp32 (float64 for float64)
        else:
            from kdengine.kernels.gram_cosine import GramStatsTriton

            stats = GramStatsTriton.apply(hs, gs, ht, gt)  # 16-bit H stays 16-bit: tensor-core tiles
    return loss_from_stats(stats, has_rows, reduction).to(student_hidden.dtype)
