"""TRL's generalized JSD (GKD) from hidden states, on kdengine's fused op: no [B, S, V] logits.

    # from trl.experimental.gkd import GKDTrainer
    from kdengine.compat.trl import KDEngineGKDTrainer as GKDTrainer

``KDEngineGKDTrainer`` is ``trl.experimental.gkd.GKDTrainer`` (trl 1.16) with one method replaced:
``compute_loss`` runs both models with ``logits_to_keep=1``, takes the backbones' last hidden
states and the lm_head weights, and gives the same loss as TRL's ``generalized_jsd_loss`` on the
full logits (tests/test_compat_trl.py). Everything else is TRL's: on-policy generation with
probability ``lmbda``, ``seq_kd``, the collator, ``num_items_in_batch`` normalisation.

TRL's conventions, kept (read from trl 1.16.0's source):

* ``beta`` in [0, 1]: 0 = KL(p_t||p_s), 1 = KL(p_s||p_t), otherwise the generalised JSD with
  ``m = beta p_t + (1 - beta) p_s`` (the endpoints are not limits of the interior).
* The trainer's loss is at temperature 1: ``GKDTrainer.compute_loss`` does not pass
  ``args.temperature`` to the loss, which only sets the sampling temperature of generation.
* Labels -100 mask positions; with ``num_items_in_batch`` the loss is sum / num_items_in_batch.

Reductions of ``generalized_jsd_loss`` in kdengine's terms (rows = kept positions, N of them):

    =================  ========================================  ==============================
    TRL                with labels                               labels=None, logits [B, S, V]
    =================  ========================================  ==============================
    batchmean          sum / max(N_valid, 1) = kdengine mean     sum / B = S * kdengine mean
    sum                sum                                       sum
    mean               sum / (N_valid V) = kdengine mean / V     sum / (B S V) = kdengine mean / V
    none               per-element [N, V] (refused here)         per-element [B, S, V] (refused)
    =================  ========================================  ==============================

Refused with a clear error: ``reduction="none"`` (a per-vocabulary-entry tensor is what the fused
op never builds), models whose logits are not ``lm_head(hidden)`` (``final_logit_softcapping``,
``logit_scale``, ``logits_scaling``), student/teacher vocabularies of different sizes (as TRL), and
heads whose weight is sharded (ZeRO-3 / FSDP: the weight is read outside the module's forward).
"""

from __future__ import annotations

import torch

from kdengine.compat.liger import liger_divergence, paired_rows
from kdengine.losses import fused_linear_divergence

TRL_IGNORE_INDEX = -100  # hard-coded in trl's generalized_jsd_loss
TRL_REDUCTIONS = ("batchmean", "sum", "mean")
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                         "lm_head_multiplier")


def generalized_jsd_from_hidden(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``GKDTrainer.generalized_jsd_loss(hidden @ W^T + b, ...)`` without materialising the logits.

    Args:
        student_hidden: [B, S, D] (or [N, D]) student hidden states; teacher_hidden: [B, S, Dt].
        student_weight: [V, D]; teacher_weight: [V, Dt] (same V, as TRL requires).
        labels: [B, S] (or [N]) with -100 at positions left out, or None (every position counts).
        student_bias: [V] or None; teacher_bias: [V] or None.
        reduction: batchmean | sum | mean with TRL's meaning (module docstring); ignored when
            ``num_items_in_batch`` is given (then sum / num_items_in_batch, as TRL).
    Returns:
        scalar loss (float32, float64 for float64 inputs).
    """
    divergence, kd_beta = liger_divergence(beta)
    if reduction not in TRL_REDUCTIONS:
        hint = (" (TRL's 'none' is a per-vocabulary-entry tensor, which the fused op never builds)"
                if reduction == "none" else "")
        raise ValueError(f"reduction={reduction!r}; expected one of {TRL_REDUCTIONS}{hint}")
    lead = paired_rows("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student_weight has {student_weight.shape[0]} rows but teacher_weight has "
                         f"{teacher_weight.shape[0]}; TRL's generalized JSD needs one shared vocabulary")
    if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels has shape {shape}; expected {lead} (one per hidden-state position)")

    xs = student_hidden.reshape(-1, student_hidden.shape[-1])
    xt = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if labels is not None:
        keep = labels.reshape(-1) != TRL_IGNORE_INDEX
        xs, xt = xs[keep], xt[keep]
    total = fused_linear_divergence(xs, student_weight, xt.detach(), teacher_weight.detach(),
                                    divergence=divergence, beta=kd_beta, temperature=temperature,
                                    reduction="sum", impl=impl, student_bias=student_bias,
                                    teacher_bias=None if teacher_bias is None else teacher_bias.detach())
    total = total.to(torch.promote_types(total.dtype, torch.float32))
    n_rows = xs.shape[0]
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "mean":  # TRL: jsd.mean() over [rows, V] (NaN on zero rows; 0 here)
        return total / max(n_rows * student_weight.shape[0], 1)
    denom = n_rows if labels is not None else (lead[0] if len(lead) > 0 else 1)
    return total / max(denom, 1)


def _check_plain_head(model, role: str) -> None:
    """Refuse models whose logits are not ``lm_head(last_hidden_state)``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value is not None and value != 1.0:
            raise ValueError(f"{role} model {type(model).__name__} has config.{attr}={value!r}: its logits are "
                             f"not lm_head(hidden), which KDEngineGKDTrainer computes; use trl's GKDTrainer")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{role} model {type(model).__name__} has no output embedding (lm_head) weight")


def _last_hidden_state(model, unwrapped, inputs) -> tuple[torch.Tensor, object]:
    """Run ``model`` (through its wrappers) with logits_to_keep=1; [B, S, D] backbone output, model output."""
    captured = {}

    def grab(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrapped.get_decoder().register_forward_hook(grab)
    try:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"{type(unwrapped).__name__}.get_decoder() did not run during the forward; "
                           f"cannot read the last hidden state")
    return captured["h"], outputs


def _head(unwrapped, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrapped.get_output_embeddings()
    if head.weight.numel() == 0 or head.weight.dim() != 2:
        raise ValueError(f"{role} lm_head weight has shape {tuple(head.weight.shape)} (sharded by ZeRO-3/FSDP?); "
                         f"KDEngineGKDTrainer needs the full [V, D] weight")
    return head.weight, getattr(head, "bias", None)


try:
    from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
except ImportError as err:  # trl is an optional extra
    _TRL_IMPORT_ERROR = err

    class KDEngineGKDTrainer:  # noqa: D101 - placeholder that explains the missing extra
        def __init__(self, *args, **kwargs):
            raise ImportError("KDEngineGKDTrainer needs trl: pip install 'kdengine[trl]'") from _TRL_IMPORT_ERROR
else:

    class KDEngineGKDTrainer(_TRLGKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` whose loss never materialises [B, S, V] logits.

        Same arguments as TRL's GKDTrainer, plus ``kd_impl`` (kdengine backend: auto | triton |
        torch | reference). ``compute_loss(..., return_outputs=True)`` returns the student output
        of a ``logits_to_keep=1`` forward (logits of the last position only).
        """

        def __init__(self, *args, kd_impl: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self.kd_impl = kd_impl
            _check_plain_head(self.accelerator.unwrap_model(self.model), "student")
            _check_plain_head(self.accelerator.unwrap_model(self.teacher_model), "teacher")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = self.accelerator.unwrap_model(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            student_hidden, student_outputs = _last_hidden_state(model, student, inputs)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_hidden, _ = _last_hidden_state(self.teacher_model, teacher, inputs)
            ws, bs = _head(student, "student")
            wt, bt = _head(teacher, "teacher")
            # Under autocast (SFTConfig's default is bf16=True) a backbone may return 16-bit hidden states
            # and the op's block matmuls would run in 16 bits: run it with autocast off, in the heads'
            # dtype (it accumulates in fp32 itself).
            device_type = student_hidden.device.type
            with torch.autocast(device_type, enabled=False):
                # causal shift as TRL: position i predicts token i + 1
                loss = generalized_jsd_from_hidden(
                    student_hidden[:, :-1].to(ws.dtype), ws, teacher_hidden[:, :-1].to(wt.device, wt.dtype), wt,
                    labels=inputs["labels"][:, 1:], beta=self.beta, num_items_in_batch=num_items_in_batch,
                    student_bias=bs, teacher_bias=bt, impl=self.kd_impl,
                )
            return (loss, student_outputs) if return_outputs else loss
