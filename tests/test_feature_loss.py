"""feature_loss: float64 reference, hand-computed values, zero rows, empty batches, weights, gradcheck, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from kdengine.losses.alignment_reference import feature_loss_reference
from kdengine.losses.feature_loss import NORM_EPS, feature_loss

METRICS = ("cosine", "mse")
REDUCTIONS = ("mean", "sum", "none")


def make(n=9, d=12, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    t = (0.6 * s + torch.randn(n, d, generator=g, dtype=torch.float64) * scale)  # correlated with the student
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[1] = 0.0
    return s, t, w


def run(fn, s, t, dtype, **kw):
    x = s.detach().to(dtype).clone().requires_grad_(True)
    loss = fn(x, t.detach().to(dtype), **kw)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_float64_reference(dtype, metric, reduction, weighted):
    """Loss and gradient of 16/32/64-bit inputs against the float64 reference on the same (rounded) inputs."""
    s, t, w = make()
    s, t = s.to(dtype).double(), t.to(dtype).double()  # the values the low-precision run really sees
    w = w.to(dtype) if weighted else None
    ref = run(feature_loss_reference, s, t, torch.float64, metric=metric, reduction=reduction,
              weight=None if w is None else w.double())
    got = run(feature_loss, s, t, dtype, metric=metric, reduction=reduction, weight=w)
    assert got[0].dtype == dtype
    for name, g, r in zip(("loss", "grad"), got, ref):
        assert_close(f"{metric}/{reduction}/{name}", g, r, dtype)


def test_hand_computed_cosine():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    s = torch.stack([e1, e1, e1, 3 * e1 + 4 * e2])
    t = torch.stack([e2, 5 * e1, -e1, e1])  # orthogonal, same direction, opposite, cos = 3/5
    rows = feature_loss(s, t, reduction="none")
    assert torch.allclose(rows, torch.tensor([1.0, 0.0, 2.0, 1 - 3 / 5]), atol=1e-7), rows
    assert torch.allclose(feature_loss(s, t), torch.tensor((1 + 0 + 2 + 0.4) / 4))
    assert torch.allclose(feature_loss(s, t, reduction="sum"), torch.tensor(3.4))


def test_hand_computed_mse_and_weights():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    rows = feature_loss(s, t, metric="mse", reduction="none")
    assert torch.equal(rows, torch.tensor([2.5, 0.0, 4.0]))  # (1 + 4)/2, 0, (4 + 4)/2
    w = torch.tensor([1.0, 5.0, 3.0])
    assert torch.allclose(feature_loss(s, t, metric="mse", weight=w), torch.tensor((2.5 + 0 + 12.0) / 9.0))
    assert torch.allclose(feature_loss(s, t, metric="mse", weight=w, reduction="sum"), torch.tensor(14.5))
    assert torch.equal(feature_loss(s, t, metric="mse", weight=w, reduction="none"), torch.tensor([2.5, 0.0, 12.0]))
    # a bool weight selects rows: the mean over rows 0 and 2
    sel = torch.tensor([True, False, True])
    assert torch.allclose(feature_loss(s, t, metric="mse", weight=sel), torch.tensor(3.25))


def test_zero_rows_have_cos_zero_and_finite_gradients():
    t = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    rows = feature_loss(s, t, reduction="none")
    assert torch.equal(rows.detach(), torch.ones(3))  # zero student, zero student, zero teacher: cos = 0
    rows.sum().backward()
    assert torch.isfinite(s.grad).all()
    # a zero student row: the gradient of 1 - <s, t> / (eps |t|) is -t / (eps |t|) (the eps clamp, documented)
    assert NORM_EPS == 1e-8  # the documented clamp
    assert torch.allclose(s.grad[0], -torch.tensor([0.6, 0.8]) / 1e-8, rtol=1e-5)
    assert torch.equal(s.grad[2], torch.zeros(2))  # a zero teacher row gives no gradient
    both = torch.zeros(2, 4, requires_grad=True)
    loss = feature_loss(both, torch.zeros(2, 4))
    loss.backward()
    assert loss.item() == 1.0 and torch.equal(both.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_gives_zero_and_zero_grads(metric, reduction):
    s = torch.zeros(0, 6, requires_grad=True)
    for weight in (None, torch.zeros(0)):
        loss = feature_loss(s, torch.zeros(0, 6), metric=metric, reduction=reduction, weight=weight)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert torch.equal(loss.detach(), torch.zeros(loss.shape))
        loss.sum().backward()
        assert s.grad.shape == (0, 6)


@pytest.mark.parametrize("metric", METRICS)
def test_zero_weights_give_zero_loss_and_zero_grads(metric):
    s, t, _ = make(n=4)
    s.requires_grad_(True)
    loss = feature_loss(s, t, metric=metric, weight=torch.zeros(4, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_hidden_states_are_finite_and_accurate(dtype, metric):
    """1e4-scale rows (squares ~1e8, sums ~1e10) in fp32/bf16: finite and within the dtype's tolerance."""
    s, t, _ = make(n=16, d=512, scale=1e4)
    s, t = s.to(dtype).double(), t.to(dtype).double()
    ref = run(feature_loss_reference, s, t, torch.float64, metric=metric)
    got = run(feature_loss, s, t, dtype, metric=metric)
    for name, g, r in zip(("loss", "grad"), got, ref):
        assert_close(f"{metric}/1e4/{name}", g, r, dtype)


@pytest.mark.parametrize("metric", METRICS)
def test_float64_gradcheck(metric):
    s, t, w = make(n=5, d=4)
    s.requires_grad_(True)
    for reduction in REDUCTIONS:
        for weight in (None, w):
            assert torch.autograd.gradcheck(
                lambda x: feature_loss(x, t, metric=metric, weight=weight, reduction=reduction), (s,),
                eps=1e-6, atol=1e-8)
    assert feature_loss(s, t, metric=metric).dtype == torch.float64


def test_teacher_detached_is_accepted_and_student_gets_grad():
    t = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, 4, requires_grad=True)
    feature_loss(s, t.detach()).backward()
    assert s.grad is not None and t.grad is None


def _good():
    return dict(projected_student=torch.randn(3, 4), teacher=torch.randn(3, 4))


@pytest.mark.parametrize("change,match", [
    (dict(projected_student=torch.randn(3, 4, 1)), r"projected_student must have 2 dims, got shape \(3, 4, 1\)"),
    (dict(projected_student=[[1.0]]), r"projected_student must be a torch.Tensor, got list"),
    (dict(projected_student=torch.ones(3, 4, dtype=torch.long)), r"projected_student must be floating point"),
    (dict(teacher=torch.randn(4)), r"teacher must have 2 dims"),
    (dict(teacher=torch.randn(3, 5)), r"teacher has shape \(3, 5\) but projected_student has \(3, 4\)"),
    (dict(teacher=torch.randn(2, 4)), r"teacher has shape \(2, 4\)"),
    (dict(projected_student=torch.randn(3, 0), teacher=torch.randn(3, 0)), r"projected_student .* Dt >= 1"),
    (dict(teacher=torch.randn(3, 4, dtype=torch.float64)), r"teacher has dtype torch.float64 but projected_student"),
    (dict(teacher=torch.randn(3, 4, device="meta")), r"teacher is on meta but projected_student is on cpu"),
    (dict(teacher=torch.randn(3, 4, requires_grad=True)), r"teacher \(3, 4\) requires grad; the teacher must be frozen"),
    (dict(metric="l1"), r"metric='l1'; expected one of \('cosine', 'mse'\)"),
    (dict(reduction="batch"), r"reduction='batch'; expected one of"),
    (dict(weight=torch.ones(4)), r"weight has shape \(4,\); expected \[N\] = \(3,\)"),
    (dict(weight=[1.0, 1.0, 1.0]), r"weight has shape list; expected \[N\]"),
    (dict(weight=torch.ones(3, dtype=torch.complex64)), r"weight has dtype torch.complex64"),
    (dict(weight=torch.ones(3, device="meta")), r"weight is on meta but projected_student is on cpu"),
    (dict(weight=torch.tensor([1.0, -0.5, 1.0])), r"weight\[1\] = -0.5; expected weights >= 0"),
    (dict(weight=torch.tensor([1.0, math.nan, 1.0])), r"weight\[1\] = nan; expected weights >= 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_named_error(change, match):
    args = _good()
    args.update(change)
    s, t = args.pop("projected_student"), args.pop("teacher")
    with pytest.raises(ValueError, match=match):
        feature_loss(s, t, **args)


def test_the_package_exports_the_alignment_losses():
    import kdengine.losses as losses
    from kdengine.losses.affinity_loss import affinity_loss, affinity_loss_batched
    from kdengine.losses.feature_loss import feature_loss

    assert losses.feature_loss is feature_loss and callable(losses.feature_loss)
    assert losses.affinity_loss is affinity_loss and losses.affinity_loss_batched is affinity_loss_batched
