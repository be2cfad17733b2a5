"""kdengine eval on tiny checkpoints: prompts, batched generation, the CLI end to end, diagnostics.

Models are tiny (32 px images, 16 image tokens) and built from the synthetic tokenizer; the
end-to-end run uses a student overfitted on the held-out answers so its scores must be perfect.
"""

import dataclasses
import json
import math

import pytest
import torch

from kdengine.cli import main
from kdengine.data import LlavaCollator, LlavaDataset
from kdengine.data.synth import synthesize
from kdengine.eval import (
    Question,
    distill_diagnostics,
    extract_choice,
    generate_answers,
    heldout_records,
    load_answer_key,
    load_questions,
    normalize_answer,
    parse_options,
    parse_yesno,
    prompt_ids,
    run_eval,
    stop_token_ids,
)
from kdengine.losses import linear_cross_entropy
from kdengine.model import build_model, distill_forward, num_image_tokens, tiny_spec

# seed 7 gives 3 exact, 3 yes/no (two "No", one "Yes") and 2 multiple-choice questions.
SYNTH = dict(seed=7, n_caption=0, n_instruct=0, n_eval=8, image_size=32, vocab_size=400)
TYPES = {"exact": 3, "yesno": 3, "mc": 2}


def _tiny(role, tokenizer):
    spec = tiny_spec(role, tokenizer)
    spec.tiny = dataclasses.replace(spec.tiny, image_size=32)
    return build_model(spec)


def _save(model, processor, path):
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _batch(processor, records, P):
    ds = LlavaDataset(records, processor.tokenizer, processor.image_processor, "chat", P)
    return LlavaCollator(processor.tokenizer.pad_token_id, ds.image_token_id, P)([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    paths = synthesize(tmp_path_factory.mktemp("eval_synth"), **SYNTH)
    key = load_answer_key(paths["eval_answers"])
    counts = {t: sum(e.type == t for e in key.values()) for t in TYPES}
    assert counts == TYPES, f"synthetic eval set changed: {counts}"
    return paths


@pytest.fixture(scope="module")
def questions(synth):
    return load_questions(synth["eval_questions"])


@pytest.fixture(scope="module")
def records(synth, questions):
    return heldout_records(questions, load_answer_key(synth["eval_answers"]), synth["images"])


@pytest.fixture(scope="module")
def student(synth):
    return _tiny("student", synth["tokenizer"])


@pytest.fixture(scope="module")
def teacher(synth):
    return _tiny("teacher", synth["tokenizer"])


@pytest.fixture(scope="module")
def student_dir(student, tmp_path_factory):
    return _save(*student, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def trained_dir(synth, records, tmp_path_factory):
    """A fresh student trained to memorise the held-out answers through the training data path."""
    model, processor = _tiny("student", synth["tokenizer"])
    batch = _batch(processor, records, num_image_tokens(model))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        out = distill_forward(model, batch)
        resp = out.response_mask
        loss = linear_cross_entropy(out.hidden[resp], out.lm_head_weight, out.next_labels[resp])
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss = float(loss.detach())
    assert loss < 0.05, f"overfitting the 8 held-out answers stalled at loss {loss:.3f}"
    model.eval()
    return _save(model, processor, tmp_path_factory.mktemp("trained"))


# ----------------------------------------------------------------------------- prompts


def test_prompt_is_the_chat_template_with_expanded_image(questions, student):
    model, processor = student
    tok = processor.tokenizer
    P, img = num_image_tokens(model), processor.image_token_id
    text_only = Question("t", "How many sides does a square have?", None, "here")
    for q in [*questions, text_only]:
        content = f"<image>\n{q.text}" if q.image else q.text
        rendered = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        expected = [x for t in ids for x in ([img] * P if t == img else [t])]
        got = prompt_ids(q, tok, "chat", P)
        assert got == expected, f"question {q.id!r}: prompt differs from the rendered chat template"
        assert got.count(img) == (P if q.image else 0)


def test_prompt_is_the_unsupervised_prefix_of_the_training_sample(questions, records, student):
    model, processor = student
    P = num_image_tokens(model)
    ds = LlavaDataset(records, processor.tokenizer, processor.image_processor, "chat", P)
    for i, q in enumerate(questions):
        prompt = prompt_ids(q, processor.tokenizer, "chat", P)
        sample = ds[i]
        n = len(prompt)
        assert sample["input_ids"][:n].tolist() == prompt
        assert (sample["labels"][:n] == -100).all() and sample["labels"][n] != -100


def test_stop_tokens_end_the_chat_turn(student):
    tok = student[1].tokenizer
    assert stop_token_ids(tok, "chat") == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_batched_generation_equals_one_by_one(synth, questions, student):
    model, processor = student
    qs = [*questions, Question("t", "How many sides does a square have?", None, "here")]
    one = generate_answers(model, processor, qs, synth["images"], batch_size=1, max_new_tokens=5, progress=False)
    many = generate_answers(model, processor, qs, synth["images"], batch_size=4, max_new_tokens=5, progress=False)
    assert len(one) == len(qs) and all(isinstance(a, str) for a in one)
    assert many == one


# ----------------------------------------------------------------------------- end to end


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _rescore(rows, questions, key):
    """Per type: (correct, unparsable) recomputed row by row from the written answers."""
    text = {q.id: q.text for q in questions}
    out = {t: [0, 0] for t in TYPES}
    for r in rows:
        e = key[r["question_id"]]
        if e.type == "exact":
            parsed = normalize_answer(r["text"]) or None
            ok = parsed == normalize_answer(e.answer)
        elif e.type == "yesno":
            parsed = parse_yesno(r["text"])
            ok = parsed == parse_yesno(e.answer)
        else:
            parsed = extract_choice(r["text"], parse_options(text[r["question_id"]]))
            ok = parsed == e.answer
        out[e.type][0] += bool(ok and parsed is not None)
        out[e.type][1] += parsed is None
    return out


def test_eval_cli_end_to_end_on_trained_student(synth, questions, trained_dir, tmp_path, capsys):
    out = tmp_path / "run" / "answers.jsonl"
    code = main(["eval", "--model", trained_dir, "--questions", synth["eval_questions"], "--images", synth["images"],
                 "--answers", synth["eval_answers"], "--teacher", trained_dir, "--out", str(out),
                 "--batch-size", "3", "--max-new-tokens", "6"])
    assert code == 0
    key = load_answer_key(synth["eval_answers"])
    rows = _rows(out)
    assert [r["question_id"] for r in rows] == [q.id for q in questions]
    assert all(set(r) == {"question_id", "prompt", "text", "model_id"} for r in rows)
    # memorised answers come back verbatim, so every type scores 1
    assert [r["text"] for r in rows] == [key[q.id].answer for q in questions]

    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["per_type"]) == set(TYPES)
    for t, n in TYPES.items():
        s = m["per_type"][t]
        assert (s["n"], s["correct"], s["accuracy"], s["unparsable"]) == (n, n, 1.0, 0), t
    yn = m["per_type"]["yesno"]
    assert (yn["precision"], yn["recall"], yn["f1"]) == (1.0, 1.0, 1.0)
    assert yn["yes_ratio"] == pytest.approx(1 / 3)
    assert (m["average"], m["overall"], m["n"], m["n_questions"], m["unparsable"]) == (1.0, 1.0, 8, 8, 0)
    assert {t: tuple(v) for t, v in _rescore(rows, questions, key).items()} == {t: (n, 0) for t, n in TYPES.items()}

    d = m["diagnostics"]
    assert d["samples"] == 8 and d["visual_tokens"] == 8 * 16
    assert 1.0 <= d["perplexity"] < 1.2  # trained to a loss below 0.05
    assert d["perplexity"] == pytest.approx(math.exp(d["nll"]))
    assert abs(d["kl_response"]) < 1e-5 and abs(d["kl_visual"]) < 1e-5  # teacher == student
    printed = capsys.readouterr().out
    assert "average" in printed and "perplexity" in printed and "KL(teacher || student)" in printed


def test_eval_untrained_scores_match_the_answers_written(synth, questions, records, student_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    m = run_eval(student_dir, synth["eval_questions"], out, images=synth["images"], answers=synth["eval_answers"],
                 max_new_tokens=4, progress=False, verbose=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(m))
    rows = _rows(out)
    key = load_answer_key(synth["eval_answers"])
    rescored = _rescore(rows, questions, key)
    for t, (correct, unparsable) in rescored.items():
        s = m["per_type"][t]
        assert (s["correct"], s["unparsable"]) == (correct, unparsable), t
        assert s["accuracy"] == pytest.approx(correct / s["n"])
        text = {r["question_id"]: r["text"] for r in rows}
        assert all(text[e["question_id"]] == e["answer"] for e in s["unparsable_examples"])
    assert m["unparsable"] == sum(u for _, u in rescored.values())
    assert m["average"] == pytest.approx(sum(s["accuracy"] for s in m["per_type"].values()) / 3)

    # the same conversations given as a LLaVA held-out file give the same diagnostics
    convs = [{"id": r.id, "image": q.image, "conversations": [{"from": "human", "value": r.turns[0].value},
                                                            {"from": "gpt", "value": r.turns[1].value}]}
             for r, q in zip(records, questions)]
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(convs))
    m2 = run_eval(student_dir, synth["eval_questions"], tmp_path / "b" / "answers.jsonl", images=synth["images"],
                  heldout=heldout, max_new_tokens=1, progress=False, verbose=False)
    assert "per_type" not in m2
    assert m2["diagnostics"]["response_tokens"] == m["diagnostics"]["response_tokens"]
    assert m2["diagnostics"]["perplexity"] == pytest.approx(m["diagnostics"]["perplexity"], rel=1e-5)


def test_eval_input_errors_come_before_loading(synth, student_dir, tmp_path):
    q, a = synth["eval_questions"], synth["eval_answers"]
    with pytest.raises(ValueError, match=r"questions.jsonl:1: question 0 has an image but no image folder was given"):
        run_eval(student_dir, q, tmp_path / "a.jsonl", progress=False)
    with pytest.raises(FileNotFoundError, match=r"model checkpoint not found: .*nowhere$"):
        run_eval(tmp_path / "nowhere", q, tmp_path / "a.jsonl")
    partial = tmp_path / "key.jsonl"
    partial.write_text(open(a).readline())
    with pytest.raises(ValueError, match=r"has no entry for 7 question\(s\), e.g. \[1, 2, 3, 4, 5\]"):
        run_eval(student_dir, q, tmp_path / "a.jsonl", images=synth["images"], answers=partial)
    with pytest.raises(ValueError, match=r"teacher given without answers or heldout"):
        run_eval(student_dir, q, tmp_path / "a.jsonl", images=synth["images"], teacher=student_dir)
    with pytest.raises(ValueError, match=r"template='llama'"):
        run_eval(student_dir, q, tmp_path / "a.jsonl", template="llama")
    assert not (tmp_path / "a.jsonl").exists()


def test_eval_cli_reports_bad_input_in_one_line(synth, tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--questions", synth["eval_questions"],
                 "--out", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdengine eval: error: model checkpoint not found: ") and "nowhere" in err
    assert "Traceback" not in err and not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------- diagnostics


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.double()


def test_perplexity_is_exp_of_cross_entropy_from_model_logits(records, student):
    model, processor = student
    d = distill_diagnostics(model, processor, records, batch_size=3, progress=False)
    batch = _batch(processor, records, num_image_tokens(model))  # one batch, independent of the 3-way split
    logits = _logits(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="mean")
    assert d["response_tokens"] == int(valid.sum()) > 0
    assert d["perplexity"] == pytest.approx(float(ce.exp()), rel=1e-4)
    assert d["perplexity"] > 10  # an untrained model: far from 1, so the comparison means something


def test_kl_of_a_model_to_itself_is_zero(records, student):
    model, processor = student
    alone = distill_diagnostics(model, processor, records, batch_size=4, progress=False)
    d = distill_diagnostics(model, processor, records, teacher=model, batch_size=4, progress=False)
    assert abs(d["kl_response"]) < 1e-6 and abs(d["kl_visual"]) < 1e-6
    assert d["visual_tokens"] == len(records) * num_image_tokens(model)
    assert d["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)  # fused CE == plain CE


def test_kl_to_a_teacher_matches_full_logits(records, student, teacher):
    model, processor = student
    t_model = teacher[0]
    d = distill_diagnostics(model, processor, records, teacher=t_model, batch_size=3, progress=False)
    batch = _batch(processor, records, num_image_tokens(model))
    log_s = torch.log_softmax(_logits(model, batch), -1)
    log_t = torch.log_softmax(_logits(t_model, batch), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, L], position i predicts token i + 1
    resp = torch.zeros_like(batch["labels"], dtype=torch.bool)
    resp[:, :-1] = batch["labels"][:, 1:] != -100
    vis = batch["input_ids"] == processor.image_token_id
    assert d["kl_response"] == pytest.approx(float(kl[resp].mean()), rel=1e-4)
    assert d["kl_visual"] == pytest.approx(float(kl[vis].mean()), rel=1e-4)
    assert d["kl_response"] > 1e-2 and d["kl_visual"] > 1e-2  # two different random models
