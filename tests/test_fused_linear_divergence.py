"""fused_linear_divergence: every impl against a float64 reference, bad input, numerics."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch
import logging

from helpers import SCHEDULES, assert_close, budget_for, force_streaming, schedules_taken

from kdengine.losses import DIVERGENCES, fused_linear_divergence
from kdengine.losses.divergences import BETA_DIVERGENCES


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 37
    ds: int = 48
    dt: int = 40
    v: int = 1003
    vt: int = 1003
    temperature: float = 1.0
    reduction: str = "mean"
    weight: bool = False
    labels: bool = False
    beta: float = 0.5

    def __str__(self):
        return self.name


CASES = [
    Case("base"),
    Case("temp2_sum_weight", temperature=2.0, reduction="sum", weight=True, beta=0.3),
    Case("labels_none", reduction="none", labels=True, temperature=0.7),
    Case("vocab_mismatch_labels", v=1003, vt=997, labels=True, temperature=1.5, beta=0.8),
    Case("teacher_wider_vocab", v=990, vt=1003, labels=True, weight=True),
]
# The Triton interpreter costs per program: same cases, smaller vocabularies.
TRITON_CASES = [Case(c.name, n=19, ds=24, dt=40, v=c.v // 5, vt=c.vt // 5, temperature=c.temperature,
                     reduction=c.reduction, weight=c.weight, labels=c.labels, beta=c.beta) for c in CASES]
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(case: Case, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(case.n, case.ds, generator=g) * scale
    ws = torch.randn(case.v, case.ds, generator=g) / math.sqrt(case.ds) * 3
    xt = torch.randn(case.n, case.dt, generator=g) * scale
    wt = torch.randn(case.vt, case.dt, generator=g) / math.sqrt(case.dt) * 3
    weight = torch.rand(case.n, generator=g) if case.weight else None
    labels = None
    if case.labels:
        labels = torch.randint(0, case.v, (case.n,), generator=g)
        labels[::4] = -100
    grad_out = torch.randn(case.n, generator=g) if case.reduction == "none" else torch.tensor(1.7)
    grad_ce = torch.tensor(0.6)
    return [t.to(dtype) for t in (xs, ws, xt, wt)], weight, labels, grad_out, grad_ce


def run(impl, tensors, weight, labels, grad_out, grad_ce, case, divergence, dtype, frozen=False, budget_mb=None):
    xs, ws, xt, wt = [t.detach().to(dtype) for t in tensors]
    xs.requires_grad_(True)
    ws.requires_grad_(not frozen)
    beta = case.beta if divergence in BETA_DIVERGENCES else None  # the others take no beta
    out = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, beta=beta,
                                  temperature=case.temperature, weight=weight, labels=labels,
                                  reduction=case.reduction, impl=impl, budget_mb=budget_mb)
    div, ce = out if labels is not None else (out, None)
    total = (div * grad_out.to(div.dtype)).sum()
    if ce is not None:
        total = total + ce * grad_ce.to(ce.dtype)
    total.backward()
    return div.detach(), (ce.detach() if ce is not None else None), xs.grad, ws.grad


def check_against_reference(impl, case, divergence, dtype, frozen=False, budget_mb=None):
    tensors, weight, labels, grad_out, grad_ce = make_inputs(case, dtype)
    ref = run("reference", tensors, weight, labels, grad_out, grad_ce, case, divergence, torch.float64, frozen)
    base = run("reference", tensors, weight, labels, grad_out, grad_ce, case, divergence, dtype, frozen)
    got = run(impl, tensors, weight, labels, grad_out, grad_ce, case, divergence, dtype, frozen, budget_mb)
    for name, g, r, b in zip(("div", "ce", "dX", "dW"), got, ref, base):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        assert g.dtype == dtype, f"{name} dtype {g.dtype} != input dtype {dtype}"
        assert_close(f"{impl}/{divergence}/{case}/{name}", g, r, dtype, b)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_matches_reference(divergence, case, dtype, schedule, caplog):
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    check_against_reference("torch", case, divergence, dtype, budget_mb=budget_for(schedule, case.n))
    # reduction="none" has no scalar loss to form the gradient of: it streams whatever the budget
    assert schedules_taken(caplog) == ["streaming" if case.reduction == "none" else schedule]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_torch_frozen_head_matches_reference(divergence, case, schedule):
    """Frozen student head (DPT): only dX; streaming takes the eager single pass for forward_kl."""
    check_against_reference("torch", case, divergence, torch.float32, frozen=True,
                            budget_mb=budget_for(schedule, case.n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_matches_reference(divergence, case, dtype):
    check_against_reference("triton", case, divergence, dtype)


def test_triton_fp16_and_frozen_head():
    check_against_reference("triton", TRITON_CASES[2], "forward_kl", torch.float16)
    check_against_reference("triton", TRITON_CASES[3], "jsd", torch.float32, frozen=True)


@pytest.mark.parametrize("budget_mb", [0.42, 2.0, 3.5, None])
def test_torch_budgets_agree(budget_mb, caplog):
    """Streaming with the smallest and wider blocks, one row chunk per call and the default budget all
    give the reference answer (N=70: a streaming block needs 0.41 MB, a chunk of all rows 3.4 MB)."""
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    case = Case("blocks", n=70, labels=True, temperature=1.3)
    tensors, weight, labels, grad_out, grad_ce = make_inputs(case, torch.float32)
    ref = run("reference", tensors, weight, labels, grad_out, grad_ce, case, "jsd", torch.float64)
    xs, ws, xt, wt = [t.clone() for t in tensors]
    xs.requires_grad_(True)
    ws.requires_grad_(True)
    div, ce = fused_linear_divergence(xs, ws, xt, wt, divergence="jsd", temperature=1.3, labels=labels,
                                      impl="torch", budget_mb=budget_mb)
    (div * grad_out + ce * grad_ce).backward()
    for name, g, r in zip(("div", "ce", "dX", "dW"), (div, ce, xs.grad, ws.grad), ref):
        assert_close(f"budget{budget_mb}/{name}", g, r, torch.float32)
    assert schedules_taken(caplog) == ["streaming" if budget_mb is not None and budget_mb < 3 else "row_chunk"]


# ----------------------------------------------------------------------------------------------
# edge cases and numerics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_loss_and_grads(impl, reduction, monkeypatch):
    if impl == "torch_streaming":
        force_streaming(monkeypatch)
        impl = "torch"
    xs = torch.randn(0, 16, requires_grad=True)
    ws = torch.randn(50, 16, requires_grad=True)
    div, ce = fused_linear_divergence(xs, ws, torch.randn(0, 8), torch.randn(50, 8), labels=torch.zeros(0, dtype=torch.long),
                                      reduction=reduction, impl=impl)
    assert div.shape == ((0,) if reduction == "none" else ())
    assert torch.isfinite(ce) and float(ce.detach()) == 0.0
    (div.sum() + ce).backward()
    assert xs.grad.shape == (0, 16)
    assert ws.grad is None or (torch.isfinite(ws.grad).all() and ws.grad.abs().max() == 0)


@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "triton"])
def test_all_labels_ignored_gives_zero_ce(impl, monkeypatch):
    if impl == "torch_streaming":
        force_streaming(monkeypatch)
        impl = "torch"
    case = Case("ignored", n=9, v=60, vt=60, labels=True)
    (xs, ws, xt, wt), _, _, _, _ = make_inputs(case, torch.float32)
    xs.requires_grad_(True)
    div, ce = fused_linear_divergence(xs, ws, xt, wt, labels=torch.full((9,), -100), impl=impl)
    ce.backward()
    assert float(ce.detach()) == 0.0 and xs.grad.abs().max() == 0


@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_are_finite(impl, dtype, divergence, monkeypatch):
    """Logits of magnitude ~1e4 in every dtype: finite loss, CE and gradients."""
    if impl == "torch_streaming":
        force_streaming(monkeypatch)
        impl = "torch"
    n, d, v = 6, 4, 40
    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(n, d, generator=g) * 100).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, d, generator=g) * 50).to(dtype).requires_grad_(True)
    xt = (torch.randn(n, d, generator=g) * 100).to(dtype)
    wt = (torch.randn(v, d, generator=g) * 50).to(dtype)
    assert (xs.float() @ ws.float().T).abs().max() > 5e3
    div, ce = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, labels=torch.arange(n), impl=impl)
    (div + ce).backward()
    for name, t in (("div", div), ("ce", ce), ("dX", xs.grad), ("dW", ws.grad)):
        assert torch.isfinite(t.float()).all(), f"{name} not finite: {t}"


@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "triton", "reference"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_vocab_is_finite_and_matches_reference(impl, divergence, monkeypatch):
    """Teacher logits of -inf (masked vocabulary) give finite values that agree across impls."""
    if impl == "torch_streaming":
        force_streaming(monkeypatch)
    n, d, v = 8, 6, 70
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64)
    xt = torch.randn(n, d, generator=g, dtype=torch.float64)
    xt[:, 0] = xt[:, 0].abs() + 0.1
    wt = torch.randn(v, d, generator=g, dtype=torch.float64)
    wt[5:20, :] = 0.0
    wt[5:20, 0] = -math.inf  # positive x_0 times -inf: teacher logit -inf for vocab 5..19
    assert torch.isneginf(xt @ wt.T).sum() == n * 15

    def go(impl, dtype):
        a = xs.detach().to(dtype).clone().requires_grad_(True)
        b = ws.detach().to(dtype).clone().requires_grad_(True)
        out = fused_linear_divergence(a, b, xt.to(dtype), wt.to(dtype), divergence=divergence, impl=impl)
        out.backward()
        return out.detach(), a.grad, b.grad

    ref = go("reference", torch.float64)
    got = go(impl.replace("_streaming", ""), torch.float32)
    for name, x, r in zip(("div", "dX", "dW"), got, ref):
        assert_close(f"masked/{impl}/{divergence}/{name}", x, r, torch.float32)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_temperature_has_no_t_squared_factor(schedule, monkeypatch):
    """Documented convention: the loss is the plain divergence at temperature T (no T^2)."""
    case = Case("t", n=5, v=30, vt=30)
    (xs, ws, xt, wt), _, _, _, _ = make_inputs(case, torch.float64)
    if schedule == "streaming":
        force_streaming(monkeypatch)
    t = 3.0
    p_t = torch.softmax(xt @ wt.T / t, -1)
    log_p_s = torch.log_softmax(xs @ ws.T / t, -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    got = fused_linear_divergence(xs, ws, xt, wt, temperature=t, impl="torch")
    assert abs(float(got) - float(expected)) < 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_is_applied_before_mean_over_n(schedule, monkeypatch):
    if schedule == "streaming":
        force_streaming(monkeypatch)
    case = Case("w", n=6, v=30, vt=30)
    (xs, ws, xt, wt), _, _, _, _ = make_inputs(case, torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    rows = fused_linear_divergence(xs, ws, xt, wt, reduction="none", impl="torch")
    mean = fused_linear_divergence(xs, ws, xt, wt, weight=w, reduction="mean", impl="torch")
    assert abs(float(mean) - float((rows * w).sum() / 6)) < 1e-6


def test_frozen_head_does_no_weight_gradient_work(monkeypatch):
    """Streaming: a frozen student head takes the single-pass eager path, backward does no logits work."""
    fld = importlib.import_module("kdengine.losses.fused_linear_divergence_torch")

    calls = {"grad": 0}
    real = fld._dlogits_block

    def counting(*a, **k):
        calls["grad"] += 1
        return real(*a, **k)

    monkeypatch.setattr(fld, "_dlogits_block", counting)
    case = Case("frozen", n=10, v=300, vt=300)
    (xs, ws, xt, wt), _, _, _, _ = make_inputs(case, torch.float32)
    xs.requires_grad_(True)
    budget = budget_for("streaming", case.n)
    fused_linear_divergence(xs, ws, xt, wt, impl="torch", budget_mb=budget).backward()
    assert calls["grad"] == 0 and ws.grad is None and xs.grad is not None
    ws.requires_grad_(True)
    fused_linear_divergence(xs, ws, xt, wt, impl="torch", budget_mb=budget).backward()
    assert calls["grad"] > 0 and ws.grad is not None


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _good():
    return dict(student_hidden=torch.randn(4, 8), student_weight=torch.randn(20, 8),
                teacher_hidden=torch.randn(4, 6), teacher_weight=torch.randn(20, 6))


@pytest.mark.parametrize("change,match", [
    (dict(student_hidden=torch.randn(4, 7)), r"student hidden size mismatch.*\(4, 7\).*\(20, 8\)"),
    (dict(teacher_hidden=torch.randn(4, 5)), r"teacher hidden size mismatch.*\(4, 5\)"),
    (dict(teacher_hidden=torch.randn(3, 6)), r"row count mismatch.*\(4, 8\).*\(3, 6\)"),
    (dict(student_hidden=torch.randn(4, 8, 1)), r"student_hidden must have 2 dims.*\(4, 8, 1\)"),
    (dict(teacher_weight=torch.randn(20, 6, dtype=torch.float64)), r"teacher_weight has dtype torch.float64"),
    (dict(teacher_weight=torch.randn(20, 6, requires_grad=True)), r"teacher_weight \(20, 6\) requires grad"),
    (dict(teacher_hidden=torch.randn(4, 6, requires_grad=True)), r"teacher_hidden \(4, 6\) requires grad"),
    (dict(divergence="kl"), r"divergence='kl'"),
    (dict(divergence="jsd", beta=1.0), r"beta=1.0 .*0 < beta < 1"),
    (dict(divergence="skew_forward_kl", beta=0.0), r"beta=0.0"),
    (dict(temperature=0.0), r"temperature=0.0"),
    (dict(temperature=-1.0), r"temperature=-1.0"),
    (dict(reduction="avg"), r"reduction='avg'"),
    (dict(impl="cuda"), r"impl='cuda'"),
    (dict(weight=torch.ones(3)), r"weight has shape \(3,\); expected \[N\] = \(4,\)"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels has shape \(5,\)"),
    (dict(labels=torch.zeros(4)), r"labels has dtype torch.float32"),
    (dict(labels=torch.tensor([1, 2, 20, -100])), r"labels\[2\] = 20 is outside \[0, 20\)"),
    (dict(student_weight=torch.randn(0, 8)), r"empty vocabulary"),
    (dict(teacher_weight=torch.randn(20, 6, device="meta")), r"teacher_weight is on meta but student_hidden is on cpu"),
    (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), r"labels is on meta"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_named_error(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_linear_divergence(**args)


def test_beta_with_forward_kl_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=r"beta=5.0 has no effect for divergence 'forward_kl'"):
        fused_linear_divergence(**_good(), divergence="forward_kl", beta=5.0)
