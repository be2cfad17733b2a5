"""kdengine.train end to end on CPU (DeepSpeed cpu accelerator, gloo).

A tiny five-stage pipeline (teacher pt, sft; student dpt, sft, dft) runs once as a subprocess
and is the reference for: the artifacts, frozen components, and a run killed mid-stage
(SIGKILL) then resumed, whose losses must equal the reference's bit for bit. Two ranks with
ZeRO-2 must match one rank with the same global batch. In process: the loss falls on a fixed
batch under ZeRO 0 / 1 / 3 while frozen components keep their values.

The first DeepSpeed start on a machine compiles a small op (about a minute or two); later starts
take seconds.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

from kdengine.model import ModelSpec, TinySpec, build_model, component_modules
from reliability_report import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
COMPARED = ("stage", "step", "loss", "ce", "res", "vis", "rel", "lr", "grad_norm", "tokens")
TIMEOUT = 900  # seconds per subprocess; the first one may compile DeepSpeed's op

VISION = dict(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2,
              vision_intermediate=32, max_positions=256, vision_seed=0)
TEXT = dict(text_heads=4, text_kv_heads=2)
TEACHER = TinySpec(**VISION, **TEXT, text_hidden=64, text_layers=2, text_intermediate=128, seed=2)
STUDENT = TinySpec(**VISION, **TEXT, text_hidden=32, text_layers=1, text_intermediate=64, seed=1)

# The pipeline: 2 + 2 steps of teacher, then the student; dpt and dft accumulate 2 micro-batches.
B4 = dict(batch_size=4, micro_batch_size=4)
PIPELINE = [
    dict(name="t_pt", kind="pt", model="teacher", data="pretrain", lr=2e-3, max_steps=2, **B4),
    dict(name="t_sft", kind="sft", model="teacher", data="instruct", lr=1e-3, max_steps=2, **B4),
    dict(name="s_dpt", kind="dpt", model="student", teacher="teacher", data="pretrain", lr=2e-3, batch_size=4,
         micro_batch_size=2, max_steps=5, checkpoint_every=2),
    dict(name="s_sft", kind="sft", model="student", data="instruct", lr=1e-3, max_steps=2, **B4),
    dict(name="s_dft", kind="dft", model="student", teacher="teacher", data="instruct", lr=1e-3, batch_size=4,
         micro_batch_size=2, max_steps=4, checkpoint_every=2),
]
KILL_AFTER = 2 + 2 + 3  # optimizer steps: killed after s_dpt step 3, its last checkpoint is step 2


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kdengine.data import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out, seed=0, n_caption=40, n_instruct=40, n_eval=2, image_size=32, vocab_size=600)
    return str(out)


def spec(data_dir: str, sizes: TinySpec) -> ModelSpec:
    return ModelSpec(source="tiny", tokenizer=os.path.join(data_dir, "tokenizer"), tiny=sizes)


def write_config(path, data_dir: str, run_dir: str, stages: list[dict], **engine) -> str:
    images = os.path.join(data_dir, "images")
    tiny = {name: {"source": "tiny", "tokenizer": os.path.join(data_dir, "tokenizer"), "tiny": vars(sizes)}
            for name, sizes in (("teacher", TEACHER), ("student", STUDENT))}
    cfg = {
        "run": {"output_dir": run_dir, "seed": 0},
        "synth": None,
        "datasets": {
            "pretrain": {"path": os.path.join(data_dir, "pretrain.json"), "image_folder": images, "template": "plain"},
            "instruct": {"path": os.path.join(data_dir, "instruct.json"), "image_folder": images, "template": "chat"},
        },
        "models": tiny,
        "engine": engine,
        "stages": stages,
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", **{k: str(v) for k, v in extra.items()})
    return env


def train_cmd(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kdengine.cli", "train", config, *args]


def run_train(config: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, *args), cwd=ROOT, env=clean_env(**env), capture_output=True, text=True,
                          timeout=TIMEOUT)


def check_ok(proc, what: str) -> None:
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_stage(run_dir: str, stage: str) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(os.path.join(run_dir, stage, "model"))


def components(model) -> dict[str, dict[str, torch.Tensor]]:
    """Component name -> {parameter name: detached copy}."""
    return {name: {f"{i}.{k}": v.detach().clone() for i, m in enumerate(mods) for k, v in m.state_dict().items()}
            for name, mods in component_modules(model).items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the reference pipeline


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = str(tmp / "run")
    config = write_config(tmp / "cfg.yaml", data_dir, run_dir, PIPELINE)
    proc = run_train(config)
    check_ok(proc, "the reference pipeline")
    return {"config": config, "run_dir": run_dir, "stdout": proc.stdout}


def test_pipeline_runs_all_four_stage_kinds(reference_run):
    run_dir = reference_run["run_dir"]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    expected = [(s["name"], s["kind"], s["max_steps"]) for s in PIPELINE]
    assert [(r["stage"], r["kind"], r["steps"]) for r in summary] == expected
    assert "stage" in reference_run["stdout"] and "s_dft" in reference_run["stdout"]  # the summary table
    records = metrics(run_dir)
    for st in PIPELINE:
        rows = [r for r in records if r["stage"] == st["name"]]
        assert [r["step"] for r in rows] == list(range(1, st["max_steps"] + 1)), st["name"]
        terms = ("loss", "ce", "res", "vis", "rel") if st["kind"] in ("dpt", "dft") else ("loss", "ce")
        for r in rows:
            for k in (*terms, "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
                assert isinstance(r[k], float) and r[k] == r[k] and abs(r[k]) < float("inf"), (st["name"], k, r[k])
            assert r["tokens"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0
            if st["kind"] in ("pt", "sft"):
                assert "res" not in r and r["loss"] == r["ce"]
        stage_dir = os.path.join(run_dir, st["name"])
        assert os.path.isfile(os.path.join(stage_dir, "loss.png"))
        assert not os.path.exists(os.path.join(stage_dir, "checkpoints"))  # removed once the stage finished
        model_dir = os.path.join(stage_dir, "model")
        assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
        # Loads with plain transformers: weights, config, processor and tokenizer.
        model = LlavaForConditionalGeneration.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir)
        assert processor.image_token_id == model.config.image_token_id
        assert model.config.text_config.hidden_size == (64 if st["model"] == "teacher" else 32)


def test_frozen_components_do_not_change(reference_run, data_dir):
    run_dir = reference_run["run_dir"]
    fresh_teacher = components(build_model(spec(data_dir, TEACHER))[0])
    fresh_student = components(build_model(spec(data_dir, STUDENT))[0])
    after = {st["name"]: components(load_stage(run_dir, st["name"])) for st in PIPELINE}
    before = {"t_pt": fresh_teacher, "t_sft": after["t_pt"], "s_dpt": fresh_student, "s_sft": after["s_dpt"],
              "s_dft": after["s_sft"]}
    trained = {"pt": {"projector"}, "dpt": {"projector"}, "sft": {"projector", "language_model"},
               "dft": {"projector", "language_model"}}
    for st in PIPELINE:
        for comp in ("vision_tower", "projector", "language_model"):
            same = equal(before[st["name"]][comp], after[st["name"]][comp])
            if comp in trained[st["kind"]]:
                assert not same, f"{st['name']}: trainable {comp} did not change"
            else:
                assert same, f"{st['name']}: frozen {comp} changed"


def test_kill_mid_stage_then_resume_reproduces_the_losses(reference_run, data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    config = write_config(tmp_path / "cfg.yaml", data_dir, run_dir, PIPELINE)
    killed = run_train(config, KDENGINE_KILL_AFTER_STEPS=KILL_AFTER)
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}:\n{killed.stderr[-3000:]}"
    dpt = os.path.join(run_dir, "s_dpt")
    assert os.path.isfile(os.path.join(dpt, "checkpoints", "step00000002", "complete.json"))
    assert not os.path.exists(os.path.join(dpt, "model"))
    assert [r["step"] for r in metrics(run_dir) if r["stage"] == "s_dpt"] == [1, 2, 3]
    # A half-written checkpoint left by a crash is ignored.
    os.makedirs(os.path.join(dpt, "checkpoints", ".tmp-step00000004", "ds"))

    again = run_train(config)  # without --resume the run directory is refused
    assert again.returncode != 0 and "expected --resume" in again.stderr

    resumed = run_train(config, "--resume")
    check_ok(resumed, "the resumed run")
    assert "resuming from" in resumed.stdout and "step00000002" in resumed.stdout
    assert "(already done)" in resumed.stdout  # t_pt and t_sft skipped
    ref, got = metrics(reference_run["run_dir"]), metrics(run_dir)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in ref]
    for a, b in zip(ref, got):
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}, (a["stage"], a["step"])
    final_ref = components(load_stage(reference_run["run_dir"], "s_dft"))
    final_got = components(load_stage(run_dir, "s_dft"))
    for comp in final_ref:
        assert equal(final_ref[comp], final_got[comp]), comp


def test_two_rank_zero2_matches_one_rank(data_dir, tmp_path):
    stage = dict(name="s_dft", kind="dft", model="student", teacher="teacher", data="instruct", lr=1e-3,
                 batch_size=4, micro_batch_size=2, max_steps=4)
    one = write_config(tmp_path / "one.yaml", data_dir, str(tmp_path / "one"), [stage], zero_stage=2)
    two = write_config(tmp_path / "two.yaml", data_dir, str(tmp_path / "two"), [stage], zero_stage=2)
    port = free_port()
    ranks = [
        subprocess.Popen(train_cmd(two), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=clean_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)
    ]
    try:
        single = run_train(one)
        outs = [p.communicate(timeout=TIMEOUT) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    for r, (p, (out, err)) in enumerate(zip(ranks, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{err[-4000:]}"
    check_ok(single, "the one-rank run")
    assert "2 micro x 2 ranks x 1 accumulation" in outs[0][0]
    assert "2 micro x 1 ranks x 2 accumulation" in single.stdout
    a, b = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        for k in ("loss", "ce", "res", "vis", "rel", "grad_norm", "lr"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (x["step"], k)
    wa = components(load_stage(str(tmp_path / "one"), "s_dft"))
    wb = components(load_stage(str(tmp_path / "two"), "s_dft"))
    for comp in wa:
        for k in wa[comp]:
            torch.testing.assert_close(wb[comp][k], wa[comp][k], rtol=1e-5, atol=1e-6, msg=f"{comp} {k}")
    worst = max(abs(y[k] - x[k]) / max(abs(x[k]), 1e-30) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
    same = sum(x[k] == y[k] for x, y in zip(a, b) for k in ("loss", "ce", "res", "vis", "rel", "grad_norm"))
    weights = max(float((wb[c][k] - wa[c][k]).abs().max()) for c in wa for k in wa[c])
    record("ranks", "test_train.py::test_two_rank_zero2_matches_one_rank", [{
        "check": f"ZeRO-2, 2 ranks x micro 2 vs 1 rank x 2 accumulation, {len(a)} dft steps",
        "result": f"tokens equal every step; {same}/{6 * len(a)} loss terms and grad norms bitwise equal, worst "
                  f"relative difference {worst:.1e} (loss, grad norm); final weights max |diff| {weights:.1e}",
    }])


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def one_rank(monkeypatch):
    """A world of one in this process (environment restored afterwards)."""
    from kdengine.train.dist import init_distributed

    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    threads = torch.get_num_threads()
    yield init_distributed(cpu_threads=1)
    torch.set_num_threads(threads)


# A projector alone moves the loss of an untrained language model little (measured: -0.5% in 12
# steps), the whole model a lot (measured: more than -40%).
FIXED_BATCH = [("dpt", 0, 1e-2, 0.003), ("dft", 1, 3e-3, 0.2), ("dft", 3, 3e-3, 0.2)]


@pytest.mark.parametrize("kind, zero, lr, min_drop", FIXED_BATCH, ids=["dpt-zero0", "dft-zero1", "dft-zero3"])
def test_loss_decreases_on_a_fixed_batch(one_rank, data_dir, kind, zero, lr, min_drop):
    import deepspeed

    from kdengine.data import LlavaCollator
    from kdengine.model import num_image_tokens, set_trainable
    from kdengine.train.batches import StepPlan, build_stage_dataset
    from kdengine.train.config import DatasetConfig, EngineConfig, StageConfig
    from kdengine.train.stage_models import Teacher
    from kdengine.train.stages import build_engine, train_step
    from kdengine.train.student_module import StudentObjective

    teacher_model, _ = build_model(spec(data_dir, TEACHER))
    teacher_model.requires_grad_(False)
    teacher = Teacher(teacher_model, None, teacher_model.get_output_embeddings().weight.detach())
    student, processor = build_model(spec(data_dir, STUDENT))
    stage = StageConfig(name="fixed", kind=kind, model="student", data="instruct", teacher="teacher", lr=lr,
                        warmup_ratio=0.0, batch_size=4, micro_batch_size=4, max_steps=100)
    set_trainable(student, stage.trainable)
    student.train()
    before = components(student)
    n_img = num_image_tokens(student)
    data = DatasetConfig(path=os.path.join(data_dir, "instruct.json"), image_folder=os.path.join(data_dir, "images"))
    dataset = build_stage_dataset(data, processor, n_img, verbose=False)
    picks = [i for i, mm in enumerate(dataset.is_multimodal) if mm][:4]
    collator = LlavaCollator(processor.tokenizer.pad_token_id, student.config.image_token_id, n_img)
    batch = collator([dataset[i] for i in picks])
    plan = StepPlan.build(dataset, stage, one_rank, seed=0)
    engine = build_engine(StudentObjective(student, stage.weights, stage.distill, n_img), stage, plan,
                          EngineConfig(zero_stage=zero), one_rank)
    losses = []
    for _ in range(12):
        terms, tokens, gnorm, skipped = train_step(engine, [batch], teacher, share=True)
        assert set(terms) == {"loss", "ce", "res", "vis", "rel"} and tokens == int(batch["attention_mask"].sum())
        assert skipped == []
        assert gnorm is not None and gnorm > 0
        losses.append(float(terms["loss"]))
    assert all(x == x for x in losses), losses
    assert losses[-1] < (1 - min_drop) * losses[0], f"loss did not fall by {min_drop:.1%} on a fixed batch: {losses}"
    params = list(student.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
        after = components(student)
    for comp in ("vision_tower", "projector", "language_model"):
        same = equal(before[comp], after[comp])
        assert same == (comp not in stage.trainable), f"{comp}: unchanged={same}, trainable={stage.trainable}"


# ----------------------------------------------------------------------------- small parts


def test_warmup_cosine_schedule():
    from kdengine.train.optim import WarmupCosine

    f = WarmupCosine(total=100, warmup_ratio=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert 0 < f(99) < 1e-3
    assert all(f(s) >= f(s + 1) for s in range(10, 99))
    assert WarmupCosine(total=5, warmup_ratio=0.0)(0) == 1.0


def test_loss_curve_png_and_the_note_without_matplotlib(tmp_path, monkeypatch):
    from kdengine.train.plots import plot_stage

    rows = [{"step": i, "loss": 3.0 / i, "ce": 2.0 / i} for i in range(1, 6)]
    assert plot_stage(rows, str(tmp_path / "a.png"), "a") is None
    assert (tmp_path / "a.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = plot_stage(rows, str(tmp_path / "b.png"), "b")
    assert note is not None and "matplotlib is not installed" in note
    assert not (tmp_path / "b.png").exists()
