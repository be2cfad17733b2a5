"""affinity_loss and affinity_loss_batched: float64 references, hand-computed values, samples without rows,
extreme inputs, gradcheck, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from kdengine.losses.affinity_loss import affinity_loss, affinity_loss_batched
from kdengine.losses.alignment_reference import affinity_loss_batched_reference, affinity_loss_reference

METRICS = ("kl", "mse")


def make_sample(t=5, p=7, ds=12, dt=9, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    sr, sv = (torch.randn(n, ds, generator=g, dtype=torch.float64) * scale for n in (t, p))
    tr = torch.randn(t, dt, generator=g, dtype=torch.float64) * scale
    tv = torch.randn(p, dt, generator=g, dtype=torch.float64) * scale
    tr[:, :3] += sr[:, :3]  # some shared structure between the two models' affinities
    tv[:, :3] += sv[:, :3]
    return sr, sv, tr, tv


def run_single(fn, tensors, dtype, **kw):
    sr, sv, tr, tv = [x.detach().to(dtype) for x in tensors]
    sr.requires_grad_(True)
    sv.requires_grad_(True)
    loss = fn(sr, sv, tr, tv, **kw)
    (loss * 1.7).backward()
    return loss.detach(), sr.grad, sv.grad


@pytest.mark.parametrize("temperature", [0.1, 1.0])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_single_matches_float64_reference(dtype, metric, temperature):
    tensors = [x.to(dtype).double() for x in make_sample()]  # the values the low-precision run really sees
    ref = run_single(affinity_loss_reference, tensors, torch.float64, metric=metric, temperature=temperature)
    got = run_single(affinity_loss, tensors, dtype, metric=metric, temperature=temperature)
    assert got[0].dtype == dtype
    for name, g, r in zip(("loss", "d_resp", "d_vis"), got, ref):
        assert_close(f"{metric}/T={temperature}/{name}", g, r, dtype)


def test_hand_computed_values():
    """T = 1, P = 2 with unit vectors: S_s = [1, 0] / tau, S_t = [0, 1] / tau."""
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    tau = 0.5
    sr, sv = e1, torch.cat([e1, e2])
    tr, tv = 3 * e2, torch.cat([-e1, 2 * e2])  # cos(resp, vis) = (0, 1): scale never matters
    assert torch.allclose(affinity_loss(sr, sv, tr, tv, metric="mse", temperature=tau), torch.tensor(4.0))  # 1/tau^2
    # p_t = (b, a), p_s = (a, b), a = e^2 / (1 + e^2), b = 1 - a: KL = (a - b) log(a / b) = 2 (a - b)
    a = math.exp(2) / (1 + math.exp(2))
    kl = affinity_loss(sr, sv, tr, tv, metric="kl", temperature=tau)
    assert math.isclose(float(kl), 2 * (a - (1 - a)), rel_tol=1e-6), float(kl)
    for metric in METRICS:  # the same affinities: 0
        assert affinity_loss(sr, sv, 7 * sr, sv, metric=metric).item() == pytest.approx(0.0, abs=1e-6)
    # two response rows: the kl is their mean (row 2 has the teacher's affinities (1, 0) and adds 0)
    kl2 = affinity_loss(torch.cat([sr, e1]), sv, torch.cat([tr, -e1]), tv, metric="kl", temperature=tau)
    assert math.isclose(float(kl2), float(kl) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_no_response_or_no_visual_rows_give_zero_and_zero_grads(metric):
    sr, sv, tr, tv = make_sample()
    for t, p in ((0, 7), (5, 0), (0, 0)):
        a, b = sr[:t].clone().requires_grad_(True), sv[:p].clone().requires_grad_(True)
        loss = affinity_loss(a, b, tr[:t], tv[:p], metric=metric)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_inputs_are_finite(dtype, metric):
    """1e4-scale rows match the unit-scale loss (rows are normalised); zero rows and tau = 1e-3 stay finite."""
    tensors = [x.to(dtype).double() for x in make_sample(p=30, ds=256, dt=128)]
    small = run_single(affinity_loss, tensors, dtype, metric=metric)[0]
    big = run_single(affinity_loss, [x * 1e4 for x in tensors], dtype, metric=metric)
    assert torch.isfinite(big[0]) and torch.isfinite(big[1]).all() and torch.isfinite(big[2]).all()
    assert_close(f"{metric}/1e4", big[0], small.double(), dtype)
    zero = [x.clone() for x in tensors]
    zero[0][1] = 0.0  # a zero response row (student)
    zero[3][2] = 0.0  # a zero visual row (teacher)
    for tau in (0.1, 1e-3):
        ref = run_single(affinity_loss_reference, zero, torch.float64, metric=metric, temperature=tau)
        got = run_single(affinity_loss, zero, dtype, metric=metric, temperature=tau)
        for name, g, r in zip(("loss", "d_resp", "d_vis"), got, ref):
            assert torch.isfinite(g).all(), name
            assert_close(f"{metric}/zero rows/tau={tau}/{name}", g, r, dtype)


def make_batch(b=4, s=16, ds=10, dt=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, s, ds, generator=g, dtype=torch.float64)
    ht = torch.randn(b, s, dt, generator=g, dtype=torch.float64)
    ht[..., :3] += hs[..., :3]
    vis = torch.zeros(b, s, dtype=torch.bool)
    vis[:, 2:8] = True
    vis[1, 6:8] = False          # fewer visual rows in sample 1
    vis[2] = False               # sample 2 has no visual rows
    resp = torch.rand(b, s, generator=g) > 0.4
    resp[:, 2:8] = False
    resp[0, 12:] = True
    resp[3] = False              # sample 3 has a single response row
    resp[3, 9] = True
    return hs, ht, resp, vis


def run_batched(fn, hs, ht, resp, vis, dtype, **kw):
    x = hs.detach().to(dtype).clone().requires_grad_(True)
    out = fn(x, ht.to(dtype), resp, vis, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * 1.3).backward()
    return loss.detach(), x.grad, out[1] if isinstance(out, tuple) else None


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_batched_matches_reference_and_counts_samples(dtype, metric):
    hs, ht, resp, vis = make_batch()
    hs, ht = hs.to(dtype).double(), ht.to(dtype).double()
    ref = run_batched(affinity_loss_batched_reference, hs, ht, resp, vis, torch.float64, metric=metric)
    got = run_batched(affinity_loss_batched, hs, ht, resp, vis, dtype, metric=metric, return_count=True)
    assert ref[2] == 3 and int(got[2]) == 3  # samples 0, 1 and 3 have both kinds of rows
    assert got[2].dtype == torch.int64 and got[0].dtype == dtype
    for name, g, r in zip(("loss", "grad"), got[:2], ref[:2]):
        assert_close(f"batched/{metric}/{name}", g, r, dtype)
    assert torch.equal(got[1][2], torch.zeros_like(got[1][2]))  # the sample without visual rows gets no gradient
    neither = ~(resp | vis)
    assert torch.equal(got[1][neither], torch.zeros_like(got[1][neither]))  # nor do rows in neither mask


@pytest.mark.parametrize("metric", METRICS)
def test_batched_is_the_mean_of_single_sample_losses(metric):
    hs, ht, resp, vis = make_batch()
    singles = [affinity_loss(hs[b][resp[b]], hs[b][vis[b]], ht[b][resp[b]], ht[b][vis[b]], metric=metric)
               for b in (0, 1, 3)]
    batched = affinity_loss_batched(hs, ht, resp, vis, metric=metric)
    assert torch.allclose(batched, sum(singles) / 3, rtol=1e-12, atol=0)
    # a sample that lacks one kind of rows changes nothing: drop sample 2 entirely
    keep = [0, 1, 3]
    assert torch.allclose(affinity_loss_batched(hs[keep], ht[keep], resp[keep], vis[keep], metric=metric),
                          batched, rtol=1e-12, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_batched_without_any_pair_or_empty_batch_is_zero(metric):
    hs, ht, resp, vis = make_batch()
    x = hs.clone().requires_grad_(True)
    loss, count = affinity_loss_batched(x, ht, resp, torch.zeros_like(vis), metric=metric, return_count=True)
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0 and torch.equal(x.grad, torch.zeros_like(x))
    e = torch.zeros(0, 5, 4, requires_grad=True)
    m = torch.zeros(0, 5, dtype=torch.bool)
    loss, count = affinity_loss_batched(e, torch.zeros(0, 5, 3), m, m, metric=metric, return_count=True)
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0 and e.grad.shape == e.shape


@pytest.mark.parametrize("metric", METRICS)
def test_float64_gradcheck(metric):
    sr, sv, tr, tv = make_sample(t=3, p=4, ds=5, dt=4)
    sr.requires_grad_(True)
    sv.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: affinity_loss(a, b, tr, tv, metric=metric, temperature=0.5),
                                    (sr, sv), eps=1e-6, atol=1e-8)
    hs, ht, resp, vis = make_batch(b=4, s=10, ds=4, dt=3)
    hs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: affinity_loss_batched(x, ht, resp, vis, metric=metric, temperature=0.5),
                                    (hs,), eps=1e-6, atol=1e-8)


def _good_single():
    return dict(student_resp=torch.randn(3, 6), student_vis=torch.randn(4, 6),
                teacher_resp=torch.randn(3, 5), teacher_vis=torch.randn(4, 5))


@pytest.mark.parametrize("change,match", [
    (dict(student_resp=torch.randn(3)), r"student_resp must have 2 dims, got shape \(3,\)"),
    (dict(teacher_vis=[[0.0]]), r"teacher_vis must be a torch.Tensor"),
    (dict(student_vis=torch.ones(4, 6, dtype=torch.int32)), r"student_vis must be floating point"),
    (dict(student_vis=torch.randn(4, 7)), r"student_vis has shape \(4, 7\) but student_resp has \(3, 6\); expected one hidden size"),
    (dict(teacher_vis=torch.randn(4, 6)), r"teacher_vis has shape \(4, 6\) but teacher_resp has \(3, 5\)"),
    (dict(teacher_resp=torch.randn(2, 5)), r"teacher_resp has shape \(2, 5\) but student_resp has \(3, 6\); expected the same number of response rows T"),
    (dict(teacher_vis=torch.randn(5, 5)), r"teacher_vis has shape \(5, 5\) but student_vis has \(4, 6\); expected the same number of visual rows P"),
    (dict(student_vis=torch.randn(4, 6, dtype=torch.float64)), r"student_vis \(torch.float64 on cpu\) and student_resp"),
    (dict(teacher_resp=torch.randn(3, 5, dtype=torch.float64), teacher_vis=torch.randn(4, 5, dtype=torch.float64)),
     r"teacher_resp has dtype torch.float64 but student_resp has torch.float32"),
    (dict(teacher_resp=torch.randn(3, 5, device="meta"), teacher_vis=torch.randn(4, 5, device="meta")),
     r"teacher_resp is on meta but student_resp is on cpu"),
    (dict(teacher_vis=torch.randn(4, 5, requires_grad=True)), r"teacher_vis \(4, 5\) requires grad; the teacher must be frozen"),
    (dict(metric="cosine"), r"metric='cosine'; expected one of \('kl', 'mse'\)"),
    (dict(temperature=0.0), r"temperature=0.0; expected a finite number > 0"),
    (dict(temperature=math.inf), r"temperature=inf; expected a finite number > 0"),
    (dict(temperature=True), r"temperature=True; expected a finite number > 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_single_bad_input_raises_named_error(change, match):
    args = _good_single()
    args.update(change)
    tensors = [args.pop(k) for k in ("student_resp", "student_vis", "teacher_resp", "teacher_vis")]
    with pytest.raises(ValueError, match=match):
        affinity_loss(*tensors, **args)


def _good_batched():
    return dict(student_hidden=torch.randn(2, 6, 4), teacher_hidden=torch.randn(2, 6, 3),
                resp_mask=torch.ones(2, 6, dtype=torch.bool), vis_mask=torch.zeros(2, 6, dtype=torch.bool))


@pytest.mark.parametrize("change,match", [
    (dict(student_hidden=torch.randn(12, 4)), r"student_hidden must have 3 dims"),
    (dict(teacher_hidden=torch.randn(2, 5, 3)), r"teacher_hidden has shape \(2, 5, 3\) but student_hidden has \(2, 6, 4\); expected the same \[B, S\]"),
    (dict(teacher_hidden=torch.randn(2, 6, 3, dtype=torch.bfloat16)), r"teacher_hidden has dtype torch.bfloat16"),
    (dict(teacher_hidden=torch.randn(2, 6, 3, requires_grad=True)), r"teacher_hidden \(2, 6, 3\) requires grad"),
    (dict(resp_mask=torch.ones(2, 5, dtype=torch.bool)), r"resp_mask has shape \(2, 5\); expected a bool tensor \[B, S\] = \(2, 6\)"),
    (dict(vis_mask=torch.zeros(2, 6)), r"vis_mask has shape \(2, 6\); expected a bool tensor"),
    (dict(vis_mask=None), r"vis_mask has shape NoneType; expected a bool tensor"),
    (dict(resp_mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), r"resp_mask is on meta but student_hidden is on cpu"),
    (dict(metric="KL"), r"metric='KL'; expected one of"),
    (dict(temperature=-1), r"temperature=-1; expected a finite number > 0"),
    (dict(temperature="0.1"), r"temperature='0.1'; expected a finite number > 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_batched_bad_input_raises_named_error(change, match):
    args = _good_batched()
    args.update(change)
    tensors = [args.pop(k) for k in ("student_hidden", "teacher_hidden", "resp_mask", "vis_mask")]
    with pytest.raises(ValueError, match=match):
        affinity_loss_batched(*tensors, **args)
