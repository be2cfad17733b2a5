"""kdengine.train.config: the YAML schema, --set overrides and every config error, raised before
any model, dataset or DeepSpeed is loaded. No training here (see test_train.py)."""

import json
import os
import subprocess
import sys

import pytest

from kdengine.train.config import ConfigError, TrainConfig, load_config
from kdengine.train.resume import check_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(os.path.join(CONFIGS, "tiny.yaml"), check_paths=False) == load_config(check_paths=False)
    cfg = load_config(check_paths=False)
    assert [s.kind for s in cfg.stages] == ["pt", "sft", "dpt", "sft", "dft"]
    assert [s.model for s in cfg.stages] == ["teacher"] * 2 + ["student"] * 3


@pytest.mark.parametrize("name, world", [("llava_kd_1b", 8), ("llava_kd_2b", 8)])
def test_paper_configs_parse(name, world):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"), world_size=world, check_paths=False)
    dpt = next(s for s in cfg.stages if s.kind == "dpt")
    dft = next(s for s in cfg.stages if s.kind == "dft")
    assert (dpt.lr, dpt.batch_size, dpt.trainable) == (1e-3, 32, ["projector"])
    assert (dft.lr, dft.batch_size, dft.trainable) == (2e-5, 16, ["projector", "language_model"])
    for st in (dpt, dft):
        w = st.weights
        assert (w.ce, w.res, w.vis, w.rel) == (1.0, 1.0, 1.0, 0.5)
    # The checkpoints are not on this machine: the error names the first missing path.
    missing = r"models\.(teacher|student)\.vision_tower = 'models/siglip.*': directory not found"
    with pytest.raises(ConfigError, match=missing):
        load_config(os.path.join(CONFIGS, f"{name}.yaml"), world_size=world)


def test_overrides_and_run_dir_placeholder(tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(overrides=[f"run.output_dir={out}", "stages.student_dft.lr=1e-4", "stages.2.weights.rel=0.25",
                                 "engine.zero_stage=2", "stages.student_sft.trainable=[language_model]"])
    assert cfg.stages[4].lr == 1e-4 and isinstance(cfg.stages[4].lr, float)
    w = cfg.stages[2].weights
    assert (w.ce, w.res, w.vis, w.rel) == (1.0, 1.0, 1.0, 0.25)  # the other weights keep the dpt defaults
    assert cfg.stages[3].trainable == ["language_model"]
    assert cfg.engine.zero_stage == 2 and cfg.engine.cpu_threads == 1  # the other engine fields keep theirs
    assert cfg.datasets["pretrain"].path == f"{out}/data/pretrain.json"
    assert cfg.models["student"].tokenizer == f"{out}/data/tokenizer"
    assert cfg.synth.out == f"{out}/data"


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


def test_set_in_a_yaml_stage_keeps_that_stage_kind_defaults(tmp_path):
    """--set edits the YAML's own stage: weights not given are the dpt defaults, not the embedded
    default config's first stage (a pt stage)."""
    path = _yaml(tmp_path, "stages: [{name: a, kind: dpt, model: student, teacher: teacher, data: pretrain}]\n")
    cfg = load_config(path, ["stages.a.weights.rel=0.25", "stages.a.distill.temperature=2"], check_paths=False)
    w, d = cfg.stages[0].weights, cfg.stages[0].distill
    assert (w.ce, w.res, w.vis, w.rel) == (1.0, 1.0, 1.0, 0.25)
    assert (d.temperature, d.divergence) == (2.0, "forward_kl") and cfg.stages[0].trainable == ["projector"]


# (test id, --set overrides, world size, regex the message must match)
ERRORS = [
    ("unknown-top-key", ["trainer.lr=1"], 1, r"unknown config key 'trainer'"),
    ("unknown-run-key", ["run.sead=1"], 1, r"unknown config key 'run\.sead'; expected one of \['keep_checkpoints'"),
    ("unknown-stage-key", ["stages.0.lrr=1"], 1, r"unknown config key 'stages\[0\]\.lrr'"),
    ("unknown-model-key", ["models.student.tiny.hidden=8"], 1, r"unknown config key 'models\.student\.tiny\.hidden'"),
    ("wrong-type-float", ["stages.0.lr=abc"], 1, r"stages\[0\]\.lr = 'abc' \(str\): expected a number"),
    ("wrong-type-int", ["run.seed=1.5"], 1, r"run\.seed = 1\.5 \(float\): expected an integer"),
    ("wrong-type-bool", ["engine.liger=maybe"], 1, r"engine\.liger = 'maybe': expected true or false"),
    ("wrong-type-list", ["stages.0.trainable=projector"], 1, r"stages\[0\]\.trainable = 'projector'.*expected a list"),
    ("bad-kind", ["stages.0.kind=kd"], 1, r"stages\[0\]\.kind = 'kd': expected one of \['pt', 'sft', 'dpt', 'dft', 'teacher_cache'\]"),
    ("dft-without-teacher", ["stages.student_dft.teacher=null"], 1,
     r"stages\[4\] \(student_dft\): kind 'dft' needs a teacher; expected teacher: one of \['teacher'\]"),
    ("dpt-teacher-is-itself", ["stages.student_dpt.teacher=student"], 1,
     r"teacher = 'student' is the model being trained"),
    ("teacher-on-ce-stage", ["stages.teacher_pt.teacher=student"], 1, r"kind 'pt' is cross-entropy only"),
    ("all-zero-weights", ["stages.student_dft.weights={ce: 0, res: 0, vis: 0, rel: 0}"], 1,
     r"stages\[4\] \(student_dft\)\.weights are all zero"),
    ("distill-weights-zero", ["stages.student_dpt.weights={res: 0, vis: 0, rel: 0}"], 1, r"would not distill"),
    ("distill-on-sft", ["stages.student_sft.weights.res=1"], 1, r"kind 'sft' has no teacher"),
    ("negative-weight", ["stages.student_dft.weights.rel=-1"], 1, r"expected weights >= 0"),
    ("nothing-trainable", ["stages.teacher_pt.trainable=[]"], 1,
     r"stages\[0\] \(teacher_pt\)\.trainable = \[\]: nothing to train"),
    ("unknown-component", ["stages.0.trainable=[projecter]"], 1, r"unknown components \['projecter'\]"),
    ("unknown-model", ["stages.0.model=tutor"], 1,
     r"stages\[0\] \(teacher_pt\)\.model = 'tutor': expected one of the models"),
    ("unknown-data", ["stages.0.data=coco"], 1,
     r"\.data = 'coco': expected one of the datasets \['instruct', 'pretrain'\]"),
    ("duplicate-stage", ["stages.1.name=teacher_pt"], 1, r"'teacher_pt' is used twice"),
    ("bad-divergence", ["stages.student_dft.distill.divergence=kl"], 1, r"divergence = 'kl': expected one of"),
    ("bad-temperature", ["stages.student_dft.distill.temperature=0"], 1, r"temperature = 0\.0: expected > 0"),
    ("inf-temperature", ["stages.student_dft.distill.temperature=.inf"], 1,
     r"stages\[4\]\.distill\.temperature = inf: expected a finite number"),
    ("bad-reduction", ["stages.student_dft.distill.rdist_reduction=mean"], 1, r"rdist_reduction = 'mean'"),
    ("bad-lr", ["stages.0.lr=0"], 1, r"stages\[0\] \(teacher_pt\)\.lr = 0\.0: expected > 0"),
    ("bad-zero-stage", ["engine.zero_stage=4"], 1, r"engine\.zero_stage = 4: expected 0, 1, 2, 3 or null"),
    ("shard-teacher-without-zero3", ["engine.shard_teacher=true"], 1, r"shard_teacher = true needs ZeRO stage 3"),
    ("batch-not-divisible", [], 3, r"batch_size = 8 is not a multiple of micro_batch_size 8 x world size 3 = 24"),
    ("missing-tokenizer", ["synth=null", "run.output_dir=/nonexistent/run"], 1,
     r"models\.teacher\.tokenizer = '/nonexistent/run/data/tokenizer': directory not found"),
    ("missing-model-dir", ["models.teacher={source: llava, path: /nonexistent/teacher}"], 1,
     r"models\.teacher\.path = '/nonexistent/teacher': directory not found"),
    ("model-spec-incomplete", ["models.teacher={source: composed, vision_tower: /x}"], 1,
     r"models\.teacher: model spec with source='composed' needs \['language_model'\]"),
    ("missing-data-file", ["datasets.pretrain.path=/nonexistent/558k.json"], 1,
     r"datasets\.pretrain\.path = '/nonexistent/558k\.json': file not found"),
    ("missing-image-folder", ["datasets.instruct.image_folder=/nonexistent/images"], 1,
     r"datasets\.instruct\.image_folder = '/nonexistent/images': directory not found"),
    ("bad-question-set", ["synth.questions=hard"], 1, r"synth\.questions = 'hard': expected one of \['basic', 'mixed'\]"),
    ("set-without-equals", ["stages.0.lr"], 1, r"--set 'stages\.0\.lr': expected key=value"),
    ("set-bad-stage-name", ["stages.student_xft.lr=1"], 1, r"no item named 'student_xft'"),
    ("set-bad-index", ["stages.9.lr=1"], 1, r"index 9 out of range; the list has 5 items"),
]


@pytest.mark.parametrize("overrides, world, pattern", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_config_errors(overrides, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides, world_size=world)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"top level is a list; expected a mapping"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"run = 3: expected a RunConfig mapping"):
        load_config(_yaml(tmp_path, "run: 3\n"))
    with pytest.raises(ConfigError, match=r"config key 'stages\[0\]\.model' is missing; expected str"):
        load_config(_yaml(tmp_path, "stages: [{name: a, kind: pt, data: pretrain}]\n"))


def test_deepspeed_json_checks(tmp_path):
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"sets \['train_batch_size'\]: these come from the stage config"):
        load_config(overrides=[f"engine.deepspeed_config={owned}"])
    z3 = os.path.join(CONFIGS, "ds_zero3.json")
    conflict = r"engine\.zero_stage = 2 but .*ds_zero3\.json has zero_optimization\.stage = 3"
    with pytest.raises(ConfigError, match=conflict):
        load_config(overrides=[f"engine.deepspeed_config={z3}", "engine.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"engine\.deepspeed_config: file not found: /nonexistent\.json"):
        load_config(overrides=["engine.deepspeed_config=/nonexistent.json"])
    cfg = load_config(overrides=[f"engine.deepspeed_config={z3}", "engine.shard_teacher=true"])
    assert cfg.engine.shard_teacher


def test_existing_run_needs_resume(tmp_path):
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}"])
    check_run_dir(cfg, resume=False)  # empty: fine
    marker = tmp_path / "teacher_sft" / "model" / "stage.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"steps": 1}))
    with pytest.raises(ValueError, match=r"already holds stages \['teacher_sft'\]: expected --resume"):
        check_run_dir(cfg, resume=False)
    check_run_dir(cfg, resume=True)


# The config errors the CLI must report in one line with exit code 2: (test id, --set overrides, message part)
CLI_ERRORS = [
    ("unknown-key", ["run.sead=1"], "unknown config key 'run.sead'"),
    ("wrong-type", ["stages.0.lr=abc"], "stages[0].lr = 'abc' (str): expected a number"),
    ("dft-without-teacher", ["stages.student_dft.teacher=null"], "kind 'dft' needs a teacher"),
    ("unknown-model", ["stages.0.model=tutor"], "stages[0] (teacher_pt).model = 'tutor': expected one of the models"),
    ("set-without-equals", ["stages.0.lr"], "--set 'stages.0.lr': expected key=value"),
    ("set-invalid-yaml", ["run.seed=[1"], "--set 'run.seed=[1': value is not valid YAML: "),
    ("missing-data-path", ["datasets.pretrain.path=/nonexistent/558k.json"],
     "datasets.pretrain.path = '/nonexistent/558k.json': file not found"),
]


@pytest.mark.parametrize("overrides, part", [e[1:] for e in CLI_ERRORS], ids=[e[0] for e in CLI_ERRORS])
def test_cli_config_errors_are_one_line_with_exit_code_2(tmp_path, capsys, overrides, part):
    from kdengine.cli import main

    argv = ["train", "--set", f"run.output_dir={tmp_path / 'run'}"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("kdengine train: config error: ") and part in err, err
    assert not (tmp_path / "run").exists()


def test_cli_config_error_before_anything_heavy(tmp_path):
    """The CLI exits 2 with the message, without importing DeepSpeed or writing the run directory."""
    run_dir = tmp_path / "run"
    code = (
        "import sys\n"
        "from kdengine.cli import main\n"
        f"rc = main(['train', '--set', 'run.output_dir={run_dir}', '--set', 'stages.student_dft.teacher=null'])\n"
        "print('rc', rc, 'deepspeed' in sys.modules, 'kdengine.train.stages' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rc 2 False False" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert "config error: stages[4] (student_dft): kind 'dft' needs a teacher" in proc.stderr
    assert not run_dir.exists()


def test_default_config_dataclass_roundtrip():
    cfg = TrainConfig()
    assert cfg.to_dict()["stages"][2]["weights"] == {"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 0.5}
