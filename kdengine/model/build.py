"""Build LLaVA models (`LlavaForConditionalGeneration` + `LlavaProcessor`) from local paths.

Three sources, one result type, so every checkpoint written here loads in plain transformers:

- ``source="llava"``: a llava-format checkpoint directory (`load_llava`);
- ``source="composed"``: a SigLIP/CLIP vision tower directory plus a causal LM directory, joined
  by a new mlp2x_gelu projector (`compose_llava`);
- ``source="tiny"``: from config only, for tests and the embedded default (`build_tiny`).

Runtime policy (`resolve_runtime`): on CUDA bf16 with flash_attention_2 when flash-attn is
installed, else sdpa; on CPU fp32 with sdpa.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from transformers import (
    AddedToken,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from kdengine.model.spec import DTYPES, TINY_STUDENT, TINY_TEACHER, ModelSpec, TinySpec, tiny_spec  # torch-free

__all__ = [
    "ModelSpec",
    "Runtime",
    "TinySpec",
    "TINY_STUDENT",
    "TINY_TEACHER",
    "build_model",
    "build_tiny",
    "compose_llava",
    "load_llava",
    "num_image_tokens",
    "resolve_runtime",
    "tiny_spec",
]

# vision checkpoint model_type -> (vision model class, LLaVA feature select strategy).
# SigLIP has no CLS token, so every patch is kept ("full"); CLIP drops its CLS ("default").
VISION_TOWERS: dict[str, tuple[type[PreTrainedModel], str]] = {
    "siglip": (SiglipVisionModel, "full"),
    "siglip_vision_model": (SiglipVisionModel, "full"),
    "clip": (CLIPVisionModel, "default"),
    "clip_vision_model": (CLIPVisionModel, "default"),
}
# Causal LM families the composed builder accepts (Qwen1.5 checkpoints use model_type "qwen2").
LANGUAGE_MODELS = ("qwen2", "llama")
# Vision towers whose sequence starts with a CLS token.
_CLS_TOWERS = ("clip_vision_model",)
_DTYPES = {name: getattr(torch, name) for name in DTYPES}


# ----------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str


def resolve_runtime(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Runtime:
    """Device, dtype and attention backend: CUDA -> bf16 + flash_attention_2 (if flash_attn is
    importable) else sdpa; CPU -> fp32 + sdpa. Explicit arguments win."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} requested but CUDA is not available")
        if attn_implementation is None:
            has_flash = importlib.util.find_spec("flash_attn") is not None
            attn_implementation = "flash_attention_2" if has_flash else "sdpa"
        dtype = dtype or torch.bfloat16
    else:
        attn_implementation = attn_implementation or "sdpa"
        dtype = dtype or torch.float32
    return Runtime(device=device, dtype=dtype, attn_implementation=attn_implementation)


# ----------------------------------------------------------------------------- builders


def build_model(spec: ModelSpec) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build (model, processor) from a `ModelSpec`; the model is in eval mode."""
    spec.validate()
    rt = resolve_runtime(spec.device, spec.dtype, spec.attn_implementation)
    if spec.source == "llava":
        return load_llava(spec.path, runtime=rt)
    if spec.source == "composed":
        return compose_llava(
            spec.vision_tower, spec.language_model, image_token=spec.image_token, seed=spec.projector_seed, runtime=rt
        )
    return build_tiny(spec.tiny, spec.tokenizer, image_token=spec.image_token, seed=spec.projector_seed, runtime=rt)


def load_llava(
    path: str | os.PathLike, *, runtime: Runtime | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a llava-format checkpoint directory (config.json with model_type "llava" + processor files)."""
    rt = runtime or resolve_runtime()
    path = str(path)
    config = _read_config(path, "llava checkpoint")
    if config.model_type != "llava":
        raise ValueError(f"{path}: config model_type={config.model_type!r}; expected 'llava'")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"{path}: processor is {type(processor).__name__}; expected LlavaProcessor")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=rt.dtype, attn_implementation=rt.attn_implementation
    )
    return _finish(model.to(rt.device), processor, path)


def compose_llava(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    *,
    image_token: str = "<image>",
    seed: int = 0,
    runtime: Runtime | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Join a vision tower directory (SigLIP/CLIP; full or vision-only checkpoint, with its
    preprocessor_config.json) and a causal LM directory (Qwen2/Qwen1.5/Llama, with its tokenizer)
    through a new mlp2x_gelu projector (seeded by ``seed``). Features come from the second-to-last
    tower layer, every patch. The image token is added to the tokenizer if missing and the
    embeddings grow only when the tokenizer outgrows them."""
    rt = runtime or resolve_runtime()
    vision_tower, language_model = str(vision_tower), str(language_model)
    vcfg = _read_config(vision_tower, "vision tower")
    if vcfg.model_type not in VISION_TOWERS:
        raise ValueError(
            f"{vision_tower}: vision tower model_type={vcfg.model_type!r}; expected one of {sorted(VISION_TOWERS)}"
        )
    lcfg = _read_config(language_model, "language model")
    if lcfg.model_type not in LANGUAGE_MODELS:
        raise ValueError(
            f"{language_model}: language model model_type={lcfg.model_type!r}; expected one of {list(LANGUAGE_MODELS)}"
        )
    if not os.path.isfile(os.path.join(vision_tower, "preprocessor_config.json")):
        raise FileNotFoundError(f"{vision_tower}: no preprocessor_config.json (the tower's image processor)")
    vision_cls, strategy = VISION_TOWERS[vcfg.model_type]

    tokenizer = _load_tokenizer(language_model)
    image_token_id = _ensure_image_token(tokenizer, image_token)
    image_processor = AutoImageProcessor.from_pretrained(vision_tower, local_files_only=True)

    kw = dict(
        local_files_only=True, dtype=rt.dtype, attn_implementation=rt.attn_implementation, output_loading_info=True
    )
    vision, info = vision_cls.from_pretrained(vision_tower, **kw)
    _check_loaded(vision_tower, info)
    lm, info = AutoModelForCausalLM.from_pretrained(language_model, **kw)
    _check_loaded(language_model, info)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        with _seeded(seed):
            lm.resize_token_embeddings(len(tokenizer))
    model = _assemble(vision, lm, strategy=strategy, image_token_id=image_token_id, seed=seed)
    processor = _make_processor(image_processor, tokenizer, model, image_token)
    return _finish(model.to(rt.device), processor, f"{vision_tower} + {language_model}")


def build_tiny(
    tiny: TinySpec,
    tokenizer: str | os.PathLike,
    *,
    image_token: str = "<image>",
    seed: int = 0,
    runtime: Runtime | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A SigLIP + Qwen2 LLaVA from config only; vocabulary = len(tokenizer) (optionally padded).
    The tower is seeded by ``tiny.vision_seed``, the LM by ``tiny.seed``, the projector by ``seed``."""
    rt = runtime or resolve_runtime()
    tokenizer = str(tokenizer)
    if tiny.image_size % tiny.patch_size:
        raise ValueError(f"tiny image_size={tiny.image_size} is not a multiple of patch_size={tiny.patch_size}")
    tok = _load_tokenizer(tokenizer)
    image_token_id = _ensure_image_token(tok, image_token)
    m = max(1, tiny.pad_vocab_to_multiple_of)
    vocab_size = -(-len(tok) // m) * m

    vision_config = SiglipVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_intermediate,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=tiny.text_hidden,
        intermediate_size=tiny.text_intermediate,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads,
        num_key_value_heads=tiny.text_kv_heads,
        max_position_embeddings=tiny.max_positions,
        tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    for cfg in (vision_config, text_config):
        cfg._attn_implementation = rt.attn_implementation
    with _seeded(tiny.vision_seed):
        vision = SiglipVisionModel(vision_config)
    with _seeded(tiny.seed):
        lm = Qwen2ForCausalLM(text_config)
    model = _assemble(vision, lm, strategy="full", image_token_id=image_token_id, seed=seed)
    size = {"height": tiny.image_size, "width": tiny.image_size}
    processor = _make_processor(SiglipImageProcessorPil(size=size), tok, model, image_token)
    return _finish(model.to(device=rt.device, dtype=rt.dtype), processor, f"tiny on {tokenizer}")


def num_image_tokens(obj: LlavaForConditionalGeneration | LlavaConfig | LlavaProcessor) -> int:
    """Image tokens per image, P = (image_size // patch_size)**2 (+1 for a kept CLS token).

    Works from a model, its LlavaConfig, or a LlavaProcessor (from its image size, patch size,
    num_additional_image_tokens and select strategy, as LlavaProcessor expands ``<image>``)."""
    if isinstance(obj, LlavaProcessor):
        h, w = _processor_image_size(obj.image_processor)
        if h is None or obj.patch_size is None:
            raise ValueError(f"processor image size {(h, w)} / patch_size {obj.patch_size}: cannot count image tokens")
        n = (h // obj.patch_size) * (w // obj.patch_size) + (obj.num_additional_image_tokens or 0)
        return n - 1 if obj.vision_feature_select_strategy == "default" else n
    config = obj.config if isinstance(obj, PreTrainedModel) else obj
    if not isinstance(config, LlavaConfig):
        raise ValueError(
            f"num_image_tokens: got {type(obj).__name__}; expected a LLaVA model, LlavaConfig or LlavaProcessor"
        )
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if config.vision_feature_select_strategy == "full" and vc.model_type in _CLS_TOWERS:
        n += 1
    return n


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under a fixed CPU RNG seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _read_config(path: str, what: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} directory {path} has no config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _load_tokenizer(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise FileNotFoundError(f"{path}: no tokenizer files (expected one of {list(names)})")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _ensure_image_token(tokenizer, image_token: str) -> int:
    """Id of ``image_token``, adding it as a special token if the tokenizer lacks it."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"image token {image_token!r} encodes to {ids}; expected a single id")
    return ids[0]


def _check_loaded(path: str, info: dict) -> None:
    bad = {k: sorted(info.get(k) or [])[:5] for k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        raise ValueError(f"{path}: checkpoint does not match its config: {bad}")


def _assemble(
    vision: PreTrainedModel, lm: PreTrainedModel, *, strategy: str, image_token_id: int, seed: int
) -> LlavaForConditionalGeneration:
    """LLaVA shell built on the meta device, then the loaded tower / LM swapped in and a new
    projector (Linear -> GELU -> Linear, PyTorch default init under ``seed``) attached."""
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    config.image_seq_length = num_image_tokens(config)
    config._attn_implementation = lm.config._attn_implementation
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    weight = lm.get_input_embeddings().weight
    with _seeded(seed):
        projector = LlavaMultiModalProjector(config).to(device=weight.device, dtype=weight.dtype)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.model.multi_modal_projector = projector
    model.lm_head = lm.lm_head
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"LLaVA assembly left tensors on the meta device: {meta[:5]}")
    return model


def _make_processor(
    image_processor, tokenizer, model: LlavaForConditionalGeneration, image_token: str
) -> LlavaProcessor:
    config = model.config
    has_cls = config.vision_config.model_type in _CLS_TOWERS
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        image_token=image_token,
    )


def _processor_image_size(image_processor) -> tuple[int | None, int | None]:
    """(height, width) of the processor's output images, or (None, None) if not fixed."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        return crop["height"], crop["width"]
    size = getattr(image_processor, "size", None) or {}
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    return None, None


def _finish(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, where: str
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Check processor/model agreement, set ``processor.num_image_tokens``, eval mode."""
    vc = model.config.vision_config
    n_model = num_image_tokens(model)
    n_proc = num_image_tokens(processor)
    if n_model != n_proc:
        raise ValueError(
            f"{where}: processor expands <image> to {n_proc} tokens but the model expects {n_model} "
            f"(image processor size {_processor_image_size(processor.image_processor)}, "
            f"tower image_size={vc.image_size}, patch_size={vc.patch_size})"
        )
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"{where}: processor image token id {processor.image_token_id} "
            f"!= model image_token_id {model.config.image_token_id}"
        )
    rows = model.get_output_embeddings().weight.shape[0]
    if len(processor.tokenizer) > rows:
        raise ValueError(f"{where}: tokenizer has {len(processor.tokenizer)} tokens but the lm_head only {rows} rows")
    processor.num_image_tokens = n_model
    model.eval()
    return model, processor
