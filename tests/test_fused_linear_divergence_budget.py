"""fused_linear_divergence's memory budget: the row-chunk schedule against the float64 reference, its GEMM
count and peak working memory, the schedule a budget selects, and bad budgets."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import assert_close, schedules_taken

from kdengine.losses import DIVERGENCES, fused_linear_divergence
from kdengine.losses.budget import choose_schedule, default_budget_mb
from kdengine.losses.divergences import BETA_DIVERGENCES
from kdengine.plan.live_bytes import TorchOps

MB = 2**20
# N=300 rows, V=600, Vt=590, Ds+Dt = 24+16: a float64 row takes 8 * (600 + 590 + 10 * 600 + 40) bytes, so
# 16 MB holds 289 >= 256 rows: two balanced chunks of 150 (float32: 578 rows, one chunk of 300)
N, DS, DT, V, VT = 300, 24, 16, 600, 590
TWO_CHUNKS_F64 = 16.0


def make(dtype, seed=0, frozen=False):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, DS, generator=g, dtype=torch.float64)
    ws = torch.randn(V, DS, generator=g, dtype=torch.float64) / DS**0.5 * 3
    bs = torch.randn(V, generator=g, dtype=torch.float64)
    xt = torch.randn(N, DT, generator=g, dtype=torch.float64)
    wt = torch.randn(VT, DT, generator=g, dtype=torch.float64) / DT**0.5 * 3
    bt = torch.randn(VT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    weight = torch.rand(N, generator=g, dtype=torch.float64)
    leaves = [t.to(dtype).requires_grad_(not (frozen and t is not xs)) for t in (xs, ws, bs)]
    return leaves, [t.to(dtype) for t in (xt, wt, bt)], labels, weight.to(dtype)


def run(impl, dtype, divergence, reduction="mean", grad_div=1.0, grad_ce=0.5, ce_weight=0.5, frozen=False, **kw):
    (xs, ws, bs), (xt, wt, bt), labels, weight = make(dtype, frozen=frozen)
    div, ce = fused_linear_divergence(
        xs, ws, xt, wt, divergence=divergence, beta=0.3 if divergence in BETA_DIVERGENCES else None,
        temperature=1.3, weight=weight, labels=labels, reduction=reduction, impl=impl, ce_weight=ce_weight,
        student_bias=bs, teacher_bias=bt, **kw)
    (grad_div * div + grad_ce * ce).backward()
    return [div.detach(), ce.detach(), xs.grad] + ([] if frozen else [ws.grad, bs.grad])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_chunks_equal_the_float64_reference(divergence, reduction, caplog):
    """Two chunks, labels, weights, both biases, V != Vt, T != 1: loss, CE, dX, dW, db to float64 rounding."""
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    ref = run("reference", torch.float64, divergence, reduction)
    got = run("torch", torch.float64, divergence, reduction, budget_mb=TWO_CHUNKS_F64)
    assert schedules_taken(caplog) == ["row_chunk"] and "rows=150 " in caplog.text
    assert "recomputing" not in caplog.text
    for name, g, r in zip(("div", "ce", "dX", "dW", "db"), got, ref):
        assert_close(f"{divergence}/{reduction}/{name}", g, r, torch.float64)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_chunks_fp32_and_frozen_head(divergence):
    ref = run("reference", torch.float64, divergence, frozen=True)
    base = run("reference", torch.float32, divergence, frozen=True)
    got = run("torch", torch.float32, divergence, frozen=True, budget_mb=8.0)
    for name, g, r, b in zip(("div", "ce", "dX"), got, ref, base):
        assert_close(f"frozen/{divergence}/{name}", g, r, torch.float32, b)


@pytest.mark.parametrize("grads", [(1.7, 0.6), (0.0, 1.0), (2.0, 0.0)], ids=str)
def test_a_backward_with_another_ce_share_recomputes_correctly(grads, caplog):
    """The forward formed the gradient of div + 0.5 ce; other output grads still get the exact answer."""
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    ref = run("reference", torch.float64, "jsd", grad_div=grads[0], grad_ce=grads[1])
    got = run("torch", torch.float64, "jsd", grad_div=grads[0], grad_ce=grads[1], budget_mb=TWO_CHUNKS_F64)
    assert "recomputing" in caplog.text
    for name, g, r in zip(("div", "ce", "dX", "dW", "db"), got, ref):
        assert_close(f"grads{grads}/{name}", g, r, torch.float64)


def test_second_backward_recomputes_the_same_gradient():
    (xs, ws, bs), (xt, wt, bt), labels, weight = make(torch.float64)
    div = fused_linear_divergence(xs, ws, xt, wt, divergence="reverse_kl", impl="torch", student_bias=bs)
    div.backward(retain_graph=True)
    first = [t.grad.clone() for t in (xs, ws, bs)]
    for t in (xs, ws, bs):
        t.grad = None
    (3.0 * div).backward()
    for a, b in zip(first, (xs.grad, ws.grad, bs.grad)):
        assert torch.allclose(3.0 * a, b, rtol=1e-12, atol=1e-15)


def test_return_rows_gives_unweighted_detached_rows():
    (xs, ws, bs), (xt, wt, bt), labels, weight = make(torch.float64)
    rows_ref = fused_linear_divergence(xs, ws, xt, wt, labels=labels, reduction="none", impl="reference")[0]
    for impl in ("torch", "reference"):
        div, ce, rows = fused_linear_divergence(xs, ws, xt, wt, labels=labels, weight=weight, reduction="sum",
                                                impl=impl, return_rows=True)
        assert not rows.requires_grad and rows.shape == (N,)
        assert torch.allclose(rows, rows_ref.detach(), rtol=1e-12)
        assert torch.allclose(div, (rows_ref * weight).sum(), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# GEMM units and working memory (counted by kdengine.plan.live_bytes.TorchOps)
# ----------------------------------------------------------------------------------------------
def measure(divergence, budget_mb, frozen=False, no_grad=False, n=520, v=5000, ds=64, dt=48):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, ds, generator=g).requires_grad_(not no_grad)
    ws = (torch.randn(v, ds, generator=g) / 8 * 3).requires_grad_(not (frozen or no_grad))
    xt, wt = torch.randn(n, dt, generator=g), torch.randn(v, dt, generator=g) / 7 * 3
    labels = torch.randint(0, v, (n,), generator=g)
    with TorchOps() as mode:
        div, ce = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, labels=labels, temperature=2.0,
                                          impl="torch", budget_mb=budget_mb)
        if not no_grad:
            (div + ce).backward()
    grad_bytes = sum(t.grad.numel() * 4 for t in (xs, ws) if t.grad is not None)
    units = sum(f for name, f, _, _ in mode.ops if name.rstrip("_") in ("mm", "addmm")) / (2 * n * v)
    return (mode.peak - grad_bytes) / MB, units


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_chunk_gemms_and_peak_within_budget(divergence):
    """N=520, V=5000: 60 MB holds 293 rows (two chunks of 260). Four GEMM units: z_s (Ds), z_t (Dt),
    dX and dW (Ds each); peak working memory beyond the gradients at most budget + 10%."""
    ds, dt = 64, 48
    peak, units = measure(divergence, 60.0)
    assert units == pytest.approx(ds + dt + 2 * ds), f"{units / ds:.3f} Ds-units of [N, V] GEMMs"
    assert peak <= 60.0 * 1.1, f"{divergence}: peak working memory {peak:.1f} MB > 66 MB"


def test_frozen_and_no_grad_gemms():
    _, frozen = measure("forward_kl", 60.0, frozen=True)
    _, no_grad = measure("jsd", 60.0, no_grad=True)
    assert frozen == pytest.approx(64 + 48 + 64)  # z_s, z_t, dX
    assert no_grad == pytest.approx(64 + 48)  # z_s, z_t


def test_streaming_recomputes_within_its_blocks():
    """A budget below a chunk of 256 rows streams: 2 forward_kl passes of logits (pass 1, backward) + dX, dW."""
    peak, units = measure("forward_kl", 8.0)
    assert units == pytest.approx(2 * (64 + 48) + 2 * 64)
    assert peak <= 16.0, f"streaming peak {peak:.1f} MB"


# ----------------------------------------------------------------------------------------------
# which schedule a budget selects
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,budget_mb,reduction,expected", [
    # benchmark shape, fp32, with labels: a row is 4 * (151936 + 151936 + 10 * 4096 + 896 + 1536) = 1,385,056 B
    (512, 512.0, "mean", ("row_chunk", 256)),   # 536,870,912 / 1,385,056 = 387 rows fit: 2 chunks of 256
    (512, 300.0, "sum", ("streaming", 512)),     # 227 rows < 256
    (512, 32.0, "mean", ("streaming", 512)),     # today's streaming blocks: 512 x 2560
    (512, 512.0, "none", ("streaming", 512)),    # no scalar loss
    (100, 150.0, "mean", ("row_chunk", 100)),    # 113 rows fit, N = 100 < 256 rows needed
    (1000, 1024.0, "mean", ("row_chunk", 500)),  # 775 rows fit: ceil(1000 / 775) = 2 balanced chunks of 500
], ids=str)
def test_schedule_for_budget_and_rows(n, budget_mb, reduction, expected):
    s = choose_schedule(n, 151936, 151936, 896 + 1536, 4, budget_mb, reduction)
    assert (s.kind, s.rows) == expected
    if budget_mb == 32.0:
        assert s.cols == 2560  # 32 MB / 4 B / 6 temporaries / 512 rows = 2730 -> multiple of 256


def test_default_budget(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    assert default_budget_mb(torch.device("cpu")) == 512.0
    assert default_budget_mb(torch.device("cuda")) == 512.0  # 4 GB free / 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert default_budget_mb(torch.device("cuda")) == 1024.0


def test_env_budget_is_used(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    (xs, ws, bs), (xt, wt, bt), labels, weight = make(torch.float64)
    monkeypatch.setenv("KDENGINE_LOSS_BUDGET_MB", "4")  # above a streaming block (3.5 MB), below a chunk (14.8)
    fused_linear_divergence(xs, ws, xt, wt, impl="torch")
    monkeypatch.setenv("KDENGINE_LOSS_BUDGET_MB", "64")
    fused_linear_divergence(xs, ws, xt, wt, impl="torch")
    assert schedules_taken(caplog) == ["streaming", "row_chunk"]
    assert "budget_mb=4)" in caplog.text


# ----------------------------------------------------------------------------------------------
# bad budgets
# ----------------------------------------------------------------------------------------------
def _small():
    g = torch.Generator().manual_seed(1)
    return torch.randn(300, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(300, 6, generator=g), \
        torch.randn(40, 6, generator=g)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_budget_below_one_streaming_block(impl):
    # 300 rows x 256 columns x 6 temporaries x 4 bytes = 1,843,200 B = 1.758 MB
    with pytest.raises(ValueError, match=r"budget_mb=1\.5 MB is below one streaming block.*at least 1\.758 MB"):
        fused_linear_divergence(*_small(), impl=impl, budget_mb=1.5)
    fused_linear_divergence(*_small(), impl=impl, budget_mb=1.76)


@pytest.mark.parametrize("value", [0, -3, math.nan, math.inf, "big", True])
def test_budget_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=r"budget_mb=.*expected a finite number of MB > 0"):
        fused_linear_divergence(*_small(), impl="torch", budget_mb=value)


@pytest.mark.parametrize("raw,match", [
    ("lots", r"KDENGINE_LOSS_BUDGET_MB='lots': expected a finite number of MB > 0"),
    ("-1", r"KDENGINE_LOSS_BUDGET_MB='-1'"),
    ("1.0", r"KDENGINE_LOSS_BUDGET_MB=1 MB is below one streaming block.*at least 1\.758 MB"),
])
def test_bad_env_budget_names_the_variable(raw, match, monkeypatch):
    monkeypatch.setenv("KDENGINE_LOSS_BUDGET_MB", raw)
    with pytest.raises(ValueError, match=match):
        fused_linear_divergence(*_small(), impl="torch")


@pytest.mark.parametrize("value", [math.nan, "1", None])
def test_bad_ce_weight(value):
    with pytest.raises(ValueError, match=r"ce_weight=.*expected a finite number"):
        fused_linear_divergence(*_small(), impl="torch", ce_weight=value)


@pytest.mark.parametrize("w_hard,w_soft", [(0.3, 0.7), (0.0, 1.0), (1.0, 0.0)])
def test_liger_compat_loss_uses_the_gradient_formed_in_the_forward(w_hard, w_soft, caplog):
    """kdengine.compat.liger passes its mean as weight= and w_hard / w_soft as ce_weight: no recomputation
    (w_soft = 0 leaves no divergence share to scale: that one recomputes) and the reference's gradient."""
    from kdengine.compat.liger import fused_linear_jsd

    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    (xs, ws, bs), (xt, wt, bt), labels, _ = make(torch.float64)
    grads = {}
    for impl in ("reference", "torch"):
        xs.grad = ws.grad = None
        fused_linear_jsd(xs, ws, xt, wt, labels, weight_hard_loss=w_hard, weight_soft_loss=w_soft, beta=0.3,
                         temperature=1.3, impl=impl).backward()
        grads[impl] = (xs.grad.clone(), ws.grad.clone())
    assert ("recomputing" in caplog.text) == (w_soft == 0.0)
    for g, r in zip(grads["torch"], grads["reference"]):
        assert_close("liger compat grad", g, r, torch.float64)
