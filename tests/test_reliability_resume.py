"""--resume compares the new config with the run's config.yaml: a change a finished stage or the
checkpoint being resumed contradicts is refused (key and both values), any other is applied."""

import json

import pytest
import yaml

from kdengine.train.config import ConfigError, load_config
from kdengine.train.resume import check_resume, config_changes


@pytest.fixture()
def run_dir(tmp_path):
    """The embedded tiny run: teacher_pt finished, teacher_sft at checkpoint step 50, the rest not started."""
    run = tmp_path / "run"
    cfg = load_config(None, [f"run.output_dir={run}"], check_paths=False)
    (run / "teacher_pt" / "model").mkdir(parents=True)
    (run / "teacher_pt" / "model" / "stage.json").write_text(json.dumps({"steps": 64}))
    ckpt = run / "teacher_sft" / "checkpoints" / "step00000050"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"step": 50}))
    (run / "data").mkdir()
    (run / "data" / "meta.json").write_text("{}")
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return str(run)


def _resume(run_dir, *sets):
    return check_resume(load_config(None, [f"run.output_dir={run_dir}", *sets], check_paths=False), resume=True)


REFUSED = [
    ("stages.teacher_pt.lr=0.5", r"stages\.teacher_pt\.lr = 0\.5, but stage 'teacher_pt' \(finished\) ran with stages\.teacher_pt\.lr = 0\.002"),
    ("stages.teacher_sft.lr=0.5", r"stages\.teacher_sft\.lr = 0\.5, but stage 'teacher_sft' \(at checkpoint step00000050\) ran with stages\.teacher_sft\.lr = 0\.001"),
    ("stages.teacher_sft.max_steps=7", r"stages\.teacher_sft\.max_steps = 7, .* ran with stages\.teacher_sft\.max_steps = None"),
    ("datasets.pretrain.max_length=64", r"datasets\.pretrain\.max_length = 64, but stage 'teacher_pt' \(finished\)"),
    ("models.teacher.tiny.seed=9", r"models\.teacher\.tiny\.seed = 9, but stage 'teacher_pt'"),
    ("run.seed=3", r"run\.seed = 3, but stage 'teacher_pt'"),
    ("engine.zero_stage=2", r"engine\.zero_stage = 2, but stage 'teacher_sft' \(at checkpoint step00000050\) ran with engine\.zero_stage = None"),
    ("synth.n_caption=9", r"synth\.n_caption = 9, but the run's data was synthesized with 512"),
]


@pytest.mark.parametrize("change, pattern", REFUSED, ids=[c for c, _ in REFUSED])
def test_a_change_the_run_state_contradicts_is_refused(run_dir, change, pattern):
    with pytest.raises(ConfigError, match=r"^--resume: " + pattern):
        _resume(run_dir, change)


def test_changes_only_unstarted_stages_use_are_applied(run_dir):
    applied = _resume(run_dir, "stages.student_dft.lr=5e-4", "run.log_every=5", "stages.teacher_sft.checkpoint_every=10")
    assert applied == [
        {"key": "run.log_every", "old": 1, "new": 5},
        {"key": "stages.student_dft.lr", "old": 0.001, "new": 0.0005},
        {"key": "stages.teacher_sft.checkpoint_every", "old": 50, "new": 10},
    ]
    assert _resume(run_dir) == []


def test_without_resume_the_started_run_is_refused_and_a_fresh_dir_is_fine(run_dir, tmp_path):
    cfg = load_config(None, [f"run.output_dir={run_dir}"], check_paths=False)
    with pytest.raises(ConfigError, match=r"already holds stages \['teacher_pt', 'teacher_sft'\]: expected --resume"):
        check_resume(cfg, resume=False)
    fresh = load_config(None, [f"run.output_dir={tmp_path / 'new'}"], check_paths=False)
    assert check_resume(fresh, resume=False) == [] and check_resume(fresh, resume=True) == []


def test_config_changes_keys_stages_by_name():
    old = {"run": {"seed": 0}, "stages": [{"name": "a", "lr": 1.0}, {"name": "b", "lr": 2.0}]}
    new = {"run": {"seed": 0}, "stages": [{"name": "b", "lr": 3.0}, {"name": "a", "lr": 1.0}]}
    assert config_changes(old, new) == [("stages", ["a", "b"], ["b", "a"]), ("stages.b.lr", 2.0, 3.0)]


def test_a_run_saved_with_the_old_default_beta_still_resumes(run_dir):
    """Before beta became divergence-specific every stage was saved with distill.beta: 0.5, also for
    forward_kl (which ignored it); such a run resumes, and a real beta change of a jsd stage is still refused."""
    path = f"{run_dir}/config.yaml"
    tree = yaml.safe_load(open(path))
    for st in tree["stages"]:
        st["distill"]["beta"] = 0.5
    tree["stages"][0]["distill"]["divergence"] = "jsd"  # teacher_pt: finished, now with a mixing divergence
    yaml.safe_dump(tree, open(path, "w"), sort_keys=False)
    assert _resume(run_dir, "stages.teacher_pt.distill.divergence=jsd") == []  # jsd saved 0.5 = unset (0.5)
    with pytest.raises(ConfigError, match=r"stages\.teacher_pt\.distill\.beta = 0\.3, but stage 'teacher_pt'"):
        _resume(run_dir, "stages.teacher_pt.distill.divergence=jsd", "stages.teacher_pt.distill.beta=0.3")
