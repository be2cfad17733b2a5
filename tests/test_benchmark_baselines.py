"""The benchmark's "plain" baselines (what a user writes on full logits) compute the same losses as kdengine."""

from __future__ import annotations

import torch

from benchmarks.losses import plain_gram_loss, plain_kd_loss
from kdengine.losses import fused_linear_divergence, gram_cosine_loss


def _data(n=37, ds=24, dt=40, v=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, ds), (v, ds), (n, dt), (v, dt))]


def test_plain_kd_loss_is_forward_kl_batchmean_and_ce():
    xs, ws, xt, wt = _data()
    labels = torch.randint(0, ws.shape[0], (xs.shape[0],), generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 2.0):
        kl, ce = plain_kd_loss(xs, ws, xt, wt, labels, temperature=temperature)
        div, ce_ref = fused_linear_divergence(xs, ws, xt, wt, temperature=temperature, labels=labels,
                                              impl="reference")
        torch.testing.assert_close(kl, div, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ce, ce_ref, rtol=1e-10, atol=1e-12)


def test_plain_gram_loss_is_rdist_batch_reduction():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(3, 17, 24, generator=g, dtype=torch.float64), torch.randn(3, 17, 40, generator=g,
                                                                                      dtype=torch.float64)
    _, ws, _, wt = _data()
    ref = gram_cosine_loss(hs, ws, ht, wt, reduction="batch", impl="reference")
    torch.testing.assert_close(plain_gram_loss(hs, ws, ht, wt), ref, rtol=1e-10, atol=1e-12)
