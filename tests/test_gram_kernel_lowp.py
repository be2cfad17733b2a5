"""GramStatsTriton with bf16 hidden states: A = H G is stored in bf16 and the backward's R combination is
rounded to bf16 (tensor-core dots on a GPU). Forward and gradients against float64 autograd through
materialised R, within bf16's tolerance (tests/helpers.py)."""

import torch
from helpers import assert_close

from kdengine.kernels.gram_cosine import GramStatsTriton


def test_bf16_hidden_matches_float64_autograd():
    B, P, Ds, Dt = 2, 37, 48, 20
    gen = torch.Generator().manual_seed(11)
    h_s = torch.randn(B, P, Ds, generator=gen).to(torch.bfloat16)
    h_t = torch.randn(B, P, Dt, generator=gen).to(torch.bfloat16)
    w_s = torch.randn(3 * Ds, Ds, generator=gen) / Ds**0.5
    w_t = torch.randn(2 * Dt, Dt, generator=gen) / Dt**0.5
    g_s, g_t = w_s.T @ w_s, w_t.T @ w_t
    weights = torch.tensor([[0.8, -0.3, 0.5], [-1.2, 0.4, 2.0]])

    h = h_s.clone().requires_grad_(True)
    g = g_s.clone().requires_grad_(True)
    stats = GramStatsTriton.apply(h, g, h_t, g_t)
    (stats * weights).sum().backward()

    h64 = h_s.double().requires_grad_(True)
    g64 = g_s.double().requires_grad_(True)
    r_s = h64 @ g64 @ h64.transpose(1, 2)
    r_t = h_t.double() @ g_t.double() @ h_t.double().transpose(1, 2)
    ref = torch.stack([(r_s * r_t).sum((1, 2)), (r_s * r_s).sum((1, 2)), (r_t * r_t).sum((1, 2))], 1)
    (ref * weights.double()).sum().backward()

    assert h.grad.dtype == torch.bfloat16
    assert_close("stats", stats.detach(), ref.detach(), torch.bfloat16)
    assert_close("grad h_s", h.grad, h64.grad, torch.bfloat16)
    assert_close("grad g_s", g.grad, g64.grad, torch.bfloat16)
