"""Plain PyTorch references of every loss op: they materialise the logits (and Gram matrices).

They are the test oracles (run in float64), the CPU path of last resort (``impl="reference"``) and
the generic materialising baseline of the benchmarks. Each computes in fp32, or in float64 when
given float64, and follows the same contract as the op it mirrors.
"""

from __future__ import annotations

import math

import torch

from kdengine.losses.checks import IGNORE_INDEX
from kdengine.losses.divergences import DIVERGENCES, reduce_rows, resolve_beta, teacher_log_ratio


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  rows: int | None = None) -> torch.Tensor:
    """hidden [N, D] @ weight[:rows]^T (+ bias[:rows]) in the compute dtype: [N, rows]."""
    rows = weight.shape[0] if rows is None else rows
    z = (hidden @ weight[:rows].T).to(_compute_dtype(hidden))
    return z if bias is None else z + bias[:rows].to(z.dtype)


# ----------------------------------------------------------------------------------------------
# fused_linear_divergence
# ----------------------------------------------------------------------------------------------
def fused_linear_divergence_reference(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *, divergence="forward_kl", beta=None,
    temperature=1.0, weight=None, labels=None, ignore_index=IGNORE_INDEX, reduction="mean",
    student_bias=None, teacher_bias=None,
):
    """Full [N, V] logits. Same contract as ``kdengine.losses.fused_linear_divergence`` (options keyword-only,
    beta None: 0.5 for the divergences that mix, a ValueError with the others)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    beta = resolve_beta(divergence, beta)
    vc = min(student_weight.shape[0], teacher_weight.shape[0])
    zs_full = linear_logits(student_hidden, student_weight, student_bias)
    zt = linear_logits(teacher_hidden, teacher_weight, teacher_bias, vc)
    s = torch.log_softmax(zs_full[:, :vc] / temperature, dim=-1)
    t = torch.log_softmax(zt / temperature, dim=-1)
    rows = divergence_rows_reference(s, t, divergence, beta)
    return finish_reference(rows, zs_full, weight, labels, ignore_index, reduction, student_hidden.dtype)


def finish_reference(rows, z, weight, labels, ignore_index, reduction, dtype):
    """Row losses [N] and the student's full logits z [N, V] -> div, or (div, mean CE over valid rows)."""
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    div = reduce_rows(rows, reduction).to(dtype)
    if labels is None:
        return div
    ce = torch.nn.functional.cross_entropy(z, labels.long(), ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum().clamp_min(1)
    return div, (ce / n_valid).to(dtype)


def divergence_rows_reference(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Row divergences [N] from log-probabilities s (student), t (teacher; may hold -inf) [N, V].

    Log-ratios are taken in log space and exact for every finite teacher entry; a term weighted by
    a zero probability is exactly 0; masked (-inf) teacher entries enter the reverse log-ratios as
    LOG_FLOOR (see ``divergences.py``). TVD's subgradient at a tie p_s == p_t is 0.
    """
    p_s, p_t = s.exp(), t.exp()
    t_log = teacher_log_ratio(t)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)

    def kl_pos(p, log_p, log_q):  # sum p (log p - log q) with 0 log 0 = 0
        return torch.where(p > 0, p * (log_p - log_q), zero).sum(-1)

    def log_mix(a, b):  # log(beta e^a + (1 - beta) e^b)
        return torch.logaddexp(a + math.log(beta), b + math.log1p(-beta))

    if divergence == "forward_kl":
        return kl_pos(p_t, t_log, s)
    if divergence == "reverse_kl":
        return kl_pos(p_s, s, t_log)
    if divergence in ("jsd", "skew_forward_kl"):
        log_m = log_mix(t, s)
        fwd = kl_pos(p_t, t, log_m)
        return fwd if divergence == "skew_forward_kl" else beta * fwd + (1 - beta) * kl_pos(p_s, s, log_m)
    if divergence == "skew_reverse_kl":
        return kl_pos(p_s, s, log_mix(s, t))
    if divergence == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")


# ----------------------------------------------------------------------------------------------
# gram_cosine_loss
# ----------------------------------------------------------------------------------------------
def _frobenius_stats(rs: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    """R_s, R_t [B, P, P] -> [B, 3] = (<R_s, R_t>, |R_s|^2, |R_t|^2)."""
    return torch.stack([(rs * rt).sum((1, 2)), (rs * rs).sum((1, 2)), (rt * rt).sum((1, 2))], -1)


def gram_cosine_stats_reference(hs, ws, ht, wt, vc):
    """Materialised logits Z = H W[:vc]^T [B, P, vc] and R = Z Z^T [B, P, P] -> stats [B, 3]."""
    dtype = _compute_dtype(hs)
    zs, zt = (hs @ ws[:vc].T).to(dtype), (ht @ wt[:vc].T).to(dtype)
    return _frobenius_stats(zs @ zs.transpose(1, 2), zt @ zt.transpose(1, 2))


def gram_stats_reference(a_s, h_s, a_t, h_t):
    """Float64 oracle for ``kdengine.kernels.gram_cosine.gram_stats``: R = A H^T materialised -> [B, 3]."""
    return _frobenius_stats(a_s.double() @ h_s.double().transpose(1, 2), a_t.double() @ h_t.double().transpose(1, 2))


def gram_grad_matmul_reference(a_s, h_s, a_t, h_t, coef_t, coef_s, m):
    """Float64 oracle for ``kdengine.kernels.gram_cosine.gram_grad_matmul``:
    (coef_t R_t - coef_s R_s) @ m with R = A H^T materialised -> [B, P, Dm]."""
    r_s = a_s.double() @ h_s.double().transpose(1, 2)
    r_t = a_t.double() @ h_t.double().transpose(1, 2)
    c = coef_t.double()[:, None, None] * r_t - coef_s.double()[:, None, None] * r_s
    return c @ m.double()


# ----------------------------------------------------------------------------------------------
# topk_divergence
# ----------------------------------------------------------------------------------------------
def topk_divergence_reference(
    student_hidden, student_weight, teacher_ids, teacher_logprobs, *, temperature=1.0, tail="renormalise",
    weight=None, labels=None, ignore_index=IGNORE_INDEX, reduction="mean", student_bias=None,
):
    """Full [N, V] logits and an [N, V] support mask. Same contract as ``kdengine.losses.topk_divergence``
    (whose docstring defines both tail policies; options keyword-only); teacher id -1 is padding."""
    z = linear_logits(student_hidden, student_weight, student_bias)
    log_q = torch.log_softmax(z / temperature, dim=-1)
    pad = teacher_ids == -1
    ids = torch.where(pad, 0, teacher_ids).long()
    lp = teacher_logprobs.to(z.dtype).masked_fill(pad, -math.inf)
    log_mass = torch.logsumexp(lp, -1, keepdim=True)
    if tail == "renormalise":
        lp = torch.where(torch.isfinite(log_mass), lp - log_mass, -math.inf)
    p = lp.exp()
    rows = torch.where(p > 0, p * (lp - log_q.gather(1, ids)), 0.0).sum(-1)
    if tail == "tail":
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        support = torch.zeros_like(z).scatter_add_(1, ids, (~pad).to(z.dtype)) > 0  # padding adds 0 at column 0
        empty = support.all(-1, keepdim=True)  # K = V: no tail bin (kept finite for autograd)
        log_q_tail = torch.logsumexp(log_q.masked_fill(support & ~empty, -math.inf), -1)
        used = (p_tail > 0) & ~empty[:, 0]
        rows = rows + torch.where(used, p_tail * (p_tail.clamp_min(1e-300).log() - log_q_tail), 0.0)
    return finish_reference(rows, z, weight, labels, ignore_index, reduction, student_hidden.dtype)
