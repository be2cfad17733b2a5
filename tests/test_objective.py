"""llava_kd_loss against the objective written out with full logits (what the public code does)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import pytest
import torch

from helpers import SCHEDULES, force_streaming

from kdengine.losses import DistillSettings, LossWeights, fused_linear_divergence, linear_cross_entropy, llava_kd_loss


@dataclass
class Out:  # the fields of kdengine.model.DistillOutputs that the objective reads
    hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    visual_mask: torch.Tensor
    response_mask: torch.Tensor
    next_labels: torch.Tensor


def make_batch(seed=0, b=2, seq=20, p=4, ds=12, dt=20, v=50):
    g = torch.Generator().manual_seed(seed)
    vis = torch.zeros(b, seq, dtype=torch.bool)
    vis[0, 2:2 + p] = True
    vis[1, 1:1 + 2 * p] = True  # two images in sample 1
    resp = torch.zeros(b, seq, dtype=torch.bool)
    resp[0, 10:15] = True
    resp[1, 12:19] = True
    labels = torch.where(resp, torch.randint(0, v, (b, seq), generator=g), -100)
    student = Out(torch.randn(b, seq, ds, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(v, ds, generator=g, dtype=torch.float64, requires_grad=True), vis, resp, labels)
    teacher = Out(torch.randn(b, seq, dt, generator=g, dtype=torch.float64),
                  torch.randn(v, dt, generator=g, dtype=torch.float64), vis, resp, labels)
    return student, teacher


def naive(student, teacher, w, temperature, p):
    zs = student.hidden @ student.lm_head_weight.T
    zt = teacher.hidden @ teacher.lm_head_weight.T
    resp, vis = student.response_mask, student.visual_mask
    ce = torch.nn.functional.cross_entropy(zs[resp], student.next_labels[resp])

    def kl(mask):
        log_ps = torch.log_softmax(zs[mask] / temperature, -1)
        log_pt = torch.log_softmax(zt[mask] / temperature, -1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()

    ys, yt = zs[vis].view(-1, p, zs.shape[-1]), zt[vis].view(-1, p, zt.shape[-1])
    rs, rt = ys @ ys.transpose(1, 2), yt @ yt.transpose(1, 2)
    rel = 1 - torch.nn.functional.cosine_similarity(rs.flatten(), rt.flatten(), dim=0)
    return w.ce * ce + w.res * kl(resp) + w.vis * kl(vis) + w.rel * rel


@pytest.mark.parametrize("impl", ["torch", "torch_streaming", "reference"])
def test_objective_matches_full_logits(impl, monkeypatch):
    if impl == "torch_streaming":
        force_streaming(monkeypatch)
        impl = "torch"
    student, teacher = make_batch()
    w = LossWeights(ce=1.0, res=0.7, vis=1.3, rel=0.5)
    total, terms = llava_kd_loss(student, teacher, w, DistillSettings(temperature=1.5, impl=impl), num_image_tokens=4)
    total.backward()
    got = [student.hidden.grad.clone(), student.lm_head_weight.grad.clone()]
    student.hidden.grad = None
    student.lm_head_weight.grad = None
    expected = naive(student, teacher, w, 1.5, 4)
    expected.backward()
    assert abs(float(total) - float(expected)) < 1e-5
    assert abs(float(terms["loss"]) - float(expected)) < 1e-5
    for g, r in zip(got, (student.hidden.grad, student.lm_head_weight.grad)):
        assert (g - r).abs().max() < 1e-5 * r.abs().max()


def old_objective(student, teacher, w, settings):
    """The objective as llava_kd_loss computed it before the scalar reduction (per-row divergences weighted
    outside the op), without RDist, with the float64 reference op: (total, ce, res, vis)."""
    resp, vis = student.response_mask, student.visual_mask
    rows = resp | vis if w.vis != 0 else resp
    is_resp = resp[rows]
    labels = torch.where(is_resp, student.next_labels[rows], -100)
    div_rows, ce = fused_linear_divergence(
        student.hidden[rows], student.lm_head_weight, teacher.hidden[rows].detach(),
        teacher.lm_head_weight.detach(), divergence=settings.divergence, beta=settings.beta,
        temperature=settings.temperature, labels=labels, reduction="none", impl="reference")
    l_res = torch.where(is_resp, div_rows, 0.0).sum() / is_resp.sum().clamp_min(1)
    l_vis = torch.where(is_resp, 0.0, div_rows).sum() / (~is_resp).sum().clamp_min(1)
    return w.ce * ce + w.res * l_res + w.vis * l_vis, ce, l_res, l_vis


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("weights", [
    LossWeights(ce=1.0, res=0.7, vis=1.3, rel=0),
    LossWeights(ce=0.0, res=1, vis=0, rel=0),
    LossWeights(ce=2.5, res=0, vis=0.4, rel=0),
], ids=["all", "no_ce_no_vis", "vis_only"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_scalar_objective_equals_the_per_row_formulation(divergence, weights, schedule, monkeypatch, caplog):
    """Weights moved into weight= and a sum reduction: the logged terms, the loss and the gradients equal
    the old per-row formulation; the row-chunk schedule uses the gradient formed in its forward."""
    caplog.set_level(logging.DEBUG, logger="kdengine.losses")
    if schedule == "streaming":
        force_streaming(monkeypatch)
    settings = DistillSettings(divergence=divergence, temperature=1.5, impl="torch")
    student, teacher = make_batch(seed=3)
    total, terms = llava_kd_loss(student, teacher, weights, settings)
    (2.0 * total).backward()
    got = [student.hidden.grad.clone(), student.lm_head_weight.grad.clone()]
    student.hidden.grad = student.lm_head_weight.grad = None
    old_total, old_ce, old_res, old_vis = old_objective(student, teacher, weights, settings)
    (2.0 * old_total).backward()
    for name, old in (("loss", old_total), ("ce", old_ce), ("res", old_res), ("vis", old_vis)):
        if name in terms:
            # the logged terms are fp32 (detach().float()), as before
            assert abs(float(terms[name]) - float(old)) <= 1e-6 * max(1.0, abs(float(old))), (name, terms[name], old)
    assert set(terms) == {"loss", "ce", "res", "vis"} and not any(t.requires_grad for t in terms.values())
    assert abs(float(total) - float(old_total)) <= 1e-12 * abs(float(old_total))
    for g, r in zip(got, (student.hidden.grad, student.lm_head_weight.grad)):
        assert (g - r).abs().max() <= 1e-10 * r.abs().max()
    assert "recomputing" not in caplog.text  # grad_ce / grad_div was ce_weight: no second logits pass


def test_ce_only_stage_matches_cross_entropy():
    student, _ = make_batch()
    total, terms = llava_kd_loss(student, None, LossWeights(), DistillSettings())
    zs = student.hidden @ student.lm_head_weight.T
    resp = student.response_mask
    expected = torch.nn.functional.cross_entropy(zs[resp], student.next_labels[resp])
    assert abs(float(total) - float(expected)) < 1e-6 and set(terms) == {"ce", "loss"}


def test_linear_cross_entropy_chunks_and_empty():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (37,), generator=g)
    y[::3] = -100
    got = linear_cross_entropy(h, w, y, chunk_rows=5)
    assert abs(float(got) - float(torch.nn.functional.cross_entropy(h @ w.T, y))) < 1e-5  # fp32 logits
    empty = linear_cross_entropy(h[:0], w, y[:0])
    assert float(empty) == 0.0


def test_rdist_needs_whole_images():
    student, teacher = make_batch()
    with pytest.raises(ValueError, match="not a multiple of num_image_tokens=5"):
        llava_kd_loss(student, teacher, LossWeights(), DistillSettings(), num_image_tokens=5)


def test_text_only_batch_has_zero_rdist():
    student, teacher = make_batch()
    for out in (student, teacher):
        out.visual_mask = torch.zeros_like(out.visual_mask)
    total, terms = llava_kd_loss(student, teacher, LossWeights(), DistillSettings(), num_image_tokens=4)
    total.backward()
    assert float(terms["rel"]) == 0.0 and float(terms["vis"]) == 0.0 and torch.isfinite(total)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("inf")), r"temperature = inf: expected a finite number"),
    (dict(divergence="jsd", beta=1.0), r"beta = 1.0 for jsd: expected 0 < beta < 1"),
    (dict(impl="cuda"), r"impl = 'cuda': expected one of"),
    (dict(topk_tail="drop"), r"topk_tail = 'drop': expected one of \['renormalise', 'tail'\]"),
    (dict(rdist_reduction="mean"), r"rdist_reduction = 'mean'"),
])
def test_distill_settings_check_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillSettings(**kwargs)


def test_loss_weights_check_themselves():
    with pytest.raises(ValueError, match=r"rel = -1: expected weights >= 0"):
        LossWeights(rel=-1)
    with pytest.raises(ValueError, match=r"ce = 'x': expected a finite number"):
        LossWeights(ce="x")


def test_frozen_teacher_gram_is_computed_once(monkeypatch):
    """Across steps the frozen teacher's W^T W comes from the cache (the weight object is passed through)."""
    gram = importlib.import_module("kdengine.losses.gram_cosine")
    student, teacher = make_batch()
    calls = []
    real = gram.weight_gram

    def counting(weight, rows):
        g = real(weight, rows)
        calls.append((weight is teacher.lm_head_weight, id(g)))
        return g

    monkeypatch.setattr(gram, "weight_gram", counting)
    for _ in range(3):
        llava_kd_loss(student, teacher, LossWeights(), DistillSettings(impl="torch"), num_image_tokens=4)
    teacher_grams = {g for is_teacher, g in calls if is_teacher}
    assert sum(is_teacher for is_teacher, _ in calls) == 3 and len(teacher_grams) == 1, calls
