"""Shared test helpers: error metrics against float64 references with per-dtype tolerances."""

from __future__ import annotations

import torch

# atol on the normalised error (max |x - ref| / max |ref|), per input dtype; the impl may also be
# off by up to REL_TO_BASE times the error of the plain same-dtype PyTorch computation.
ATOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}
REL_TO_BASE = 2.0


def norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.abs().max().clamp_min(1e-12) if ref.numel() else torch.tensor(1.0)
    return float((x - ref).abs().max() / scale) if ref.numel() else 0.0


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, base: torch.Tensor | None = None):
    """got/base vs a float64 ref; prints the first mismatching indices on failure."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got.double()).all(), f"{name}: non-finite values at {(~torch.isfinite(got.double())).nonzero()[:5].tolist()}"
    err = norm_err(got, ref)
    base_err = norm_err(base, ref) if base is not None else 0.0
    tol = ATOL[dtype] + REL_TO_BASE * base_err
    if err > tol:
        diff = (got.detach().double() - ref.detach().double()).abs()
        flat = diff.flatten().argsort(descending=True)[:5]
        idx = [tuple(int(i) for i in torch.unravel_index(f, diff.shape)) for f in flat] if diff.dim() else [()]
        rows = ", ".join(f"{i}: got {float(got.detach().double()[i]):.6g} ref {float(ref.double()[i]):.6g}" for i in idx)
        raise AssertionError(f"{name}: normalised error {err:.3e} > tol {tol:.3e} "
                             f"(same-dtype torch error {base_err:.3e}); worst {rows}")


# The torch path of fused_linear_divergence has two schedules (kdengine/losses/budget.py). Tests run both:
SCHEDULES = ("row_chunk", "streaming")


def budget_for(schedule: str, n: int, dtype: torch.dtype = torch.float32):
    """budget_mb that selects ``schedule`` at the tests' small sizes (V of a few hundred or more):
    the default (512 MB) holds every row's logits; the smallest legal budget, one streaming block of
    min(N, 1024) rows x 256 columns x 6 temporaries, holds no row chunk."""
    if schedule == "row_chunk":
        return None
    elem = 8 if dtype == torch.float64 else 4
    return max(min(n, 1024), 1) * 256 * 6 * elem / 2**20 * 1.001


def schedules_taken(caplog) -> list[str]:
    """The schedules the torch path logged (caplog at DEBUG for kdengine.losses)."""
    return [r.args[0] for r in caplog.records if r.msg.startswith("fused_linear_divergence torch path")]


def force_streaming(monkeypatch) -> None:
    """Make the torch path stream at any size (tiny vocabularies fit a row chunk in every legal budget):
    its schedule is chosen as for reduction="none"."""
    import kdengine.losses.fused_linear_divergence_torch as fld

    real = fld.choose_schedule
    monkeypatch.setattr(fld, "choose_schedule", lambda *a: real(*a[:6], "none", *a[7:]))
