"""kdengine.compat.LigerFusedLinearJSDLoss against liger-kernel's own LigerFusedLinearJSDLoss.

Liger runs eagerly (compiled=False) on the same inputs. The truth is Liger in float64; kdengine in
float32 must be within the project's tolerance of it (tests/helpers.py): ATOL plus 2x the error
of Liger itself in float32. (Liger takes its CE log-softmax in float32 even for float64 inputs, so
its CE part is a float32-accurate truth, ~1e-7, well inside the 2e-5 tolerance.)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close

from kdengine.compat import LigerFusedLinearJSDLoss, fused_linear_jsd

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
LigerJSD = liger_chunked.LigerFusedLinearJSDLoss


@dataclass(frozen=True)
class Case:
    name: str
    beta: float = 0.5
    temperature: float = 1.0
    ignore: float = 0.0  # fraction of rows labelled ignore_index
    v: int = 103
    vt: int = 103
    bias: bool = False
    w_hard: float = 0.5
    w_soft: float = 0.5
    rows3d: bool = False  # [B, T, H] inputs and [B, T] labels

    def __str__(self):
        return self.name


CASES = [Case(f"beta{b}_T{t}_ign{i}", beta=b, temperature=t, ignore=i)
         for b in (0.0, 0.3, 0.5, 1.0) for t in (1.0, 2.0) for i in (0.0, 0.3)] + [
    Case("all_ignored", ignore=1.0, beta=0.3),
    Case("bias_beta0.3", beta=0.3, bias=True, ignore=0.3),
    Case("bias_beta0_T2", beta=0.0, temperature=2.0, bias=True),
    Case("bias_beta1", beta=1.0, bias=True, ignore=0.3),
    Case("hard_only", w_hard=1.0, w_soft=0.0, ignore=0.3),
    Case("soft_only", w_hard=0.0, w_soft=1.0, ignore=0.3, beta=0.3),
    Case("weights_0.2_0.8", w_hard=0.2, w_soft=0.8, ignore=0.3, temperature=2.0, bias=True),
    Case("rows3d", rows3d=True, ignore=0.3, beta=0.3),
]
N, DS, DT = 37, 24, 16


def make_inputs(case: Case, dtype=torch.float64, seed=0):
    """Student and teacher tensors (float64 masters cast to ``dtype``), labels; student leaves need grad."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, DS, generator=g, dtype=torch.float64)
    ws = torch.randn(case.v, DS, generator=g, dtype=torch.float64) * 2 / math.sqrt(DS)
    xt = torch.randn(N, DT, generator=g, dtype=torch.float64)
    wt = torch.randn(case.vt, DT, generator=g, dtype=torch.float64) * 2 / math.sqrt(DT)
    bs = torch.randn(case.v, generator=g, dtype=torch.float64) if case.bias else None
    bt = torch.randn(case.vt, generator=g, dtype=torch.float64) if case.bias else None
    labels = torch.randint(0, case.v, (N,), generator=g)
    labels[torch.rand(N, generator=g) < case.ignore] = -100
    if case.rows3d:
        xs, xt, labels = xs[:36].reshape(4, 9, DS), xt[:36].reshape(4, 9, DT), labels[:36].reshape(4, 9)
    student = [t.to(dtype).requires_grad_() if t is not None else None for t in (xs, ws, bs)]
    teacher = [t.to(dtype) if t is not None else None for t in (xt, wt, bt)]
    return student, teacher, labels


def loss_and_grads(module, case, dtype, grad_out=1.5, **overrides):
    """(loss, grads of grad_out * loss); 1.5 is exact in float32, the dtype of Liger's loss and its grad_output."""
    (xs, ws, bs), (xt, wt, bt), labels = make_inputs(case, dtype)
    loss = module(xs, ws, xt, wt, labels, bs, bt, **overrides) if overrides else module(xs, ws, xt, wt, labels, bs, bt)
    leaves = [t for t in (xs, ws, bs) if t is not None]
    grads = torch.autograd.grad(loss * grad_out, leaves, allow_unused=True)
    return loss, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def liger(case: Case, **kw):
    return LigerJSD(weight_hard_loss=case.w_hard, weight_soft_loss=case.w_soft, beta=case.beta,
                    temperature=case.temperature, compiled=False, **kw)


def kdengine(case: Case, impl="torch", **kw):
    return LigerFusedLinearJSDLoss(weight_hard_loss=case.w_hard, weight_soft_loss=case.w_soft, beta=case.beta,
                                   temperature=case.temperature, compiled=False, impl=impl, **kw)


GRAD_NAMES = ("d_student_input", "d_student_weight", "d_student_bias")


def check_against_liger(case: Case, dtype=torch.float32, impl="torch"):
    """kdengine in ``dtype`` vs Liger in float64, within ATOL + 2x Liger's own ``dtype`` error."""
    ref, ref_grads = loss_and_grads(liger(case), case, torch.float64)
    base, base_grads = loss_and_grads(liger(case), case, dtype)
    got, got_grads = loss_and_grads(kdengine(case, impl=impl), case, dtype)
    assert got.dtype == torch.float32  # as Liger's loss, for 16-bit and fp32 inputs
    assert_close("loss", got, ref, dtype, base)
    for name, g, r, b in zip(GRAD_NAMES, got_grads, ref_grads, base_grads):
        assert g.dtype == dtype
        assert_close(name, g, r, dtype, b)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_liger(case):
    check_against_liger(case)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_triton_path_matches_liger(beta):
    """The GPU path (TRITON_INTERPRET=1 on CPU): impl='triton', no bias (the kernel has none yet)."""
    check_against_liger(Case(f"triton_beta{beta}", beta=beta, ignore=0.3, temperature=2.0, w_hard=0.3, w_soft=0.7),
                        impl="triton")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bfloat16_inputs(beta):
    """bf16 inputs: fp32 accumulation; the loss is fp32 typed (the core op rounds its value to bf16)."""
    check_against_liger(Case(f"bf16_beta{beta}", beta=beta, ignore=0.3, bias=True), torch.bfloat16)


def test_teacher_gets_no_gradient_like_liger():
    """Liger runs the teacher under no_grad; a teacher that requires grad is accepted and gets none."""
    case = Case("teacher_grad", beta=0.3, bias=True)
    (xs, ws, bs), (xt, wt, bt), labels = make_inputs(case, torch.float32)
    teacher = [t.requires_grad_() for t in (xt, wt, bt)]
    loss = kdengine(case)(xs, ws, xt, wt, labels, bs, bt)
    grads = torch.autograd.grad(loss, [xs, *teacher], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


def test_empty_batch():
    ws = torch.randn(11, DS, requires_grad=True)
    xs = torch.zeros(0, DS, requires_grad=True)
    loss = LigerFusedLinearJSDLoss(beta=0.3)(xs, ws, torch.zeros(0, DT), torch.randn(11, DT),
                                            torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and xs.grad.shape == (0, DS) and float(ws.grad.abs().max()) == 0.0


def test_all_ignored_is_exactly_zero():
    case = Case("all_ignored", ignore=1.0)
    loss, grads = loss_and_grads(kdengine(case), case, torch.float32)
    assert float(loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("part", ["soft", "hard"])
def test_float64_in_float64_out(part):
    """float64 inputs are computed in float64 (gradcheck-grade). Liger's soft loss is float64 then;
    its CE is not (log_softmax in float32), so the CE truth is torch's float64 cross_entropy."""
    w_hard, w_soft = (0.0, 1.0) if part == "soft" else (1.0, 0.0)
    case = Case("f64", beta=0.3, ignore=0.3, bias=True, w_hard=w_hard, w_soft=w_soft)
    if part == "soft":
        ref, ref_grads = loss_and_grads(liger(case), case, torch.float64)
    else:
        (xs, ws, bs), _, labels = make_inputs(case, torch.float64)
        ref = torch.nn.functional.cross_entropy(xs @ ws.T + bs, labels, ignore_index=-100)
        ref_grads = torch.autograd.grad(ref * 1.5, (xs, ws, bs))
    got, got_grads = loss_and_grads(kdengine(case), case, torch.float64)
    assert got.dtype == torch.float64
    for name, g, r in zip(("loss", *GRAD_NAMES), [got, *got_grads], [ref, *ref_grads]):
        # Liger accumulates its loss in float32 (its gradients in float64)
        assert_close(name, g, r, torch.float32 if (name == "loss" and part == "soft") else torch.float64)


def test_return_soft_hard_loss():
    case = Case("parts", beta=0.3, ignore=0.3, w_hard=0.3, w_soft=0.7)
    (xs, ws, _), (xt, wt, _), labels = make_inputs(case, torch.float64)
    ref = liger(case, return_soft_hard_loss=True)(xs, ws, xt, wt, labels)
    (xs, ws, _), (xt, wt, _), labels = make_inputs(case, torch.float32)
    got = kdengine(case, return_soft_hard_loss=True)(xs, ws, xt, wt, labels)
    assert len(got) == 3
    for name, g, r in zip(("loss", "soft", "hard"), got, ref):
        assert_close(name, g, r, torch.float32)


def test_same_signature_as_liger():
    """Switching is one import line: every Liger parameter, in Liger's order, with Liger's default."""
    for ours, theirs in ((LigerFusedLinearJSDLoss.__init__, LigerJSD.__init__),
                         (LigerFusedLinearJSDLoss.forward, LigerJSD.forward)):
        mine = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()
                if p.kind != inspect.Parameter.KEYWORD_ONLY]
        peer = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert mine == peer


# ------------------------------------------------------------------------------------------------
# vocabulary mismatch: kdengine compares the shared first min(V, Vt) entries; Liger does not
# ------------------------------------------------------------------------------------------------
def test_teacher_wider_vocab_is_liger_on_the_shared_vocab():
    """Vt > V: kdengine == Liger given the teacher's first V rows (and bias entries)."""
    case = Case("vt_wider", v=97, vt=103, bias=True, beta=0.3, ignore=0.3, temperature=2.0)
    (xs, ws, bs), (xt, wt, bt), labels = make_inputs(case, torch.float64)
    ref = liger(case)(xs, ws, xt, wt[: case.v], labels, bs, bt[: case.v])
    ref_grads = torch.autograd.grad(ref, (xs, ws, bs))
    got, got_grads = loss_and_grads(kdengine(case), case, torch.float32, grad_out=1.0)
    for name, g, r in zip(("loss", *GRAD_NAMES), [got, *got_grads], [ref, *ref_grads]):
        assert_close(name, g, r, torch.float32)


def test_liger_pads_the_student_with_zero_logits_when_the_teacher_vocab_is_wider():
    """Liger's soft loss (Vt > V) == its soft loss for a student head with Vt - V extra zero rows.

    kdengine's soft loss differs from it (it compares the shared V entries, see the test above).
    """
    case = Case("vt_wider", v=97, vt=103, beta=0.3)
    (xs, ws, _), (xt, wt, _), labels = make_inputs(case, torch.float64)
    padded_ws = torch.cat([ws, ws.new_zeros(case.vt - case.v, DS)])
    _, peer_soft, _ = liger(case, return_soft_hard_loss=True)(xs, ws, xt, wt, labels)
    _, padded_soft, _ = liger(case, return_soft_hard_loss=True)(xs, padded_ws, xt, wt, labels)
    assert abs(float(peer_soft) - float(padded_soft)) < 1e-6
    _, ours_soft, _ = kdengine(case, return_soft_hard_loss=True)(xs.float(), ws.float(), xt.float(), wt.float(),
                                                                labels)
    assert abs(float(ours_soft) - float(peer_soft)) > 1e-3, "the documented difference to Liger disappeared"


def test_student_wider_vocab():
    """V > Vt: Liger raises; kdengine's soft loss is over the first Vt entries, its CE over all V."""
    case = Case("v_wider", v=103, vt=97, beta=0.3, ignore=0.3)
    (xs, ws, _), (xt, wt, _), labels = make_inputs(case, torch.float64)
    with pytest.raises(RuntimeError):
        liger(case)(xs, ws, xt, wt, labels)
    soft_only = LigerJSD(weight_hard_loss=0.0, weight_soft_loss=case.w_soft, beta=case.beta, compiled=False)
    hard_only = LigerJSD(weight_hard_loss=case.w_hard, weight_soft_loss=0.0, beta=case.beta, compiled=False)
    ref = soft_only(xs, ws[: case.vt], xt, wt, labels) + hard_only(xs, ws, xs.detach(), ws.detach(), labels)
    ref_grads = torch.autograd.grad(ref, (xs, ws))
    got, got_grads = loss_and_grads(kdengine(case), case, torch.float32, grad_out=1.0)
    for name, g, r in zip(("loss", "d_student_input", "d_student_weight"), [got, *got_grads], [ref, *ref_grads]):
        assert_close(name, g, r, torch.float32)


# ------------------------------------------------------------------------------------------------
# bad input: a ValueError naming the argument
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5"])
def test_beta_outside_unit_interval(beta):
    with pytest.raises(ValueError, match=r"beta="):
        LigerFusedLinearJSDLoss(beta=beta)
    (xs, ws, _), (xt, wt, _), labels = make_inputs(Case("x"), torch.float32)
    with pytest.raises(ValueError, match=r"beta="):
        fused_linear_jsd(xs, ws, xt, wt, labels, beta=beta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature="):
        LigerFusedLinearJSDLoss(temperature=temperature)


@pytest.mark.parametrize("which", ["student_bias", "teacher_bias"])
def test_bias_shape_mismatch(which):
    (xs, ws, bs), (xt, wt, bt), labels = make_inputs(Case("x", bias=True), torch.float32)
    bad = {"student_bias": bs, "teacher_bias": bt}
    bad[which] = torch.zeros(104)
    with pytest.raises(ValueError, match=rf"{which} has shape \(104,\); expected \[103\]"):
        LigerFusedLinearJSDLoss()(xs, ws, xt, wt, labels, **bad)


@pytest.mark.parametrize("labels_shape", [(36,), (38,), (37, 1)])
def test_labels_wrong_length(labels_shape):
    (xs, ws, _), (xt, wt, _), _ = make_inputs(Case("x"), torch.float32)
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"true_labels has shape"):
        LigerFusedLinearJSDLoss()(xs, ws, xt, wt, labels)


def test_teacher_rows_mismatch():
    (xs, ws, _), (xt, wt, _), labels = make_inputs(Case("x"), torch.float32)
    with pytest.raises(ValueError, match=r"teacher_input has shape"):
        LigerFusedLinearJSDLoss()(xs, ws, xt[:-1], wt, labels)
