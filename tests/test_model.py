"""kdengine.model: builders, save/reload round trip, distillation forward, masks, freezing.

Everything is tiny and CPU-only; checkpoints are written into tmp dirs (no hub access).
"""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
)

from kdengine.data.tokenizer import train_tokenizer
from kdengine.model import (
    COMPONENTS,
    ModelSpec,
    TinySpec,
    build_model,
    build_tiny,
    check_compatible,
    check_tokenizers,
    compose_llava,
    distill_forward,
    format_param_summary,
    load_llava,
    num_image_tokens,
    param_summary,
    resolve_runtime,
    same_vision_tower,
    set_trainable,
    tiny_spec,
    vision_features,
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
WHERE = ["left of", "right of", "above", "below", "next to"]


def _corpus(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(COLOURS), rng.choice(COLOURS)
        s, t = rng.choice(SHAPES), rng.choice(SHAPES)
        out.append(f"A {a} {s} is {rng.choice(WHERE)} the {b} {t}. How many shapes? {rng.randint(1, 4)}.")
    return out


def _image(seed: int, size: int = 48) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _tokenizer_without_image_token(out_dir: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE LM tokenizer that lacks <image> (composition must add it)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(7), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>")
    tok.save_pretrained(out_dir)
    return tok


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(_corpus(0), d, vocab_size=600)
    return d


@pytest.fixture(scope="module")
def student(tok_dir):
    return build_model(tiny_spec("student", tok_dir))


@pytest.fixture(scope="module")
def teacher(tok_dir):
    return build_model(tiny_spec("teacher", tok_dir))


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory):
    """Tiny tower and LM checkpoints on disk: a full SigLIP (text + vision) and a CLIP vision
    model, each with its image processor; a Qwen2 LM whose tokenizer lacks <image> and whose
    vocabulary is exact, and a Llama LM with rows padded beyond its tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    d = root / "siglip"
    SiglipModel(
        SiglipConfig(
            vision_config=vision,
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
            ),
        )
    ).save_pretrained(d)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(d)
    d = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)

    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    lms = (("qwen2", Qwen2Config, Qwen2ForCausalLM, 0), ("llama", LlamaConfig, LlamaForCausalLM, 64))
    for name, cfg_cls, lm_cls, extra_rows in lms:
        d = str(root / name)
        tok = _tokenizer_without_image_token(d)
        tie = name == "qwen2"  # like Qwen2-0.5B: tied embeddings, and grown for <image> below
        lm_cls(cfg_cls(vocab_size=len(tok) + extra_rows, tie_word_embeddings=tie, **text)).save_pretrained(d)
    return root


def _batch(model, processor, seed: int = 0) -> dict:
    """Hand-built collated batch, right padded: sample 0 has one image, sample 1 two images,
    sample 2 is text only. Labels supervise a few answer tokens per sample."""
    P = num_image_tokens(model)
    img = model.config.image_token_id
    tok = processor.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(10, len(tok) - 8, (30,), generator=g).tolist()  # ordinary text tokens
    rows = [
        ([w[0]] + [img] * P + w[1:4] + [eos], [-100] * (P + 2) + w[2:4] + [eos]),
        ([img] * P + [w[4]] + [img] * P + w[5:8] + [eos], [-100] * (2 * P + 2) + w[6:8] + [eos]),
        (w[10:16] + [eos], [-100] * 3 + w[13:16] + [eos]),
    ]
    L = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((3, L), pad)
    labels = torch.full((3, L), -100)
    attention_mask = torch.zeros(3, L, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention_mask[b, : len(ids)] = 1
    size = model.config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "visual_mask": input_ids == img,
        "pixel_values": torch.randn(3, 3, size, size, generator=g),
    }


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()[:3].tolist()
    return f"first mismatching indices {idx}, max abs diff {(a - b).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- build + round trip


@pytest.mark.parametrize("kind", ["siglip-qwen2", "clip-llama", "tiny"])
def test_round_trip_plain_transformers(kind, parts_dir, tok_dir, tmp_path):
    if kind == "tiny":
        model, processor = build_tiny(TinySpec(image_size=32, tie_word_embeddings=True), tok_dir)
    else:
        tower, lm = kind.split("-")
        model, processor = compose_llava(parts_dir / tower, parts_dir / lm)
        lm_tok = AutoTokenizer.from_pretrained(parts_dir / lm)  # the loader compose_llava uses
        assert "<image>" not in lm_tok.get_vocab()
        assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
        on_disk = AutoConfig.from_pretrained(parts_dir / lm).vocab_size
        # qwen2 dir: exact vocab -> grown to fit <image>; llama dir: padded rows, no resize
        assert (on_disk < len(lm_tok) + 1) == (lm == "qwen2")
        assert model.lm_head.weight.shape[0] == max(on_disk, len(lm_tok) + 1) == model.config.text_config.vocab_size
        assert model.config.vision_feature_select_strategy == ("full" if tower == "siglip" else "default")
        assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == (lm == "qwen2")
    assert model.config.vision_feature_layer == -2
    assert model.config.projector_hidden_act == "gelu"
    proj = model.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (32, model.config.text_config.hidden_size)
    assert proj.linear_2.in_features == proj.linear_2.out_features == model.config.text_config.hidden_size
    assert num_image_tokens(model) == num_image_tokens(processor) == processor.num_image_tokens == 16

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    again_proc = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again_proc, LlavaProcessor)
    assert (again.lm_head.weight is again.model.language_model.embed_tokens.weight) == model.config.tie_word_embeddings
    assert num_image_tokens(again_proc) == 16
    check_tokenizers(processor, again_proc)
    assert again_proc.tokenizer.chat_template == processor.tokenizer.chat_template

    texts = ["<image>\nWhat colour?", "A red <image> star"]
    inputs = again_proc(images=[_image(1), _image(2)], text=texts, padding=True, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 2 * 16
    with torch.no_grad():
        ref = model(**inputs).logits
        out = again(**inputs).logits
        out_ours = load_llava(tmp_path)[0](**inputs).logits
    assert torch.equal(ref, out), _first_mismatch(ref, out)
    assert torch.equal(ref, out_ours), _first_mismatch(ref, out_ours)


def test_composed_keeps_checkpoint_weights(parts_dir):
    model, _ = compose_llava(parts_dir / "siglip", parts_dir / "qwen2", seed=3)
    tower = SiglipModel.from_pretrained(parts_dir / "siglip").vision_model.state_dict()
    mine = model.model.vision_tower.state_dict()
    assert mine.keys() == tower.keys()
    assert all(torch.equal(mine[k], tower[k]) for k in tower)
    lm = Qwen2ForCausalLM.from_pretrained(parts_dir / "qwen2")
    n = lm.lm_head.weight.shape[0]
    assert torch.equal(model.lm_head.weight[:n], lm.lm_head.weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    again, _ = compose_llava(parts_dir / "siglip", parts_dir / "qwen2", seed=3)
    proj, proj_again = model.model.multi_modal_projector, again.model.multi_modal_projector
    assert torch.equal(proj_again.linear_1.weight, proj.linear_1.weight)


def test_tiny_defaults_teacher_about_4x_student(student, teacher):
    (s, sp), (t, tp) = student, teacher
    s_lm = param_summary(s)["language_model"]["total"]
    t_lm = param_summary(t)["language_model"]["total"]
    assert 3.5 <= t_lm / s_lm <= 5.0, (t_lm, s_lm, len(sp.tokenizer))
    assert s.config.vision_config.to_dict() == t.config.vision_config.to_dict()
    assert same_vision_tower(s, t)
    assert s.lm_head.weight.shape[0] == t.lm_head.weight.shape[0] == len(sp.tokenizer)
    assert num_image_tokens(s) == sp.num_image_tokens == (64 // 8) ** 2
    assert sp.image_processor.size == {"height": 64, "width": 64}
    check_compatible(t, tp, s, sp)


def test_runtime_policy_on_cpu(student):
    rt = resolve_runtime("cpu")
    assert (rt.device.type, rt.dtype, rt.attn_implementation) == ("cpu", torch.float32, "sdpa")
    model, _ = student
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training


def test_build_errors_name_the_problem(tmp_path, parts_dir, tok_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_llava(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model_type='qwen2'.*expected 'llava'"):
        load_llava(parts_dir / "qwen2")
    with pytest.raises(ValueError, match="vision tower model_type='qwen2'"):
        compose_llava(parts_dir / "qwen2", parts_dir / "llama")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        compose_llava(parts_dir / "siglip", tmp_path)
    with pytest.raises(ValueError, match="needs \\['tokenizer'\\]"):
        build_model(ModelSpec(source="tiny"))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_tiny(TinySpec(image_size=30, patch_size=8), tok_dir)


def test_load_llava_rejects_processor_model_disagreement(tok_dir, tmp_path):
    model, processor = build_tiny(TinySpec(), tok_dir)
    model.save_pretrained(tmp_path)
    processor.image_processor.size = {"height": 32, "width": 32}
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expands <image> to 16 tokens but the model expects 64"):
        load_llava(tmp_path)


# ----------------------------------------------------------------------------- forward


def test_masks_are_next_token_aligned(student):
    model, processor = student
    batch = _batch(model, processor)
    out = distill_forward(model, batch)
    labels = batch["labels"]
    B, L = labels.shape
    for b in range(B):
        for i in range(L):
            nxt = labels[b, i + 1].item() if i + 1 < L else -100
            assert out.next_labels[b, i].item() == nxt
            assert out.response_mask[b, i].item() == (nxt != -100)
    assert not out.response_mask[:, -1].any()
    # sample 0: [w0, img*P, w1, w2, w3, eos]; supervised w2, w3, eos -> predicted from positions P+1..P+3
    P = num_image_tokens(model)
    assert out.response_mask[0].nonzero().flatten().tolist() == [P + 1, P + 2, P + 3]
    assert out.visual_mask[0].nonzero().flatten().tolist() == list(range(1, P + 1))
    assert out.visual_mask[1].nonzero().flatten().tolist() == list(range(P)) + list(range(P + 1, 2 * P + 1))
    assert out.visual_mask.sum(dim=1).tolist() == [P, 2 * P, 0]
    assert out.hidden.shape == (B, L, model.config.text_config.hidden_size)
    assert out.visual_mask.dtype == out.response_mask.dtype == torch.bool


@pytest.mark.parametrize("which", ["student", "teacher", "padded_vocab"])
def test_hidden_times_lm_head_equals_model_logits(which, student, teacher, tok_dir):
    if which == "padded_vocab":
        pair = build_tiny(TinySpec(pad_vocab_to_multiple_of=64), tok_dir)
        assert pair[0].lm_head.weight.shape[0] % 64 == 0 and pair[0].lm_head.weight.shape[0] > len(pair[1].tokenizer)
    else:
        pair = {"student": student, "teacher": teacher}[which]
    model, processor = pair
    batch = _batch(model, processor, seed=1)
    with torch.no_grad():
        out = distill_forward(model, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        logits = model(**inputs).logits
    rows = out.response_mask | out.visual_mask
    assert rows.sum() > 0
    mine = out.hidden[rows] @ out.lm_head_weight.T
    torch.testing.assert_close(mine, logits[rows], rtol=1e-5, atol=1e-5)
    assert out.lm_head_weight is model.lm_head.weight


def test_shared_vision_features_match_normal_path(student, teacher):
    (s, sp), (t, _) = student, teacher
    batch = _batch(s, sp, seed=2)
    with torch.no_grad():
        feats = vision_features(t, batch["pixel_values"])
        assert feats.shape == (3, num_image_tokens(s), s.config.vision_config.hidden_size)
        for model in (s, t):
            shared = distill_forward(model, batch, vision_features=feats).hidden
            normal = distill_forward(model, batch).hidden
            assert torch.equal(shared, normal), _first_mismatch(shared, normal)


def test_same_vision_tower_detects_differences(student, tok_dir):
    s, _ = student
    other_seed, _ = build_tiny(TinySpec(vision_seed=5), tok_dir)
    assert not same_vision_tower(s, other_seed)
    other_size, _ = build_tiny(TinySpec(image_size=32), tok_dir)
    assert not same_vision_tower(s, other_size)
    twin, _ = build_tiny(TinySpec(text_hidden=32, text_heads=2, text_kv_heads=1), tok_dir)
    assert same_vision_tower(s, twin)
    with torch.no_grad():
        twin.model.vision_tower.encoder.layers[0].mlp.fc1.bias[0] += 1e-3
    assert not same_vision_tower(s, twin)


def test_clip_features_drop_cls(parts_dir):
    model, processor = compose_llava(parts_dir / "clip", parts_dir / "llama")
    with torch.no_grad():
        pixel_values = processor.image_processor([_image(3)], return_tensors="pt")["pixel_values"]
        feats = vision_features(model, pixel_values)
        states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    assert states[-2].shape[1] == 17 and feats.shape == (1, 16, 32)
    assert torch.equal(feats, states[-2][:, 1:])


def test_forward_batch_errors(student):
    model, processor = student
    batch = _batch(model, processor)
    with pytest.raises(ValueError, match="visual_mask"):
        distill_forward(model, {**batch, "visual_mask": torch.zeros_like(batch["visual_mask"])})
    with pytest.raises(ValueError, match="2 images x 64 features = 128 but the batch has 192 image tokens"):
        distill_forward(model, {**batch, "pixel_values": batch["pixel_values"][:2]})
    with pytest.raises(ValueError, match="neither pixel_values nor vision_features"):
        distill_forward(model, {**batch, "pixel_values": None})
    with pytest.raises(ValueError, match="vision_features shape \\(3, 64, 7\\); expected \\[n_img, P, 32\\]"):
        distill_forward(model, batch, vision_features=torch.zeros(3, 64, 7))
    with pytest.raises(ValueError, match="missing 'labels'"):
        distill_forward(model, {k: v for k, v in batch.items() if k != "labels"})


def test_grads_reach_lm_head_and_projector_only_when_trainable(tok_dir):
    model, processor = build_tiny(TinySpec(), tok_dir)
    set_trainable(model, ["projector", "language_model"])
    batch = _batch(model, processor)
    out = distill_forward(model, batch)
    (out.hidden[out.response_mask] @ out.lm_head_weight.T).logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


# ----------------------------------------------------------------------------- freeze


def _flags(module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_freeze_by_component_and_counts(tie, tok_dir):
    model, _ = build_tiny(TinySpec(tie_word_embeddings=tie), tok_dir)
    inner = model.model
    numel = {
        "vision_tower": sum(p.numel() for p in inner.vision_tower.parameters()),
        "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in inner.language_model.parameters())
        + (0 if tie else model.lm_head.weight.numel()),
    }
    assert (model.lm_head.weight is inner.language_model.embed_tokens.weight) == tie

    set_trainable(model, ["projector"])
    assert _flags(inner.vision_tower) == {False} and _flags(inner.language_model) == {False}
    assert _flags(model.lm_head) == {False} and _flags(inner.multi_modal_projector) == {True}
    s = param_summary(model)
    assert set(s) == {*COMPONENTS, "all"}
    assert {k: v["total"] for k, v in s.items() if k != "all"} == numel
    assert s["projector"]["trainable"] == numel["projector"]
    assert s["vision_tower"]["trainable"] == s["language_model"]["trainable"] == 0
    assert s["all"] == {"total": sum(p.numel() for p in model.parameters()), "trainable": numel["projector"]}

    set_trainable(model, "language_model")
    assert _flags(inner.language_model) == {True} and _flags(model.lm_head) == {True}
    assert _flags(inner.multi_modal_projector) == {False} and _flags(inner.vision_tower) == {False}
    s = param_summary(model)
    assert s["all"]["trainable"] == s["language_model"]["trainable"] == numel["language_model"]
    table = format_param_summary(s)
    assert all(name in table for name in COMPONENTS) and f"{numel['language_model']:,}" in table

    with pytest.raises(ValueError, match="unknown model components \\['lm'\\]"):
        set_trainable(model, ["lm"])


# ----------------------------------------------------------------------------- tokenizer agreement


def test_tokenizer_mismatch_is_a_clear_error(student, tok_dir, tmp_path):
    model, processor = student
    other = train_tokenizer(_corpus(1, n=60) + ["zebra quokka axolotl"], str(tmp_path), vocab_size=600)
    with pytest.raises(ValueError, match="tokenizers differ at id \\d+: teacher '.*', student '.*'"):
        check_tokenizers(processor, other)
    check_tokenizers(processor, processor.tokenizer)
    padded, padded_proc = build_tiny(TinySpec(pad_vocab_to_multiple_of=128), tok_dir)
    assert padded.lm_head.weight.shape[0] != model.lm_head.weight.shape[0]
    check_compatible(padded, padded_proc, model, processor)  # V != Vt with one tokenizer is fine


def test_compatibility_needs_equal_image_tokens_and_a_full_teacher_head(student, teacher, tok_dir):
    (s, sp), (t, tp) = student, teacher
    small, small_proc = build_tiny(TinySpec(image_size=32), tok_dir)
    with pytest.raises(ValueError, match="teacher uses 16 tokens per image, the student 64; expected equal"):
        check_compatible(small, small_proc, s, sp)
    n = len(sp.tokenizer)
    short = t.get_output_embeddings().weight[: n - 1]  # e.g. a partitioned teacher's gathered head
    with pytest.raises(ValueError, match=f"teacher lm_head has {n - 1} rows but the tokenizer has {n} tokens"):
        check_compatible(t, tp, s, sp, teacher_lm_head_weight=short)
    check_compatible(t, tp, s, sp, teacher_lm_head_weight=t.get_output_embeddings().weight.detach())


def test_tokenizer_normalizer_difference_is_caught(tok_dir, tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tok_dir)
    b = AutoTokenizer.from_pretrained(tok_dir)
    b.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="split .* differently"):
        check_tokenizers(a, b)


def test_same_vision_tower_after_save_and_reload(student, tmp_path):
    """A reloaded model carries a config dtype that a fresh one leaves None; the towers still match."""
    s, processor = student
    s.save_pretrained(tmp_path / "m")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert same_vision_tower(s, reloaded)
    reloaded.model.vision_tower.to(torch.float64)
    assert not same_vision_tower(s, reloaded)  # tensor dtypes are still compared
