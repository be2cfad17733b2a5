"""Ctrl-C (issue 20): a first SIGINT checkpoints at the next step boundary and exits 130 with one line;
``--resume`` then gives the uninterrupted run bit for bit; a second SIGINT stops at once; a Ctrl-C
outside the step loop is one line, not a traceback."""

import os
import subprocess
import sys
import textwrap

from test_reliability_train import STAGE, STEPS, _same_as_reference, data_dir, reference, step_rows, train  # noqa: F401
from test_train import check_ok, write_config

from kdengine.cli import main


def test_ctrl_c_checkpoints_exits_130_in_one_line_and_resume_loses_nothing(reference, data_dir, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    config = write_config(tmp_path / "cfg.yaml", data_dir, run_dir, [dict(STAGE, checkpoint_every=0)])
    stopped = train(config, KDENGINE_FAULT="after_step:2:INT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    ckpt = os.path.join(run_dir, "s_dft", "checkpoints", "step00000002")
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("kdengine")]
    assert lines == [
        "kdengine: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)",
        f"kdengine train: Ctrl-C (SIGINT): stopped after step 2/{STEPS} of stage 's_dft' with checkpoint {ckpt}; "
        "--resume continues from it"], stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "[rank0]:" not in stopped.stderr, stopped.stderr[-3000:]
    assert os.path.isfile(os.path.join(ckpt, "complete.json"))

    resumed = train(config, "--resume")
    check_ok(resumed, "the run resumed after Ctrl-C")
    assert [r["step"] for r in step_rows(run_dir)] == list(range(1, STEPS + 1))
    _same_as_reference(reference, run_dir)


def test_a_second_ctrl_c_stops_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from kdengine.train.stop import StopRequest
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            print("first:", stop.signum == signal.SIGINT, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["first: True"], proc.stdout
    assert proc.stderr.splitlines() == ["",
        "kdengine: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)", "",
        "kdengine: second Ctrl-C: stopped at once; --resume continues from the last checkpoint"], proc.stderr


def test_ctrl_c_outside_the_step_loop_is_one_line(monkeypatch, capsys):
    import kdengine.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_eval", interrupted)  # the parser binds the name when main() builds it
    assert main(["eval", "--model", "m", "--questions", "q.jsonl", "--out", "o.jsonl"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["kdengine eval: interrupted (Ctrl-C); a training run continues with --resume from its "
                                "last checkpoint"], err
