"""topk_divergence: every impl against a float64 reference, K = V against the exact forward KL, bad input, numerics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from kdengine.losses import fused_linear_divergence
from kdengine.losses.topk_divergence import topk_divergence

IMPLS = ("reference", "torch", "triton")


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 37
    d: int = 48
    v: int = 1003
    k: int = 16
    temperature: float = 1.0
    tail: str = "renormalise"
    reduction: str = "mean"
    weight: bool = False
    labels: bool = False
    bias: bool = False
    pad: bool = False
    lp_dtype: torch.dtype = torch.float32

    def __str__(self):
        return self.name


CASES = [
    Case("renormalise"),
    Case("tail", tail="tail"),
    Case("tail_temp2_sum_weight", tail="tail", temperature=2.0, reduction="sum", weight=True),
    Case("renormalise_labels_none_bias", temperature=0.7, reduction="none", labels=True, bias=True),
    Case("tail_labels_pad_fp16_logprobs", tail="tail", labels=True, pad=True, bias=True, lp_dtype=torch.float16),
]
# The Triton interpreter costs per program: same cases, smaller shapes.
TRITON_CASES = [Case(c.name, n=19, d=24, v=c.v // 5, k=8, temperature=c.temperature, tail=c.tail,
                     reduction=c.reduction, weight=c.weight, labels=c.labels, bias=c.bias, pad=c.pad,
                     lp_dtype=c.lp_dtype) for c in CASES]
DTYPES = [torch.float32, torch.bfloat16]


def teacher_topk(n, d, v, k, temperature, seed):
    """A random teacher's log_softmax at T (float64, [N, V]) and its top-k (ids [N, K], log-probs [N, K])."""
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(n, d, generator=g, dtype=torch.float64)
    wt = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    full = torch.log_softmax(xt @ wt.T / temperature, -1)
    top = full.topk(k, -1)
    return xt, wt, full, top.indices, top.values


def make_inputs(case: Case, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(case.n, case.d, generator=g)
    ws = torch.randn(case.v, case.d, generator=g) / math.sqrt(case.d) * 3
    bs = torch.randn(case.v, generator=g) if case.bias else None
    _, _, _, ids, lp = teacher_topk(case.n, case.d, case.v, case.k, case.temperature, seed)
    if case.pad:  # a row with fewer than K entries (garbage log-probs on padding), one id with no mass
        ids[3, case.k // 2:] = -1
        lp[3, case.k // 2:] = 7.0
        lp[5, 1] = -math.inf
    weight = torch.rand(case.n, generator=g) if case.weight else None
    labels = None
    if case.labels:
        labels = torch.randint(0, case.v, (case.n,), generator=g)
        labels[::4] = -100
    grad_out = torch.randn(case.n, generator=g) if case.reduction == "none" else torch.tensor(1.7)
    return dict(xs=xs, ws=ws, bs=bs, ids=ids, lp=lp.to(case.lp_dtype), weight=weight, labels=labels,
                grad_out=grad_out, grad_ce=torch.tensor(0.6))


def run(impl, inp, case, dtype, frozen=False, **kw):
    """(div, ce, dX, dW, db) of div * grad_out + ce * grad_ce."""
    xs = inp["xs"].detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf per run: no grad accumulation
    ws = inp["ws"].detach().to(dtype).clone().requires_grad_(not frozen)
    bs = inp["bs"].detach().to(dtype).clone().requires_grad_(True) if inp["bs"] is not None else None
    out = topk_divergence(xs, ws, inp["ids"], inp["lp"], temperature=case.temperature, tail=case.tail,
                          weight=inp["weight"], labels=inp["labels"], reduction=case.reduction, impl=impl,
                          student_bias=bs, **kw)
    div, ce = out if inp["labels"] is not None else (out, None)
    total = (div * inp["grad_out"].to(div.dtype)).sum()
    if ce is not None:
        total = total + ce * inp["grad_ce"].to(ce.dtype)
    total.backward()
    return (div.detach(), ce.detach() if ce is not None else None, xs.grad, ws.grad,
            bs.grad if bs is not None else None)


def check_against_reference(impl, case, dtype, frozen=False, **kw):
    inp = make_inputs(case)
    ref = run("reference", inp, case, torch.float64, frozen)
    base = run("reference", inp, case, dtype, frozen)
    got = run(impl, inp, case, dtype, frozen, **kw)
    for name, g, r, b in zip(("div", "ce", "dX", "dW", "db"), got, ref, base):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        assert g.dtype == dtype, f"{name} dtype {g.dtype} != input dtype {dtype}"
        assert_close(f"{impl}/{case}/{name}", g, r, dtype, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_matches_reference(case, dtype):
    check_against_reference("torch", case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_reference(case, dtype):
    check_against_reference("triton", case, dtype)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_head_and_fp16(impl):
    """Frozen student head (DPT): dX only; fp16 inputs."""
    case = (CASES if impl == "torch" else TRITON_CASES)[4]
    check_against_reference(impl, case, torch.float32, frozen=True)
    check_against_reference(impl, case, torch.float16)


@pytest.mark.parametrize("budget_mb", [0.5, 64.0])
def test_torch_block_sizes_agree(budget_mb):
    """Many small vocabulary blocks and one large block both give the reference answer."""
    check_against_reference("torch", CASES[4], torch.float32, budget_mb=budget_mb)


# ----------------------------------------------------------------------------------------------
# exactness: K = V is the exact forward KL
# ----------------------------------------------------------------------------------------------
# impl='triton' takes fp16/bf16/fp32 only (float64 is a ValueError, tested below)
EXACT_RUNS = [(impl, dtype) for impl in IMPLS for dtype in (torch.float64, torch.float32)
              if not (impl == "triton" and dtype == torch.float64)]


@pytest.mark.parametrize("tail", ["renormalise", "tail"])
@pytest.mark.parametrize("impl,dtype", EXACT_RUNS, ids=[f"{i}-{d}" for i, d in EXACT_RUNS])
def test_k_equals_v_is_the_exact_forward_kl(impl, dtype, tail):
    """The teacher's full log_softmax as a top-k with K = V (sorted by probability) gives the loss and
    gradients of fused_linear_divergence's forward KL with the teacher's hidden states (float64)."""
    n, d, v, temperature = 13, 24, 203, 1.4
    xt, wt, _, ids, lp = teacher_topk(n, d, v, v, temperature, seed=3)
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    grad_out = torch.randn(n, generator=g, dtype=torch.float64)

    def grads(fn, x, w):
        x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(x, w)
        (out * grad_out.to(out.dtype)).sum().backward()
        return out.detach().double(), x.grad.double(), w.grad.double()

    exact = grads(lambda x, w: fused_linear_divergence(x, w, xt, wt, temperature=temperature, reduction="none",
                                                       impl="reference"), xs, ws)
    got = grads(lambda x, w: topk_divergence(x, w, ids, lp.to(dtype), temperature=temperature, tail=tail,
                                             reduction="none", impl=impl), xs.to(dtype), ws.to(dtype))
    rel = float((got[0] - exact[0]).abs().max() / exact[0].abs().max())
    assert rel < 1e-6, f"{impl}/{tail}/{dtype}: loss rows differ from the exact forward KL by {rel:.2e} (relative)"
    for name, a, b in zip(("dX", "dW"), got[1:], exact[1:]):
        assert_close(f"K=V/{impl}/{tail}/{name}", a, b, dtype)


def test_tail_bin_is_exact_when_the_student_puts_its_mass_on_the_support():
    """q_tail ~ 1e-22: 1 - sum_k q_k is 0 in fp32, the streamed lse off the support is not."""
    n, d, v, k = 6, 8, 97, 5
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(n, d, generator=g)
    ws = torch.randn(v, d, generator=g) * 0.1
    support = torch.randperm(v, generator=g)[:k]
    ids = torch.stack([support[torch.randperm(k, generator=g)] for _ in range(n)])  # one support, shuffled
    bs = torch.zeros(v).index_fill_(0, support, 50.0)  # the support gets +50 logits
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k]  # teacher tail mass > 0
    case = Case("peaked", n=n, d=d, v=v, k=k, tail="tail", bias=True)
    inp = dict(xs=xs, ws=ws, bs=bs, ids=ids, lp=lp, weight=None, labels=None, grad_out=torch.tensor(1.0),
               grad_ce=torch.tensor(0.0))
    ref = run("reference", inp, case, torch.float64)
    assert float(ref[0]) > 10, "the tail term should dominate (log q_tail ~ -50)"
    for impl in ("torch", "triton"):
        got = run(impl, inp, case, torch.float32)
        for name, a, b in zip(("div", "dX", "dW", "db"), got[:1] + got[2:], ref[:1] + ref[2:]):
            assert_close(f"peaked/{impl}/{name}", a, b, torch.float32)


def test_padding_equals_the_shorter_row():
    """A row padded with -1 (garbage log-probs) gives the loss of the same row without the padding."""
    case = Case("pad", n=4, d=8, v=50, k=6, tail="tail", reduction="none")
    inp = make_inputs(case)
    inp["ids"][0, 1] = 0 if 0 not in inp["ids"][0] else inp["ids"][0, 1]  # a real id 0 beside padding
    ids, lp = inp["ids"].clone(), inp["lp"].clone()
    ids[:, 4:], lp[:, 4:] = -1, float("nan")
    for impl in IMPLS:
        dtype = torch.float32 if impl == "triton" else torch.float64
        xs, ws = inp["xs"].to(dtype), inp["ws"].to(dtype)
        padded = topk_divergence(xs, ws, ids, lp, tail="tail", reduction="none", impl=impl)
        short = topk_divergence(xs, ws, inp["ids"][:, :4], inp["lp"][:, :4], tail="tail", reduction="none", impl=impl)
        assert_close(f"pad/{impl}", padded, short.double(), dtype)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("tail", ["renormalise", "tail"])
def test_torch_path_never_materialises_n_by_v(tail):
    """Forward + backward of the torch path create no tensor near [N, V] (the reference does)."""
    case = Case("memory", n=128, d=8, v=20000, k=32, tail=tail, labels=True, temperature=1.5)
    inp = make_inputs(case)

    def largest(impl):
        with _LargestTensor() as probe:
            run(impl, inp, case, torch.float32, budget_mb=1.0)
        return probe.numel

    n_by_v = case.n * case.v  # the largest legitimate tensors are dW [V, D] = [N, V] / 16 here
    assert largest("reference") >= n_by_v  # the probe sees logits-sized tensors when they exist
    got = largest("torch")
    assert got < n_by_v // 10, f"largest tensor of the torch path has {got} elements; [N, V] has {n_by_v}"


# ----------------------------------------------------------------------------------------------
# edge cases and numerics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["renormalise", "tail"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_loss_and_grads(reduction, impl, tail):
    xs = torch.randn(0, 16, requires_grad=True)
    ws = torch.randn(50, 16, requires_grad=True)
    div, ce = topk_divergence(xs, ws, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), tail=tail,
                              labels=torch.zeros(0, dtype=torch.long), reduction=reduction, impl=impl)
    assert div.shape == ((0,) if reduction == "none" else ())
    assert float(ce.detach()) == 0.0 and (reduction == "none" or float(div.detach()) == 0.0)
    (div.sum() + ce).backward()
    assert xs.grad.shape == (0, 16)
    assert ws.grad is None or (torch.isfinite(ws.grad).all() and ws.grad.abs().max() == 0)


@pytest.mark.parametrize("tail", ["renormalise", "tail"])
@pytest.mark.parametrize("impl", IMPLS)
def test_all_padding_rows_and_all_ignored_labels(impl, tail):
    """Rows with no teacher entries have loss 0 and no gradient; all labels ignored gives CE 0."""
    case = Case("empty_rows", n=9, d=8, v=60, k=4, tail=tail, reduction="none")
    inp = make_inputs(case)
    ids = inp["ids"].clone()
    ids[2] = -1
    ids[7] = -1
    xs = inp["xs"].clone().requires_grad_(True)
    div, ce = topk_divergence(xs, inp["ws"], ids, inp["lp"], tail=tail, labels=torch.full((9,), -100),
                              reduction="none", impl=impl)
    (div.sum() + ce).backward()
    assert float(ce.detach()) == 0.0
    assert torch.isfinite(div).all() and torch.isfinite(xs.grad).all()
    div = div.detach()
    assert float(div[2].abs()) < 1e-6 and float(div[7].abs()) < 1e-6, div
    assert float(xs.grad[[2, 7]].abs().max()) < 1e-6
    assert float(div.min()) > -1e-6 and float(div.sum()) > 0


@pytest.mark.parametrize("tail", ["renormalise", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extreme_logits_are_finite(impl, dtype, tail):
    """Student logits of magnitude ~1e4 in every dtype: finite loss, CE and gradients."""
    n, d, v, k = 6, 4, 40, 5
    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(n, d, generator=g) * 100).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, d, generator=g) * 50).to(dtype).requires_grad_(True)
    assert (xs.float() @ ws.float().T).abs().max() > 5e3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).int()
    lp = torch.log_softmax(torch.randn(n, k + 2, generator=g) * 30, -1)[:, :k]
    div, ce = topk_divergence(xs, ws, ids, lp, tail=tail, labels=torch.arange(n), impl=impl)
    (div + ce).backward()
    for name, t in (("div", div), ("ce", ce), ("dX", xs.grad), ("dW", ws.grad)):
        assert torch.isfinite(t.float()).all(), f"{name} not finite: {t}"


def test_int32_ids_and_labels_match_int64():
    case = TRITON_CASES[3]
    inp = make_inputs(case)
    for impl in ("torch", "triton"):
        a = run(impl, inp, case, torch.float32)
        b = run(impl, {**inp, "ids": inp["ids"].int(), "labels": inp["labels"].int()}, case, torch.float32)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the value and what was expected
# ----------------------------------------------------------------------------------------------
def _good():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(5)])
    return dict(student_hidden=torch.randn(5, 8), student_weight=torch.randn(30, 8), teacher_ids=ids,
                teacher_logprobs=torch.log_softmax(torch.randn(5, 6, generator=g), -1)[:, :4])


def _with(name, fn):
    def make():
        kw = _good()
        kw[name] = fn(kw[name])
        return kw
    return make


def _set(row, col, value, name="teacher_ids"):
    def fn(x):
        x = x.clone()
        x[row, col] = value
        return x
    return _with(name, fn)


def _dup(x):
    x = x.clone()
    x[2, 3] = x[2, 0]
    return x


BAD = [
    ("id_too_large", _set(1, 2, 30), r"teacher_ids\[1, 2\] = 30 is outside \[0, 30\)"),
    ("id_negative", _set(0, 0, -2), r"teacher_ids\[0, 0\] = -2 is outside .* padding id -1"),
    ("duplicate_id", _with("teacher_ids", _dup), r"row 2 lists id \d+ twice"),
    ("positive_logprob", _set(3, 1, 0.5, "teacher_logprobs"), r"teacher_logprobs\[3, 1\] = 0.5.*<= 0"),
    ("nan_logprob", _set(4, 0, float("nan"), "teacher_logprobs"), r"teacher_logprobs\[4, 0\] = nan"),
    ("logits_not_logprobs", _with("teacher_logprobs", lambda x: x * 0.01), r"row 0 has top-k mass .* > 1"),
    ("float_ids", _with("teacher_ids", lambda x: x.float()), r"teacher_ids has dtype torch.float32"),
    ("ids_rows", _with("teacher_ids", lambda x: x[:4]), r"teacher_ids has shape \(4, 4\); expected \[N, K\]"),
    ("logprobs_shape", _with("teacher_logprobs", lambda x: x[:, :3]), r"teacher_logprobs has shape \(5, 3\)"),
    ("k_larger_than_v", _with("student_weight", lambda x: x[:3]), r"K = 4 ids per row but .* V = 3"),
    ("logprobs_grad", _with("teacher_logprobs", lambda x: x.clone().requires_grad_(True)), r"requires grad"),
    ("hidden_size", _with("student_weight", lambda x: x[:, :7]), r"hidden size mismatch"),
    ("weight_dtype", _with("student_weight", lambda x: x.double()), r"student_weight is torch.float64"),
]


@pytest.mark.parametrize("make,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        topk_divergence(**make(), impl="torch")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd", "skew_forward_kl"])
def test_divergences_top_k_cannot_give_are_errors(divergence):
    with pytest.raises(ValueError, match=rf"divergence='{divergence}'.*only 'forward_kl'.*cannot be computed exactly"):
        topk_divergence(**_good(), divergence=divergence)


@pytest.mark.parametrize("kw,match", [
    (dict(tail="drop"), r"tail='drop'; expected one of \('renormalise', 'tail'\)"),
    (dict(temperature=0.0), r"temperature=0.0"),
    (dict(reduction="batch"), r"reduction='batch'"),
    (dict(impl="cuda"), r"impl='cuda'"),
    (dict(weight=torch.ones(4)), r"weight has shape \(4,\)"),
    (dict(labels=torch.zeros(5)), r"labels has dtype torch.float32"),
    (dict(labels=torch.full((5,), 30)), r"labels\[0\] = 30 is outside \[0, 30\)"),
    (dict(student_bias=torch.zeros(29)), r"student_bias has shape \(29,\)"),
    (dict(student_bias=[0.0] * 30), r"student_bias has shape list"),
    (dict(student_bias=torch.zeros(30, dtype=torch.float64)), r"student_bias is torch.float64"),
], ids=["tail", "temperature", "reduction", "impl", "weight", "labels_dtype", "labels_range", "bias",
        "bias_list", "bias_dtype"])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        topk_divergence(**_good(), **kw)


def test_triton_rejects_float64():
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in _good().items()}
    with pytest.raises(ValueError, match=r"impl='triton' computes in fp32.*float64"):
        topk_divergence(**kw, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_unchecked_out_of_range_id_is_nan_not_another_column(impl):
    """What a GPU run (no value checks) does with an id >= V or < -1: that row's loss is NaN, the others are not."""
    from kdengine.kernels.topk_divergence import TopkDivergenceTriton
    from kdengine.losses.topk_divergence import TopkDivergenceParams
    from kdengine.losses.topk_divergence_torch import TopkDivergenceFunction

    kw = _good()
    ids = kw["teacher_ids"].clone()
    ids[1, 2], ids[3, 0] = 30, -5
    fn = TopkDivergenceFunction if impl == "torch" else TopkDivergenceTriton
    div, _ = fn.apply(kw["student_hidden"], kw["student_weight"], None, ids, kw["teacher_logprobs"], None, None,
                      TopkDivergenceParams(reduction="none"))
    assert torch.isnan(div[[1, 3]]).all() and torch.isfinite(div[[0, 2, 4]]).all(), div
