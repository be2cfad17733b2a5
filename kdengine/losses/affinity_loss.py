"""Visual-text affinity (LLaVADI's affinity-aware distillation): relations of response rows to visual rows.

For one sample and each model, with rows L2-normalised (norms clamped below at NORM_EPS = 1e-8, so a
zero row stays a zero row and gives affinities 0):
    S = normalize(H_resp) normalize(H_vis)^T / temperature          [T, P], the same shape for both models
    kl   mean over the T response rows of KL(softmax(S_t) || softmax(S_s))   (softmax over the P visual rows)
    mse  mean over the T * P entries of (S_s - S_t)^2
A sample without response rows or without visual rows has loss 0. No projector is needed (S does not
depend on the hidden size). Memory is O((T + P) D + T P) per sample.

The batched form compacts each sample's response and visual rows into [B, T_max, D] and [B, P_max, D]
(a device sync for each of T_max and P_max), so its memory is O(B (T_max + P_max) D + B T_max P_max), never
[B, S, S]. It averages over the samples that have both kinds of rows and can return that count.
"""

from __future__ import annotations

import math

import torch

from kdengine.losses.checks import check_choice, check_tensor
from kdengine.losses.feature_loss import NORM_EPS, check_frozen, compute_dtype

AFFINITY_METRICS = ("kl", "mse")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}; expected a finite number > 0")


def _check_pair(student, teacher, s_name, t_name, what) -> None:
    if student.device != teacher.device:
        raise ValueError(f"{t_name} is on {teacher.device} but {s_name} is on {student.device}")
    if student.dtype != teacher.dtype:
        raise ValueError(f"{t_name} has dtype {teacher.dtype} but {s_name} has {student.dtype}; cast them to one dtype")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"{t_name} has shape {tuple(teacher.shape)} but {s_name} has {tuple(student.shape)}; "
                         f"expected the same {what}")
    check_frozen(t_name, teacher)


def validate_affinity_args(student_resp, student_vis, teacher_resp, teacher_vis, metric, temperature) -> None:
    """Raise ValueError naming the argument, its shape or value and what was expected."""
    for name, x in (("student_resp", student_resp), ("student_vis", student_vis),
                    ("teacher_resp", teacher_resp), ("teacher_vis", teacher_vis)):
        check_tensor(name, x, 2)
    for resp, vis, r_name, v_name in ((student_resp, student_vis, "student_resp", "student_vis"),
                                      (teacher_resp, teacher_vis, "teacher_resp", "teacher_vis")):
        if resp.shape[1] != vis.shape[1]:
            raise ValueError(f"{v_name} has shape {tuple(vis.shape)} but {r_name} has {tuple(resp.shape)}; "
                             f"expected one hidden size per model")
        if resp.device != vis.device or resp.dtype != vis.dtype:
            raise ValueError(f"{v_name} ({vis.dtype} on {vis.device}) and {r_name} ({resp.dtype} on {resp.device}) "
                             f"must share dtype and device")
    _check_pair(student_resp, teacher_resp, "student_resp", "teacher_resp", "number of response rows T")
    _check_pair(student_vis, teacher_vis, "student_vis", "teacher_vis", "number of visual rows P")
    check_choice("metric", metric, AFFINITY_METRICS)
    check_temperature(temperature)


def validate_batched_args(student_hidden, teacher_hidden, resp_mask, vis_mask, metric, temperature) -> None:
    check_tensor("student_hidden", student_hidden, 3)
    check_tensor("teacher_hidden", teacher_hidden, 3)
    _check_pair(student_hidden, teacher_hidden, "student_hidden", "teacher_hidden", "[B, S]")
    b, s = student_hidden.shape[:2]
    for name, m in (("resp_mask", resp_mask), ("vis_mask", vis_mask)):
        if not isinstance(m, torch.Tensor) or m.shape != (b, s) or m.dtype != torch.bool:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name} has shape {shape}; expected a bool tensor [B, S] = ({b}, {s})")
        if m.device != student_hidden.device:
            raise ValueError(f"{name} is on {m.device} but student_hidden is on {student_hidden.device}")
    check_choice("metric", metric, AFFINITY_METRICS)
    check_temperature(temperature)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def affinity_per_sample(sr, sv, tr, tv, row_valid, col_valid, metric, temperature):
    """Per-sample losses [B] of compute-dtype padded rows sr [B, T, Ds], sv [B, P, Ds], tr [B, T, Dt],
    tv [B, P, Dt] with row_valid [B, T] and col_valid [B, P] marking the real rows; 0 for a sample
    without a valid response or visual row. Padding never makes NaN, in the forward or the backward."""
    n_rows = row_valid.sum(1)
    n_cols = col_valid.sum(1)
    has = (n_rows > 0) & (n_cols > 0)
    s_s = _normalize(sr) @ _normalize(sv).transpose(1, 2) / temperature  # [B, T, P]
    s_t = _normalize(tr) @ _normalize(tv).transpose(1, 2) / temperature
    cols = col_valid[:, None, :]
    if metric == "kl":
        # padded columns get probability 0; a sample with no valid column keeps all (finite, then weighted 0)
        keep = cols | ~has[:, None, None]
        log_s = torch.log_softmax(s_s.masked_fill(~keep, -math.inf), -1)
        log_t = torch.log_softmax(s_t.masked_fill(~keep, -math.inf), -1)
        p_t = log_t.exp()
        kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)     # [B, T]
        total = torch.where(row_valid, kl, 0.0).sum(1)
        count = n_rows
    else:
        d = torch.where(row_valid[:, :, None] & cols, s_s - s_t, 0.0)
        total = (d * d).sum((1, 2))
        count = n_rows * n_cols
    return torch.where(has, total / count.clamp_min(1).to(total.dtype), 0.0), has


def affinity_loss(
    student_resp: torch.Tensor,
    student_vis: torch.Tensor,
    teacher_resp: torch.Tensor,
    teacher_vis: torch.Tensor,
    *,
    metric: str = "kl",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Affinity loss of one sample (see the module docstring). Options are keyword-only.

    Args:
        student_resp: [T, Ds] the student's hidden states at response positions (gradients flow).
        student_vis: [P, Ds] the student's hidden states at visual positions (gradients flow).
        teacher_resp: [T, Dt], teacher_vis: [P, Dt], the teacher's rows: same dtype and device, no grad.
        metric: kl (mean over response rows of KL(softmax(S_t) || softmax(S_s))) | mse (mean over entries).
        temperature: > 0, divides the cosine affinities.
    Returns:
        A scalar in the input dtype, computed in fp32 (float64 for float64 inputs); 0 (zero gradients)
        when T == 0 or P == 0.
    """
    validate_affinity_args(student_resp, student_vis, teacher_resp, teacher_vis, metric, temperature)
    dtype = compute_dtype(student_resp)
    t, p = student_resp.shape[0], student_vis.shape[0]
    dev = student_resp.device
    per, _ = affinity_per_sample(
        student_resp.to(dtype)[None], student_vis.to(dtype)[None], teacher_resp.to(dtype)[None],
        teacher_vis.to(dtype)[None], torch.ones(1, t, dtype=torch.bool, device=dev),
        torch.ones(1, p, dtype=torch.bool, device=dev), metric, temperature)
    return per[0].to(student_resp.dtype)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``mask`` [B, S], moved to the front in order: (index [B, K], valid [B, K]), K the largest
    count (one device sync); the padding indices point at other rows and are marked invalid."""
    counts = mask.sum(1)
    k = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return order, torch.arange(k, device=mask.device)[None, :] < counts[:, None]


def _rows(hidden: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """hidden [B, S, D] at index [B, K] -> [B, K, D] in ``dtype``."""
    return torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[2])).to(dtype)


def affinity_loss_batched(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    resp_mask: torch.Tensor,
    vis_mask: torch.Tensor,
    *,
    metric: str = "kl",
    temperature: float = 0.1,
    return_count: bool = False,
):
    """Affinity loss of a batch: the mean over the samples that have both response and visual rows.

    Args:
        student_hidden: [B, S, Ds] (gradients flow); teacher_hidden: [B, S, Dt], same dtype and device, no grad.
        resp_mask, vis_mask: [B, S] bool, each sample's response and visual positions.
        metric, temperature: as in ``affinity_loss``.
        return_count: also return the number of samples averaged over.
    Returns:
        The loss (input dtype; 0 with zero gradients when no sample has both kinds of rows). Samples
        without them add 0 to the sum and are left out of the mean. With ``return_count``:
        (loss, count), count a 0-dim int64 tensor on the input's device (no sync), e.g. to weight
        the term across micro-batches or ranks as loss * count / total count.
    """
    validate_batched_args(student_hidden, teacher_hidden, resp_mask, vis_mask, metric, temperature)
    dtype = compute_dtype(student_hidden)
    resp, row_valid = _compact(resp_mask)
    vis, col_valid = _compact(vis_mask)
    per, has = affinity_per_sample(_rows(student_hidden, resp, dtype), _rows(student_hidden, vis, dtype),
                                   _rows(teacher_hidden, resp, dtype), _rows(teacher_hidden, vis, dtype),
                                   row_valid, col_valid, metric, temperature)
    count = has.sum()
    loss = (per.sum() / count.clamp_min(1).to(per.dtype)).to(student_hidden.dtype)
    return (loss, count) if return_count else loss
