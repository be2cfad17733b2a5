"""Train a byte-level BPE tokenizer and save it as Hugging Face tokenizer files.

The saved folder loads with ``AutoTokenizer.from_pretrained(out_dir)`` and has:
``<pad>`` (pad), ``<|im_end|>`` (eos, closes every chat turn), ``<|im_start|>``,
``<image>`` (the image placeholder, also exposed as ``tokenizer.image_token``) and a
chatml ``chat_template``, so a tiny teacher and student share one vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|im_end|>"
IM_START_TOKEN = "<|im_start|>"
# Order fixes the ids: <pad>=0, <|im_end|>=1, <|im_start|>=2, <image>=3.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START_TOKEN, IMAGE_TOKEN)

# chatml: "<|im_start|>{role}\n{content}<|im_end|>\n" per message. Content may be a string
# or a list of parts ({"type": "image"} renders "<image>\n", {"type": "text", "text": ...}).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    min_frequency: int = 2,
):
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Args:
        texts: training corpus, one string per document (iterated once).
        out_dir: folder to write ``tokenizer.json``, ``tokenizer_config.json`` and
            ``chat_template.jinja``; created if missing.
        vocab_size: upper bound on the vocabulary (special tokens and the 256 byte
            symbols included). A small corpus may stop merging earlier, so
            ``len(tokenizer)`` can be below it.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        the saved tokenizer, reloaded with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    n_base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size={vocab_size} is too small: expected >= {n_base} (256 bytes + specials)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}: expected >= 1")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IMAGE_TOKEN],
        image_token=IMAGE_TOKEN,
        chat_template=CHATML_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))
