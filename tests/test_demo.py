"""`kdengine demo`: a smoke run with very small sizes produces the table, the metrics and the chart
with the right rows and columns (the accuracy gap belongs to the full demo, not here)."""

from __future__ import annotations

import json
import os

import pytest

from kdengine.cli import main
from kdengine.demo import DEFAULT_CONFIG, demo_config, packaged_config
from kdengine.train.config import ConfigError

TYPES = ("exact", "yesno", "mc")
MAIN_LABELS = ["teacher", "student PT+SFT", "student DPT+SFT+DFT"]
ABLATION_LABELS = MAIN_LABELS + ["student PT+DFT", "student DPT+SFT", "student DPT+DFT",
                                 "student DPT+SFT+DFT (cached hidden)", "student DPT+SFT+DFT (cached top-k, k=8)"]


def _small(steps: int = 4) -> list[str]:
    """Overrides shrinking the demo to seconds: a few records and questions, and ``steps`` steps per
    model and dataset, split evenly over that model's stages on the dataset (equal budgets)."""
    cfg, _ = demo_config(DEFAULT_CONFIG, ablation=True)
    sets = ["synth.n_caption=24", "synth.n_instruct=24", "synth.n_eval=15", "run.log_every=1"]
    for st in cfg.stages:
        n = sum(o.model == st.model and o.data == st.data for o in cfg.stages)
        sets.append(f"stages.{st.name}.max_steps={steps // n}")
    return sets


def test_default_config_found_installed_or_in_checkout(tmp_path):
    assert os.path.isfile(DEFAULT_CONFIG)
    pkg = tmp_path / "site" / "kdengine"
    (pkg / "configs").mkdir(parents=True)
    # an editable install: no kdengine/configs copy, the checkout's configs/ beside the package
    assert packaged_config("demo.yaml", str(pkg)) == str(tmp_path / "site" / "configs" / "demo.yaml")
    (pkg / "configs" / "demo.yaml").write_text("run: {}\n")  # an installed copy wins
    assert packaged_config("demo.yaml", str(pkg)) == str(pkg / "configs" / "demo.yaml")


def test_rows_and_budgets():
    _, rows = demo_config(DEFAULT_CONFIG)
    assert [r.label for r in rows] == MAIN_LABELS
    _, rows = demo_config(DEFAULT_CONFIG, ablation=True)
    assert sorted(r.label for r in rows) == sorted(ABLATION_LABELS)
    assert rows[0].label == "teacher"
    budgets = [r.steps for r in rows[1:]]
    assert all(b == budgets[0] for b in budgets), budgets
    cfg, _ = demo_config(DEFAULT_CONFIG, ablation=True)
    names = [st.name for st in cfg.stages]
    # the cached rows read caches written earlier in the pipeline and take the online row's seeds
    for st in cfg.stages:
        if st.teacher_cache is not None:
            assert names.index(st.teacher_cache) < names.index(st.name)
        if "cached" in st.name:
            assert st.seed_as == "dpt_sft_dft-" + st.name.rsplit("-", 1)[1]
    assert rows[0].stages == ["teacher_pt", "teacher_sft"]  # the teacher is evaluated from its sft model
    main_cfg, _ = demo_config(DEFAULT_CONFIG)
    assert not any(st.kind == "teacher_cache" for st in main_cfg.stages)  # no cache work without --ablation


def test_unequal_budget_is_refused():
    with pytest.raises(ConfigError, match="different step budgets"):
        demo_config(DEFAULT_CONFIG, overrides=["stages.pt_sft-sft.max_steps=7"])


def test_missing_main_row_is_refused(tmp_path):
    text = open(DEFAULT_CONFIG, encoding="utf-8").read().replace("student_dpt_sft_dft", "student_other")
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="main rows"):
        demo_config(path)


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seed", "1", *sum((["--set", s] for s in _small()), [])]) == 0
    printed = capsys.readouterr().out

    # results.md: the header names every question type and the average, one line per row, in order.
    lines = (out / "results.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "model" and "average" in header
    for t in TYPES:
        assert any(c.startswith(t + " (n=") for c in header), header
    body = [ln for ln in lines[2:] if ln.startswith("|")]
    assert [ln.strip("|").split("|")[0].strip() for ln in body] == MAIN_LABELS
    assert all(len(ln.strip("|").split("|")) == len(header) for ln in body)
    assert lines[0] in printed

    # results.json and each row's metrics.json agree.
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 1 and res["n_questions"] == 15
    assert [r["label"] for r in res["rows"]] == MAIN_LABELS
    for r in res["rows"]:
        assert set(r["per_type"]) == set(TYPES)
        assert 0.0 <= r["average"] <= 1.0
        m = json.loads((out / "eval" / r["row"] / "metrics.json").read_text())
        assert m["average"] == pytest.approx(r["average"]) and m["n"] == 15
        assert os.path.isfile(os.path.join(r["model_dir"], "config.json"))
    assert res["rows"][0]["kl_response"] is None and res["rows"][1]["kl_response"] is not None
    assert res["rows"][1]["steps"] == res["rows"][2]["steps"] == {"pretrain": 4, "instruct": 4}

    # the time and the machine are stated: training seconds summed over the stages, date, CPU, cores
    import time as _time

    sec, where = res["seconds"], res["measured"]
    assert 0 < sec["stages"] <= sec["train"] <= sec["total"] and sec["resumed"] is False
    assert where["date"] == _time.strftime("%Y-%m-%d") and where["cores"] == os.cpu_count() and where["cpu"]
    note = (out / "results.md").read_text()
    assert f"training {sec['stages']} s summed over its stages" in note and where["cpu"] in note
    assert "Float results differ across CPU types" in note

    # results.png: a real PNG.
    pytest.importorskip("matplotlib")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
