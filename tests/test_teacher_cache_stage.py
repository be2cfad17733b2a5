"""The teacher cache in a training pipeline (kdengine train, DeepSpeed on CPU).

Two runs with the same stage list: [teacher_cache t_cache, dft s_dft]. In the online run s_dft
names ``teacher: teacher``; in the cached run ``teacher_cache: t_cache`` and never loads the
teacher. Their per-step losses must agree to 1e-6 relative over 5 steps (each term to 1e-6 of the
loss) and the students end equal. A top-k cache with k = V (fp32) must give the online losses up
to fp32 rounding (the full teacher distribution). A top-k cache imported from JSONL (response
positions only) trains a stage with vis = rel = 0. A run reading the cache under another template
must fail before any step.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
TERMS = ("loss", "ce", "res", "vis", "rel")
VISION = dict(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2,
              vision_intermediate=32, max_positions=256, vision_seed=0)
TEXT = dict(text_heads=4, text_kv_heads=2)
MODELS = {"teacher": dict(**VISION, **TEXT, text_hidden=64, text_layers=2, text_intermediate=128, seed=2),
          "student": dict(**VISION, **TEXT, text_hidden=32, text_layers=1, text_intermediate=64, seed=1)}
STEPS = 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kdengine.data import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out, seed=0, n_caption=2, n_instruct=24, n_eval=1, image_size=32, vocab_size=600)
    return str(out)


def write_config(path, data_dir, run_dir, dft: dict, template="chat", cache=None) -> str:
    tok = os.path.join(data_dir, "tokenizer")
    cfg = {
        "run": {"output_dir": run_dir, "seed": 0},
        "synth": None,
        "datasets": {"instruct": {"path": os.path.join(data_dir, "instruct.json"),
                                  "image_folder": os.path.join(data_dir, "images"), "template": template}},
        "models": {name: {"source": "tiny", "tokenizer": tok, "tiny": tiny} for name, tiny in MODELS.items()},
        "stages": [
            {"name": "t_cache", "kind": "teacher_cache", "model": "teacher", "data": "instruct",
             "cache": cache or {"mode": "hidden", "batch_size": 4, "shard_samples": 8}},
            {"name": "s_dft", "kind": "dft", "model": "student", "data": "instruct", "lr": 1e-3,
             "batch_size": 4, "micro_batch_size": 2, "max_steps": STEPS, **dft},
        ],
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def kdengine(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kdengine.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def train(config: str) -> subprocess.CompletedProcess:
    return kdengine("train", config)


def check_ok(proc, what):
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == "s_dft"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    out = {}
    for name, dft in (("online", {"teacher": "teacher"}), ("cached", {"teacher_cache": "t_cache"})):
        d = tmp_path_factory.mktemp(name)
        config = write_config(d / "config.yaml", data_dir, str(d / "run"), dft)
        if name == "cached":  # the cache stage alone first; the pipeline then finds its cache complete
            check_ok(kdengine("teacher-cache", config, "--stage", "t_cache"), "kdengine teacher-cache")
        proc = train(config)
        check_ok(proc, f"the {name} run")
        out[name] = (str(d / "run"), proc.stdout)
    return out


def test_cached_dft_stage_equals_the_online_one(runs):
    (online, _), (cached, log) = runs["online"], runs["cached"]
    a, b = losses(cached), losses(online)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        # the loss to 1e-6 relative; each term to 1e-6 of the loss: the cache was written in other
        # teacher batches than the stage's, so its states differ from the online ones by fp32 rounding
        for k in TERMS:
            tol = 1e-6 * abs(rb["loss"])
            assert abs(ra[k] - rb[k]) <= tol, f"step {ra['step']} {k}: cached {ra[k]!r} online {rb[k]!r}"
    assert any(r["rel"] > 0 and r["vis"] > 0 for r in a)  # every term of the objective ran
    sa = LlavaForConditionalGeneration.from_pretrained(os.path.join(cached, "s_dft", "model")).state_dict()
    sb = LlavaForConditionalGeneration.from_pretrained(os.path.join(online, "s_dft", "model")).state_dict()
    for name, ref in sb.items():
        torch.testing.assert_close(sa[name], ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert "wrote 0 samples" in log and "teacher cache t_cache" in log  # written before, read instead of the teacher


def test_topk_cache_with_k_equal_v_in_the_pipeline(runs, data_dir, tmp_path):
    online = runs["online"][0]
    with open(os.path.join(online, "s_dft", "model", "config.json")) as f:
        v = json.load(f)["text_config"]["vocab_size"]
    cache = {"mode": "topk", "k": v, "dtype": "float32", "batch_size": 4}
    config = write_config(tmp_path / "config.yaml", data_dir, str(tmp_path / "run"), {"teacher_cache": "t_cache"},
                          cache=cache)
    check_ok(train(config), "the top-k run")
    for ra, rb in zip(losses(str(tmp_path / "run")), losses(online)):
        for k in TERMS:
            assert abs(ra[k] - rb[k]) <= 2e-5 * abs(rb["loss"]), \
                f"step {ra['step']} {k}: top-k {ra[k]!r} online {rb[k]!r}"


def test_imported_topk_cache_trains_a_stage(data_dir, tmp_path):
    from test_teacher_cache import server_records, write_jsonl

    from kdengine.data import LlavaCollator, build_dataset
    from kdengine.model import ModelSpec, TinySpec, build_model, num_image_tokens

    tok = os.path.join(data_dir, "tokenizer")
    teacher, proc = build_model(ModelSpec(source="tiny", tokenizer=tok, tiny=TinySpec(**MODELS["teacher"])))
    p = num_image_tokens(teacher)
    ds = build_dataset(os.path.join(data_dir, "instruct.json"), proc.tokenizer, proc.image_processor,
                       image_folder=os.path.join(data_dir, "images"), num_image_tokens=p, verbose=False)
    recs = server_records(teacher, ds, LlavaCollator(proc.tokenizer.pad_token_id, teacher.config.image_token_id, p),
                          k=4)
    jsonl = write_jsonl(tmp_path / "server.jsonl", recs)
    cache = str(tmp_path / "imported")
    dft = {"teacher_cache": cache, "weights": {"vis": 0.0, "rel": 0.0}}
    config = write_config(tmp_path / "config.yaml", data_dir, str(tmp_path / "run"), dft)
    cfg = yaml.safe_load(open(config))
    cfg["stages"] = cfg["stages"][1:]
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**recs[0], "top_logprobs": [[0.5] * 4] * len(recs[0]["positions"])}])
    proc = kdengine("teacher-cache", "import", bad, "--config", config, "--stage", "s_dft", "--teacher-name", "x",
                    "--k", "4")
    assert proc.returncode == 2 and "bad.jsonl:1 (id" in proc.stderr and "positive" in proc.stderr, proc.stderr
    assert not os.path.exists(cache)  # nothing half-written
    check_ok(kdengine("teacher-cache", "import", jsonl, "--config", config, "--stage", "s_dft",
                      "--teacher-name", "server", "--k", "4"), "kdengine teacher-cache import")
    check_ok(train(config), "training from the imported cache")
    rows = losses(str(tmp_path / "run"))
    assert len(rows) == STEPS and all(r["res"] > 0 and r["vis"] == 0 for r in rows)


def test_a_cache_read_under_another_template_fails_before_any_step(runs, data_dir, tmp_path):
    cache = os.path.join(runs["cached"][0], "t_cache", "cache")
    config = write_config(tmp_path / "config.yaml", data_dir, str(tmp_path / "run"),
                          {"teacher_cache": cache}, template="vicuna")
    cfg = yaml.safe_load(open(config))
    cfg["stages"] = cfg["stages"][1:]  # the cache is a directory now, not a stage of this run
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    proc = train(config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("kdengine train: error: teacher cache")
    assert "does not match the stage: template differs" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(tmp_path, "run", "metrics.jsonl")) or not losses(str(tmp_path / "run"))
