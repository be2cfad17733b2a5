"""What a newcomer met (issue 20): one-line errors that say what to pass or run instead.

kdengine eval --model with a missing folder, a training stage folder or a run folder; kdengine
teacher-cache import into a fresh run folder whose synthetic data (tokenizer included) is not written.
"""

import json
import os
import shlex

import torch
import yaml
from safetensors.torch import save_file

from kdengine.cli import main
from kdengine.eval.checkpoint_files import check_checkpoint_dir


def _checkpoint(path):
    """A folder check_checkpoint_dir accepts: config.json with model_type and whole weights."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llava"}, f)
    save_file({"w": torch.zeros(4, 4)}, os.path.join(path, "model.safetensors"))
    return str(path)


def _eval_error(model, tmp_path, capsys):
    code = main(["eval", "--model", str(model), "--questions", str(tmp_path / "q.jsonl"),
                 "--out", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("kdengine eval: error: model checkpoint "), err
    return err.rstrip("\n")


def _suggested(err):
    """The folder after 'use ' in an error line."""
    assert "use " in err, err
    return err.split("use ", 1)[1].split(",")[0].split(" ")[0].rstrip(")")


def test_eval_missing_model_folder_says_not_found(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert _eval_error(missing, tmp_path, capsys) == f"kdengine eval: error: model checkpoint not found: {missing}"
    (tmp_path / "file").write_text("x")
    err = _eval_error(tmp_path / "file", tmp_path, capsys)
    assert err.endswith(f"{tmp_path / 'file'}: not a folder (expected a save_pretrained folder)"), err


def test_eval_plain_folder_without_config_says_what_is_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _eval_error(tmp_path / "empty", tmp_path, capsys)
    assert err.endswith(f"{tmp_path / 'empty'}: no config.json (expected a save_pretrained folder)"), err


def test_eval_stage_folder_suggests_its_model(tmp_path, capsys):
    stage = tmp_path / "runs" / "x" / "student_dft"
    _checkpoint(stage / "model")
    (stage / "checkpoints").mkdir()
    err = _eval_error(stage, tmp_path, capsys)
    assert "no config.json" in err and "training stage folder" in err, err
    assert _suggested(err) == str(stage / "model")
    check_checkpoint_dir(_suggested(err))  # the suggestion is a loadable folder


def test_eval_stage_folder_without_a_model_yet_says_so(tmp_path, capsys):
    stage = tmp_path / "student_dft"
    (stage / "checkpoints" / "step00000002").mkdir(parents=True)
    err = _eval_error(stage, tmp_path, capsys)
    assert "training stage folder without a finished model" in err and "--resume" in err, err
    assert "use " not in err, err


def test_eval_run_folder_suggests_the_last_stage_model_in_config_order(tmp_path, capsys):
    run = tmp_path / "run"
    # config order t_pt, s_dpt, s_dft; alphabetically s_dpt < t_pt, so name order would pick t_pt.
    _checkpoint(run / "t_pt" / "model")
    _checkpoint(run / "s_dpt" / "model")
    (run / "s_dft" / "checkpoints").mkdir(parents=True)  # unfinished: no model
    (run / "data").mkdir()
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump({"stages": [{"name": "t_pt"}, {"name": "s_dpt"}, {"name": "s_dft"}]}, f)
    err = _eval_error(run, tmp_path, capsys)
    assert "training run folder" in err and _suggested(err) == str(run / "s_dpt" / "model"), err
    assert err.endswith("stages with a model, in order: t_pt, s_dpt)"), err
    check_checkpoint_dir(_suggested(err))


def test_eval_run_folder_without_config_orders_stages_by_time(tmp_path, capsys):
    run = tmp_path / "run"
    for name, when in (("b_first", 1_000_000), ("a_second", 2_000_000)):
        path = _checkpoint(run / name / "model")
        os.utime(os.path.join(path, "config.json"), (when, when))
    err = _eval_error(run, tmp_path, capsys)
    assert _suggested(err) == str(run / "a_second" / "model"), err
    assert err.endswith("in order: b_first, a_second)"), err


def test_eval_run_folder_with_one_stage_lists_nothing_more(tmp_path, capsys):
    run = tmp_path / "run"
    _checkpoint(run / "only" / "model")
    err = _eval_error(run, tmp_path, capsys)
    assert err.endswith(f"use {run / 'only' / 'model'}, the last stage's model)"), err


# ----------------------------------------------------------------------------- teacher-cache import


def test_teacher_cache_import_into_a_fresh_run_names_the_command_that_writes_the_tokenizer(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    with open(config, "w") as f:
        yaml.safe_dump({
            "run": {"output_dir": str(run)},
            "synth": {"n_caption": 0, "n_instruct": 4, "n_eval": 1, "seed": 3},
            "stages": [{"name": "s_dft", "kind": "dft", "model": "student", "data": "instruct",
                        "teacher_cache": str(tmp_path / "cache")}],
        }, f)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("not json\n")
    argv = ["teacher-cache", "import", str(jsonl), "--config", str(config), "--stage", "s_dft", "--teacher-name", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    tok = run / "data" / "tokenizer"
    assert err.startswith(f"kdengine teacher-cache: error: models.student.tokenizer = '{tok}' not found: "), err
    assert "kdengine train writes when it starts" in err, err
    command = err.rstrip("\n").split("write it first with: ", 1)[1]
    assert command.startswith(f"kdengine data synth --out {run / 'data'} --seed 3 --n-caption 0 --n-instruct 4 "
                              "--n-eval 1 "), command
    assert not os.path.exists(run / "data")

    # The named command writes the tokenizer; the import then gets past it to the JSONL.
    assert main(shlex.split(command)[1:]) == 0
    capsys.readouterr()
    assert os.path.isdir(tok)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenizer" not in err and "in.jsonl:1" in err, err
    assert not os.path.exists(tmp_path / "cache")
