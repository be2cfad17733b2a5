"""Triton fused_linear_divergence internals: lm_head biases, the split / chunk plumbing, dtypes, and
launchers that run on meta tensors (as the ahead-of-time compile records them).

Values and gradients are compared with the float64 reference (kdengine.losses.reference) through
tests/helpers.assert_close: the kernel's error may be REL_TO_BASE x the same-dtype reference's plus
a per-dtype atol.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

import kdengine.kernels.fused_linear_divergence as fk
from kdengine.kernels.tuning import fixed_or_tuned
from kdengine.losses import DIVERGENCES
from kdengine.losses.divergences import BETA_DIVERGENCES
from kdengine.losses.fused_linear_divergence import FusedLinearDivergenceParams
from kdengine.losses.reference import fused_linear_divergence_reference

N, DS, DT = 19, 24, 40


def make(v, vt, dtype, seed=0, bias=True, labels=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, DS, generator=g)
    ws = torch.randn(v, DS, generator=g) / math.sqrt(DS) * 3
    xt = torch.randn(N, DT, generator=g)
    wt = torch.randn(vt, DT, generator=g) / math.sqrt(DT) * 3
    bs = torch.randn(v, generator=g) if bias else None
    bt = torch.randn(vt, generator=g) * 2 if bias else None
    lab = torch.randint(0, v, (N,), generator=g) if labels else None
    if lab is not None:
        lab[::5] = -100
    return [t.to(dtype) if t is not None else None for t in (xs, ws, bs, xt, wt, bt)], lab


def leaves(tensors, dtype):
    """Fresh copies in ``dtype``; the student's hidden, weight and bias take gradients."""
    xs, ws, bs, xt, wt, bt = [t.detach().to(dtype).clone() if t is not None else None for t in tensors]
    for x in (xs, ws, bs):
        if x is not None:
            x.requires_grad_(True)
    return xs, ws, bs, xt, wt, bt


def backward_and_grads(div, ce, labels, xs, ws, bs):
    """Backward of 1.3 div + 0.6 ce (grad outputs != 1); returns values and the student's gradients."""
    (1.3 * div + (0.6 * ce if labels is not None else 0)).sum().backward()
    return div.detach(), ce.detach(), xs.grad, ws.grad, (bs.grad if bs is not None else None)


def run_triton(tensors, labels, params, dtype, weight=None):
    xs, ws, bs, xt, wt, bt = leaves(tensors, dtype)
    div, ce = fk.FusedLinearDivergenceTriton.apply(xs, ws, bs, xt, wt, bt, weight, labels, params)
    return backward_and_grads(div, ce, labels, xs, ws, bs)


def run_reference(tensors, labels, params, dtype, weight=None):
    xs, ws, bs, xt, wt, bt = leaves(tensors, dtype)
    beta = params.beta if params.divergence in BETA_DIVERGENCES else None  # the others take no beta
    out = fused_linear_divergence_reference(
        xs, ws, xt, wt, divergence=params.divergence, beta=beta, temperature=params.temperature, weight=weight,
        labels=labels, ignore_index=params.ignore_index, reduction=params.reduction, student_bias=bs,
        teacher_bias=bt)
    div, ce = out if labels is not None else (out, torch.zeros((), dtype=dtype))
    return backward_and_grads(div, ce, labels, xs, ws, bs)


def check(tensors, labels, params, dtype, weight=None):
    got = run_triton(tensors, labels, params, dtype, weight)
    ref = run_reference(tensors, labels, params, torch.float64, weight)
    base = run_reference(tensors, labels, params, dtype, weight)
    for name, g, r, b in zip(("div", "ce", "dX", "dW", "db"), got, ref, base):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        if name == "ce" and labels is None:
            continue
        assert g.dtype == dtype, f"{name} dtype {g.dtype} != {dtype}"
        assert_close(f"{params.divergence}/{name}", g, r, dtype, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bias_matches_reference(divergence, dtype):
    """z = x W^T + b for both models; d bias = column sums of dlogits (V > Vt: CE-only columns too)."""
    tensors, labels = make(200, 190, dtype)
    check(tensors, labels, FusedLinearDivergenceParams(divergence=divergence, temperature=1.5, beta=0.3), dtype)


def test_bias_student_only_teacher_wider_no_labels():
    tensors, _ = make(150, 170, torch.float32, seed=1)
    tensors[5] = None  # no teacher bias
    check(tensors, None, FusedLinearDivergenceParams(divergence="jsd", reduction="sum"), torch.float32)


def test_frozen_bias_gets_no_grad():
    tensors, labels = make(120, 120, torch.float32, seed=2)
    xs, ws, bs, xt, wt, bt = tensors
    xs = xs.clone().requires_grad_(True)
    div, ce = fk.FusedLinearDivergenceTriton.apply(xs, ws, bs, xt, wt, bt, None, labels,
                                                  FusedLinearDivergenceParams())
    (div + ce).backward()
    assert bs.grad is None and ws.grad is None and xs.grad is not None


@pytest.mark.parametrize("split,chunk", [(32, 2**28), (64, 19 * 4 * 256), (2048, 19 * 4 * 256)],
                         ids=["split32", "split64-chunk256", "one-split-chunk256"])
def test_splits_and_chunks_agree_with_reference(monkeypatch, split, chunk):
    """Partial log-sum-exps over many vocabulary splits and a chunked backward give the same answer."""
    monkeypatch.setattr(fk, "INTERPRET_SPLIT_COLS", split)
    monkeypatch.setattr(fk, "CHUNK_BYTES", chunk)
    tensors, labels = make(300, 280, torch.float32, seed=3)
    for divergence in ("forward_kl", "skew_reverse_kl"):
        check(tensors, labels, FusedLinearDivergenceParams(divergence=divergence, temperature=0.8), torch.float32)


def test_float64_is_refused_with_a_clear_error():
    tensors, labels = make(64, 64, torch.float64, bias=False)
    xs, ws, bs, xt, wt, bt = tensors
    with pytest.raises(ValueError, match=r"torch\.float64.*impl='torch'"):
        fk.FusedLinearDivergenceTriton.apply(xs, ws, bs, xt, wt, bt, None, labels, FusedLinearDivergenceParams())


def test_configs_fit_the_launchers():
    """>= 2 tuned configs per list (only those that compile spill-free on sm_80/sm_90 are shipped;
    tests/test_gpu_compile.py holds them to it), each BV dividing the vocabulary split."""
    for table in (fk.FLD_CONFIGS, fk.FLD_CONFIGS_FP32, fk.FLD_STATS_CONFIGS, fk.FLD_STATS_CONFIGS_FP32):
        assert len(table) >= 2
        for cfg in table:
            assert fk.SPLIT_COLS % cfg.kwargs["BV"] == 0, cfg
    for kernel in (fk._fld_rows_kernel, fk._fld_dlogits_kernel):
        assert kernel.configs is fk.FLD_CONFIGS
    for kernel in (fk._fld_rows_kernel_fp32, fk._fld_dlogits_kernel_fp32):
        assert kernel.configs is fk.FLD_CONFIGS_FP32
    assert fk._fld_stats_kernel.configs is fk.FLD_STATS_CONFIGS
    assert fk._fld_stats_kernel_fp32.configs is fk.FLD_STATS_CONFIGS_FP32


def test_fixed_blocks_skip_tuning():
    prune = fixed_or_tuned(("BN", "BV"))["early_config_prune"]
    assert prune(fk.FLD_CONFIGS, {}, grid=None) is fk.FLD_CONFIGS
    (only,) = prune(fk.FLD_CONFIGS, {}, BN=16, BV=32)
    assert only.all_kwargs() == {}


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_launchers_run_on_meta_tensors_when_compiled(monkeypatch, dtype):
    """Not interpreting: launchers pass no block sizes (autotuned), take meta tensors without device
    checks or host syncs, and call the dtype's kernel object through kernel[grid](...)."""
    calls = []
    monkeypatch.setattr(fk, "interpreting", lambda: False)
    names = [f"_fld_{k}_kernel{suffix}" for k in ("stats", "rows", "dlogits") for suffix in ("", "_fp32")]
    for name in names:
        monkeypatch.setattr(fk, name, _Recorder(name, calls))
    n, v, vt = 4096, 151936, 151000
    xs = torch.empty(n, 1024, device="meta", dtype=dtype, requires_grad=True)
    ws = torch.empty(v, 1024, device="meta", dtype=dtype, requires_grad=True)
    bs = torch.empty(v, device="meta", dtype=dtype, requires_grad=True)
    xt = torch.empty(n, 2560, device="meta", dtype=dtype)
    wt = torch.empty(vt, 2560, device="meta", dtype=dtype)
    labels = torch.empty(n, device="meta", dtype=torch.int64)
    div, ce = fk.FusedLinearDivergenceTriton.apply(xs, ws, bs, xt, wt, None, None, labels,
                                                  FusedLinearDivergenceParams(divergence="jsd", temperature=2.0))
    (div + ce).backward()
    assert xs.grad.shape == xs.shape and ws.grad.shape == ws.shape and bs.grad.shape == bs.shape
    suffix = "_fp32" if dtype == torch.float32 else ""
    launched = {name for name, *_ in calls}
    assert launched == {f"_fld_{k}_kernel{suffix}" for k in ("stats", "rows", "dlogits")}
    chunk = fk.CHUNK_BYTES // (2 if dtype == torch.bfloat16 else 4) // n // 256 * 256
    assert sum(name.startswith("_fld_dlogits") for name, *_ in calls) == math.ceil(v / chunk)
    for name, grid, args, kwargs in calls:
        assert not set(kwargs) & {"BN", "BV", "BD"}, f"{name} fixes block sizes: {kwargs}"
        assert callable(grid) and grid({"BN": 64, "BV": 64})[0] > 0


def test_api_passes_biases_to_triton():
    """fused_linear_divergence(impl="triton", student_bias=, teacher_bias=) reaches the kernels' bias path."""
    from kdengine.losses import fused_linear_divergence

    (xs, ws, bs, xt, wt, bt), labels = make(160, 150, torch.float32, seed=4)
    kw = dict(divergence="reverse_kl", labels=labels, student_bias=bs, teacher_bias=bt)
    got = fused_linear_divergence(xs, ws, xt, wt, impl="triton", **kw)
    ref = fused_linear_divergence(xs.double(), ws.double(), xt.double(), wt.double(), impl="reference",
                                  **{**kw, "student_bias": bs.double(), "teacher_bias": bt.double()})
    for name, g, r in zip(("div", "ce"), got, ref):
        assert_close(f"api/{name}", g, r, torch.float32)
