"""kdengine.compat.trl against trl's own GKDTrainer and generalized_jsd_loss (trl 1.16).

The truth is TRL in float64; kdengine in float32 must be within the project's tolerance of it
(tests/helpers.py): ATOL plus 2x the error of TRL itself in float32.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from helpers import assert_close

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (trl's dependency)
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from benchmarks.compat_trl import (  # noqa: E402
    collate_prompt_completion, prompt_completion_rows, tiny_causal_lm, word_tokenizer)

from kdengine.compat.trl import KDEngineGKDTrainer, generalized_jsd_from_hidden  # noqa: E402
from kdengine.losses import fused_linear_divergence  # noqa: E402

trl_loss = GKDTrainer.generalized_jsd_loss
B, S, D, DT, V = 3, 11, 24, 16, 101


def make_inputs(dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64) * 2 / math.sqrt(D)
    ht = torch.randn(B, S, DT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, DT, generator=g, dtype=torch.float64) * 2 / math.sqrt(DT)
    bs = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    bt = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, :4] = -100  # a prompt
    labels[1, 8:] = -100  # padding
    student = [t.to(dtype).requires_grad_() if t is not None else None for t in (hs, ws, bs)]
    return student, [t.to(dtype) if t is not None else None for t in (ht, wt, bt)], labels


def logits(h, w, b):
    z = h @ w.T
    return z + b if b is not None else z


def trl_and_ours(dtype, beta, temperature, reduction, use_labels, bias, num_items=None):
    """(TRL's loss on full logits, grads), (kdengine's from hidden states, grads) on the same inputs."""
    out = []
    for ours in (False, True):
        (hs, ws, bs), (ht, wt, bt), labels = make_inputs(dtype, bias)
        kw = dict(labels=labels if use_labels else None, beta=beta, temperature=temperature, reduction=reduction,
                  num_items_in_batch=num_items)
        if ours:
            loss = generalized_jsd_from_hidden(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, impl="torch", **kw)
        else:
            loss = trl_loss(logits(hs, ws, bs), logits(ht, wt, bt), **kw)
        leaves = [t for t in (hs, ws, bs) if t is not None]
        out.append((loss, torch.autograd.grad(loss * 1.3, leaves)))
    return out


LOSS_CASES = [(beta, t, red, lab, bias) for beta in (0.0, 0.3, 1.0) for t in (1.0, 2.0)
              for red in ("batchmean", "sum", "mean") for lab in (True, False) for bias in (False,)] + [
    (0.5, 1.0, "batchmean", True, True), (0.0, 2.0, "mean", False, True), (1.0, 1.0, "sum", True, True)]


@pytest.mark.parametrize("beta,temperature,reduction,use_labels,bias", LOSS_CASES,
                         ids=lambda v: str(v))
def test_generalized_jsd_matches_trl(beta, temperature, reduction, use_labels, bias):
    (ref, ref_g), _ = trl_and_ours(torch.float64, beta, temperature, reduction, use_labels, bias)
    (base, base_g), (got, got_g) = trl_and_ours(torch.float32, beta, temperature, reduction, use_labels, bias)
    assert got.dtype == torch.float32
    assert_close("loss", got, ref, torch.float32, base)
    for name, g, r, b in zip(("d_hidden", "d_weight", "d_bias"), got_g, ref_g, base_g):
        assert_close(name, g, r, torch.float32, b)


def test_num_items_in_batch_overrides_reduction():
    (ref, ref_g), _ = trl_and_ours(torch.float64, 0.3, 1.0, "mean", True, False, num_items=torch.tensor(7))
    (base, base_g), (got, got_g) = trl_and_ours(torch.float32, 0.3, 1.0, "mean", True, False, num_items=7)
    assert_close("loss", got, ref, torch.float32, base)
    for name, g, r, b in zip(("d_hidden", "d_weight"), got_g, ref_g, base_g):
        assert_close(name, g, r, torch.float32, b)


def test_reduction_mapping_to_kdengine_mean():
    """TRL on [B, S, V] logits, no labels: batchmean = S * kdengine mean, mean = kdengine mean / V."""
    (hs, ws, _), (ht, wt, _), labels = make_inputs(torch.float64)
    rows = dict(student_hidden=hs.reshape(-1, D), student_weight=ws, teacher_hidden=ht.reshape(-1, DT),
                teacher_weight=wt, divergence="jsd", beta=0.3, reduction="mean", impl="reference")
    kd_mean = fused_linear_divergence(**rows)
    z_s, z_t = logits(hs, ws, None), logits(ht, wt, None)
    assert torch.allclose(trl_loss(z_s, z_t, beta=0.3, reduction="batchmean"), S * kd_mean, rtol=1e-12)
    assert torch.allclose(trl_loss(z_s, z_t, beta=0.3, reduction="mean"), kd_mean / V, rtol=1e-12)
    # with labels TRL's batchmean is the mean over the kept positions
    keep = labels.reshape(-1) != -100
    kept = dict(rows, student_hidden=rows["student_hidden"][keep], teacher_hidden=rows["teacher_hidden"][keep])
    assert torch.allclose(trl_loss(z_s, z_t, labels=labels, beta=0.3), fused_linear_divergence(**kept), rtol=1e-12)


def test_all_positions_masked_is_zero():
    (hs, ws, _), (ht, wt, _), labels = make_inputs(torch.float32)
    for reduction in ("batchmean", "mean", "sum"):
        loss = generalized_jsd_from_hidden(hs, ws, ht, wt, labels=torch.full_like(labels, -100), reduction=reduction)
        (grad,) = torch.autograd.grad(loss, hs)
        assert float(loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="none"), r"reduction='none'.*never builds"),
    (dict(reduction="batch"), r"reduction='batch'"),
    (dict(beta=1.2), r"beta=1.2"),
    (dict(labels=torch.zeros(B, S - 1, dtype=torch.long)), r"labels has shape \(3, 10\)"),
], ids=["none", "unknown", "beta", "labels"])
def test_bad_input(kwargs, match):
    (hs, ws, _), (ht, wt, _), _ = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=match):
        generalized_jsd_from_hidden(hs, ws, ht, wt, **kwargs)


def test_vocab_mismatch_is_refused_as_trl_does():
    (hs, ws, _), (ht, wt, _), _ = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"student_weight has 101 rows but teacher_weight has 100"):
        generalized_jsd_from_hidden(hs, ws, ht, wt[:-1])


# ------------------------------------------------------------------------------------------------
# the trainer: a few steps of TRL's GKDTrainer and of KDEngineGKDTrainer from the same start
# ------------------------------------------------------------------------------------------------
TV = 67  # trainer vocabulary: <pad> = 0, eos = 1, tokens 2..66


def dataset():
    return Dataset.from_list(prompt_completion_rows(8, TV, (2, 6), (2, 6)))


STUDENT, TEACHER = tiny_causal_lm(0, TV, 32), tiny_causal_lm(1, TV, 48)


def train(trainer_cls, dtype, tmp_path, steps=3, bf16=False, **config):
    """Per-step losses of ``steps`` SGD steps from the same start, and the trained student.

    ``bf16`` is bf16 autocast (trl's SFTConfig turns it on by default; off here unless asked).
    """
    losses = []

    class Recorded(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(loss.detach().double())
            return loss

    student, teacher = copy.deepcopy(STUDENT).to(dtype), copy.deepcopy(TEACHER).to(dtype)
    args = GKDConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, max_new_tokens=3,
                     logging_steps=100, bf16=bf16, **config)
    trainer = Recorded(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                       processing_class=word_tokenizer(TV), data_collator=collate_prompt_completion,
                       optimizers=(torch.optim.SGD(student.parameters(), lr=0.5), None))
    random.seed(0)  # GKDTrainer draws on-policy steps with random.random()
    trainer.train()
    return torch.stack(losses), student


@pytest.mark.parametrize("config", [dict(lmbda=0.0, beta=0.3), dict(lmbda=1.0, beta=0.0),
                                    dict(lmbda=0.0, seq_kd=True, beta=1.0)],
                         ids=["off_policy_jsd", "on_policy_fkl", "seq_kd_rkl"])
def test_trainer_matches_trl(config, tmp_path):
    ref, ref_model = train(GKDTrainer, torch.float64, tmp_path, **config)
    base, base_model = train(GKDTrainer, torch.float32, tmp_path, **config)
    got, got_model = train(KDEngineGKDTrainer, torch.float32, tmp_path, **config)
    assert len(got) == 3 and float(ref.min()) > 1e-2  # the losses are not vanishingly small
    assert_close("step losses", got, ref, torch.float32, base)
    for (name, p), r, b in zip(got_model.named_parameters(), ref_model.parameters(), base_model.parameters()):
        assert_close(name, p, r, torch.float32, b)


def test_trainer_under_bf16_autocast(tmp_path):
    """trl's default (bf16=True): kdengine's loss stays within bf16 tolerance of the float64 truth."""
    ref, _ = train(GKDTrainer, torch.float64, tmp_path, lmbda=0.0, beta=0.3)
    base, _ = train(GKDTrainer, torch.float32, tmp_path, bf16=True, lmbda=0.0, beta=0.3)
    got, _ = train(KDEngineGKDTrainer, torch.float32, tmp_path, bf16=True, lmbda=0.0, beta=0.3)
    assert got.dtype == torch.float64 and len(got) == 3
    assert_close("step losses", got, ref, torch.bfloat16, base)


def evaluate(trainer_cls, dtype, tmp_path, bf16=False) -> torch.Tensor:
    args = GKDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=bf16, lmbda=0.0, beta=0.3,
                     per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = trainer_cls(model=copy.deepcopy(STUDENT).to(dtype), teacher_model=copy.deepcopy(TEACHER).to(dtype),
                          args=args, train_dataset=dataset(), eval_dataset=dataset(),
                          processing_class=word_tokenizer(TV), data_collator=collate_prompt_completion)
    return torch.tensor(trainer.evaluate()["eval_loss"], dtype=torch.float64)


def test_evaluate_matches_trl(tmp_path):
    """Trainer.evaluate goes through compute_loss(return_outputs=True)."""
    ref = evaluate(GKDTrainer, torch.float64, tmp_path)
    base = evaluate(GKDTrainer, torch.float32, tmp_path)
    assert_close("eval_loss", evaluate(KDEngineGKDTrainer, torch.float32, tmp_path), ref, torch.float32, base)


def test_trainer_refuses_post_processed_logits(tmp_path):
    student = tiny_causal_lm(0, TV, 32)
    student.config.final_logit_softcapping = 30.0
    args = GKDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, lmbda=0.0)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0"):
        KDEngineGKDTrainer(model=student, teacher_model=copy.deepcopy(TEACHER), args=args,
                           train_dataset=dataset(), processing_class=word_tokenizer(TV),
                           data_collator=collate_prompt_completion)
