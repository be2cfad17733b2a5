"""fused_linear_divergence numerics: large, near-equal and near-negative logits, exact teacher
log-probabilities where p_t underflows, float64 in -> float64 out (gradcheck), lm_head biases,
and TVD's subgradient at an exact tie."""

from __future__ import annotations

import pytest
import torch
from helpers import SCHEDULES, assert_close, budget_for

from kdengine.losses import DIVERGENCES, fused_linear_divergence

N, V, D = 29, 1003, 24


def family(kind: str, seed: int = 0):
    """(xs, ws, xt, wt) fp64 with student logits scaled to max |z| = 50 and a teacher that is
    independent (large), close to the student (near_equal) or close to its negative (near_negative)."""
    g = torch.Generator().manual_seed(seed)
    xs, ws = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    xs = xs * 50 / (xs @ ws.T).abs().amax()
    if kind == "large":
        xt, wt = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
        xt = xt * 50 / (xt @ wt.T).abs().amax()
    elif kind == "near_equal":
        xt, wt = xs + 0.02 * torch.randn(N, D, generator=g, dtype=torch.float64), ws.clone()
    elif kind == "near_negative":
        xt, wt = xs + 0.02 * torch.randn(N, D, generator=g, dtype=torch.float64), -ws
    else:
        raise ValueError(kind)
    return xs, ws, xt, wt


def grads(impl, tensors, dtype, divergence, **kw):
    xs, ws, xt, wt = (t.to(dtype) for t in tensors)
    xs, ws = xs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    out = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, reduction="none", impl=impl, **kw)
    grad_out = torch.linspace(0.5, 1.5, N, dtype=dtype)
    (out * grad_out).sum().backward()
    return out.detach(), xs.grad, ws.grad


IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("kind", ["large", "near_equal", "near_negative"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_families_within_2x_of_plain_fp32(impl, divergence, kind):
    """Error against float64 within 2x (+ the fp32 atol) of plain fp32 autograd over full logits."""
    tensors = family(kind)
    ref = grads("reference", tensors, torch.float64, divergence)
    base = grads("reference", tensors, torch.float32, divergence)
    got = grads(impl, tensors, torch.float32, divergence)
    for name, g, r, b in zip(("loss", "dX", "dW"), got, ref, base):
        assert_close(f"{impl} {divergence} {kind} {name}", g, r, torch.float32, base=b)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_reverse_kl_uses_exact_teacher_log_probs_where_p_t_underflows(impl):
    """A confident teacher that disagrees: many log p_t < log(fp32 tiny) = -87.3. The result equals
    KL(p_s || p_t) computed independently in float64 (no floor), row by row."""
    xs, ws, xt, wt = family("near_negative", seed=1)
    xt = xt * 3  # teacher logits up to ~150: log p_t far below -87.3 on most of the vocabulary
    s = torch.log_softmax(xs @ ws.T, -1)
    t = torch.log_softmax(xt @ wt.T, -1)
    assert (t < -87.4).float().mean() > 0.3  # the family really exercises the old floor
    truth = (s.exp() * (s - t)).sum(-1)
    got = fused_linear_divergence(xs.float(), ws.float(), xt.float(), wt.float(), divergence="reverse_kl",
                                  reduction="none", impl=impl)
    rel = ((got.double() - truth).abs() / truth.abs().clamp_min(1e-30)).max()
    assert rel < 1e-4, f"reverse_kl rows off by {float(rel):.2e} relative (max); truth range {truth.min():.3g}..{truth.max():.3g}"


def test_masked_teacher_entries_keep_a_finite_floor():
    """-inf teacher logits (masked vocabulary) are exact zeros of p_t and a finite reverse-KL penalty."""
    xs, ws, xt, wt = (t.float() for t in family("large"))
    wt = wt.clone()
    bias = torch.zeros(V)
    bias[::3] = -float("inf")
    for impl in ("torch", "reference"):
        out = fused_linear_divergence(xs, ws, xt, wt, divergence="reverse_kl", reduction="none", impl=impl,
                                      teacher_bias=bias)
        assert torch.isfinite(out).all(), impl


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_in_float64_out_gradcheck(divergence, schedule):
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(301, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(301, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    wt = torch.randn(300, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, -100, 300, 7, 0])

    def f(xs, ws, bs):
        div, ce = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, temperature=1.3, labels=labels,
                                          impl="torch", budget_mb=budget_for(schedule, 5, torch.float64),
                                          student_bias=bs)
        assert div.dtype == torch.float64 and ce.dtype == torch.float64
        return div, ce

    if divergence == "tvd":  # piecewise linear: check away from ties only through the reference
        ref = fused_linear_divergence(xs, ws, xt, wt, divergence="tvd", labels=labels, impl="reference",
                                      temperature=1.3, student_bias=bs)
        got = f(xs, ws, bs)
        assert torch.allclose(got[0], ref[0], rtol=1e-12) and torch.allclose(got[1], ref[1], rtol=1e-12)
        return
    assert torch.autograd.gradcheck(f, (xs, ws, bs), eps=1e-6, atol=1e-8)


def test_triton_refuses_float64():
    xs, ws, xt, wt = family("large")
    with pytest.raises(ValueError, match=r"impl='triton'.*torch.float64.*impl='torch'"):
        fused_linear_divergence(xs, ws, xt, wt, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "triton", "reference"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable_head", "frozen_head"])
def test_bias_matches_reference(impl, divergence, frozen):
    g = torch.Generator().manual_seed(4)
    xs, ws = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / D**0.5 * 3
    xt, wt = torch.randn(N, 16, generator=g), torch.randn(V - 10, 16, generator=g) / 4 * 3
    bs, bt = torch.randn(V, generator=g), torch.randn(V - 10, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)

    def run(dtype, impl, budget=None):
        a = xs.to(dtype).requires_grad_(True)
        w = ws.to(dtype).requires_grad_(not frozen)
        b = bs.to(dtype).requires_grad_(not frozen)
        div, ce = fused_linear_divergence(a, w, xt.to(dtype), wt.to(dtype), divergence=divergence, labels=labels,
                                          impl=impl, student_bias=b, teacher_bias=bt.to(dtype), budget_mb=budget)
        (div * 1.3 + ce * 0.7).backward()
        return [div, ce, a.grad] + ([] if frozen else [w.grad, b.grad])

    budget = budget_for("streaming" if impl == "torch_streaming" else "row_chunk", N)  # N=29: 0.17 MB
    ref, base = run(torch.float64, "reference"), run(torch.float32, "reference")
    got = run(torch.float32, impl.replace("_streaming", ""), budget)
    for i, (g_, r, b) in enumerate(zip(got, ref, base)):
        assert_close(f"{impl} bias output {i}", g_, r, torch.float32, base=b)


def test_bias_is_not_ignored():
    """A bias that favours one token changes the loss (guards against a silently dropped bias)."""
    xs, ws, xt, wt = (t.float() for t in family("large"))
    bias = torch.zeros(V)
    bias[7] = 30.0
    plain = fused_linear_divergence(xs, ws, xt, wt, impl="torch")
    biased = fused_linear_divergence(xs, ws, xt, wt, impl="torch", student_bias=bias)
    assert abs(float(biased) - float(plain)) > 1e-2


@pytest.mark.parametrize("bad, match", [
    (dict(student_bias=torch.zeros(V - 1)), r"student_bias has shape \(1002,\); expected \[V\] = \(1003,\)"),
    (dict(teacher_bias=torch.zeros(V, 2)), r"teacher_bias has shape \(1003, 2\)"),
    (dict(teacher_bias=torch.zeros(V - 1)), r"teacher_bias has shape \(1002,\); expected \[Vt\] = \(1003,\)"),
    (dict(student_bias=torch.zeros(V, dtype=torch.float64)), r"student_bias is torch.float64"),
    (dict(teacher_bias=torch.zeros(V, requires_grad=True)), r"teacher_bias \(1003,\) requires grad"),
])
def test_bad_bias(bad, match):
    xs, ws, xt, wt = (t.float() for t in family("large"))
    with pytest.raises(ValueError, match=match):
        fused_linear_divergence(xs, ws, xt, wt, **bad)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_tvd_subgradient_at_exact_tie_is_zero(impl):
    """Teacher identical to the student: p_s == p_t on every entry, the loss and its gradient are 0."""
    g = torch.Generator().manual_seed(5)
    xs, ws = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    a, w = xs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    out = fused_linear_divergence(a, w, xs.clone(), ws.clone(), divergence="tvd", impl=impl)
    out.backward()
    assert float(out) == 0.0
    assert float(a.grad.abs().max()) == 0.0 and float(w.grad.abs().max()) == 0.0
