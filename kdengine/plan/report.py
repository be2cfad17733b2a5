"""``kdengine plan``: per-stage tables, the verdict against a GPU, the cheapest change that fits, JSON."""

from __future__ import annotations

import dataclasses
import math

from kdengine.plan.estimate import ALLOWANCE_BYTES, FRAGMENTATION, Setup, peak_of, plan_stage
from kdengine.plan.gpus import GIB
from kdengine.plan.models import PlanError

__all__ = ["plan_config", "format_plan"]


def _needed(peak: int, cuda: bool) -> int:
    return int(peak * (1 + FRAGMENTATION) + ALLOWANCE_BYTES) if cuda else peak


def _largest_micro_batch(plan, capacity: int, cuda: bool) -> int | None:
    """Largest micro-batch whose need fits, from the step's per-sample slope (two meta runs: 1 and the
    configured micro-batch); None when the stage has no slope (micro-batch 1 or a cache stage)."""
    if plan.per_sample <= 0:
        return None
    spare = capacity - plan.needed
    per = plan.per_sample * ((1 + FRAGMENTATION) if cuda else 1)
    return max(0, plan.micro_batch + math.floor(spare / per))


def _suggest(st, plan, setup: Setup, capacity: int) -> str | None:
    """The first single change (cheapest first) whose plan fits: checkpointing, a higher ZeRO stage
    (more than one rank), a hidden teacher cache, a smaller micro-batch (more accumulation)."""
    stage, cuda = st.stage, setup.device == "cuda"
    mode, mb = st.teacher_mode(), plan.micro_batch
    tries = []
    if not setup.checkpointing:
        tries.append(("engine.activation_checkpointing: true", dict(checkpointing=True)))
    if setup.world_size > 1:
        tries += [(f"ZeRO stage {z} (engine.deepspeed_config)", dict(zero=z)) for z in (2, 3) if z > setup.zero]
    if mode == "live":
        tries.append(("a hidden teacher cache (a teacher_cache stage, mode hidden)", dict(teacher_mode="hidden")))
    for label, change in tries:
        args = {**dict(micro_batch=mb, checkpointing=setup.checkpointing, zero=setup.zero, teacher_mode=mode), **change}
        if _needed(peak_of(st, **args).peak, cuda) <= capacity:
            return label
    fit = _largest_micro_batch(plan, capacity, cuda)
    if fit:
        return f"micro_batch_size: {fit} (more accumulation steps)"
    return None


def plan_config(cfg, setup: Setup, capacity: int | None) -> list[dict]:
    """Every stage's plan as a dict (the --json rows), with the verdict when ``capacity`` is given."""
    rows = []
    for stage in cfg.stages:
        try:
            plan, st = plan_stage(cfg, stage, setup)
        except (PlanError, ValueError, OSError) as err:
            rows.append({"stage": stage.name, "kind": stage.kind, "error": " ".join(str(err).split())})
            continue
        row = dataclasses.asdict(plan)
        row["stage"] = row.pop("name")
        row.pop("error")
        if capacity is not None:
            cuda = setup.device == "cuda"
            row["fits"] = plan.needed <= capacity
            row["margin"] = capacity - plan.needed
            row["largest_micro_batch"] = _largest_micro_batch(plan, capacity, cuda)
            row["suggestion"] = None if row["fits"] else _suggest(st, plan, setup, capacity)
        rows.append(row)
    return rows


def _gb(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_plan(rows: list[dict], setup: Setup, gpu: tuple[str, int] | None) -> str:
    """The per-stage tables and verdicts as text (sizes in GiB)."""
    device = "CUDA bf16" if setup.device == "cuda" else "CPU fp32"
    lines = [f"kdengine plan (PREDICTED): {device}, {setup.world_size} rank(s), ZeRO-{setup.zero}, activation "
             f"checkpointing {'on' if setup.checkpointing else 'off'}"
             + (f", GPU {gpu[0]} ({_gb(gpu[1])} GiB)" if gpu else "") + "; sizes in GiB per rank"]
    for r in rows:
        lines.append("")
        if "error" in r:
            lines.append(f"== {r['stage']} ({r['kind']}): cannot plan: {r['error']}")
            continue
        lines.append(f"== {r['stage']} ({r['kind']}): micro-batch {r['micro_batch']} x {r['length']} tokens, "
                     f"params {r['trainable_params'] / 1e6:.1f}M trainable / {r['frozen_params'] / 1e6:.1f}M frozen")
        width = max(len(k) for k in r["parts"]) + 2
        for k, v in r["parts"].items():
            lines.append(f"  {k:<{width}}{_gb(v):>9}")
        for k, v in r["step_peak"].items():
            lines.append(f"  {'  step with ' + k:<{width}}{_gb(v):>9}")
        lines.append(f"  {'predicted peak (' + r['peak_point'] + ')':<{width}}{_gb(r['peak']):>9}")
        if setup.device == "cuda":
            lines.append(f"  {'+ allowances (1 GiB + 5%)':<{width}}{_gb(r['needed']):>9}")
        if "fits" in r:
            verdict = "fits" if r["fits"] else "DOES NOT FIT"
            lines.append(f"  verdict: {verdict} on {gpu[0]}, margin {_gb(r['margin'])} GiB"
                         + (f"; largest micro-batch {r['largest_micro_batch']}" if r["largest_micro_batch"] else "")
                         + (f"; cheapest change that fits: {r['suggestion']}" if not r["fits"] and r["suggestion"]
                            else "; no single change fits" if not r["fits"] else ""))
        for note in r["notes"]:
            lines.append(f"  note: {note}")
    return "\n".join(lines)
