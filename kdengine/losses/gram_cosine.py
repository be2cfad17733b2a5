"""RDist: 1 - cosine between teacher and student Gram matrices of visual-token logits.

For sample b with valid visual rows H_b [P, D] and logits Z_b = H_b W^T [P, V] (first
min(V, Vt) vocabulary rows; raw logits: no temperature, no softmax), R_b = Z_b Z_b^T.
Since R_b = H_b (W^T W) H_b^T, everything runs through the D x D matrix G = W^T W, which is cached
for frozen weights (the teacher always, the student in DPT): the per-step cost is then
independent of V and [B, P, V] never exists.

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


def weight_gram(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """G = W[:rows]^T W[:rows] in fp32, [D, D].

    Frozen weights are cached: an entry holds a weak reference to the tensor object and its
    ``_version``, so an in-place update, or a new tensor that reuses the storage address, misses.
    """
    if weight.requires_grad:
        w = weight[:rows].float()
        return w.T @ w
    for i, (ref, version, n, g) in enumerate(_GRAM_CACHE):
        if ref() is weight and version == weight._version and n == rows:
            _GRAM_CACHE.append(_GRAM_CACHE.pop(i))
            return g
    w = weight[:rows].float()
    g = w.T @ w
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
            stats = gram_stats_torch(hs.float(), gs, ht.float(), gt)
        else:
            from kdengine.kernels.gram_cosine import GramStatsTriton

            stats = GramStatsTriton.apply(hs, gs, ht, gt)  # 16-bit H stays 16-bit: tensor-core tiles
    return loss_from_stats(stats, has_rows, reduction).to(student_hidden.dtype)
