"""The stage summary table and the seed_as stage setting."""

from __future__ import annotations

import pytest

from kdengine.train.config import ConfigError, load_config
from kdengine.train.metrics import format_summary


def test_summary_columns_fit_long_names():
    rows = [dict(stage="cache_topk8-instruct", kind="teacher_cache", model="teacher", steps=0, seconds=1.0,
                 loss=None, truncated=0, skipped=None, path="/r/cache"),
            dict(stage="dpt", kind="dpt", model="student_dpt_sft_dft_cached_topk8", steps=125, seconds=2.5,
                 loss=0.5, truncated=3, skipped=0, path="/r/dpt/model")]
    lines = format_summary(rows).splitlines()
    fields = [line.split() for line in lines[2:]]
    assert fields[0][:3] == ["cache_topk8-instruct", "teacher_cache", "teacher"]
    assert fields[1][:4] == ["dpt", "dpt", "student_dpt_sft_dft_cached_topk8", "125"]
    starts = {lines[2].index(" teacher ") + 1, lines[3].index("student_dpt_sft_dft_cached_topk8")}
    assert len(starts) == 1  # the model column starts at one offset in every row


@pytest.mark.parametrize("value, match", [
    ("nonexistent", r"stages\[4\].*seed_as = 'nonexistent': expected another stage on data 'instruct'"),
    ("student_dpt", r"seed_as = 'student_dpt': expected another stage on data 'instruct'"),
    ("student_dft", r"seed_as = 'student_dft'"),
])
def test_seed_as_names_another_stage_on_the_same_data(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[f"stages.student_dft.seed_as={value}"])


def test_seed_as_accepts_a_stage_on_the_same_data():
    cfg = load_config(overrides=["stages.student_dft.seed_as=student_sft"])
    assert cfg.stages[4].seed_as == "student_sft"
