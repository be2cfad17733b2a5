"""Synthetic scenes: deterministic by seed, valid LLaVA files, answers that match the pictures."""

import json
import os
import random
import re

import pytest
from PIL import Image

from kdengine.cli import main
from kdengine.data.records import load_records
from kdengine.data.synth import (
    COLORS,
    QUESTION_SETS,
    Shape,
    draw_scene,
    q_choice,
    q_color,
    q_color_presence,
    q_count,
    q_count_check,
    q_count_choice,
    q_count_total,
    q_position,
    q_presence,
    synthesize,
)

SMALL = dict(n_caption=10, n_instruct=40, n_eval=12, image_size=32, text_only=0.1)
TEXT_FILES = ("pretrain.json", "instruct.json", "eval/questions.jsonl", "eval/answers.jsonl", "meta.json", "tokenizer/tokenizer.json")


def images_of(root):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, "images")):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            with Image.open(path) as im:
                out[os.path.relpath(path, root)] = (im.size, im.mode, im.tobytes())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize(root / name, seed=seed, **SMALL)
    return root


def test_same_seed_is_identical(runs):
    for f in TEXT_FILES:
        assert (runs / "a" / f).read_bytes() == (runs / "b" / f).read_bytes(), f
    a, b = images_of(runs / "a"), images_of(runs / "b")
    assert len(a) == 10 + 12 + sum(1 for r in json.loads((runs / "a" / "instruct.json").read_text()) if "image" in r)
    assert a == b


def test_other_seed_differs(runs):
    for f in ("pretrain.json", "instruct.json", "eval/answers.jsonl"):
        assert (runs / "a" / f).read_bytes() != (runs / "c" / f).read_bytes(), f
    a, c = images_of(runs / "a"), images_of(runs / "c")
    common = set(a) & set(c)
    assert sum(a[k] != c[k] for k in common) >= len(common) - 1


def test_files_are_valid_llava_data(runs):
    root = runs / "a"
    cap, _ = load_records(root / "pretrain.json", root / "images")  # strict: every image decodes
    ins, _ = load_records(root / "instruct.json", root / "images")
    assert len(cap) == 10 and len(ins) == 40
    assert all(len(r.turns) == 2 and r.has_image for r in cap)
    assert any(len(r.turns) > 2 for r in ins) and any(not r.has_image for r in ins)
    assert all(r.turns[0].value.count("<image>") == len(r.images) for r in ins)
    with Image.open(cap[0].images[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["n_eval"] == 12 and meta["files"]["pretrain"] == "pretrain.json"


def test_eval_files(runs):
    root = runs / "a"
    qs = [json.loads(x) for x in (root / "eval/questions.jsonl").read_text().splitlines()]
    ans = [json.loads(x) for x in (root / "eval/answers.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in ans] == list(range(12))
    assert all(set(q) == {"question_id", "image", "text", "category"} for q in qs)
    assert all(set(a) == {"question_id", "answer", "type"} for a in ans)
    train_images = {r["image"] for r in json.loads((root / "instruct.json").read_text()) if "image" in r}
    for q, a in zip(qs, ans):
        assert q["image"].startswith("eval/") and q["image"] not in train_images
        assert os.path.isfile(root / "images" / q["image"]) and "<image>" not in q["text"]
        assert a["type"] in ("exact", "yesno", "mc") and a["type"] == q["category"]
        if a["type"] == "yesno":
            assert a["answer"] in ("Yes", "No")
        if a["type"] == "mc":
            assert a["answer"] in "ABCD" and f"\n{a['answer']}. " in q["text"]


# Hand-built scene: a red circle top-left, a blue square bottom-right, a blue star in the centre.
SCENE = [
    Shape("circle", "red", 0, 0, 10.0, 10.0, 7.0),
    Shape("square", "blue", 2, 2, 50.0, 50.0, 7.0),
    Shape("star", "blue", 1, 1, 30.0, 30.0, 7.0),
]


def test_drawn_pixels_match_the_scene():
    img = draw_scene(random.Random(0), SCENE, 60, noise=0.0)
    assert img.getpixel((10, 10)) == COLORS["red"]
    assert img.getpixel((50, 50)) == COLORS["blue"]
    assert img.getpixel((30, 30)) == COLORS["blue"]
    bg = img.getpixel((59, 0))
    assert bg[0] == bg[1] == bg[2] >= 200


def test_question_answers_match_the_scene():
    for k in range(30):
        q, a, kind = q_position(random.Random(k), SCENE)
        m = re.match(r"Is the (\w+ \w+) (to the left or to the right of|above or below) the (\w+ \w+)\?", q)
        pos = {"red circle": (0, 0), "blue square": (2, 2), "blue star": (1, 1)}
        (ra, ca), (rb, cb) = pos[m.group(1)], pos[m.group(3)]
        if "left" in m.group(2):
            assert a == ("left" if ca < cb else "right")
        else:
            assert a == ("above" if ra < rb else "below")
        q, a, _ = q_color(random.Random(k), SCENE)
        assert a == {"What color is the circle?": "red", "What color is the square?": "blue", "What color is the star?": "blue"}[q.split(" Answer")[0]]
        q, a, kind = q_presence(random.Random(k), SCENE)
        named = re.search(r"Is there an? (\w+) (\w+) in", q).groups()
        assert kind == "yesno" and a == ("Yes" if named in {("red", "circle"), ("blue", "square"), ("blue", "star")} else "No")
        q, a, _ = q_count(random.Random(k), SCENE)
        expected = {"How many shapes are in the image?": "3", "How many blue shapes are there?": "2", "How many red shapes are there?": "1", "How many circles are there?": "1", "How many stars are there?": "1", "How many squares are there?": "1"}
        assert a == expected.get(q.split(" Answer")[0], "0")
        qa = q_choice(random.Random(k), SCENE)
        if qa is not None:
            q, a, kind = qa
            chosen = re.search(rf"\n{a}\. (\w+)\n", q).group(1)
            if q.startswith("Which shape is red?"):
                assert chosen == "circle"
            else:
                shape = re.match(r"What color is the (\w+)\?", q).group(1)
                assert chosen == {"circle": "red", "square": "blue", "star": "blue"}[shape]


def test_basic_question_answers_match_the_scene():
    # SCENE: a red circle, a blue square and a blue star.
    counts = {"How many shapes are in the image?": 3, "How many blue shapes are there?": 2, "How many red shapes are there?": 1}
    seen = set()
    for k in range(60):
        q, a, kind = q_count_total(random.Random(k), SCENE)
        assert kind == "exact" and a == str(counts.get(q.split(" Answer")[0], 0))
        q, a, kind = q_color_presence(random.Random(k), SCENE)
        color = re.match(r"Is there an? (\w+) shape in the image\?", q).group(1)
        assert kind == "yesno" and a == ("Yes" if color in ("red", "blue") else "No")
        q, a, kind = q_count_check(random.Random(k), SCENE)
        n = re.match(r"(?:Is|Are) there (\w+) shapes? in the image\?", q).group(1)
        assert kind == "yesno" and a == ("Yes" if n == "three" else "No")
        seen.add(a)
        qa = q_count_choice(random.Random(k), SCENE)
        if qa is None:  # a count outside the listed options
            continue
        q, a, kind = qa
        options = re.findall(r"\n([A-D])\. (\d)", q)
        assert kind == "mc" and [int(v) for _, v in options] == sorted(int(v) for _, v in options)
        assert int(dict(options)[a]) == counts.get(q.split("\n")[0], 0)
    assert seen == {"Yes", "No"}  # both answers occur


def test_question_set_is_used_and_checked(tmp_path):
    synthesize(tmp_path / "basic", seed=3, questions="basic", **SMALL)
    texts = [json.loads(line)["text"] for line in open(tmp_path / "basic" / "eval" / "questions.jsonl")]
    patterns = ("What color is the", "How many", "Is there an? \\w+ shape in", "(Is|Are) there \\w+ shapes? in")
    assert all(any(re.match(p, t) for p in patterns) for t in texts), texts
    assert json.load(open(tmp_path / "basic" / "meta.json"))["questions"] == "basic"
    assert set(QUESTION_SETS) == {"mixed", "basic"}
    with pytest.raises(ValueError, match="questions='hard'"):
        synthesize(tmp_path / "bad", questions="hard", **SMALL)


def test_cli_data_synth(tmp_path, capsys):
    argv = ["data", "synth", "--out", str(tmp_path / "cli"), "--seed", "7", "--image-size", "32", "--text-only", "0.1"]
    argv += ["--n-caption", "10", "--n-instruct", "40", "--n-eval", "12"]
    assert main(argv) == 0
    assert "pretrain" in capsys.readouterr().out
    synthesize(tmp_path / "api", seed=7, **SMALL)
    for f in TEXT_FILES:
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "api" / f).read_bytes()
    with pytest.raises(SystemExit):
        main(["data", "synth", "--seed", "1"])  # --out is required
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--questions", "hard"]) == 2
    assert "kdengine data: error: questions='hard': expected one of ['basic', 'mixed']" in capsys.readouterr().err


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="n_caption=-1: expected an int >= 0"):
        synthesize(tmp_path, n_caption=-1)
    with pytest.raises(ValueError, match="image_size=8: expected >= 24"):
        synthesize(tmp_path, image_size=8)


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_non_empty_out_is_refused_and_overwrite_replaces_it_whole(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, seed=1, **SMALL)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=rf"out_dir {out}: not empty .*overwrite=True \(--overwrite\)"):
        synthesize(out, seed=2, **SMALL)
    assert _snapshot(out) == before
    small = dict(SMALL, n_caption=3)
    synthesize(out, seed=2, overwrite=True, **small)
    synthesize(tmp_path / "fresh", seed=2, **small)
    assert _snapshot(out) == _snapshot(tmp_path / "fresh")  # no stale caption/000003.png ... 000009.png
    assert sorted(os.listdir(tmp_path)) == ["ds", "fresh"]  # no temporary sibling left
    (tmp_path / "empty").mkdir()
    synthesize(tmp_path / "empty", seed=2, **small)  # an empty folder is fine without overwrite


def test_interrupted_synth_leaves_the_old_dataset_and_the_next_run_cleans_up(tmp_path, monkeypatch, capsys):
    import kdengine.data.synth as synth_mod

    out = tmp_path / "ds"
    synthesize(out, seed=1, **SMALL)
    before = _snapshot(out)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth_mod, "train_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, seed=2, overwrite=True, **SMALL)
    monkeypatch.undo()
    assert _snapshot(out) == before and (tmp_path / ".ds.synth-tmp").is_dir()
    synthesize(out, seed=2, overwrite=True, **SMALL)
    assert f"removing {tmp_path / '.ds.synth-tmp'}, left by an interrupted synth write" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    assert json.load(open(out / "meta.json"))["seed"] == 2


def test_cli_refuses_a_non_empty_out_in_one_line_and_overwrite_replaces_it(tmp_path, capsys):
    from reliability_report import record

    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--image-size", "32", "--n-caption", "4", "--n-instruct", "8",
            "--n-eval", "2"]
    assert main(argv) == 0
    (out / "images" / "stale.png").write_bytes(b"old")
    capsys.readouterr()
    code = main(argv + ["--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"out_dir {out}: not empty" in err and "--overwrite" in err
    assert json.load(open(out / "meta.json"))["seed"] == 0 and (out / "images" / "stale.png").exists()
    replaced = main(argv + ["--seed", "1", "--overwrite"])
    assert replaced == 0
    assert json.load(open(out / "meta.json"))["seed"] == 1 and not (out / "images" / "stale.png").exists()
    record("bad_inputs", "test_synth.py::test_cli_refuses_a_non_empty_out", [
        {"input": "kdengine data synth --out a non-empty dir", "policy": "-",
         "what it gets": f"exit {code}, one line: {err.strip()}"},
        {"input": "the same with --overwrite", "policy": "-",
         "what it gets": f"exit {replaced}; the dir replaced whole (a stale image of the old dataset is gone)"},
    ], strip=tmp_path)
