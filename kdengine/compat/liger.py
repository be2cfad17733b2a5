"""Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` on kdengine's fused op.

Switching is one import line::

    # from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from kdengine.compat import LigerFusedLinearJSDLoss

Same constructor, same ``forward``, same value (checked against liger-kernel 0.8.5 in
tests/test_compat_liger.py). Liger's conventions, kept:

* ``loss = weight_hard_loss * CE + weight_soft_loss * soft``; CE at temperature 1 over the full
  student vocabulary; both divided by the number of rows whose label is not ``ignore_index``
  (at least 1), and ignored rows are left out of the soft loss too.
* ``beta`` in [0, 1]: 0 is forward KL(p_t || p_s), 1 is reverse KL(p_s || p_t), in between the
  generalised JSD ``beta KL(p_t||m) + (1-beta) KL(p_s||m)``, ``m = beta p_t + (1-beta) p_s``
  (kdengine's ``jsd``). The endpoints are not the limits of the interior: JSD -> 0 as beta -> 0 or 1.
* Logits are divided by ``temperature``; no T^2 factor.
* The teacher gets no gradient (its tensors are detached, as Liger runs it under no_grad).

Deliberate differences (documented in the README section "Coming from Liger or TRL"):

* V != Vt: kdengine compares the first min(V, Vt) entries, both renormalised there. Liger pads
  the student with zero logits when the teacher's vocabulary is larger (the student is charged
  for mass on tokens it does not have) and raises when the student's is larger.
* Bad input raises ``ValueError`` naming the argument (Liger: ``math domain error`` for a beta
  outside [0, 1], shape errors from deep inside for a wrong bias or label length; it accepts a
  negative temperature).
* ``compiled`` and ``chunk_size`` are accepted and unused: the torch path sizes its row chunks or
  blocks by its memory budget (``budget_mb``, env ``KDENGINE_LOSS_BUDGET_MB``), the Triton path by
  its tile sizes.
* The loss is a float32 tensor for 16-bit and float32 inputs (as Liger's), float64 for float64 inputs.
  For 16-bit inputs its value has been rounded to the input dtype by the core op (Liger: fp32);
  the gradients come from fp32 statistics.
"""

from __future__ import annotations

import math

import torch

from kdengine.losses import fused_linear_divergence


def liger_divergence(beta: float) -> tuple[str, float | None]:
    """Liger/TRL ``beta`` in [0, 1] -> (kdengine divergence, kdengine beta: None for forward_kl and
    reverse_kl, which take none)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta={beta!r}; expected a number in [0, 1] (0 = forward KL, 1 = reverse KL, "
                         f"in between the generalised JSD)")
    beta = float(beta)
    if beta == 0.0:
        return "forward_kl", None
    if beta == 1.0:
        return "reverse_kl", None
    return "jsd", beta


def _check_scalar(name: str, value, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (positive and float(value) <= 0.0):
        raise ValueError(f"{name}={value!r}; expected a finite number{' > 0' if positive else ''}")
    return float(value)


def _check_bias(name: str, bias, vocab: int, weight_name: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (vocab,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name} has shape {shape}; expected [{vocab}] to match {weight_name} rows")


def paired_rows(student_name: str, student, teacher_name: str, teacher) -> tuple[int, ...]:
    """Leading dims shared by [..., H] student and [..., Ht] teacher rows, or ValueError naming them."""
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {shape}; expected [N, H] or [B, T, H]")
    rows = tuple(student.shape[:-1])
    if tuple(teacher.shape[:-1]) != rows:
        raise ValueError(f"{teacher_name} has shape {tuple(teacher.shape)}; expected leading dims {rows} "
                         f"as {student_name} {tuple(student.shape)}")
    return rows


def _flatten_rows(student_input, teacher_input, true_labels):
    """[..., H] inputs and [...] labels (Liger accepts [B*T, H] and [B, T, H]) -> 2D rows, 1D labels."""
    rows = paired_rows("student_input", student_input, "teacher_input", teacher_input)
    if not isinstance(true_labels, torch.Tensor) or true_labels.shape not in (rows, (math.prod(rows),)):
        shape = tuple(true_labels.shape) if isinstance(true_labels, torch.Tensor) else type(true_labels).__name__
        raise ValueError(f"true_labels has shape {shape}; expected {rows} (one label per student_input row)")
    if true_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"true_labels has dtype {true_labels.dtype}; expected torch.int64")
    return (student_input.reshape(-1, student_input.shape[-1]), teacher_input.reshape(-1, teacher_input.shape[-1]),
            true_labels.reshape(-1))


def fused_linear_jsd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    true_labels: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    weight_hard_loss: float = 0.5,
    weight_soft_loss: float = 0.5,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_soft_hard_loss: bool = False,
    impl: str = "auto",
):
    """Liger's fused linear JSD loss, computed by ``kdengine.losses.fused_linear_divergence``.

    Args:
        student_input: [N, H] or [B, T, H]; student_weight: [V, H]; student_bias: [V] or None.
        teacher_input: [N, Ht] or [B, T, Ht]; teacher_weight: [Vt, Ht]; teacher_bias: [Vt] or None.
        true_labels: [N] or [B, T] int64 targets in [0, V) or ``ignore_index``.
        impl: kdengine backend (auto | triton | torch | reference), not in Liger's signature.
    Returns:
        scalar loss, or (loss, soft_loss, hard_loss) when ``return_soft_hard_loss``.
    """
    divergence, kd_beta = liger_divergence(beta)
    w_hard = _check_scalar("weight_hard_loss", weight_hard_loss)
    w_soft = _check_scalar("weight_soft_loss", weight_soft_loss)
    temperature = _check_scalar("temperature", temperature, positive=True)
    x, xt, labels = _flatten_rows(student_input, teacher_input, true_labels)
    for name, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{name} has shape {shape}; expected [vocab, hidden]")
    _check_bias("student_bias", student_bias, student_weight.shape[0], "student_weight")
    _check_bias("teacher_bias", teacher_bias, teacher_weight.shape[0], "teacher_weight")

    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)
    need_ce = w_hard != 0.0 or return_soft_hard_loss
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    # the mean over valid rows as row weights and the CE's share of the loss as ce_weight: the torch
    # path's row-chunk schedule then forms the gradient of w_hard hard + w_soft soft in its forward
    out = fused_linear_divergence(
        x, student_weight, xt.detach(), teacher_weight.detach(), divergence=divergence, beta=kd_beta,
        temperature=temperature, weight=valid.to(out_dtype) / n_valid, labels=labels if need_ce else None,
        ignore_index=ignore_index, reduction="sum", impl=impl, student_bias=student_bias,
        teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
        ce_weight=w_hard / w_soft if w_soft != 0.0 else 1.0,
    )
    soft, hard = out if need_ce else (out, None)
    soft = soft.to(out_dtype)
    hard = hard.to(out_dtype) if hard is not None else torch.zeros((), dtype=out_dtype, device=x.device)
    loss = w_hard * hard + w_soft * soft
    return (loss, soft, hard) if return_soft_hard_loss else loss


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` with kdengine's fused op underneath.

    Constructor and ``forward`` are Liger's; ``impl`` is kdengine's only addition (keyword).
    ``compiled`` and ``chunk_size`` are accepted for signature compatibility and unused.
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        liger_divergence(beta)
        _check_scalar("weight_hard_loss", weight_hard_loss)
        _check_scalar("weight_soft_loss", weight_soft_loss)
        _check_scalar("temperature", temperature, positive=True)
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.impl = impl

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.LongTensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        """Shapes as in :func:`fused_linear_jsd`; returns the loss (or loss, soft, hard)."""
        return fused_linear_jsd(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
            teacher_bias, self.weight_hard_loss, self.weight_soft_loss, self.beta, self.ignore_index,
            self.temperature, self.return_soft_hard_loss, self.impl,
        )
