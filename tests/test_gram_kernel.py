"""Gram-cosine Triton kernels vs their float64 references (kdengine.kernels.gram_cosine).

Every check is three-way: the kernel's error against the float64 oracle must stay within
MULT x the error of the same computation done by PyTorch in fp32 (the torch path's
precision) plus a per-dtype atol from TOLERANCES. Errors are scaled so that they are
meaningful under cancellation:
    stats  sum R_s*R_t  : |err| / sqrt(sum R_s^2 * sum R_t^2)   (Cauchy-Schwarz scale)
           sum R_s^2, sum R_t^2 : |err| / value
    matmul out          : |err| / ((|coef_t| |R_t| + |coef_s| |R_s|) @ |m|)   elementwise
"""

import os

import torch

if not torch.cuda.is_available():  # tests/conftest.py does the same; kept for standalone runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kdengine.kernels.gram_cosine import GramStatsTriton, gram_grad_matmul, gram_stats  # noqa: E402
from kdengine.losses.reference import gram_grad_matmul_reference, gram_stats_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = 1e-30
MULT = 4.0
# dtype of H and m (A is fp32 as the caller computes it, except in the all-same-dtype test).
# atol on the scaled errors above; fp32 accumulation gives ~1e-7 on these shapes.
TOLERANCES = {
    torch.float32: dict(stats=2e-6, out=2e-6),
    torch.float16: dict(stats=2e-6, out=2e-6),
    torch.bfloat16: dict(stats=4e-6, out=4e-6),
}
DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in TOLERANCES]
# (B, P, Ds, Dt): P not a multiple of any block size, Ds/Dt not multiples of BD.
SHAPES = [
    pytest.param((2, 37, 48, 20), id="B2-P37-Ds48-Dt20"),
    pytest.param((1, 1, 48, 20), id="B1-P1-Ds48-Dt20"),
    pytest.param((1, 130, 24, 40), id="B1-P130-Ds24-Dt40"),
]
COEF_T = (0.7, -1.3, 1.9)
COEF_S = (2.5, 0.25, -0.6)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def make_side(B, P, D, dtype, gen, keep=None):
    """H [B, P, D] in `dtype` and A = H @ G [B, P, D] fp32 with G = W^T W (so R is symmetric)."""
    h = torch.randn(B, P, D, generator=gen).to(dtype)
    if keep is not None:
        h = h * keep[..., None].to(dtype)
    w = torch.randn(3 * D, D, generator=gen) / D**0.5
    a = h.float() @ (w.T @ w)
    return a.to(DEVICE), h.to(DEVICE)


def make_inputs(shape, dtype, seed=0, keep=None):
    B, P, Ds, Dt = shape
    gen = torch.Generator().manual_seed(seed)
    a_s, h_s = make_side(B, P, Ds, dtype, gen, keep)
    a_t, h_t = make_side(B, P, Dt, dtype, gen, keep)
    return a_s, h_s, a_t, h_t


def make_coefs(B):
    return (torch.tensor(COEF_T[:B], device=DEVICE), torch.tensor(COEF_S[:B], device=DEVICE))


# ----------------------------------------------------------------------------------------------
# torch fp32 baselines and scaled errors
# ----------------------------------------------------------------------------------------------
def stats_torch32(a_s, h_s, a_t, h_t):
    r_s = a_s.float() @ h_s.float().transpose(1, 2)
    r_t = a_t.float() @ h_t.float().transpose(1, 2)
    return torch.stack([(r_s * r_t).sum((1, 2)), (r_s * r_s).sum((1, 2)), (r_t * r_t).sum((1, 2))], 1)


def grad_matmul_torch32(a_s, h_s, a_t, h_t, coef_t, coef_s, m):
    r_s = a_s.float() @ h_s.float().transpose(1, 2)
    r_t = a_t.float() @ h_t.float().transpose(1, 2)
    return (coef_t.float()[:, None, None] * r_t - coef_s.float()[:, None, None] * r_s) @ m.float()


def stats_error(got, ref):
    """Scaled error [B, 3] of statistics `got` against float64 `ref`."""
    got, ref = got.double().cpu(), ref.double().cpu()
    scale = torch.stack([(ref[:, 1] * ref[:, 2]).clamp_min(0).sqrt(), ref[:, 1].abs(), ref[:, 2].abs()], 1)
    return (got - ref).abs() / scale.clamp_min(TINY)


def grad_matmul_error(got, ref, a_s, h_s, a_t, h_t, coef_t, coef_s, m):
    """Elementwise error [B, P, Dm] scaled by (|coef_t||R_t| + |coef_s||R_s|) @ |m|."""
    r_s = (a_s.double() @ h_s.double().transpose(1, 2)).abs()
    r_t = (a_t.double() @ h_t.double().transpose(1, 2)).abs()
    scale = (coef_t.double().abs()[:, None, None] * r_t + coef_s.double().abs()[:, None, None] * r_s) @ m.double().abs()
    return ((got.double() - ref.double()).abs() / scale.clamp_min(TINY)).cpu()


def assert_within(name, err, bound, got, ref, max_show=5):
    """Fail with the first mismatching indices (and values) when any err > bound."""
    bad = (err > bound) | err.isnan()
    if bad.any():
        idx = bad.nonzero()[:max_show].tolist()
        rows = [f"  {tuple(i)}: got {got.double().cpu()[tuple(i)].item():.9g} "
                f"ref {ref.double().cpu()[tuple(i)].item():.9g} err {err[tuple(i)].item():.3g}" for i in idx]
        pytest.fail(f"{name}: {int(bad.sum())}/{err.numel()} entries exceed bound {bound:.3g} "
                    f"(max err {err.max().item():.3g}); first mismatches:\n" + "\n".join(rows))


def check_stats(inputs, dtype, **kwargs):
    ref = gram_stats_reference(*inputs)
    got = gram_stats(*inputs, **kwargs)
    assert got.shape == ref.shape and got.dtype == torch.float32
    base = stats_error(stats_torch32(*inputs), ref).max().item()
    assert_within("gram_stats", stats_error(got, ref), MULT * base + TOLERANCES[dtype]["stats"], got, ref)
    return got


def check_grad_matmul(inputs, coef_t, coef_s, m, dtype, **kwargs):
    args = (*inputs, coef_t, coef_s, m)
    ref = gram_grad_matmul_reference(*args)
    got = gram_grad_matmul(*args, **kwargs)
    assert got.shape == ref.shape and got.dtype == torch.float32
    base = grad_matmul_error(grad_matmul_torch32(*args), ref, *args).max().item()
    err = grad_matmul_error(got, ref, *args)
    assert_within("gram_grad_matmul", err, MULT * base + TOLERANCES[dtype]["out"], got, ref)
    return got


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats(dtype, shape):
    check_stats(make_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_matmul(dtype, shape):
    inputs = make_inputs(shape, dtype)
    coef_t, coef_s = make_coefs(shape[0])
    check_grad_matmul(inputs, coef_t, coef_s, inputs[1], dtype)  # m = h_s: the weight-gradient product


@pytest.mark.parametrize("dtype", DTYPES)
def test_asymmetric_same_dtype(dtype):
    """Arbitrary A (R not symmetric), every operand in `dtype`: symmetric=False must be exact."""
    B, P, Ds, Dt = 2, 37, 48, 20
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(B, P, d, generator=gen).to(dtype).to(DEVICE) for d in (Ds, Ds, Dt, Dt)]
    check_stats(inputs, dtype, symmetric=False)
    coef_t, coef_s = make_coefs(B)
    m = torch.randn(B, P, 24, generator=gen).to(dtype).to(DEVICE)
    check_grad_matmul(inputs, coef_t, coef_s, m, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_rows(dtype):
    """Zeroed rows in H and A (sample 1 fully masked): stats of the valid rows only, zero grads."""
    B, P, Ds, Dt = 3, 37, 48, 20
    keep = torch.ones(B, P, dtype=torch.bool)
    keep[0, 30:] = False
    keep[1] = False
    keep[2, ::3] = False
    inputs = make_inputs((B, P, Ds, Dt), dtype, seed=2, keep=keep)
    got = check_stats(inputs, dtype)
    assert (got[1] == 0).all(), f"fully masked sample has nonzero stats {got[1].tolist()}"
    # Masked rows alone give the same stats as the sample cut down to its valid rows.
    valid = keep[0].nonzero().squeeze(1).to(DEVICE)
    cut = gram_stats(*(x[:1, valid] for x in inputs))
    torch.testing.assert_close(got[:1], cut, rtol=1e-6, atol=0)

    coef_t, coef_s = make_coefs(B)
    out = check_grad_matmul(inputs, coef_t, coef_s, inputs[0], dtype)  # m = a_s: the hidden-state product
    masked = ~keep.to(DEVICE)
    assert (out[masked] == 0).all(), "masked rows of the product must be exactly zero"


@pytest.mark.parametrize("coefs", [(1.0, 1.0), (0.0, 3.0), (-2.0, 0.0)], ids=["ones", "t0-s3", "t-2-s0"])
def test_grad_matmul_coefs(coefs):
    """coef_t * R_t - coef_s * R_s for coefs that cancel or switch one side off."""
    dtype = torch.float32
    shape = (2, 37, 48, 20)
    inputs = make_inputs(shape, dtype, seed=3)
    coef_t = torch.full((2,), coefs[0], device=DEVICE)
    coef_s = torch.full((2,), coefs[1], device=DEVICE)
    check_grad_matmul(inputs, coef_t, coef_s, inputs[1], dtype)


def test_grad_matmul_student_equals_teacher():
    """Identical sides with equal coefs cancel exactly (R_s and R_t tiles are the same computation)."""
    a, h, _, _ = make_inputs((2, 37, 20, 20), torch.float32, seed=4)
    c = torch.tensor([0.5, 1.5], device=DEVICE)
    out = gram_grad_matmul(a, h, a, h, c, c, h)
    assert (out == 0).all(), f"max |out| = {out.abs().max().item()}"


@pytest.mark.parametrize("blocks", [dict(BP=32, BD=16, BDM=32), dict(BP=16, BD=32, BDM=16)],
                         ids=["BP32-BD16-BDM32", "BP16-BD32-BDM16"])
def test_block_sizes(blocks):
    dtype = torch.float32
    inputs = make_inputs((1, 70, 40, 24), dtype, seed=5)
    check_stats(inputs, dtype, BP=blocks["BP"], BD=blocks["BD"])
    coef_t, coef_s = make_coefs(1)
    check_grad_matmul(inputs, coef_t, coef_s, inputs[0], dtype, **blocks)


def test_stats_deterministic():
    inputs = make_inputs((2, 37, 48, 20), torch.bfloat16, seed=6)
    assert torch.equal(gram_stats(*inputs), gram_stats(*inputs))


def test_empty():
    a_s, h_s, a_t, h_t = (torch.zeros(2, 0, d, device=DEVICE) for d in (8, 8, 4, 4))
    assert torch.equal(gram_stats(a_s, h_s, a_t, h_t), torch.zeros(2, 3, device=DEVICE))
    c = torch.ones(2, device=DEVICE)
    assert gram_grad_matmul(a_s, h_s, a_t, h_t, c, c, a_s).shape == (2, 0, 8)


@pytest.mark.parametrize("case,match", [
    ("rank", "h_s must have shape"),
    ("batch", "a_t has \\[B, P\\]"),
    ("tokens", "h_t has \\[B, P\\]"),
    ("dim", "a_s and h_s must share D"),
    ("device", "h_t is on meta"),
    ("coef", "coef_s must be a tensor of shape \\(2,\\)"),
    ("m", "m has \\[B, P\\]"),
    ("block", "BP must be a power of two"),
])
def test_validation(case, match):
    a_s, h_s, a_t, h_t = (torch.zeros(2, 5, d, device=DEVICE) for d in (8, 8, 4, 4))
    c, c_s, m = torch.ones(2, device=DEVICE), torch.ones(2, device=DEVICE), torch.zeros(2, 5, 3, device=DEVICE)
    kwargs = {}
    if case == "rank":
        h_s = h_s[0]
    elif case == "batch":
        a_t = a_t[:1]
    elif case == "tokens":
        h_t = h_t[:, :4]
    elif case == "dim":
        a_s = torch.zeros(2, 5, 9, device=DEVICE)
    elif case == "device":
        h_t = torch.zeros(2, 5, 4, device="meta")
    elif case == "coef":
        c_s = torch.ones(3, device=DEVICE)
    elif case == "m":
        m = torch.zeros(2, 6, 3, device=DEVICE)
    elif case == "block":
        kwargs = dict(BP=24)
    with pytest.raises(ValueError, match=match):
        gram_grad_matmul(a_s, h_s, a_t, h_t, c, c_s, m, **kwargs)
    if case not in ("coef", "m"):
        with pytest.raises(ValueError, match=match):
            gram_stats(a_s, h_s, a_t, h_t, **{k: v for k, v in kwargs.items() if k != "BDM"})


@pytest.mark.parametrize("need", ["h-and-g", "h-only", "g-only"])
def test_autograd_function(need):
    """GramStatsTriton forward and backward vs float64 autograd through materialised R."""
    B, P, Ds, Dt = 2, 37, 48, 20
    gen = torch.Generator().manual_seed(7)
    keep = torch.ones(B, P, dtype=torch.bool)
    keep[1, 25:] = False
    h_s = (torch.randn(B, P, Ds, generator=gen) * keep[..., None]).to(DEVICE)
    h_t = (torch.randn(B, P, Dt, generator=gen) * keep[..., None]).to(DEVICE)
    w_s = torch.randn(3 * Ds, Ds, generator=gen).to(DEVICE) / Ds**0.5
    w_t = torch.randn(2 * Dt, Dt, generator=gen).to(DEVICE) / Dt**0.5
    g_s, g_t = w_s.T @ w_s, w_t.T @ w_t
    weights = torch.tensor([[0.8, -0.3, 0.5], [-1.2, 0.4, 2.0]], device=DEVICE)  # grad_stats != 1

    leaves = [h_s.clone().requires_grad_(need != "g-only"), g_s.clone().requires_grad_(need != "h-only")]
    stats = GramStatsTriton.apply(leaves[0], leaves[1], h_t, g_t)
    (stats * weights).sum().backward()

    ref_leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
    r_s = ref_leaves[0] @ ref_leaves[1] @ ref_leaves[0].transpose(1, 2)
    r_t = h_t.double() @ g_t.double() @ h_t.double().transpose(1, 2)
    ref = torch.stack([(r_s * r_t).sum((1, 2)), (r_s * r_s).sum((1, 2)), (r_t * r_t).sum((1, 2))], 1)
    (ref * weights.double()).sum().backward()

    assert_within("stats", stats_error(stats.detach(), ref.detach()), 2e-6, stats.detach(), ref.detach())
    for name, x, x_ref in (("grad h_s", leaves[0], ref_leaves[0]), ("grad g_s", leaves[1], ref_leaves[1])):
        if not x.requires_grad:
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        err = ((x.grad.double() - x_ref.grad).abs() / x_ref.grad.abs().max()).cpu()
        assert_within(name, err, 2e-6, x.grad, x_ref.grad)
    if leaves[0].grad is not None:
        assert (leaves[0].grad[1, 25:] == 0).all(), "masked rows must get zero gradient"
