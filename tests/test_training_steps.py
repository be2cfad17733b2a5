"""A few optimizer steps of a tiny student with the fused losses track the reference impl."""

from __future__ import annotations

import pytest
import torch
from test_objective import Out

from kdengine.losses import DistillSettings, LossWeights, llava_kd_loss


class TinyStudent(torch.nn.Module):
    """Token embeddings -> 2-layer MLP -> hidden [B, L, D]; an untied lm_head [V, D]."""

    def __init__(self, v=97, d=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(v, d, generator=g) * 0.5)
        self.mlp = torch.nn.Parameter(torch.randn(d, d, generator=g) / d**0.5)
        self.head = torch.nn.Parameter(torch.randn(v, d, generator=g) / d**0.5)

    def forward(self, ids):
        x = self.embed[ids]
        return x + torch.tanh(x @ self.mlp)


def batch(v=97, b=3, seq=24, p=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, seq), generator=g)
    vis = torch.zeros(b, seq, dtype=torch.bool)
    vis[:, 1:1 + p] = True
    vis[2, 1 + p:1 + 2 * p] = True
    resp = torch.zeros(b, seq, dtype=torch.bool)
    resp[:, 14:22] = True
    labels = torch.where(resp, ids.roll(-1, 1), -100)
    teacher_hidden = torch.randn(b, seq, 40, generator=g)
    teacher_head = torch.randn(v, 40, generator=g) / 40**0.5
    return ids, vis, resp, labels, Out(teacher_hidden, teacher_head, vis, resp, labels)


def train(impl, steps=5, freeze_head=False):
    torch.manual_seed(0)
    model = TinyStudent()
    model.head.requires_grad_(not freeze_head)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids, vis, resp, labels, teacher = batch()
    settings = DistillSettings(temperature=2.0, impl=impl)
    weights = LossWeights(ce=1.0, res=1.0, vis=0.7, rel=0.5)
    losses = []
    for _ in range(steps):
        student = Out(model(ids), model.head, vis, resp, labels)
        loss, _ = llava_kd_loss(student, teacher, weights, settings, num_image_tokens=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("freeze_head", [False, True], ids=["trainable_head", "frozen_head"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_training_tracks_reference(impl, freeze_head):
    ref_losses, ref_params = train("reference", freeze_head=freeze_head)
    losses, params = train(impl, freeze_head=freeze_head)
    assert ref_losses[-1] < ref_losses[0], "the tiny student should learn"
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, f"step {step}: {impl} loss {a} vs reference {b}"
    for name in ref_params:
        err = (params[name] - ref_params[name]).abs().max() / ref_params[name].abs().max()
        assert err < 1e-4, f"parameter {name} drifted by {err:.2e} after {len(losses)} steps"
