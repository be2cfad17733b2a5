"""Float64 references of the alignment losses (``feature_loss``, ``affinity_loss``, ``affinity_loss_batched``).

Plain code written straight from the definitions, row by row and sample by sample, with every matrix
materialised: the test oracles. They always compute and return float64 and do not check their arguments.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # the same norm clamp as the ops (NORM_EPS)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((x * x).sum(-1))


def feature_loss_reference(projected_student, teacher, *, metric="cosine", weight=None, reduction="mean"):
    """One row at a time: 1 - <s, t> / (max(|s|, eps) max(|t|, eps)) or mean((s - t)^2); then the reduction."""
    s, t = projected_student.double(), teacher.double()
    rows = []
    for i in range(s.shape[0]):
        if metric == "cosine":
            cos = (s[i] * t[i]).sum() / (torch.clamp(_norm(s[i]), min=EPS) * torch.clamp(_norm(t[i]), min=EPS))
            rows.append(1.0 - cos)
        else:
            rows.append(((s[i] - t[i]) ** 2).mean())
    rows = torch.stack(rows) if rows else s.new_zeros(0) + 0 * s.sum()
    w = torch.ones_like(rows) if weight is None else weight.detach().double()
    if reduction == "none":
        return rows * w
    if reduction == "sum":
        return (rows * w).sum()
    if float(w.sum()) == 0.0:
        return (rows * 0).sum()
    return (rows * w).sum() / w.sum()


def affinity_matrix_reference(resp, vis, temperature):
    """S [T, P]: S[i, j] = cos(resp_i, vis_j) / temperature, each norm clamped below at eps."""
    r = resp.double() / torch.clamp(_norm(resp.double()), min=EPS)[:, None]
    v = vis.double() / torch.clamp(_norm(vis.double()), min=EPS)[:, None]
    return (r @ v.T) / temperature


def affinity_loss_reference(student_resp, student_vis, teacher_resp, teacher_vis, *, metric="kl", temperature=0.1):
    """Materialised S_s, S_t [T, P]; kl = mean over rows of sum_j p_t (log p_t - log p_s), mse = mean of squares."""
    t, p = student_resp.shape[0], student_vis.shape[0]
    zero = 0 * (student_resp.double().sum() + student_vis.double().sum())  # 0, connected to the inputs' graph
    if t == 0 or p == 0:
        return zero
    s_s = affinity_matrix_reference(student_resp, student_vis, temperature)
    s_t = affinity_matrix_reference(teacher_resp, teacher_vis, temperature)
    if metric == "mse":
        return ((s_s - s_t) ** 2).mean()
    log_p_s = torch.log_softmax(s_s, dim=-1)
    log_p_t = torch.log_softmax(s_t, dim=-1)
    kl_rows = []
    for i in range(t):
        p_t = log_p_t[i].exp()
        kl_rows.append(torch.where(p_t > 0, p_t * (log_p_t[i] - log_p_s[i]), 0.0).sum())
    return torch.stack(kl_rows).mean() + zero


def affinity_loss_batched_reference(student_hidden, teacher_hidden, resp_mask, vis_mask, *, metric="kl",
                                    temperature=0.1):
    """One sample at a time (boolean indexing): (mean over samples with both kinds of rows, their count)."""
    total = 0 * student_hidden.double().sum()
    count = 0
    for b in range(student_hidden.shape[0]):
        r, v = resp_mask[b], vis_mask[b]
        if not bool(r.any()) or not bool(v.any()):
            continue
        total = total + affinity_loss_reference(student_hidden[b][r], student_hidden[b][v], teacher_hidden[b][r],
                                                teacher_hidden[b][v], metric=metric, temperature=temperature)
        count += 1
    return total / max(count, 1), count
