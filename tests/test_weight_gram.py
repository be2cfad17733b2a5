"""weight_gram: G = W^T W without an fp32 copy of a 16-bit weight, and its hand-written backward.

G against a float64 reference for every dtype (several row blocks), dW against autograd of the plain
formula, gradcheck through gram_cosine_loss in float64, and the memory: the live-bytes peak on a meta
weight of LLaVA-KD-1B's lm_head size, and the tensors a trainable head saves for backward.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from kdengine.losses import gram_cosine_loss
from kdengine.plan.live_bytes import TorchOps

gram_module = importlib.import_module("kdengine.losses.gram_cosine")
kernel_module = importlib.import_module("kdengine.kernels.gram_cosine")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# max |G - G64| / (|W|^T |W|) per weight dtype: fp32 sums (products of 16-bit values are exact in fp32);
# rounding G to a 16-bit dtype anywhere would show as ~1e-3
G_TOL = {torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-13}
# dW is returned in the weight's dtype: its rounding plus fp32 sums
DW_TOL = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-5, torch.float64: 1e-13}
MB = 1 << 20


def make_weight(v, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 fp32 rows at D=32, so the test weights span several blocks and a partial last one."""
    monkeypatch.setattr(gram_module, "BLOCK_BYTES", 64 * 32 * 4)
    monkeypatch.setattr(kernel_module, "ROW_BLOCK_BYTES", 8 * 32 * 4)


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused_requested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_float64_reference(dtype, fused, small_blocks):
    w = make_weight(1000, 32, dtype)
    rows = 777
    w64 = w[:rows].double()
    ref, scale = w64.T @ w64, w64.abs().T @ w64.abs()
    g = gram_module._gram(w[:rows], fused=fused)  # fused on CPU: no fp32-output mm, falls back to blocks
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = float(((g.double() - ref).abs() / scale).max())
    assert err <= G_TOL[dtype], f"{dtype}: G error {err:.3e} > {G_TOL[dtype]:.1e}"
    cached = gram_module.weight_gram(w, rows)  # the frozen-weight entry point gives the same G
    assert torch.equal(cached, g)


@pytest.mark.parametrize("rows", [1000, 777], ids=["all_rows", "first_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_matches_autograd_of_plain_formula(dtype, rows, small_blocks):
    w = make_weight(1000, 32, dtype).requires_grad_(True)
    dg = torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # not symmetric
    g = gram_module.weight_gram(w, rows)
    assert g.requires_grad
    g.backward(dg.to(g.dtype))

    w64 = w.detach().double().requires_grad_(True)
    (w64[:rows].T @ w64[:rows]).backward(dg)
    ref = w64.grad
    assert w.grad.dtype == dtype and w.grad.shape == w.shape
    assert (w.grad[rows:] == 0).all(), "rows past `rows` take no part in G: zero gradient"
    scale = w64.detach()[:rows].abs() @ (dg.abs() + dg.abs().T)
    err = float(((w.grad[:rows].double() - ref[:rows]).abs() / scale).max())
    assert err <= DW_TOL[dtype], f"{dtype}: dW error {err:.3e} > {DW_TOL[dtype]:.1e}"


@pytest.mark.parametrize("reduction", ["batch", "sample"])
@pytest.mark.parametrize("b,p,ds,dt,v,vt", [(2, 5, 6, 4, 13, 11), (2, 9, 4, 5, 10, 12)], ids=["pp_form", "dd_form"])
def test_gradcheck_float64_trainable_student_head(b, p, ds, dt, v, vt, reduction):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(b, p, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(b, p, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(vt, dt, generator=g, dtype=torch.float64)
    mask = torch.ones(b, p, dtype=torch.bool)
    mask[1, 3:] = False

    def loss(hs, ws):
        return gram_cosine_loss(hs, ws, ht, wt, mask=mask, reduction=reduction, impl="torch")

    assert torch.autograd.gradcheck(loss, (hs, ws), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["blocks", "fp32_output_mm"])
def test_gram_of_a_bf16_lm_head_needs_no_fp32_copy(fused):
    """LLaVA-KD-1B's student head [151936, 1024] in bf16 on meta: the fp32 copy alone would be 594 MB."""
    w = torch.empty(151936, 1024, dtype=torch.bfloat16, device="meta")
    with TorchOps() as mode:
        g = gram_module._gram(w, fused=fused)
    assert g.shape == (1024, 1024) and g.dtype == torch.float32
    assert mode.peak < 64 * MB, f"weight_gram peak {mode.peak / MB:.0f} MB (fp32 copy: {w.numel() * 4 / MB:.0f} MB)"


def test_weight_gram_entry_point_on_meta_stays_under_budget():
    w = torch.empty(151936, 1024, dtype=torch.bfloat16, device="meta")
    with TorchOps() as mode:
        gram_module.weight_gram(w, w.shape[0])
    assert mode.peak < 64 * MB, f"weight_gram peak {mode.peak / MB:.0f} MB"


def test_trainable_bf16_head_backward_works_in_blocks():
    """Forward + backward of a trainable bf16 head: beyond the gradient itself (the weight's dtype), < 64 MB."""
    w = torch.empty(151936, 1024, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with TorchOps() as mode:
        g = gram_module.weight_gram(w, w.shape[0])
        g.backward(torch.empty_like(g))
    assert w.grad.dtype == torch.bfloat16
    grad_bytes = w.grad.numel() * w.grad.element_size()
    assert mode.peak - grad_bytes < 64 * MB, f"working peak {(mode.peak - grad_bytes) / MB:.0f} MB beyond dW"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_trainable_head_saves_no_fp32_copy_of_the_weight(impl):
    v, d = 2000, 32
    w = make_weight(v, d, torch.bfloat16).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(2, 5, d, generator=g).to(torch.bfloat16).requires_grad_(True)
    ht = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16)
    wt = make_weight(v, 16, torch.bfloat16, seed=4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gram_cosine_loss(hs, w, ht, wt, impl=impl)
    big = [(tuple(t.shape), t.dtype) for t in saved if t.numel() >= v * d // 2 and t.data_ptr() != w.data_ptr()]
    assert not big, f"weight-sized tensors saved for backward besides W itself: {big}"
    assert any(t.data_ptr() == w.data_ptr() and t.dtype == torch.bfloat16 for t in saved), "W itself is saved"
    loss.backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16 and w.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_row_block_helpers_match_float64(dtype, small_blocks):
    """kdengine.kernels.gram_cosine: A = H G and sum_b H^T R over row blocks (8 rows here) vs float64."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 37, 32, generator=g).to(dtype)
    gm = torch.randn(32, 32, generator=g)
    r = torch.randn(3, 37, 20, generator=g)
    a = kernel_module._times_gram(h, gm, torch.float32)
    a_ref = h.double() @ gm.double()
    assert a.dtype == torch.float32
    assert float(((a.double() - a_ref).abs() / (h.double().abs() @ gm.double().abs())).max()) <= 1e-5
    s = kernel_module._gram_of_rows(h, r)
    s_ref = torch.einsum("bpi,bpj->ij", h.double(), r.double())
    s_scale = torch.einsum("bpi,bpj->ij", h.double().abs(), r.double().abs())
    assert float(((s.double() - s_ref).abs() / s_scale).max()) <= 1e-5


def test_kernel_forward_upcasts_bf16_hidden_in_row_blocks():
    """A = H G for bf16 H [4, 729, 2048] on meta: the bf16 A plus one block's fp32 temporaries, no fp32 copy of H."""
    h = torch.empty(4, 729, 2048, dtype=torch.bfloat16, device="meta")
    gm = torch.empty(2048, 2048, device="meta")
    with TorchOps() as mode:
        a = kernel_module._times_gram(h, gm, torch.bfloat16)
    a_bytes = a.numel() * a.element_size()
    whole_fp32 = h.numel() * 4
    assert mode.peak - a_bytes < whole_fp32, f"peak beyond A {(mode.peak - a_bytes) / MB:.1f} MB"


def test_stored_teacher_gram_objective_keeps_float64():
    """kdengine.cache.objective with a float64 student: G and R_s in float64, equal to the float64 reference."""
    from kdengine.cache.objective import gram_cosine_from_teacher_gram

    g = torch.Generator().manual_seed(6)
    hs = torch.randn(3, 7, 12, generator=g, dtype=torch.float64)
    ws = torch.randn(37, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(3, 7, 20, generator=g, dtype=torch.float64), torch.randn(37, 20, generator=g, dtype=torch.float64)
    zt = ht @ wt.T
    got = gram_cosine_from_teacher_gram(hs, ws, zt @ zt.transpose(1, 2))
    ref = gram_cosine_loss(hs, ws.detach(), ht, wt, impl="reference")
    assert got.dtype == torch.float64
    a, b = float(got.detach()), float(ref)
    assert abs(a - b) <= 1e-12 * max(1.0, abs(b)), (a, b)
    got.backward()
    assert ws.grad.dtype == torch.float64
