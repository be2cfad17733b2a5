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


# ----------------------------------------------------------------------------- bad input: one line, exit code 2

SFT = dict(name="s_sft", kind="sft", model="student", data="instruct", lr=1e-3, batch_size=4, micro_batch_size=4,
           max_steps=2)


def _small_dataset(data_dir: str, out, n: int = 8) -> tuple[str, str, list]:
    """``n`` image records of the synthetic instructions with their own copies of the images:
    (jsonl path, image folder, records). With batch 4 and 2 steps every record is read once."""
    with open(os.path.join(data_dir, "instruct.json")) as f:
        rows = [r for r in json.load(f) if "image" in r][:n]
    images = out / "images"
    for r in rows:
        os.makedirs(images / os.path.dirname(r["image"]), exist_ok=True)
        shutil.copy(os.path.join(data_dir, "images", r["image"]), images / r["image"])
    path = out / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), str(images), rows


def _small_config(tmp_path, data_dir, engine=None, **dataset) -> str:
    path, images, _ = _small_dataset(data_dir, tmp_path)
    config = write_config(tmp_path / "cfg.yaml", data_dir, str(tmp_path / "run"), [SFT], **(engine or {}))
    with open(config) as f:
        cfg = json.loads(json.dumps(__import__("yaml").safe_load(f)))
    cfg["datasets"]["instruct"] = {"path": path, "image_folder": images, "template": "chat", **dataset}
    with open(config, "w") as f:
        __import__("yaml").safe_dump(cfg, f)
    return config


def _one_line(proc_or_err: str, prefix: str) -> str:
    lines = [ln for ln in proc_or_err.splitlines() if ln.startswith("kdengine train:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc_or_err[-3000:]
    assert "Traceback" not in proc_or_err and "[rank0]:" not in proc_or_err, proc_or_err[-3000:]
    return lines[0]


def test_config_time_errors_are_one_line_before_anything_loads(reference, data_dir, tmp_path, capsys):
    notype = tmp_path / "not_a_checkpoint"
    notype.mkdir()
    (notype / "config.json").write_text(json.dumps({"hidden_size": 8}))
    cases = {
        "a data file with the wrong extension (.txt)": ["--set", f"datasets.instruct.path={tmp_path / 'data.txt'}"],
        "a model dir whose config.json has no model_type": ["--set", "models.teacher.source=llava",
                                                            "--set", f"models.teacher.path={notype}"],
        "an existing run dir without --resume": [],
    }
    patterns = {
        "a data file with the wrong extension (.txt)": r"datasets\.instruct\.path = '.*data\.txt': expected a LLaVA \.json",
        "a model dir whose config.json has no model_type": r"models\.teacher\.path = '.*not_a_checkpoint': model checkpoint .*config\.json: no 'model_type'",
        "an existing run dir without --resume": r"run\.output_dir = '.*' already holds stages \['s_dft'\]: expected --resume",
    }
    rows = []
    for name, args in cases.items():
        code = main(["train", reference["config"], *args])
        err = capsys.readouterr().err
        line = _one_line(err, "kdengine train: config error: ")
        assert code == 2 and err.count("\n") == 1 and re.search(patterns[name], line), err
        rows.append({"input": f"kdengine train, {name}", "policy": "-", "what it gets": f"exit {code}, one line: {line}"})
    record("bad_inputs", f"{HERE}::test_config_time_errors", rows,
           strip=[tmp_path, os.path.dirname(reference["run_dir"])])


def test_bad_sample_under_error_is_one_line_before_training(data_dir, tmp_path):
    config = _small_config(tmp_path, data_dir)
    _, _, rows = _small_dataset(data_dir, tmp_path)
    (tmp_path / "images" / rows[3]["image"]).write_bytes(b"not a png")
    proc = train(config)
    line = _one_line(proc.stderr, "kdengine train: error: bad sample id=")
    assert proc.returncode == 2 and f"id={rows[3]['id']!r} at {tmp_path / 'small.jsonl'}:4 [image_corrupt]" in line
    assert "== stage" not in proc.stdout  # before the stage's engine was built
    record("bad_inputs", f"{HERE}::test_bad_sample_under_error", [{
        "input": "kdengine train, a corrupt image", "policy": "on_bad_sample: error",
        "what it gets": f"exit {proc.returncode}, one line: {line}"}], strip=tmp_path)


def test_lazily_decoded_images_are_counted_under_skip_and_one_line_under_error(data_dir, tmp_path):
    skip_dir, error_dir = tmp_path / "skip", tmp_path / "error"
    skip_dir.mkdir(), error_dir.mkdir()
    runs = {}
    for folder, policy in ((skip_dir, "skip"), (error_dir, "error")):  # the error one loads in a worker process
        engine = {"num_workers": 1} if policy == "error" else None
        config = _small_config(folder, data_dir, engine, check_images=False, on_bad_sample=policy)
        _, _, rows = _small_dataset(data_dir, folder)
        gone = [rows[1], rows[6]]
        for r in gone:  # under error they do not decode (a missing file would stop the data precheck)
            if policy == "skip":
                os.remove(folder / "images" / r["image"])
            else:
                (folder / "images" / r["image"]).write_bytes(b"not an image")
        runs[policy] = (train(config), gone, str(folder / "run"))

    proc, gone, run_dir = runs["skip"]
    check_ok(proc, "the run with two missing images under skip")
    recs = [r for r in metrics(run_dir) if "step" in r]
    assert sum(r["skipped"] for r in recs) == len(gone)
    assert sorted(i for r in recs for i in r.get("skipped_ids", [])) == sorted(f"{r['id']!r} (image_missing)" for r in gone)
    with open(os.path.join(run_dir, "summary.json")) as f:
        (row,) = json.load(f)
    assert row["skipped"] == len(gone) and row["truncated"] == 0
    assert f"skipped during training: {len(gone)} sample reads\n  image_missing: {len(gone)}" in proc.stdout
    assert re.search(rf"s_sft\s+sft\s+student\s+2\s+\S+\s+\S+\s+0\s+{len(gone)}\s", proc.stdout), proc.stdout[-1500:]

    proc_e, gone_e, _ = runs["error"]
    line = _one_line(proc_e.stderr, "kdengine train: error: bad sample id=")
    assert proc_e.returncode == 2 and "[image_corrupt]" in line and any(repr(r["id"]) in line for r in gone_e)
    record("bad_inputs", f"{HERE}::test_lazily_decoded_images", [
        {"input": f"{len(gone)} images missing at training time (check_images: false)", "policy": "on_bad_sample: skip",
         "what it gets": f"exit 0; metrics.jsonl skipped: {sum(r['skipped'] for r in recs)} with their ids; "
                         f"summary skipped: {row['skipped']}"},
        {"input": "an image that does not decode at training time (check_images: false, num_workers: 1)",
         "policy": "on_bad_sample: error",
         "what it gets": f"exit {proc_e.returncode}, one line: {line}"},
    ], strip=tmp_path)


def test_deepspeed_compile_note_only_when_the_op_is_not_built(tmp_path, monkeypatch):
    from kdengine.train.dist import cpu_op_build_note

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    note = cpu_op_build_note()
    assert note.startswith("compiling DeepSpeed's CPU op deepspeed_shm_comm, once, ~1-3 min")
    built = tmp_path / "deepspeed_shm_comm"
    built.mkdir(exist_ok=True)  # _get_build_directory made it
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    assert cpu_op_build_note() is None


def test_only_the_rank_that_meets_an_error_reports_it(monkeypatch, capsys):
    import kdengine.cli as cli
    from kdengine.data.records import BadSample
    from kdengine.train.config import ConfigError

    shared = ConfigError("datasets.instruct.path = 'x.txt': expected a LLaVA .json")
    local = BadSample("image_missing", "image file not found: a.png", "s1", "d.jsonl:3")
    local.rank_local = True
    for rank, err, printed in (("0", shared, True), ("1", shared, False), ("1", local, True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(cli, "_run_train", lambda args, e=err: (_ for _ in ()).throw(e))
        assert cli.main(["train"]) == 2
        out = capsys.readouterr().err
        assert (out.count("\n") == 1 and str(err) in out) if printed else out == "", (rank, out)


def test_two_ranks_report_a_bad_sample_in_one_line_without_rank_prefixes(data_dir, tmp_path):
    import subprocess

    from test_train import TIMEOUT, clean_env, free_port, train_cmd

    config = _small_config(tmp_path, data_dir)
    _, _, rows = _small_dataset(data_dir, tmp_path)
    (tmp_path / "images" / rows[2]["image"]).write_bytes(b"not a png")
    with open(config) as f:
        cfg = __import__("yaml").safe_load(f)
    cfg["stages"][0]["micro_batch_size"] = 2  # 2 ranks x 2 = the global batch of 4
    with open(config, "w") as f:
        __import__("yaml").safe_dump(cfg, f)
    port = free_port()
    procs = [subprocess.Popen(train_cmd(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=1))
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    line = _one_line(outs[0][1], "kdengine train: error: bad sample id=")
    assert f"id={rows[2]['id']!r}" in line and "[image_corrupt]" in line
    assert "kdengine train:" not in outs[1][1] and "Traceback" not in outs[1][1] and "[rank" not in outs[1][1]
    record("bad_inputs", f"{HERE}::test_two_ranks_report_a_bad_sample", [{
        "input": "kdengine train on 2 ranks, a corrupt image", "policy": "on_bad_sample: error",
        "what it gets": f"exit codes {[p.returncode for p in procs]}; rank 0 one line, rank 1 silent, no [rank0]: traceback"}])
