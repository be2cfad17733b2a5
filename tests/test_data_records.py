"""Bad data: every case raises an error naming id, file and line/index, or is skipped and counted."""

import io
import json
import os
import random

import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil

from kdengine.data.collator import LlavaCollator
from kdengine.data.dataset import LlavaDataset, SkippedSample, build_dataset
from kdengine.data.records import BadSample, load_records
from kdengine.data.tokenizer import train_tokenizer


def png_bytes(size=(48, 40), seed=0) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    good = png_bytes()
    (img / "good.png").write_bytes(good)
    (img / "good2.png").write_bytes(png_bytes(seed=1))
    (img / "truncated.png").write_bytes(good[: len(good) // 2])
    (img / "text.png").write_bytes(b"this is not an image\n" * 10)
    (img / "folder.png").mkdir()  # exists but cannot be read as a file
    return img


def conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


GOOD = {"id": "ok", "image": "good.png", "conversations": conv(("<image>\nWhat?", "red"))}
TEXT = {"id": "txt", "conversations": conv(("Hi", "Hello"))}

# (raw line, reason, message fragment); the JSONL files below put them on lines 2, 3, ...
BAD = [
    ('{"id": "x1", "conversations": [', "malformed", "invalid JSON"),
    ("[1, 2]", "malformed", "expected a JSON object"),
    ({"conversations": conv(("Hi", "yes"))}, "malformed", "'id' must be a string or int"),
    ({"id": "x4", "conversations": "Hi"}, "malformed", "'conversations' must be a non-empty list"),
    ({"id": "x5", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "malformed", "expected 'human'"),
    ({"id": "x6", "conversations": [{"from": "human", "value": "q"}]}, "malformed", "last turn to be from 'gpt'"),
    ({"id": "x7", "image": 3, "conversations": conv(("<image>", "a"))}, "malformed", "'image' must be a path"),
    ({"id": "x8", "image": "missing.png", "conversations": conv(("<image>\nq", "a"))}, "image_missing", "missing.png"),
    ({"id": "x9", "image": "text.png", "conversations": conv(("<image>\nq", "a"))}, "image_corrupt", "text.png"),
    ({"id": "x10", "image": "truncated.png", "conversations": conv(("<image>\nq", "a"))}, "image_corrupt", "truncated"),
    ({"id": "x11", "image": "folder.png", "conversations": conv(("<image>\nq", "a"))}, "image_unreadable", "folder.png"),
    ({"id": "x12", "conversations": conv(("<image>\nq", "a"))}, "image_count_mismatch", "1 <image> placeholder(s) but 0 image(s)"),
    ({"id": "x13", "image": "good.png", "conversations": conv(("q", "a"))}, "image_count_mismatch", "0 <image>"),
    ({"id": "x14", "image": ["good.png"], "conversations": conv(("<image><image>", "a"))}, "image_count_mismatch", "2 <image>"),
    ({"id": "x15", "image": "good.png", "conversations": conv(("<image>\nq", "  "))}, "empty_answer", "turn 1 (gpt)"),
    ({"id": "x16", "conversations": conv(("q", "a"), ("q2", ""))}, "empty_answer", "turn 3 (gpt)"),
]


def line(raw) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw)


def write_jsonl(path, rows):
    path.write_text("".join(line(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("k", range(len(BAD)), ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_jsonl_record_error_names_id_file_and_line(tmp_path, folder, k):
    raw, reason, fragment = BAD[k]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, raw, TEXT])
    with pytest.raises(BadSample) as info:
        load_records(path, folder)
    err = info.value
    assert err.reason == reason
    assert f"{path}:2" in str(err) and f"[{reason}]" in str(err)
    assert fragment in str(err)
    rid = raw.get("id") if isinstance(raw, dict) else None
    assert f"id={rid!r}" in str(err)


def test_bad_json_record_error_names_index(tmp_path, folder):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, TEXT, {"id": 77, "image": "missing.png", "conversations": conv(("<image>", "a"))}]))
    with pytest.raises(BadSample, match=rf"id=77 at {path}\[index 2\] \[image_missing\]: image file not found: .*missing.png"):
        load_records(path, folder)


def test_skip_counts_every_reason(tmp_path, folder, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] + [b[0] for b in BAD] + [TEXT])
    records, summary = load_records(path, folder, on_bad_sample="skip")
    assert [r.id for r in records] == ["ok", "txt"]
    expected = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(summary.counts) == expected
    assert expected == {
        "malformed": 7,
        "image_missing": 1,
        "image_corrupt": 2,
        "image_unreadable": 1,
        "image_count_mismatch": 3,
        "empty_answer": 2,
    }
    assert (summary.total, summary.kept, summary.skipped) == (18, 2, 16)
    text = summary.format()
    assert text.startswith("data: 2/18 samples kept (0 truncated), 16 skipped")
    assert f"image_missing: 1 (e.g. 'x8' at {path}:9)" in text


def test_good_records_parse(tmp_path, folder):
    two = {"id": 5, "image": ["good.png", "good2.png"], "conversations": conv(("<image>\n<image>\nq", "a"), ("q2", "b"))}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", TEXT, two])  # blank lines are allowed
    records, summary = load_records(path, folder)
    assert [r.id for r in records] == ["ok", "txt", 5]
    assert records[2].images == (os.path.join(folder, "good.png"), os.path.join(folder, "good2.png"))
    assert [t.role for t in records[2].turns] == ["human", "gpt", "human", "gpt"]
    assert not records[1].has_image and records[2].where == f"{path}:4"
    assert summary.to_dict() == {"total": 3, "kept": 3, "skipped": {}, "truncated": 0}


def test_file_level_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        load_records(tmp_path / "nope.json", folder)
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match=r"expected a \.json \(list\) or \.jsonl file"):
        load_records(tmp_path / "d.csv", folder)
    (tmp_path / "d.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of records, got dict"):
        load_records(tmp_path / "d.json", folder)
    (tmp_path / "e.json").write_text('[{"id": 1},\n')
    with pytest.raises(ValueError, match="invalid JSON at line"):
        load_records(tmp_path / "e.json", folder)
    with pytest.raises(ValueError, match=r"on_bad_sample='ignore': expected one of \('error', 'skip'\)"):
        load_records(tmp_path / "d.json", folder, on_bad_sample="ignore")


# ---- dataset-level bad samples: found after tokenization or when images load lazily ----


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["What? red Hello Hi q a b q2 yes no shapes colour long answer words"] * 5
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def processor():
    return SiglipImageProcessorPil(size={"height": 32, "width": 32})


def test_lazy_image_failure_error_or_skip(tmp_path, folder, tokenizer, processor):
    gone = folder / "gone.png"
    gone.write_bytes(png_bytes())
    rows = [GOOD, {"id": "g", "image": "gone.png", "conversations": conv(("<image>\nq", "a"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(image_folder=folder, template="chat", num_image_tokens=4, check_images=False, verbose=False)
    strict = build_dataset(path, tokenizer, processor, **kw)
    lenient = build_dataset(path, tokenizer, processor, on_bad_sample="skip", **kw)
    gone.unlink()  # disappears after loading
    with pytest.raises(BadSample, match=rf"id='g' at {path}:2 \[image_missing\]"):
        strict[1]
    skipped = lenient[1]
    assert isinstance(skipped, SkippedSample) and skipped.error.reason == "image_missing"
    collate = LlavaCollator(tokenizer.pad_token_id, lenient.image_token_id, 4)
    batch = collate([lenient[0], lenient[1]])
    assert batch["ids"] == ["ok"] and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert [(e.sample_id, e.reason, e.where) for e in batch["skipped"]] == [("g", "image_missing", f"{path}:2")]
    empty = collate([lenient[1]])
    assert empty["ids"] == [] and "input_ids" not in empty and len(empty["skipped"]) == 1
    for err in batch["skipped"] + empty["skipped"]:  # what the trainer does with them
        lenient.summary.add_during_training(err)
    assert lenient.summary.during_training == {"image_missing": 2}
    assert lenient.summary.to_dict()["skipped_during_training"] == {"image_missing": 2}
    assert f"skipped during training: 2 sample reads\n  image_missing: 2 (e.g. 'g' at {path}:2" in lenient.summary.format()


def test_truncation_uncuttable_sample_is_dropped_and_counted_or_raises(tmp_path, folder, tokenizer, processor):
    long_q = "q " * 40
    rows = [GOOD, {"id": "long", "image": "good.png", "conversations": conv((long_q + "<image>", "a"))}, TEXT]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(image_folder=folder, template="chat", num_image_tokens=4, max_length=30, verbose=False)
    ds = build_dataset(path, tokenizer, processor, truncation="truncate", **kw)
    assert [r.id for r in ds.records] == ["ok", "txt"]
    assert ds.summary.to_dict() == {"total": 3, "kept": 2, "skipped": {"too_long": 1}, "truncated": 0}
    assert max(ds.lengths) <= 30
    with pytest.raises(BadSample, match=rf"id='long' at {path}:2 \[too_long\].*max_length=30"):
        build_dataset(path, tokenizer, processor, truncation="error", **kw)


def test_tokenization_mismatch_skip_counts_and_all_dropped_is_an_error(tmp_path, folder, tokenizer, processor):
    # A template that strips whitespace from answers cannot render " a" verbatim.
    tok = train_tokenizer(["Hi Hello a b"] * 3, tmp_path / "tok", vocab_size=300)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}"
    rows = [TEXT, {"id": "sp", "conversations": conv(("Hi", " a"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset(path, tok, None, template="chat", on_bad_sample="skip", verbose=False)
    assert [r.id for r in ds.records] == ["txt"] and ds.summary.counts == {"tokenization_mismatch": 1}
    with pytest.raises(BadSample, match=rf"id='sp' at {path}:2 \[tokenization_mismatch\]"):
        build_dataset(path, tok, None, template="chat", verbose=False)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", rows[1:])
    with pytest.raises(ValueError, match="no usable samples out of 1"):
        build_dataset(only_bad, tok, None, template="chat", on_bad_sample="skip", verbose=False)


def test_dataset_argument_errors(tokenizer, processor, tmp_path, folder):
    records, _ = load_records(write_jsonl(tmp_path / "d.jsonl", [GOOD]), folder)
    with pytest.raises(ValueError, match="num_image_tokens=0: expected an int >= 1"):
        LlavaDataset(records, tokenizer, processor, num_image_tokens=0)
    with pytest.raises(ValueError, match="truncation='cut': expected one of"):
        LlavaDataset(records, tokenizer, processor, truncation="cut")
    with pytest.raises(ValueError, match="image_processor is None"):
        LlavaDataset(records, tokenizer, None)


def test_dataset_sample_is_exact(tmp_path, folder, tokenizer, processor):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, TEXT])
    ds = build_dataset(path, tokenizer, processor, image_folder=folder, template="chat", num_image_tokens=4, verbose=False)
    s = ds[0]
    assert s["id"] == "ok" and s["pixel_values"].shape == (1, 3, 32, 32) and s["pixel_values"].dtype == torch.float32
    assert s["input_ids"].dtype == torch.long and int((s["input_ids"] == ds.image_token_id).sum()) == 4
    sup = s["input_ids"][s["labels"] != -100].tolist()
    assert tokenizer.decode(sup) == "red<|im_end|>"
    assert ds.lengths == [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])] and ds.is_multimodal == [True, False]
    assert ds[1]["pixel_values"] is None
