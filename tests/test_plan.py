"""kdengine plan: the GPU table, bad input, and predicted (meta) vs measured (real CPU tensors) step peaks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kdengine.plan.estimate import Setup, plan_stage
from kdengine.plan.gpus import GIB, GPUS, MIB, parse_gpu
from kdengine.plan.live_bytes import TorchOps
from kdengine.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_names_and_sizes():
    assert parse_gpu("a100-80gb") == ("A100-80GB", 81920 * MIB)
    assert parse_gpu("24GB") == ("24GB", 24 * GIB)
    with pytest.raises(ValueError) as err:
        parse_gpu("A200")
    assert "'A200'" in str(err.value) and all(name in str(err.value) for name in GPUS)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "kdengine.cli", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unknown_gpu_is_one_line_naming_the_known_ones():
    r = _cli("configs/tiny.yaml", "--gpu", "A200")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'A200'" in lines[0] and "H100-80GB" in lines[0], r.stderr


def test_tiny_plan_json_verdicts():
    r = _cli("configs/tiny.yaml", "--gpu", "A100-80GB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [s["stage"] for s in out["stages"]] == ["teacher_pt", "teacher_sft", "student_dpt", "student_sft",
                                                   "student_dft"]
    for s in out["stages"]:
        assert s["fits"] and s["margin"] > 70 * GIB
        assert s["step_peak"]["checkpointing"] < s["step_peak"]["no checkpointing"]
        assert s["needed"] > s["peak"] > 0
        assert s["largest_micro_batch"] > s["micro_batch"]


def _real_step_peak(cfg, stage) -> tuple[int, int]:
    """(weights, tracker peak of two real steps beyond them) of a stage on CPU fp32 with real tensors: the
    models of the plan materialised on the CPU, the trainer's objective and AdamW."""
    from kdengine.model import set_trainable
    from kdengine.plan.models import build_meta_model
    from kdengine.plan.step import run_step, synthetic_batch
    from kdengine.train.optim import build_optimizer
    from kdengine.train.stage_models import Teacher
    from kdengine.train.student_module import StudentObjective

    def real(name):
        m = build_meta_model(cfg.models[name], f"models.{name}", cfg.synth.vocab_size, torch.float32)
        m.model = type(m.model)(m.model.config)  # the same class and config, on the CPU with its buffers
        return m

    s = real(stage.model)
    set_trainable(s.model, stage.trainable)
    s.model.train()
    teacher, share = None, False
    weights = sum(p.numel() * 4 for p in s.model.parameters())
    if stage.distills:
        t = real(stage.teacher).model.eval().requires_grad_(False)
        teacher, share = Teacher(t, None, t.get_output_embeddings().weight.detach()), True
        weights += sum(p.numel() * 4 for p in t.parameters())
    objective = StudentObjective(s.model, stage.weights, stage.distill, s.num_image_tokens)
    optimizer = build_optimizer(objective, stage.lr, stage.weight_decay)
    batch = synthetic_batch(stage.micro_batch_size, 512, s.num_image_tokens, s.image_size, s.image_token_id)
    return weights, run_step(objective, batch, teacher, share, optimizer=optimizer, steps=2).peak


@pytest.mark.parametrize("name", ["teacher_pt", "teacher_sft", "student_dpt", "student_sft", "student_dft"])
def test_predicted_peak_matches_a_real_cpu_step(name):
    """configs/tiny.yaml, CPU fp32, one rank: the plan's peak against the same step run for real (two steps,
    so AdamW's states are alive in the second), within 15% or 8 MB."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), check_paths=False)
    stage = next(st for st in cfg.stages if st.name == name)
    plan, _ = plan_stage(cfg, stage, Setup(device="cpu"))
    weights, step = _real_step_peak(cfg, stage)
    measured = weights + step
    assert abs(plan.peak - measured) <= max(0.15 * measured, 8 * MIB), (
        f"{name}: predicted {plan.peak / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB")
