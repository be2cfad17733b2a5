"""Distillation forward: final hidden states (never logits) plus the masks the losses need.

Shapes: B batch, L sequence, D LM hidden, V lm_head rows, n_img images in the batch,
P image tokens per image, Dv vision hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration

from kdengine.losses.checks import IGNORE_INDEX
from kdengine.model.build import num_image_tokens

__all__ = [
    "DistillOutputs",
    "check_compatible",
    "check_tokenizers",
    "distill_forward",
    "same_vision_tower",
    "vision_features",
]

# Text encoded by both tokenizers in `check_tokenizers` to catch normalizer/pre-tokenizer
# differences that an equal vocabulary would hide.
_PROBE_TEXT = "Hello, World! 12 + 3.5 = 15.5\n\tcafé ÉCOLE   naïve <image> 你好 🙂 don't"


@dataclass
class DistillOutputs:
    """What the distillation losses consume for one model on one batch.

    hidden:             Float[B, L, D]  final hidden states after the last norm.
    lm_head_weight:     Float[V, D]     the lm_head Parameter itself (grads flow if trainable).
    visual_mask:        Bool[B, L]      image-token positions (the state there predicts token i+1).
    response_mask:      Bool[B, L]      response_mask[:, i] = labels[:, i+1] != -100; last column False.
    next_labels:        Long[B, L]      labels shifted left by one, -100 in the last column.
    """

    hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    visual_mask: torch.Tensor
    response_mask: torch.Tensor
    next_labels: torch.Tensor


def vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Selected-layer tower features, before the projector: Float[n_img, 3, H, W] -> Float[n_img, P, Dv].

    Uses the model's vision_feature_layer (int or list, concatenated on the last dim) and
    select strategy ("default" drops the CLS column). Runs without autograd when no tower
    parameter requires grad, so a frozen tower keeps no activations."""
    _check_llava(model)
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)}; expected [n_img, 3, H, W]")
    config = model.config
    tower = model.model.vision_tower
    ref = next(tower.parameters())
    pixel_values = pixel_values.to(device=ref.device, dtype=ref.dtype)
    trainable = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        states = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        start = 1 if config.vision_feature_select_strategy == "default" else 0
        return torch.cat([states[i][:, start:] for i in layers], dim=-1)


_vision_features = vision_features  # distill_forward's argument shadows the name


def distill_forward(
    model: LlavaForConditionalGeneration,
    batch: dict[str, torch.Tensor | None],
    vision_features: torch.Tensor | None = None,
) -> DistillOutputs:
    """Run a LLaVA model on a collated batch and return its final hidden states and masks.

    batch: input_ids Long[B, L], attention_mask Long[B, L], labels Long[B, L] (unshifted,
    -100 = unsupervised), visual_mask Bool[B, L] (optional; must equal input_ids == image
    token id), pixel_values Float[n_img, 3, H, W] or None.
    vision_features: Float[n_img, P, Dv] from `vision_features` (e.g. computed once on the
    teacher when `same_vision_tower(teacher, student)` and both towers are frozen); when given,
    pixel_values is not run through this model's tower, so its tower gets no gradient.
    The model's own projector maps the features, they replace the image-token embeddings in
    order, and the inner language model runs on inputs_embeds; lm_head is never applied.
    """
    _check_llava(model)
    input_ids, attention_mask, labels = (_require(batch, k) for k in ("input_ids", "attention_mask", "labels"))
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(
            f"batch shapes input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}, "
            f"labels {tuple(labels.shape)}; expected all [B, L]"
        )
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    visual_mask = input_ids == model.config.image_token_id
    given = batch.get("visual_mask")
    if given is not None and not torch.equal(given.to(device=device, dtype=torch.bool), visual_mask):
        raise ValueError(
            f"batch visual_mask ({int(given.sum())} positions) != input_ids == image_token_id "
            f"{model.config.image_token_id} ({int(visual_mask.sum())} positions)"
        )

    embeds = model.get_input_embeddings()(input_ids)
    pixel_values = batch.get("pixel_values")
    if vision_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
        vision_features = _vision_features(model, pixel_values)
    n_tokens = int(visual_mask.sum())
    if vision_features is not None:
        d_in = model.model.multi_modal_projector.linear_1.in_features
        if vision_features.dim() != 3 or vision_features.shape[-1] != d_in:
            raise ValueError(f"vision_features shape {tuple(vision_features.shape)}; expected [n_img, P, {d_in}]")
        n_img, P = vision_features.shape[:2]
        if n_img * P != n_tokens:
            raise ValueError(
                f"{n_img} images x {P} features = {n_img * P} but the batch has {n_tokens} image tokens "
                f"(id {model.config.image_token_id}); expected equal"
            )
        image_embeds = model.model.multi_modal_projector(vision_features.to(device=device, dtype=embeds.dtype))
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
    elif n_tokens:
        raise ValueError(f"batch has {n_tokens} image tokens but neither pixel_values nor vision_features")

    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, return_dict=True
    )
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    return DistillOutputs(
        hidden=out.last_hidden_state,
        lm_head_weight=model.get_output_embeddings().weight,
        visual_mask=visual_mask,
        response_mask=next_labels != IGNORE_INDEX,
        next_labels=next_labels,
    )


def same_vision_tower(a: LlavaForConditionalGeneration, b: LlavaForConditionalGeneration) -> bool:
    """True if two models compute identical vision features: same tower config, feature layer,
    select strategy, dtype/device, and bit-equal tower weights. Call once at setup (it reads
    every tower tensor)."""
    _check_llava(a)
    _check_llava(b)
    if a.model.vision_tower is b.model.vision_tower:
        return True
    # dtype is compared on the tensors below (the config field is None on a fresh model, set on a reloaded one)
    skip = {"_name_or_path", "architectures", "transformers_version", "_attn_implementation_autoset", "dtype",
            "torch_dtype"}
    ca = {k: v for k, v in a.config.vision_config.to_dict().items() if k not in skip}
    cb = {k: v for k, v in b.config.vision_config.to_dict().items() if k not in skip}
    if ca != cb:
        return False
    for key in ("vision_feature_layer", "vision_feature_select_strategy"):
        if getattr(a.config, key) != getattr(b.config, key):
            return False
    sa, sb = a.model.vision_tower.state_dict(), b.model.vision_tower.state_dict()
    if sa.keys() != sb.keys():
        return False
    for k, ta in sa.items():
        tb = sb[k]
        if ta.shape != tb.shape or ta.dtype != tb.dtype or ta.device != tb.device or not torch.equal(ta, tb):
            return False
    return True


def check_tokenizers(teacher_processor, student_processor) -> None:
    """Raise ValueError naming the first difference if teacher and student tokenize differently.

    Accepts processors (their ``.tokenizer`` is used) or tokenizers. Compares the full
    vocabulary (incl. added tokens), pad/eos/image tokens, and the ids of a probe text."""
    t = getattr(teacher_processor, "tokenizer", teacher_processor)
    s = getattr(student_processor, "tokenizer", student_processor)
    vt, vs = t.get_vocab(), s.get_vocab()
    if vt != vs:
        by_id_t = {i: tok for tok, i in vt.items()}
        by_id_s = {i: tok for tok, i in vs.items()}
        for i in sorted(set(by_id_t) | set(by_id_s)):
            if by_id_t.get(i) != by_id_s.get(i):
                raise ValueError(
                    f"tokenizers differ at id {i}: teacher {by_id_t.get(i)!r}, student {by_id_s.get(i)!r} "
                    f"(vocab sizes {len(vt)} vs {len(vs)}); teacher and student must share one tokenizer"
                )
    for name in ("pad_token", "eos_token", "bos_token"):
        if getattr(t, name, None) != getattr(s, name, None):
            a, b = getattr(t, name, None), getattr(s, name, None)
            raise ValueError(f"tokenizers differ in {name}: teacher {a!r}, student {b!r}")
    it = getattr(teacher_processor, "image_token_id", None)
    is_ = getattr(student_processor, "image_token_id", None)
    if it != is_:
        raise ValueError(f"image token ids differ: teacher {it}, student {is_}")
    ids_t = t.encode(_PROBE_TEXT, add_special_tokens=False)
    ids_s = s.encode(_PROBE_TEXT, add_special_tokens=False)
    if ids_t != ids_s:
        j = next((k for k, (x, y) in enumerate(zip(ids_t, ids_s)) if x != y), min(len(ids_t), len(ids_s)))
        raise ValueError(
            f"tokenizers split {_PROBE_TEXT!r} differently from token {j}: "
            f"teacher {ids_t[j:j + 4]}, student {ids_s[j:j + 4]} (same vocabulary, different normalizer/pre-tokenizer)"
        )


def check_compatible(
    teacher: LlavaForConditionalGeneration,
    teacher_processor,
    student: LlavaForConditionalGeneration,
    student_processor,
    teacher_lm_head_weight: torch.Tensor | None = None,
) -> None:
    """`check_tokenizers` plus model-side agreement: the same image token id and image tokens per
    image (the visual positions line up), and every tokenizer id has an lm_head row in both models.
    Different row counts (padded vocab, V != Vt) are allowed. ``teacher_lm_head_weight``: the
    teacher's full Float[Vt, D] head when its parameters are partitioned (ZeRO-3 inference)."""
    check_tokenizers(teacher_processor, student_processor)
    if teacher.config.image_token_id != student.config.image_token_id:
        raise ValueError(
            f"image_token_id differs: teacher {teacher.config.image_token_id}, student {student.config.image_token_id}"
        )
    n_t, n_s = num_image_tokens(teacher), num_image_tokens(student)
    if n_t != n_s:
        raise ValueError(f"teacher uses {n_t} tokens per image, the student {n_s}; "
                         f"expected equal (the visual positions must line up)")
    n = len(getattr(student_processor, "tokenizer", student_processor))
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight = teacher.get_output_embeddings().weight
    heads = (("teacher", teacher_lm_head_weight), ("student", student.get_output_embeddings().weight))
    for role, weight in heads:
        if weight.shape[0] < n:
            raise ValueError(f"{role} lm_head has {weight.shape[0]} rows but the tokenizer has {n} tokens; "
                             f"expected rows >= {n}")


def _check_llava(model) -> None:
    if not isinstance(model, LlavaForConditionalGeneration):
        raise ValueError(f"expected a LlavaForConditionalGeneration, got {type(model).__name__}")


def _require(batch: dict, key: str) -> torch.Tensor:
    if batch.get(key) is None:
        present = sorted(k for k, v in batch.items() if v is not None)
        raise ValueError(f"batch is missing {key!r}; keys present: {present}")
    return batch[key]
