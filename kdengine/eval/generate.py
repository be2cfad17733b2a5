"""Greedy answers from a LLaVA checkpoint on LLaVA-format question files.

Question file (JSONL, LLaVA's evaluation format), one question per line::

    {"question_id": 0, "image": "eval/000000.png", "text": "What color is the star? ..."}

``image`` is optional (text-only question) and relative to the image folder; other keys
(e.g. ``category``) are ignored. A question becomes the first human turn of a training
record, ``"<image>\\n{text}"`` (or ``text`` as is when it already holds ``<image>``), and
its prompt ids are the ids `kdengine.data.templates.tokenize_record` gives that record up
to the first supervised token: the chat markup, the BOS rule and the ``<image>`` expansion
to P image tokens are the training ones, token for token.

Batches are left-padded (so every prompt ends at the last column and generation appends
after it) and ordered longest first; answers come back in question order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from kdengine.data.images import process_images
from kdengine.data.records import Record, Turn, open_image
from kdengine.data.templates import IGNORE_INDEX, check_template, image_token_id_of, tokenize_record
from kdengine.data.tokenizer import IMAGE_TOKEN
from kdengine.eval.scoring import iter_question_rows

__all__ = [
    "Question",
    "generate_answers",
    "human_turn",
    "load_questions",
    "prompt_ids",
    "stop_token_ids",
    "write_jsonl",
]

# Stands in for the assistant's reply when a question is rendered as a training record; only
# the ids before it are used. Short and plain so it cannot merge with the template's markup.
_PLACEHOLDER_ANSWER = "ok"


@dataclass(frozen=True)
class Question:
    """One question: ``image`` is the path as written in the file (None: text-only)."""

    id: object
    text: str
    image: str | None
    where: str  # "file.jsonl:12"


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a LLaVA question JSONL file; raise ValueError naming the line of the first bad row."""
    questions, seen = [], {}
    for row, qid, where in iter_question_rows(path, "question file"):
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid!r} repeats {seen[qid]}")
        seen[qid] = where
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r:.80}")
        image = row.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise ValueError(f"{where}: 'image' must be a non-empty path string or absent, got {image!r}")
        n_tok = text.count(IMAGE_TOKEN)
        if n_tok > (1 if image else 0):
            raise ValueError(
                f"{where}: text holds {n_tok} {IMAGE_TOKEN!r} placeholder(s) for {1 if image else 0} image(s)"
            )
        questions.append(Question(qid, text, image, where))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def image_path(question: Question, image_folder: str | os.PathLike | None) -> str | None:
    """Where the question's image is, or None for a text-only question."""
    if question.image is None:
        return None
    if image_folder is None:
        raise ValueError(f"{question.where}: question {question.id!r} has an image but no image folder was given")
    return os.path.join(os.fspath(image_folder), question.image)


def human_turn(question: Question) -> str:
    """The question as a first human turn: ``<image>\\n`` prepended when it has an image (LLaVA's rule)."""
    if question.image is None or IMAGE_TOKEN in question.text:
        return question.text
    return f"{IMAGE_TOKEN}\n{question.text}"


def prompt_ids(question: Question, tokenizer, template: str, num_image_tokens: int) -> list[int]:
    """Prompt token ids of one question under ``template``: the ids the training pipeline
    gives a record with this human turn, cut at its first supervised token.

    Returns:
        ids, length = prompt text tokens + (num_image_tokens - 1) if the question has an image.
    """
    images = (question.image,) if question.image is not None else ()
    record = Record(question.id, images, (Turn("human", human_turn(question)), Turn("gpt", _PLACEHOLDER_ANSWER)),
                    question.where)
    ids, labels = tokenize_record(record, tokenizer, template, image_token_id_of(tokenizer), num_image_tokens)
    cut = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    if cut is None:
        raise ValueError(f"{question.where}: template {template!r} supervises no answer token; "
                         f"cannot find where the prompt ends")
    if cut == 0:
        raise ValueError(f"{question.where}: template {template!r} gives this question an empty prompt "
                         f"(no image, no BOS)")
    return ids[:cut]


def stop_token_ids(tokenizer, template: str, generation_config=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, the model's generation eos, and the
    special token the template puts right after an answer (e.g. chatml's ``<|im_end|>`` when
    the tokenizer's eos is another token)."""
    stops = []
    eos = getattr(generation_config, "eos_token_id", None)
    for tok in [tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])]:
        if tok is not None and tok not in stops:
            stops.append(int(tok))
    record = Record("probe", (), (Turn("human", "?"), Turn("gpt", _PLACEHOLDER_ANSWER)), "stop_token_ids")
    ids, labels = tokenize_record(record, tokenizer, template, image_token_id_of(tokenizer), 1)
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    answer = tokenizer(_PLACEHOLDER_ANSWER, add_special_tokens=False)["input_ids"]
    if supervised[: len(answer)] == answer and len(supervised) > len(answer):
        after = supervised[len(answer)]
        if after in tokenizer.all_special_ids and after not in stops:
            stops.append(after)
    if not stops:
        raise ValueError("no stop token: the tokenizer has no eos_token and the template ends answers "
                         "with no special token")
    return stops


@torch.no_grad()
def generate_answers(
    model,
    processor,
    questions: list[Question],
    image_folder: str | os.PathLike | None = None,
    template: str = "chat",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    pad_to_square: bool = False,
    progress: bool = True,
) -> list[str]:
    """Greedy answers of a ``LlavaForConditionalGeneration`` to ``questions``, in their order.

    Args:
        model: the LLaVA model (eval mode); its device and dtype are used for the inputs.
        processor: its LlavaProcessor (``.tokenizer`` with the training chat template,
            ``.image_processor``).
        questions: from `load_questions`.
        image_folder: folder the questions' image paths are relative to.
        template: the training template ("chat", "vicuna" or "plain").
        batch_size: questions per generate call (left-padded to the batch's longest prompt).
        max_new_tokens: answer length cap in tokens.
        pad_to_square: pad images to squares first, as the training data was processed.
        progress: show a tqdm bar over batches.

    Returns:
        answers: one string per question, special tokens dropped, whitespace stripped.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from kdengine.model import num_image_tokens

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    tokenizer = processor.tokenizer
    check_template(template, tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected tokenizer.pad_token_id to be set for batched generation")
    paths = [image_path(q, image_folder) for q in questions]
    P = num_image_tokens(model)
    prompts = [prompt_ids(q, tokenizer, template, P) for q in questions]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop_token_ids(tokenizer, template, model.generation_config),
        pad_token_id=tokenizer.pad_token_id,
    )
    device, dtype = model.get_input_embeddings().weight.device, model.dtype
    order = sorted(range(len(questions)), key=lambda i: -len(prompts[i]))
    answers: list[str | None] = [None] * len(questions)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        L = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), L), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), L), dtype=torch.long)
        images = []
        for b, i in enumerate(batch):
            n = len(prompts[i])
            input_ids[b, L - n :] = torch.tensor(prompts[i], dtype=torch.long)
            attention_mask[b, L - n :] = 1
            if paths[i] is not None:
                images.append(open_image(paths[i], questions[i].id, questions[i].where))
        extra = {}  # transformers runs the tower on any pixel_values key, even None: pass it only with images
        if images:
            extra["pixel_values"] = process_images(images, processor.image_processor, pad_to_square).to(device, dtype)
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config, **extra
        )
        texts = tokenizer.batch_decode(out[:, L:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            answers[i] = text.strip()
    return answers


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL, creating the parent folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
