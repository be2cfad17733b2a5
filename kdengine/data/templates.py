"""Conversation templates and exact label masks.

A template turns a record's turns into text pieces, each marked prompt (label -100) or
supervised (label = token id). Pieces are tokenized one by one and concatenated, so the
mask boundaries are exact; the concatenation must equal the tokenization of the whole
text, otherwise the sample is rejected as ``tokenization_mismatch`` (never masked
silently). Then each ``<image>`` id is expanded to ``num_image_tokens`` copies, the
layout ``LlavaForConditionalGeneration`` expects.

Templates:
    plain:  ``<image>...<image>{caption}{eos}``; only caption and eos supervised
            (LLaVA pre-training; the human turn's text is dropped).
    chat:   the tokenizer's own ``chat_template`` (e.g. Qwen chatml); each assistant
            segment up to and including its end token is supervised.
    vicuna: ``{system} USER: {q} ASSISTANT: {a}{eos}USER: ...``; `` {a}{eos}`` supervised.
"""

from __future__ import annotations

from .records import IMAGE_TOKEN, BadSample, Record, Turn

TEMPLATES = ("plain", "chat", "vicuna")
IGNORE_INDEX = -100
VICUNA_SYSTEM = "A conversation between a user and an AI assistant that answers questions about images."


def check_template(template: str, tokenizer) -> None:
    """Fail early if ``template`` cannot work with ``tokenizer``."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")
    if template in ("plain", "vicuna") and tokenizer.eos_token is None:
        raise ValueError(f"template {template!r} needs tokenizer.eos_token; the tokenizer has none")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' uses tokenizer.chat_template, but the tokenizer has none")


def image_token_id_of(tokenizer) -> int:
    """The id of ``<image>``; it must encode to exactly one token."""
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer encodes {IMAGE_TOKEN!r} as {len(ids)} tokens {ids}: expected one "
            f"(add it with tokenizer.add_special_tokens({{'extra_special_tokens': ['{IMAGE_TOKEN}']}}))"
        )
    return ids[0]


def _plain_pieces(turns: tuple[Turn, ...], eos: str, sid, where) -> list[tuple[str, bool]]:
    if len(turns) != 2:
        raise BadSample("malformed", f"template 'plain' expects 1 human + 1 gpt turn, got {len(turns)} turns", sid, where)
    n_img = turns[0].value.count(IMAGE_TOKEN)
    return [(IMAGE_TOKEN * n_img, False), (turns[1].value, True), (eos, True)]


def _vicuna_pieces(turns: tuple[Turn, ...], eos: str) -> list[tuple[str, bool]]:
    pieces = []
    for k in range(0, len(turns), 2):
        head = f"{VICUNA_SYSTEM} " if k == 0 else ""
        pieces.append((f"{head}USER: {turns[k].value} ASSISTANT:", False))
        pieces.append((f" {turns[k + 1].value}{eos}", True))
    return pieces


def _chat_pieces(turns: tuple[Turn, ...], tokenizer, sid, where) -> list[tuple[str, bool]]:
    """Diff successive renders of the tokenizer's chat template into pieces."""
    msgs = [{"role": "user" if t.role == "human" else "assistant", "content": t.value} for t in turns]

    def render(n: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)

    def mismatch(msg: str) -> BadSample:
        return BadSample("tokenization_mismatch", f"chat template: {msg}", sid, where)

    eos = tokenizer.eos_token
    pieces, done = [], ""
    for k, turn in enumerate(turns):
        if turn.role != "gpt":
            continue
        before, through = render(k, True), render(k + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise mismatch(f"rendering turn {k} does not extend the earlier turns (the template is not prefix-stable)")
        seg = through[len(before) :]
        i = seg.find(turn.value)
        if i < 0:
            raise mismatch(f"assistant turn {k} is not rendered verbatim in {seg!r:.120}")
        j = seg.find(eos, i + len(turn.value)) if eos else -1
        cut = j + len(eos) if j >= 0 else len(seg)
        pieces += [(before[len(done) :], False), (seg[:cut], True), (seg[cut:], False)]
        done = through
    full = render(len(msgs), False)
    if not full.startswith(done):
        raise mismatch("the full render does not extend the per-turn renders")
    pieces.append((full[len(done) :], False))
    return pieces


def render_pieces(record: Record, template: str, tokenizer) -> list[tuple[str, bool]]:
    """Text pieces ``[(text, supervised), ...]`` whose concatenation is the whole sample."""
    if template == "plain":
        pieces = _plain_pieces(record.turns, tokenizer.eos_token, record.id, record.where)
    elif template == "vicuna":
        pieces = _vicuna_pieces(record.turns, tokenizer.eos_token)
    elif template == "chat":
        pieces = _chat_pieces(record.turns, tokenizer, record.id, record.where)
    else:
        raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")
    return [(text, sup) for text, sup in pieces if text]


def tokenize_record(
    record: Record,
    tokenizer,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
) -> tuple[list[int], list[int]]:
    """Token ids and unshifted labels of one record.

    Returns:
        (input_ids, labels), both of length L = text tokens + n_images * (num_image_tokens - 1);
        ``labels[i] = input_ids[i]`` where supervised, else -100. Image positions hold
        ``image_token_id`` and label -100.

    Raises:
        BadSample("tokenization_mismatch") if piecewise and whole-text tokenization differ
        or the ``<image>`` ids do not match the record's images.
    """
    pieces = render_pieces(record, template, tokenizer)
    ids: list[int] = []
    sup: list[bool] = []
    for text, supervised in pieces:
        piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        sup += [supervised] * len(piece_ids)
    full_text = "".join(text for text, _ in pieces)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if ids != full_ids:
        k = next((i for i, (a, b) in enumerate(zip(ids, full_ids)) if a != b), min(len(ids), len(full_ids)))
        raise BadSample(
            "tokenization_mismatch",
            f"template {template!r}: piecewise tokens differ from whole-text tokens at position {k} "
            f"(pieces {ids[k : k + 5]} vs whole {full_ids[k : k + 5]}, lengths {len(ids)} vs {len(full_ids)})",
            record.id,
            record.where,
        )
    if template != "chat" and tokenizer.bos_token_id is not None:
        ids, sup = [tokenizer.bos_token_id] + ids, [False] + sup

    n_found = ids.count(image_token_id)
    if n_found != len(record.images):
        raise BadSample(
            "tokenization_mismatch",
            f"template {template!r}: {n_found} image token(s) (id {image_token_id}) after tokenization, "
            f"expected {len(record.images)}",
            record.id,
            record.where,
        )
    input_ids: list[int] = []
    labels: list[int] = []
    for tok, s in zip(ids, sup):
        if tok == image_token_id:
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        else:
            input_ids.append(tok)
            labels.append(tok if s else IGNORE_INDEX)
    return input_ids, labels


def truncate(
    input_ids: list[int],
    labels: list[int],
    max_length: int | None,
    image_token_id: int,
    sample_id=None,
    where: str = "",
    limit_name: str = "max_length",
) -> tuple[list[int], list[int]]:
    """Cut a sample to ``max_length`` tokens without cutting through image tokens.

    Only text after the last image token may be cut. Raises ``BadSample("too_long")`` if
    the cut would reach an image token and ``BadSample("no_supervised_tokens")`` if no
    supervised label is left; the caller drops-and-counts or raises by its policy.
    ``limit_name`` names the limit in those messages (e.g. the model's context length).
    """
    if max_length is None or len(input_ids) <= max_length:
        out_ids, out_labels = input_ids, labels
    else:
        last_img = max((i for i, t in enumerate(input_ids) if t == image_token_id), default=-1)
        if last_img >= max_length:
            raise BadSample(
                "too_long",
                f"{len(input_ids)} tokens > {limit_name}={max_length} and image tokens reach position "
                f"{last_img}: truncation would cut through an image",
                sample_id,
                where,
            )
        out_ids, out_labels = input_ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in out_labels):
        raise BadSample(
            "no_supervised_tokens",
            f"no supervised token left in {len(out_ids)} tokens ({limit_name}={max_length}, full length {len(input_ids)})",
            sample_id,
            where,
        )
    return out_ids, out_labels
