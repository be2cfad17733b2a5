"""train_tokenizer: a real byte-level BPE that round-trips through AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from kdengine.data.tokenizer import train_tokenizer

TEXTS = [
    "A red circle at the top left and a blue square in the center.",
    "How many shapes are in the image? Answer the question using a single word or phrase.",
    "Is there a green star in the image? Answer yes or no.",
] * 30


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, out, vocab_size=400)
    return out


def test_round_trip_through_autotokenizer(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.is_fast
    for text in TEXTS[:3] + ["héllo, wörld!  unseen\n\ttext 123 <image>"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # learned merges: a frequent word is one token, not its bytes
    assert len(tok.tokenize(" circle")) == 1
    assert 260 < len(tok) <= 400


def test_special_tokens(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<|im_end|>", None)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<|im_end|>", "<|im_start|>", "<image>")}
    assert ids == {"<pad>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "<image>": 3}
    assert tok.image_token == "<image>" and tok.image_token_id == 3
    assert tok("x<image>y<|im_end|>", add_special_tokens=False)["input_ids"][1::2] == [3, 1]
    assert tok("a circle", add_special_tokens=True)["input_ids"] == tok("a circle", add_special_tokens=False)["input_ids"]
    assert tok.decode([2, 3, 1], skip_special_tokens=True) == ""


def test_chatml_template(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\n<image>\nHi<|im_end|>\n"


def test_deterministic_and_errors(tmp_path, tok_dir):
    train_tokenizer(TEXTS, tmp_path / "again", vocab_size=400)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small: expected >= 260"):
        train_tokenizer(TEXTS, tmp_path / "small", vocab_size=100)
