"""Issue 12, data and eval side: bad bytes, over-long samples and broken checkpoints are a
one-line error naming the file (and line), or a counted skip; nothing is cut or dropped silently."""

import json

import pytest
import torch
from safetensors.torch import save_file
from reliability_report import record
from test_data_records import GOOD, TEXT, conv, folder, processor, tokenizer, write_jsonl  # noqa: F401 (fixtures)

from kdengine.cli import main
from kdengine.data.dataset import build_dataset
from kdengine.data.records import BadSample, load_records
from kdengine.eval.checkpoint_files import check_checkpoint_dir

HERE = "test_reliability_data.py"


def _jsonl_bytes(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


BAD_LINE = b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "a"}]}'


def test_non_utf8_jsonl_line_is_a_bad_sample_naming_file_and_line(tmp_path, folder):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes([GOOD, BAD_LINE, TEXT]))
    with pytest.raises(BadSample) as info:
        load_records(path, folder)
    msg = str(info.value)
    assert info.value.reason == "not_utf8" and f"at {path}:2 [not_utf8]" in msg
    assert f"id='latin1' at {path}:2" in msg
    col = BAD_LINE.index(0xE9) + 1
    assert f"byte 0xe9 at column {col} of d.jsonl line 2 is not UTF-8" in msg
    records, summary = load_records(path, folder, on_bad_sample="skip")
    assert [r.id for r in records] == ["ok", "txt"] and summary.counts == {"not_utf8": 1}
    assert (summary.total, summary.kept) == (3, 2)
    record("bad_inputs", f"{HERE}::test_non_utf8_jsonl_line", [
        {"input": "non-UTF-8 byte in a JSONL line", "policy": "error", "what it gets": msg.split(": byte")[0]},
        {"input": "non-UTF-8 byte in a JSONL line", "policy": "skip",
         "what it gets": f"{summary.kept}/{summary.total} kept, not_utf8: {summary.counts['not_utf8']} counted"},
    ], strip=tmp_path)


def test_non_utf8_json_record_is_a_bad_sample_naming_index_and_line(tmp_path, folder):
    path = tmp_path / "d.json"
    bad = BAD_LINE.replace(b'"latin1"', b'"x\xff"')  # the id itself is not UTF-8 either: 2 bytes
    path.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b",\n" + bad + b",\n" + json.dumps(TEXT).encode() + b"\n]\n")
    with pytest.raises(BadSample) as info:
        load_records(path, folder)
    msg = str(info.value)
    assert f"at {path}[index 1] [not_utf8]" in msg and "byte 0xff at d.json line 3 is not UTF-8 (2 such byte(s))" in msg
    records, summary = load_records(path, folder, on_bad_sample="skip")
    assert [r.id for r in records] == ["ok", "txt"] and summary.counts == {"not_utf8": 1}
    outside = tmp_path / "e.json"
    outside.write_bytes(b"[\n" + json.dumps(TEXT).encode() + b",\n\xff]\n")  # not in a string: the list is broken
    with pytest.raises(ValueError, match=rf"{outside}: invalid JSON at line 3"):
        load_records(outside, folder, on_bad_sample="skip")
    record("bad_inputs", f"{HERE}::test_non_utf8_json_record", [
        {"input": "non-UTF-8 bytes in a record of a JSON list", "policy": "error", "what it gets": msg.split(": byte")[0]},
        {"input": "non-UTF-8 bytes in a record of a JSON list", "policy": "skip",
         "what it gets": f"{summary.kept}/{summary.total} kept, not_utf8: {summary.counts['not_utf8']} counted"},
    ], strip=tmp_path)


def test_non_utf8_eval_question_line_names_file_and_line(tmp_path):
    q = tmp_path / "q.jsonl"
    bad = b'{"question_id": 1, "text": "caf\xe9"}'
    q.write_bytes(b'{"question_id": 0, "text": "ok"}\n' + bad + b"\n")
    from kdengine.eval.generate import load_questions

    col = bad.index(0xE9) + 1
    with pytest.raises(ValueError, match=rf"^{q}:2: byte 0xe9 at column {col} is not UTF-8$"):
        load_questions(q)


def _long_rows(n_words: int):
    answer = " ".join(["long answer words"] * n_words)
    return [GOOD, {"id": "long", "image": "good.png", "conversations": conv(("<image>\nWhat?", answer))}, TEXT]


def test_truncation_is_counted_skipped_or_refused(tmp_path, folder, tokenizer, processor):
    path = write_jsonl(tmp_path / "d.jsonl", _long_rows(20))
    kw = dict(image_folder=folder, template="chat", num_image_tokens=4, max_length=40, verbose=False)
    cut = build_dataset(path, tokenizer, processor, truncation="truncate", **kw)
    assert [r.id for r in cut.records] == ["ok", "long", "txt"] and cut.lengths[1] == 40
    assert cut.summary.to_dict() == {"total": 3, "kept": 3, "skipped": {}, "truncated": 1}
    assert cut.summary.format().startswith(f"data: 3/3 samples kept (1 truncated), 0 skipped\n  truncated: 1 (e.g. 'long' at {path}:2)")
    assert len(cut[1]["input_ids"]) == 40  # __getitem__ cuts the same way
    skip = build_dataset(path, tokenizer, processor, truncation="skip", **kw)
    assert [r.id for r in skip.records] == ["ok", "txt"] and skip.summary.counts == {"too_long": 1}
    with pytest.raises(BadSample, match=rf"id='long' at {path}:2 \[too_long\]: \d+ tokens > max_length=40 \(truncation='error'\)") as info:
        build_dataset(path, tokenizer, processor, truncation="error", **kw)
    record("bad_inputs", f"{HERE}::test_truncation", [
        {"input": "answer longer than max_length", "policy": "truncation: truncate",
         "what it gets": f"cut and counted: {cut.summary.truncated} truncated of {cut.summary.total}"},
        {"input": "answer longer than max_length", "policy": "truncation: skip",
         "what it gets": f"dropped and counted: too_long {skip.summary.counts['too_long']} of {skip.summary.total}"},
        {"input": "answer longer than max_length", "policy": "truncation: error", "what it gets": str(info.value)},
    ], strip=tmp_path)


def test_context_length_caps_with_a_count_or_refuses_a_larger_max_length(tmp_path, folder, tokenizer, processor):
    path = write_jsonl(tmp_path / "d.jsonl", _long_rows(20))
    kw = dict(image_folder=folder, template="chat", num_image_tokens=4, verbose=False)
    uncapped = build_dataset(path, tokenizer, processor, **kw)
    assert uncapped.summary.truncated == 0 and max(uncapped.lengths) > 32
    capped = build_dataset(path, tokenizer, processor, context_length=32, **kw)
    assert max(capped.lengths) == 32 and capped.summary.truncated == 1
    with pytest.raises(BadSample, match=r"\[too_long\]: \d+ tokens > the model's context length=32"):
        build_dataset(path, tokenizer, processor, context_length=32, truncation="error", **kw)
    with pytest.raises(ValueError, match=r"max_length=64 exceeds the model's context of 32 tokens \(max_position_embeddings\)") as info:
        build_dataset(path, tokenizer, processor, context_length=32, max_length=64, **kw)
    record("bad_inputs", f"{HERE}::test_context_length", [
        {"input": f"max_length: null, a {max(uncapped.lengths)}-token sample, model context 32", "policy": "truncation: truncate",
         "what it gets": f"cut to {max(capped.lengths)} and counted ({capped.summary.truncated} truncated)"},
        {"input": "max_length 64 > model context 32", "policy": "any", "what it gets": f"ValueError: {info.value}"},
    ])


def _checkpoint(path, n_bytes_cut=0, model_type="llava"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {"hidden_size": 8}))
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path / "model.safetensors"))
    if n_bytes_cut:
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:-n_bytes_cut])
    return path


def test_eval_with_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    check_checkpoint_dir(_checkpoint(tmp_path / "good"))
    cases = {
        "truncated model.safetensors": (_checkpoint(tmp_path / "cut", n_bytes_cut=100), r"model.safetensors: truncated: \d+ bytes, expected \d+"),
        "model.safetensors cut inside its header": (_checkpoint(tmp_path / "head", n_bytes_cut=256 + 40), r"model.safetensors: truncated: \d+ bytes, but its header alone"),
        "missing model.safetensors": (_checkpoint(tmp_path / "none"), "model.safetensors: missing"),
        "config.json without model_type": (_checkpoint(tmp_path / "notype", model_type=None), "config.json: no 'model_type'"),
    }
    (tmp_path / "none" / "model.safetensors").unlink()
    rows = []
    for name, (ckpt, pattern) in cases.items():
        code = main(["eval", "--model", str(ckpt), "--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "a.jsonl")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"kdengine eval: error: model checkpoint {ckpt}"), err
        assert __import__("re").search(pattern, err), err
        rows.append({"input": f"kdengine eval, {name}", "policy": "-", "what it gets": f"exit {code}, one line: {err.strip()[len('kdengine eval: error: '):]}"})
    record("bad_inputs", f"{HERE}::test_eval_broken_checkpoint", rows, strip=tmp_path)


def test_lazily_skipped_samples_reach_the_batch_through_dataloader_workers(tmp_path, folder, tokenizer, processor):
    import pickle

    from torch.utils.data import DataLoader

    from kdengine.data.collator import LlavaCollator

    err = BadSample("image_missing", "image file not found: x.png", "s1", "d.jsonl:3")
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, again.sample_id, again.where, str(again)) == (err.reason, err.sample_id, err.where, str(err))
    (folder / "gone.png").write_bytes((folder / "good.png").read_bytes())
    rows = [GOOD, {"id": "g", "image": "gone.png", "conversations": conv(("<image>\nq", "a"))}, GOOD | {"id": "ok2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset(path, tokenizer, processor, image_folder=folder, template="chat", num_image_tokens=4,
                       check_images=False, on_bad_sample="skip", verbose=False)
    (folder / "gone.png").unlink()
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=LlavaCollator(tokenizer.pad_token_id, ds.image_token_id, 4))
    (batch,) = list(loader)
    assert batch["ids"] == ["ok", "ok2"] and [(e.sample_id, e.reason) for e in batch["skipped"]] == [("g", "image_missing")]


def test_a_lazy_failure_under_error_in_a_worker_reaches_the_reader_as_the_bad_sample(tmp_path, folder, tokenizer, processor):
    from torch.utils.data import DataLoader

    from kdengine.data.collator import LlavaCollator

    (folder / "gone.png").write_bytes((folder / "good.png").read_bytes())
    rows = [GOOD, {"id": "g", "image": "gone.png", "conversations": conv(("<image>\nq", "a"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset(path, tokenizer, processor, image_folder=folder, template="chat", num_image_tokens=4,
                       check_images=False, verbose=False)
    (folder / "gone.png").unlink()
    collate = LlavaCollator(tokenizer.pad_token_id, ds.image_token_id, 4)
    (batch,) = list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate))
    assert batch["ids"] == ["ok"] and batch["skipped"] == []
    assert [str(e) for e in batch["failed"]] == [f"bad sample id='g' at {path}:2 [image_missing]: image file not found: {folder / 'gone.png'}"]
    with pytest.raises(BadSample, match=r"\[image_missing\]"):  # outside a worker it raises at once
        ds[1]
