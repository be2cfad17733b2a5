"""The public losses' calling convention (issue 20): options after the tensors are keyword-only, and
a beta given to a divergence that has none is a ValueError, not silently ignored; beta left out keeps
the old default 0.5 for jsd and the skew divergences."""

from __future__ import annotations

import pytest
import torch
from test_objective import make_batch

from kdengine.compat.liger import liger_divergence
from kdengine.losses import (
    DIVERGENCES,
    DistillSettings,
    LossWeights,
    fused_linear_divergence,
    fused_linear_divergence_reference,
    gram_cosine_loss,
    linear_cross_entropy,
    llava_kd_loss,
    topk_divergence,
)
from kdengine.losses.reference import topk_divergence_reference
from kdengine.train.config import ConfigError, load_config

NO_BETA = ("forward_kl", "reverse_kl", "tvd")
WITH_BETA = ("jsd", "skew_forward_kl", "skew_reverse_kl")


def _rows(n=6, ds=8, dt=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, ds, generator=g, dtype=torch.float64), torch.randn(v, ds, generator=g, dtype=torch.float64),
            torch.randn(n, dt, generator=g, dtype=torch.float64), torch.randn(v, dt, generator=g, dtype=torch.float64))


def _topk(n=6, d=8, v=11, k=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1).gather(1, ids)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64), ids, lp


def test_the_groups_cover_every_divergence():
    assert sorted(NO_BETA + WITH_BETA) == sorted(DIVERGENCES)


# ----------------------------------------------------------------------------- keyword-only options


@pytest.mark.parametrize("call", [
    lambda xs, ws, xt, wt: fused_linear_divergence(xs, ws, xt, wt, "jsd"),
    lambda xs, ws, xt, wt: fused_linear_divergence(xs, ws, xt, wt, "jsd", 0.3, 2.0),
    lambda xs, ws, xt, wt: fused_linear_divergence_reference(xs, ws, xt, wt, "jsd"),
    lambda xs, ws, xt, wt: gram_cosine_loss(xs[None], ws, xt[None], wt, None),
    lambda xs, ws, xt, wt: linear_cross_entropy(xs, ws, torch.zeros(6, dtype=torch.long), 2),
], ids=["fld_divergence", "fld_beta_temperature", "fld_reference", "gram_mask", "linear_ce_chunk_rows"])
def test_positional_options_are_a_type_error(call):
    with pytest.raises(TypeError, match=r"positional argument"):
        call(*_rows())


@pytest.mark.parametrize("fn", [topk_divergence, topk_divergence_reference])
def test_topk_positional_temperature_is_a_type_error(fn):
    xs, ws, ids, lp = _topk()
    with pytest.raises(TypeError, match=r"positional argument"):
        fn(xs, ws, ids, lp, 2.0)
    assert torch.isfinite(fn(xs, ws, ids, lp, temperature=2.0))  # the keyword form works


def test_keyword_order_does_not_matter():
    """The README passes temperature before beta: keywords make the order irrelevant."""
    xs, ws, xt, wt = _rows()
    a = fused_linear_divergence(xs, ws, xt, wt, divergence="jsd", temperature=2.0, beta=0.3, impl="torch")
    b = fused_linear_divergence(xs, ws, xt, wt, beta=0.3, divergence="jsd", temperature=2.0, impl="torch")
    assert float(a) == float(b)


# ----------------------------------------------------------------------------- beta


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("divergence", NO_BETA)
def test_beta_with_a_divergence_that_has_none_is_a_value_error(divergence, impl):
    with pytest.raises(ValueError, match=rf"^beta=0.3 has no effect for divergence '{divergence}'; "
                                         r"pass beta only with jsd, skew_forward_kl, skew_reverse_kl$"):
        fused_linear_divergence(*_rows(), divergence=divergence, beta=0.3, impl=impl)
    with pytest.raises(ValueError, match=rf"beta=0.5 has no effect for divergence '{divergence}'"):
        fused_linear_divergence_reference(*_rows(), divergence=divergence, beta=0.5)
    assert torch.isfinite(fused_linear_divergence(*_rows(), divergence=divergence, beta=None, impl=impl))


def _jsd_by_hand(xs, ws, xt, wt, beta, temperature=1.0):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s; mean over rows."""
    p_s = torch.softmax(xs @ ws.T / temperature, -1)
    p_t = torch.softmax(xt @ wt.T / temperature, -1)
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    return (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_jsd_default_beta_is_still_one_half(impl):
    rows = _rows()
    default = fused_linear_divergence(*rows, divergence="jsd", temperature=1.5, impl=impl)
    assert abs(float(default) - float(_jsd_by_hand(*rows, 0.5, 1.5))) < 1e-12
    explicit = fused_linear_divergence_reference(*rows, divergence="jsd", beta=0.5, temperature=1.5)
    assert abs(float(default) - float(explicit)) < 1e-12
    other = fused_linear_divergence(*rows, divergence="jsd", beta=0.2, temperature=1.5, impl=impl)
    assert abs(float(other) - float(_jsd_by_hand(*rows, 0.2, 1.5))) < 1e-12
    assert abs(float(other) - float(default)) > 1e-4  # beta really changes the value here


@pytest.mark.parametrize("divergence", WITH_BETA)
@pytest.mark.parametrize("beta", [0.0, 1.0, float("nan"), "0.5"])
def test_beta_outside_the_open_unit_interval_is_still_refused(divergence, beta):
    with pytest.raises(ValueError, match=rf"beta={beta!r} for divergence='{divergence}'; expected 0 < beta < 1"):
        fused_linear_divergence(*_rows(), divergence=divergence, beta=beta)


# ----------------------------------------------------------------------------- objective, config, compat


@pytest.mark.parametrize("divergence", NO_BETA)
def test_distill_settings_refuse_beta_without_use(divergence):
    with pytest.raises(ValueError, match=rf"beta = 0.3 has no effect for divergence '{divergence}'"):
        DistillSettings(divergence=divergence, beta=0.3)
    assert DistillSettings(divergence=divergence).beta is None


def test_objective_jsd_default_beta_is_one_half():
    student, teacher = make_batch()
    loss = {b: float(llava_kd_loss(student, teacher, LossWeights(rel=0.0),
                                   DistillSettings(divergence="jsd", beta=b, impl="reference"))[0].detach())
            for b in (None, 0.5, 0.2)}
    assert loss[None] == loss[0.5] and abs(loss[None] - loss[0.2]) > 1e-4


def test_config_with_beta_and_forward_kl_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^stages\[4\]\.distill\.beta = 0.3 has no effect for divergence 'forward_kl'"):
        load_config(None, ["stages.student_dft.distill.beta=0.3"], check_paths=False)
    cfg = load_config(None, ["stages.student_dft.distill.divergence=jsd", "stages.student_dft.distill.beta=0.3"],
                      check_paths=False)
    assert [st.distill.beta for st in cfg.stages if st.name == "student_dft"] == [0.3]


def test_liger_endpoints_pass_no_beta():
    assert liger_divergence(0.0) == ("forward_kl", None)
    assert liger_divergence(1.0) == ("reverse_kl", None)
    assert liger_divergence(0.3) == ("jsd", 0.3)
