"""Label masks on hand-built examples, checked against hand-written token positions.

The tokenizer here is a word-level one with a fixed vocabulary (words, single punctuation
marks and whitespace runs are tokens), so every expected sequence below is written out
token by token, independent of the code under test.
"""

import re

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdengine.data.records import BadSample, parse_record
from kdengine.data.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    check_template,
    image_token_id_of,
    tokenize_record,
    truncate,
)
from kdengine.data.tokenizer import CHATML_TEMPLATE

SPECIALS = ["<pad>", "<|im_end|>", "<|im_start|>", "<image>"]
WORDS = (
    "user assistant What color ? red Is it round yes Hi ! Hello . Describe A circle Compare left "
    "USER ASSISTANT : blue square and"
).split()
VOCAB = {t: i for i, t in enumerate(SPECIALS + ["<unk>", " ", "\n"] + WORDS)}
SPLIT = r"\w+|[^\w\s]|\s+"
IMG = VOCAB["<image>"]


def word_tokenizer(chat_template=CHATML_TEMPLATE, split=SPLIT, image_special=True):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    tok.add_special_tokens(SPECIALS if image_special else SPECIALS[:3])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>", chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def record(turns, images=(), rid="r1", where="mem.jsonl:7"):
    raw = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if images:
        raw["image"] = list(images)
    return parse_record(raw, where, "/imgs")


def expect(*segments):
    """segments: ("p", tokens) prompt, ("s", tokens) supervised, ("img", n) n image tokens."""
    ids, labels = [], []
    for kind, val in segments:
        if kind == "img":
            ids += [IMG] * val
            labels += [IGNORE_INDEX] * val
            continue
        for t in val:
            ids.append(VOCAB[t] if t in VOCAB else VOCAB["<unk>"])
            labels.append(ids[-1] if kind == "s" else IGNORE_INDEX)
    return ids, labels


def test_word_tokenizer_is_what_the_tests_assume(tok):
    assert tok("What color?", add_special_tokens=False)["input_ids"] == [VOCAB["What"], VOCAB[" "], VOCAB["color"], VOCAB["?"]]
    assert image_token_id_of(tok) == IMG == 3


def test_plain_supervises_caption_and_eos_only(tok):
    rec = record([("human", "<image>\nDescribe."), ("gpt", "A red circle.")], ["a.png"])
    ids, labels = tokenize_record(rec, tok, "plain", IMG, num_image_tokens=3)
    exp = expect(("img", 3), ("s", ["A", " ", "red", " ", "circle", ".", "<|im_end|>"]))
    assert (ids, labels) == exp
    assert [i for i, t in enumerate(ids) if t == IMG] == [0, 1, 2]
    assert [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX] == [3, 4, 5, 6, 7, 8, 9]


def test_plain_rejects_multi_turn(tok):
    rec = record([("human", "<image>"), ("gpt", "red"), ("human", "Hi"), ("gpt", "yes")], ["a.png"])
    with pytest.raises(BadSample, match=r"id='r1' at mem.jsonl:7 \[malformed\].*plain"):
        tokenize_record(rec, tok, "plain", IMG, 3)


def test_chat_single_turn_with_image(tok):
    rec = record([("human", "<image>\nWhat color?"), ("gpt", "red")], ["a.png"])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, num_image_tokens=4)
    exp = expect(
        ("p", ["<|im_start|>", "user", "\n"]),
        ("img", 4),
        ("p", ["\n", "What", " ", "color", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]),
        ("s", ["red", "<|im_end|>"]),
        ("p", ["\n"]),
    )
    assert (ids, labels) == exp
    assert [i for i, t in enumerate(ids) if t == IMG] == [3, 4, 5, 6]
    assert [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX] == [17, 18]


def test_chat_template_default_system_turn_is_prompt():
    # Like Qwen's templates: a system turn is injected when the conversation has none.
    template = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    tok = word_tokenizer(chat_template=template + CHATML_TEMPLATE)
    rec = record([("human", "Hi!"), ("gpt", "yes")])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, 2)
    exp = expect(
        ("p", ["<|im_start|>", "system", "\n", "Be", " ", "brief", ".", "<|im_end|>", "\n"]),
        ("p", ["<|im_start|>", "user", "\n", "Hi", "!", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]),
        ("s", ["yes", "<|im_end|>"]),
        ("p", ["\n"]),
    )
    assert (ids, labels) == exp
    assert [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX] == [19, 20]


def test_chat_multi_turn_text_only(tok):
    rec = record([("human", "Hi!"), ("gpt", "Hello."), ("human", "Is it round?"), ("gpt", "yes")])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, num_image_tokens=4)
    exp = expect(
        ("p", ["<|im_start|>", "user", "\n", "Hi", "!", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]),
        ("s", ["Hello", ".", "<|im_end|>"]),
        ("p", ["\n", "<|im_start|>", "user", "\n", "Is", " ", "it", " ", "round", "?", "<|im_end|>", "\n"]),
        ("p", ["<|im_start|>", "assistant", "\n"]),
        ("s", ["yes", "<|im_end|>"]),
        ("p", ["\n"]),
    )
    assert (ids, labels) == exp
    assert IMG not in ids
    assert [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX] == [10, 11, 12, 28, 29]


def test_chat_two_images(tok):
    rec = record([("human", "<image>\n<image>\nCompare."), ("gpt", "left")], ["a.png", "b.png"])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, num_image_tokens=2)
    exp = expect(
        ("p", ["<|im_start|>", "user", "\n"]),
        ("img", 2),
        ("p", ["\n"]),
        ("img", 2),
        ("p", ["\n", "Compare", ".", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]),
        ("s", ["left", "<|im_end|>"]),
        ("p", ["\n"]),
    )
    assert (ids, labels) == exp
    assert [i for i, t in enumerate(ids) if t == IMG] == [3, 4, 6, 7]


def test_vicuna_multi_turn(tok):
    rec = record([("human", "<image>\nWhat color?"), ("gpt", "red"), ("human", "Is it round?"), ("gpt", "yes")], ["a.png"])
    ids, labels = tokenize_record(rec, tok, "vicuna", IMG, num_image_tokens=2)
    system = re.findall(SPLIT, VICUNA_SYSTEM)
    exp = expect(
        ("p", system + [" ", "USER", ":", " "]),
        ("img", 2),
        ("p", ["\n", "What", " ", "color", "?", " ", "ASSISTANT", ":"]),
        ("s", [" ", "red", "<|im_end|>"]),
        ("p", ["USER", ":", " ", "Is", " ", "it", " ", "round", "?", " ", "ASSISTANT", ":"]),
        ("s", [" ", "yes", "<|im_end|>"]),
    )
    assert (ids, labels) == exp
    n_sys = len(system)
    sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    first = n_sys + 4 + 2 + 8
    assert sup == [first, first + 1, first + 2, first + 15, first + 16, first + 17]


def test_truncation_cuts_text_after_last_image(tok):
    rec = record([("human", "Hi!"), ("gpt", "Hello."), ("human", "Is it round?"), ("gpt", "yes")])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, 4)
    t_ids, t_labels = truncate(ids, labels, 12, IMG, rec.id, rec.where)
    assert t_ids == ids[:12]
    # the first answer "Hello" "." survive at 10, 11; its <|im_end|> (12) is cut
    assert [i for i, lab in enumerate(t_labels) if lab != IGNORE_INDEX] == [10, 11]


def test_truncation_never_cuts_an_image(tok):
    rec = record([("human", "<image>\nWhat color?"), ("gpt", "red")], ["a.png"])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, 4)
    assert len(ids) == 20
    with pytest.raises(BadSample, match=r"\[no_supervised_tokens\]"):  # image ends at 6: cut allowed, answer gone
        truncate(ids, labels, 7, IMG)
    with pytest.raises(BadSample, match=r"id='r1' at mem.jsonl:7 \[too_long\]: 20 tokens > max_length=6"):
        truncate(ids, labels, 6, IMG, rec.id, rec.where)


def test_truncation_without_supervised_tokens_is_rejected(tok):
    rec = record([("human", "<image>\nWhat color?"), ("gpt", "red")], ["a.png"])
    ids, labels = tokenize_record(rec, tok, "chat", IMG, 4)
    with pytest.raises(BadSample, match=r"\[no_supervised_tokens\]"):
        truncate(ids, labels, 17, IMG, rec.id, rec.where)  # answer starts at 17
    t_ids, t_labels = truncate(ids, labels, 18, IMG)
    assert [i for i, lab in enumerate(t_labels) if lab != IGNORE_INDEX] == [17]


def test_piecewise_tokenization_mismatch_is_an_error():
    # "assistant:" and the answer share one whitespace-delimited chunk -> the whole text
    # tokenizes as one <unk>, the pieces as "assistant" ":" "red": must not be masked silently.
    template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    tok = word_tokenizer(chat_template=template, split=r"\S+|\s+")
    rec = record([("human", "Hi"), ("gpt", "red")])
    with pytest.raises(BadSample, match=r"id='r1' at mem.jsonl:7 \[tokenization_mismatch\].*piecewise"):
        tokenize_record(rec, tok, "chat", IMG, 2)


def test_template_that_is_not_prefix_stable_is_an_error():
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = word_tokenizer(chat_template=template)
    rec = record([("human", "Hi"), ("gpt", "red")])
    with pytest.raises(BadSample, match=r"\[tokenization_mismatch\].*prefix-stable"):
        tokenize_record(rec, tok, "chat", IMG, 2)


def test_image_placeholder_must_be_one_token():
    tok = word_tokenizer(image_special=False)
    with pytest.raises(ValueError, match="encodes '<image>' as 3 tokens"):
        image_token_id_of(tok)


def test_template_checks(tok):
    with pytest.raises(ValueError, match=r"template='llama': expected one of \('plain', 'chat', 'vicuna'\)"):
        check_template("llama", tok)
    with pytest.raises(ValueError, match="has none"):
        check_template("chat", word_tokenizer(chat_template=None))
