"""gram_cosine_loss: impls against a float64 materialised reference, masks, caching, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import assert_close

from kdengine.losses import gram_cosine_loss

gram_module = importlib.import_module("kdengine.losses.gram_cosine")

# (B, P, Ds, Dt, V, Vt): P <= D takes the P x P form, P > D the D x D form
SHAPES = {
    "pp_form": (2, 7, 48, 40, 300, 300),
    "dd_form": (3, 37, 12, 20, 211, 211),
    "vocab_mismatch": (2, 9, 16, 24, 130, 121),
}


def make(shape, dtype, seed=0):
    b, p, ds, dt, v, vt = shape
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, p, ds, generator=g)
    ws = torch.randn(v, ds, generator=g) / math.sqrt(ds)
    ht = hs[..., :1].repeat(1, 1, dt) * 0.3 + torch.randn(b, p, dt, generator=g)  # correlated with the student
    wt = torch.randn(vt, dt, generator=g) / math.sqrt(dt)
    mask = torch.rand(b, p, generator=g) > 0.25
    mask[:, 0] = True
    return [t.to(dtype) for t in (hs, ws, ht, wt)], mask


def run(impl, tensors, mask, reduction, dtype, train_weight):
    hs, ws, ht, wt = [t.detach().to(dtype).clone() for t in tensors]
    hs.requires_grad_(True)
    ws.requires_grad_(train_weight)
    loss = gram_cosine_loss(hs, ws, ht, wt, mask=mask, reduction=reduction, impl=impl)
    (loss * 1.3).backward()
    return loss.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("reduction", ["batch", "sample"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_matches_reference(impl, dtype, shape, reduction, train_weight):
    tensors, mask = make(SHAPES[shape], dtype)
    ref = run("reference", tensors, mask, reduction, torch.float64, train_weight)
    base = run("reference", tensors, mask, reduction, dtype, train_weight)
    got = run(impl, tensors, mask, reduction, dtype, train_weight)
    for name, g, r, b in zip(("loss", "dH", "dW"), got, ref, base):
        if r is None:
            assert g is None
            continue
        assert_close(f"{impl}/{shape}/{reduction}/{name}", g, r, dtype, b)


def test_batch_reduction_is_one_cosine_over_all_samples():
    """batch: one cosine of the concatenated Gram matrices (not the mean of per-sample cosines)."""
    (hs, ws, ht, wt), _ = make(SHAPES["pp_form"], torch.float64)
    zs, zt = hs @ ws.T, ht @ wt.T
    rs, rt = zs @ zs.transpose(1, 2), zt @ zt.transpose(1, 2)
    expected = 1 - torch.nn.functional.cosine_similarity(rs.flatten(), rt.flatten(), dim=0)
    per_sample = 1 - torch.nn.functional.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=1)
    got_batch = gram_cosine_loss(hs, ws, ht, wt, reduction="batch", impl="torch")
    got_sample = gram_cosine_loss(hs, ws, ht, wt, reduction="sample", impl="torch")
    assert abs(float(got_batch) - float(expected)) < 1e-6
    assert abs(float(got_sample) - float(per_sample.mean())) < 1e-6
    assert abs(float(expected) - float(per_sample.mean())) > 1e-4  # the two reductions really differ here


def test_mask_equals_dropping_rows():
    """Masked rows are excluded exactly as if the sample had fewer visual tokens."""
    (hs, ws, ht, wt), _ = make(SHAPES["pp_form"], torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    sample0 = gram_cosine_loss(hs[:1, :4], ws, ht[:1, :4], wt, reduction="sample", impl="torch")
    sample1 = gram_cosine_loss(hs[1:], ws, ht[1:], wt, reduction="sample", impl="torch")
    both = gram_cosine_loss(hs, ws, ht, wt, mask=mask, reduction="sample", impl="torch")
    assert abs(float(both) - float((sample0 + sample1) / 2)) < 1e-6  # the torch path computes in fp32


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_all_false_mask_gives_zero_loss_and_zero_grads(impl, reduction):
    (hs, ws, ht, wt), _ = make(SHAPES["pp_form"], torch.float32)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    loss = gram_cosine_loss(hs, ws, ht, wt, mask=torch.zeros(2, 7, dtype=torch.bool), reduction=reduction, impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(hs.grad).all() and hs.grad.abs().max() == 0
    assert torch.isfinite(ws.grad).all() and ws.grad.abs().max() == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_empty_sample_in_sample_reduction_is_ignored(impl):
    (hs, ws, ht, wt), _ = make(SHAPES["pp_form"], torch.float32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    hs.requires_grad_(True)
    got = gram_cosine_loss(hs, ws, ht, wt, mask=mask, reduction="sample", impl=impl)
    got.backward()
    only0 = gram_cosine_loss(hs[:1].detach(), ws, ht[:1], wt, reduction="sample", impl="reference")
    assert abs(float(got.detach()) - float(only0)) < 1e-5
    assert torch.isfinite(hs.grad).all() and hs.grad[1].abs().max() == 0


def test_frozen_weight_gram_is_cached_and_invalidated():
    w = torch.randn(50, 8)
    g1 = gram_module.weight_gram(w, 50)
    assert gram_module.weight_gram(w, 50) is g1  # cache hit
    with torch.no_grad():
        w.mul_(2.0)  # in-place update bumps the version: recomputed
    g2 = gram_module.weight_gram(w, 50)
    assert g2 is not g1 and torch.allclose(g2, 4 * g1, rtol=1e-5)
    assert torch.allclose(gram_module.weight_gram(w, 30), w[:30].T @ w[:30], rtol=1e-5)


def test_new_tensor_at_reused_address_is_not_a_cache_hit():
    """A freed weight's storage can be reused by a new tensor of the same shape."""
    hits = 0
    for seed in range(6):
        w = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed))
        g = gram_module.weight_gram(w, 64)
        assert torch.allclose(g, w.T @ w, rtol=1e-5), f"stale G for seed {seed}"
        hits += 1
        del w
    assert hits == 6


def test_trainable_weight_gets_gradient_through_gram():
    (hs, ws, ht, wt), mask = make(SHAPES["pp_form"], torch.float64)
    ws.requires_grad_(True)
    gram_cosine_loss(hs, ws, ht, wt, mask=mask, impl="torch").backward()
    assert ws.grad is not None and ws.grad.abs().max() > 0


def _good():
    return dict(student_hidden=torch.randn(2, 5, 8), student_weight=torch.randn(20, 8),
                teacher_hidden=torch.randn(2, 5, 6), teacher_weight=torch.randn(20, 6))


@pytest.mark.parametrize("change,match", [
    (dict(student_hidden=torch.randn(10, 8)), r"student_hidden has shape \(10, 8\); expected .* 3 dims"),
    (dict(teacher_hidden=torch.randn(2, 4, 6)), r"teacher_hidden \(2, 4, 6\) and student_hidden \(2, 5, 8\)"),
    (dict(student_weight=torch.randn(20, 7)), r"student hidden size mismatch"),
    (dict(teacher_weight=torch.randn(20, 5)), r"teacher hidden size mismatch"),
    (dict(teacher_weight=torch.randn(20, 6, requires_grad=True)), r"teacher_weight \(20, 6\) requires grad"),
    (dict(teacher_hidden=torch.randn(2, 5, 6, dtype=torch.float64)), r"teacher_hidden has dtype torch.float64"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), r"mask has shape \(2, 4\); expected a bool tensor \[B, P\] = \(2, 5\)"),
    (dict(mask=torch.ones(2, 5)), r"mask has shape \(2, 5\); expected a bool"),
    (dict(reduction="mean"), r"reduction='mean'"),
    (dict(student_weight=torch.randn(20, 8, device="meta")), r"student_weight is on meta but student_hidden is on cpu"),
    (dict(impl="numpy"), r"impl='numpy'"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_named_error(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        gram_cosine_loss(**args)
