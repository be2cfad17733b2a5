"""Issue 12, training side: a kill at any named point, then ``--resume``, gives the uninterrupted
run's losses bit for bit; SIGTERM checkpoints and exits 0; bad input is one line with exit code 2
(no traceback, no ``[rank0]:``); ``--resume`` refuses a change the checkpoint contradicts; samples
skipped while training are counted in metrics.jsonl and the stage summary.

One uninterrupted reference run (one dft stage, 4 steps, a checkpoint after every step) is shared
by every fault point. Subprocesses run with OMP_NUM_THREADS=1.
"""

import json
import os
import re
import shutil

import pytest
from reliability_report import record
from test_train import COMPARED, check_ok, components, equal, load_stage, metrics, run_train, write_config

from kdengine.cli import main
from kdengine.train.faults import FAULT_POINTS

HERE = "test_reliability_train.py"
STEPS = 4
STAGE = dict(name="s_dft", kind="dft", model="student", teacher="teacher", data="instruct", lr=1e-3,
             batch_size=4, micro_batch_size=2, max_steps=STEPS, checkpoint_every=1)
# point -> (KDENGINE_FAULT, what the kill leaves behind, relative to the stage directory)
FAULTS = {
    "after_step": ("after_step:2", None),
    "metrics_mid": ("metrics_mid:3", None),
    "ckpt_mid": ("ckpt_mid:2", "checkpoints/.tmp-step00000002"),
    "ckpt_before_rename": ("ckpt_before_rename:2", "checkpoints/.tmp-step00000002"),
    "model_mid": ("model_mid:1", ".model.tmp"),
}


def train(config: str, *args: str, **env):
    return run_train(config, *args, OMP_NUM_THREADS=1, **env)


def step_rows(run_dir: str) -> list[dict]:
    """The per-step records (events such as config changes left out), compared keys only."""
    return [{k: r.get(k) for k in COMPARED} for r in metrics(run_dir) if "step" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kdengine.data import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out, seed=0, n_caption=8, n_instruct=40, n_eval=2, image_size=32, vocab_size=600)
    return str(out)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = str(tmp / "run")
    config = write_config(tmp / "cfg.yaml", data_dir, run_dir, [STAGE])
    proc = train(config)
    check_ok(proc, "the reference run")
    assert [r["step"] for r in step_rows(run_dir)] == list(range(1, STEPS + 1))
    return {"config": config, "run_dir": run_dir}


def _same_as_reference(reference, run_dir: str) -> None:
    ref, got = step_rows(reference["run_dir"]), step_rows(run_dir)
    assert got == ref  # every compared key of every step, bit for bit (floats compared exactly)
    a, b = components(load_stage(reference["run_dir"], "s_dft")), components(load_stage(run_dir, "s_dft"))
    for comp in a:
        assert equal(a[comp], b[comp]), comp


def test_fault_points_are_all_tested():
    assert set(FAULTS) == set(FAULT_POINTS)


@pytest.mark.parametrize("point", list(FAULTS))
def test_kill_at_a_fault_point_then_resume_equals_the_uninterrupted_run(point, reference, data_dir, tmp_path):
    spec, leftover = FAULTS[point]
    run_dir = str(tmp_path / "run")
    config = write_config(tmp_path / "cfg.yaml", data_dir, run_dir, [STAGE])
    killed = train(config, KDENGINE_FAULT=spec)
    assert killed.returncode == -9, f"{spec}: expected SIGKILL, got {killed.returncode}:\n{killed.stderr[-3000:]}"
    stage_dir = os.path.join(run_dir, "s_dft")
    assert not os.path.exists(os.path.join(stage_dir, "model", "stage.json"))
    if leftover:
        assert os.path.isdir(os.path.join(stage_dir, leftover)), f"{spec} left no {leftover}"
    torn = None
    if point == "metrics_mid":
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            torn = f.read().splitlines()[-1]
        with pytest.raises(json.JSONDecodeError):
            json.loads(torn)

    resumed = train(config, "--resume")
    check_ok(resumed, f"the run resumed after {spec}")
    if leftover:
        assert f"removed {os.path.join(stage_dir, leftover)}, left by an interrupted write" in resumed.stdout
        assert not os.path.exists(os.path.join(stage_dir, leftover))
    if torn is not None:
        expected = f"dropped its torn last line ({len(torn.encode())} bytes, a write cut short by a kill)"
        assert expected in resumed.stdout, resumed.stdout[-2000:]
    _same_as_reference(reference, run_dir)
    start = re.search(r"resuming from .*step(\d+)", resumed.stdout)
    record("fault_points", f"{HERE}::test_kill_at_a_fault_point[{point}]", [{
        "fault point": f"SIGKILL at {spec}",
        "resume result": (f"resumed from step {int(start.group(1)) if start else 0}; {len(step_rows(run_dir))}/{STEPS} "
                          f"step losses and the final weights equal the uninterrupted run bit for bit"
                          + ("; leftover temp dir removed with a message" if leftover else "")
                          + ("; torn metrics line dropped with a message" if torn is not None else "")),
    }])


def test_sigterm_checkpoints_at_the_step_boundary_exits_0_and_resume_loses_nothing(reference, data_dir, tmp_path,
                                                                                      capsys):
    run_dir = str(tmp_path / "run")
    config = write_config(tmp_path / "cfg.yaml", data_dir, run_dir, [dict(STAGE, checkpoint_every=0)])
    stopped = train(config, KDENGINE_FAULT="after_step:2:TERM")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    ckpt = os.path.join(run_dir, "s_dft", "checkpoints", "step00000002")
    assert f"SIGTERM: stopped after step 2/{STEPS} of stage 's_dft' with checkpoint {ckpt}" in stopped.stderr
    assert os.path.isfile(os.path.join(ckpt, "complete.json"))
    assert not os.path.exists(os.path.join(run_dir, "s_dft", "model"))

    # --resume refuses a change the checkpoint's optimizer and schedule contradict, before anything loads
    assert main(["train", config, "--resume", "--set", "stages.s_dft.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages.s_dft.lr = 0.5, but stage 's_dft' (at checkpoint step00000002) " \
                                   "ran with stages.s_dft.lr = 0.001" in err, err

    resumed = train(config, "--resume", "--set", "run.keep_checkpoints=3")  # applied, and recorded
    check_ok(resumed, "the run resumed after SIGTERM")
    assert "--resume applies run.keep_checkpoints: 2 -> 3" in resumed.stdout
    events = [r for r in metrics(run_dir) if r.get("event") == "config_change"]
    assert events == [{"event": "config_change", "key": "run.keep_checkpoints", "old": 2, "new": 3}]
    _same_as_reference(reference, run_dir)
    record("signals", f"{HERE}::test_sigterm", [{
        "signal": "SIGTERM after step 2 (KDENGINE_FAULT=after_step:2:TERM)",
        "result": f"exit {stopped.returncode}, checkpoint step00000002 written; --resume: {len(step_rows(run_dir))}/{STEPS} "
                  f"step losses equal the uninterrupted run bit for bit",
    }])
    record("bad_inputs", f"{HERE}::test_sigterm[resume-change]", [{
        "input": "--resume --set stages.s_dft.lr=0.5 (the checkpoint ran with 0.001)", "policy": "-",
        "what it gets": f"exit 2, one line: {err.strip()}"}], strip=tmp_path)
