"""A config's models built on the ``meta`` device from their configs alone (no weights, no hub).

The model is the one `kdengine.model.build_model` makes from the same `ModelSpec`: a
`LlavaForConditionalGeneration` with the vision tower's own class (SigLIP/CLIP vision model), the
language model's class (Qwen2/Llama) and the mlp2x_gelu projector, the LLaVA config set as
`kdengine.model.build._assemble` sets it (feature layer -2, the tower's select strategy).

Shapes come from:
- ``tiny``: the spec's sizes; vocabulary len(tokenizer) (+ the image token when missing) when the
  tokenizer directory exists, else ``synth.vocab_size`` + 1 (the synthetic tokenizer's upper bound);
- ``composed`` / ``llava``: the directories' config.json; a directory that does not exist is looked up by
  its last path component in ``configs/models/`` (the paper's models, shapes only) and the plan says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdengine.model.spec import ModelSpec

__all__ = ["MODELS_DIR", "MetaModel", "PlanError", "build_meta_model", "resolve_dir"]

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


class PlanError(ValueError):
    """A model or stage that cannot be planned; the message names the value and what was expected."""


@dataclass
class MetaModel:
    model: object  # LlavaForConditionalGeneration on meta
    num_image_tokens: int
    image_size: int
    image_token_id: int
    notes: list[str]


def resolve_dir(path: str, key: str) -> tuple[str, str | None]:
    """(directory with a config.json, note) for a model path; a missing one from configs/models/ by name."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    shipped = {p.name.lower(): p for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()} \
        if MODELS_DIR.is_dir() else {}
    name = Path(path.rstrip("/")).name.lower()
    if name in shipped:
        return str(shipped[name]), f"{key}: {path} not found; shapes from {shipped[name]}/config.json"
    raise PlanError(f"{key} = {path!r}: no config.json there and no folder of that name in {MODELS_DIR} "
                    f"(one of {sorted(p.name for p in shipped.values())}); set it, e.g. --set {key}=configs/models/NAME")


def _vocab_of_tokenizer(path: str | None) -> tuple[int | None, int | None]:
    """(len(tokenizer) with the image token, its id) when ``path`` holds a tokenizer, else (None, None)."""
    if not path or not os.path.isdir(path):
        return None, None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image = tok.convert_tokens_to_ids("<image>") if "<image>" in tok.get_vocab() else None
    return (len(tok), image) if image is not None else (len(tok) + 1, len(tok))


def build_meta_model(spec: ModelSpec, key: str, synth_vocab: int | None, dtype: torch.dtype,
                     attn: str = "sdpa") -> MetaModel:
    """The LLaVA model of ``spec`` on meta, in ``dtype`` (``key``: e.g. models.teacher, for messages)."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from kdengine.model.build import LANGUAGE_MODELS, VISION_TOWERS, num_image_tokens

    notes: list[str] = []
    if spec.source == "llava":
        path, note = resolve_dir(spec.path, f"{key}.path")
        notes += [note] if note else []
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "llava":
            raise PlanError(f"{key}.path = {spec.path!r}: config model_type={config.model_type!r}; expected 'llava'")
        image_token_id = config.image_token_id
    else:
        if spec.source == "tiny":
            t = spec.tiny
            vocab, image_token_id = _vocab_of_tokenizer(spec.tokenizer)
            if vocab is None:
                if synth_vocab is None:
                    raise PlanError(f"{key}.tokenizer = {spec.tokenizer!r}: not found and no synth section to bound "
                                    f"the vocabulary; expected a tokenizer directory")
                vocab, image_token_id = synth_vocab + 1, synth_vocab
                notes.append(f"{key}: tokenizer {spec.tokenizer} not written yet; vocabulary <= synth.vocab_size + 1 "
                             f"= {vocab} (an upper bound)")
            m = max(1, t.pad_vocab_to_multiple_of)
            vocab = -(-vocab // m) * m
            vision = SiglipVisionConfig(hidden_size=t.vision_hidden, intermediate_size=t.vision_intermediate,
                                        num_hidden_layers=t.vision_layers, num_attention_heads=t.vision_heads,
                                        image_size=t.image_size, patch_size=t.patch_size, vision_use_head=False)
            text = Qwen2Config(vocab_size=vocab, hidden_size=t.text_hidden, intermediate_size=t.text_intermediate,
                               num_hidden_layers=t.text_layers, num_attention_heads=t.text_heads,
                               num_key_value_heads=t.text_kv_heads, max_position_embeddings=t.max_positions,
                               tie_word_embeddings=t.tie_word_embeddings)
        else:
            vpath, note = resolve_dir(spec.vision_tower, f"{key}.vision_tower")
            notes += [note] if note else []
            lpath, note = resolve_dir(spec.language_model, f"{key}.language_model")
            notes += [note] if note else []
            vision = AutoConfig.from_pretrained(vpath, local_files_only=True)
            if vision.model_type not in VISION_TOWERS:
                raise PlanError(f"{key}.vision_tower: model_type={vision.model_type!r}; "
                                f"expected one of {sorted(VISION_TOWERS)}")
            if vision.model_type in ("siglip", "clip"):
                vision = vision.vision_config
            text = AutoConfig.from_pretrained(lpath, local_files_only=True)
            if text.model_type not in LANGUAGE_MODELS:
                raise PlanError(f"{key}.language_model: model_type={text.model_type!r}; "
                                f"expected one of {list(LANGUAGE_MODELS)}")
            vocab, image_token_id = _vocab_of_tokenizer(lpath if lpath == spec.language_model else None)
            if vocab is not None and vocab > text.vocab_size:
                text.vocab_size = vocab  # compose_llava grows the embeddings to the tokenizer
            if image_token_id is None:
                image_token_id = text.vocab_size - 1  # any id: only its positions matter
                notes.append(f"{key}: no tokenizer; the image token is taken as id {image_token_id}")
        strategy = VISION_TOWERS[vision.model_type][1] if vision.model_type in VISION_TOWERS else "full"
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                             projector_hidden_act="gelu", vision_feature_layer=-2,
                             vision_feature_select_strategy=strategy, tie_word_embeddings=text.tie_word_embeddings)
        config.image_seq_length = num_image_tokens(config)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = attn
    dtype = getattr(torch, spec.dtype) if spec.dtype else dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return MetaModel(model, num_image_tokens(config), config.vision_config.image_size, image_token_id, notes)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
