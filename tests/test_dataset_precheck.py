"""The data of every stage is checked before the first stage trains (kdengine.train.run.precheck_datasets).

Cheap checks only: records parse and validate, image files are present and not empty; no image is
decoded (that stays lazy, or at the stage's start under check_images). A bad record raises one line
naming the dataset, the stages reading it, the record and the path, unless the dataset skips bad
samples: then it is counted. End to end: a run whose second stage reads a missing image stops before
the first stage takes a step, and the same pipeline on good data (or skipping the bad record) trains.
"""

import json
import os
import shutil

import pytest
import yaml

from kdengine.data import synthesize
from kdengine.data.records import BadSample, check_image_file, load_records, precheck_records
from kdengine.train.config import ConfigError, load_config
from kdengine.train.run import precheck_datasets
from test_train import check_ok, metrics, run_train, write_config

MISSING = "missing/nowhere.png"
B4 = dict(batch_size=4, micro_batch_size=4, max_steps=1)
TWO_STAGES = [
    dict(name="t_pt", kind="pt", model="teacher", data="pretrain", lr=2e-3, **B4),
    dict(name="t_sft", kind="sft", model="teacher", data="broken", lr=1e-3, **B4),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthesize(out, seed=0, n_caption=16, n_instruct=16, n_eval=2, image_size=32, vocab_size=600)
    return str(out)


def with_images(data_dir: str) -> list[dict]:
    with open(os.path.join(data_dir, "instruct.json")) as f:
        return [r for r in json.load(f) if "image" in r]


def broken_copy(data_dir: str, tmp_path, image: str = MISSING, index: int = 3) -> tuple[str, dict]:
    """instruct.json's records with images, record ``index`` pointing at ``image``; (path, that record)."""
    records = with_images(data_dir)
    records[index]["image"] = image
    path = str(tmp_path / "broken.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, records[index]


def config(data_dir: str, tmp_path, broken: str, stages=TWO_STAGES, **dataset) -> str:
    """test_train's two-model config plus dataset ``broken`` (instruct's settings on ``broken``)."""
    path = write_config(tmp_path / "cfg.yaml", data_dir, str(tmp_path / "run"), stages)
    with open(path) as f:
        tree = yaml.safe_load(f)
    tree["datasets"]["broken"] = {**tree["datasets"]["instruct"], "path": broken, **dataset}
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return path


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("kind, reason", [("missing", "image_missing"), ("empty", "image_corrupt"),
                                          ("folder", "image_unreadable")])
def test_precheck_records_finds_image_files_that_cannot_load(data_dir, tmp_path, kind, reason):
    images = os.path.join(data_dir, "images")
    rel = {"missing": MISSING, "empty": "empty.png", "folder": "a_folder"}[kind]
    target = tmp_path / "images"
    shutil.copytree(images, target)
    if kind == "empty":
        (target / rel).write_bytes(b"")
    if kind == "folder":
        (target / rel).mkdir()
    path, rec = broken_copy(data_dir, tmp_path, rel)
    with pytest.raises(BadSample) as err:
        precheck_records(path, str(target))
    assert (err.value.reason, err.value.sample_id, err.value.where) == (reason, rec["id"], f"{path}[index 3]")
    assert str(target / rel) in str(err.value)
    summary = precheck_records(path, str(target), on_bad_sample="skip")  # the skip policy counts it
    assert (summary.total, summary.kept, dict(summary.counts)) == (len(with_images(data_dir)),
                                                                  len(with_images(data_dir)) - 1, {reason: 1})


def test_precheck_decodes_no_image(data_dir, tmp_path):
    """A present, non-empty file that is not an image passes the precheck (decoding stays lazy); decoding
    at load (check_images: true) finds it, and check_images: false does no image I/O at all."""
    target = tmp_path / "images"
    shutil.copytree(os.path.join(data_dir, "images"), target)
    (target / "garbage.png").write_bytes(b"not a png at all")
    path, rec = broken_copy(data_dir, tmp_path, "garbage.png")
    assert precheck_records(path, str(target)).kept == len(with_images(data_dir))
    with pytest.raises(BadSample, match=r"\[image_corrupt\]"):
        load_records(path, str(target), check_images=True)
    missing, _ = broken_copy(data_dir, tmp_path, MISSING)
    records, summary = load_records(missing, str(target), check_images=False)
    assert len(records) == summary.total == len(with_images(data_dir))


def test_check_image_file_accepts_a_present_image(data_dir):
    rec = with_images(data_dir)[0]
    assert check_image_file(os.path.join(data_dir, "images", rec["image"])) is None


# ----------------------------------------------------------------------------- the stages' datasets


def test_precheck_names_dataset_stages_record_and_path(data_dir, tmp_path):
    broken, rec = broken_copy(data_dir, tmp_path)
    stages = TWO_STAGES + [dict(name="t_sft2", kind="sft", model="teacher", data="broken", lr=1e-3, **B4)]
    cfg = load_config(config(data_dir, tmp_path, broken, stages))
    with pytest.raises(BadSample) as err:
        precheck_datasets(cfg, cfg.stages)
    missing = os.path.join(data_dir, "images", MISSING)
    assert str(err.value) == (f"datasets.broken (stages t_sft, t_sft2): bad sample id={rec['id']!r} at "
                              f"{broken}[index 3] [image_missing]: image file not found: {missing}")
    assert set(precheck_datasets(cfg, cfg.stages[:1])) == {"pretrain"}  # only the datasets of the stages given


def test_precheck_counts_under_skip_and_refuses_all_bad(data_dir, tmp_path):
    broken, _ = broken_copy(data_dir, tmp_path)
    cfg = load_config(config(data_dir, tmp_path, broken, on_bad_sample="skip"))
    summaries = precheck_datasets(cfg, cfg.stages)
    assert dict(summaries["broken"].counts) == {"image_missing": 1}
    assert summaries["pretrain"].skipped == 0 and summaries["pretrain"].total > 0

    all_bad = tmp_path / "all_bad.json"
    all_bad.write_text(json.dumps([{**r, "image": MISSING} for r in with_images(data_dir)]))
    cfg.datasets["broken"].path = str(all_bad)
    with pytest.raises(ConfigError, match=r"^datasets.broken \(stage t_sft\): all \d+ records are bad "
                                          r"\(image_missing \d+\); expected usable records$"):
        precheck_datasets(cfg, cfg.stages)


# ----------------------------------------------------------------------------- end to end


def test_missing_image_of_the_second_stage_stops_the_run_before_the_first_trains(data_dir, tmp_path):
    broken, rec = broken_copy(data_dir, tmp_path)
    proc = run_train(config(data_dir, tmp_path, broken))
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("kdengine train:")]
    missing = os.path.join(data_dir, "images", MISSING)
    assert said == [f"kdengine train: error: datasets.broken (stage t_sft): bad sample id={rec['id']!r} at "
                    f"{broken}[index 3] [image_missing]: image file not found: {missing}"]
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "run"
    assert not (run_dir / "t_pt").exists(), "stage 1 started"
    assert not (run_dir / "metrics.jsonl").exists() or metrics(str(run_dir)) == []


@pytest.mark.parametrize("data", ["good", "skip"])
def test_the_pipeline_trains_on_good_data_and_when_skipping(data_dir, tmp_path, data):
    """Good data trains both stages; with on_bad_sample: skip (and lazy images) the bad record is counted
    before training and both stages train."""
    if data == "good":
        path, extra = os.path.join(data_dir, "instruct.json"), {}
    else:
        path, extra = broken_copy(data_dir, tmp_path)[0], dict(on_bad_sample="skip", check_images=False)
    proc = run_train(config(data_dir, tmp_path, path, **extra))
    check_ok(proc, f"training on {data} data")
    assert [r["stage"] for r in metrics(str(tmp_path / "run")) if "step" in r] == ["t_pt", "t_sft"]
    n = len(with_images(data_dir))
    counted = f"datasets.broken, checked before training: data: {n - 1}/{n} samples kept (0 truncated), 1 skipped"
    assert (counted in proc.stdout) == (data == "skip"), proc.stdout[-3000:]
