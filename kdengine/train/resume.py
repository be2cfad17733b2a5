"""What ``--resume`` may change: the new config against the one the run's checkpoints were written under.

The run directory keeps the config it ran with (``config.yaml``). On ``--resume`` every key
that differs is either

- refused (ConfigError naming the key and both values) when a stage that already finished, or
  the stage whose checkpoint the run continues from, was built with the old value: its weights,
  optimizer and schedule say the old value, and claiming the new one would be false;
- or applied, when only stages that have not started use it; the change is returned, and the
  trainer records it in metrics.jsonl.

Keys that no stage state depends on (how often to log and checkpoint, how many checkpoints to
keep, data loader workers, CPU threads) are always applied.
"""

from __future__ import annotations

import os

import yaml

from kdengine.losses.settings import BETA_DIVERGENCES, DEFAULT_BETA
from kdengine.train.checkpoint import finished_stage, latest_checkpoint
from kdengine.train.config import ConfigError, TrainConfig

__all__ = ["check_resume", "check_resume_changes", "check_run_dir", "config_changes", "started_stages"]

ALWAYS_APPLIED = ("run.log_every", "run.keep_checkpoints", "engine.num_workers", "engine.cpu_threads")
ALWAYS_APPLIED_STAGE_KEYS = ("checkpoint_every",)


def _flatten(tree, prefix: str, out: dict) -> dict:
    """Dotted key -> leaf value; stages are keyed by name (``stages.<name>.lr``), as --set allows."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix == "stages" and isinstance(tree, list):
        out["stages"] = [s.get("name") for s in tree]  # the order
        for s in tree:
            _flatten(s, f"stages.{s.get('name')}", out)
    else:
        out[prefix] = tree
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs; a missing leaf is None."""
    a, b = _flatten(old, "", {}), _flatten(new, "", {})
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def started_stages(cfg: TrainConfig) -> dict[str, str]:
    """Stage name -> "finished" or "at checkpoint stepNNNNNNNN", for the stages with any state on disk."""
    out = {}
    for st in cfg.stages:
        d = os.path.join(cfg.run.output_dir, st.name)
        if finished_stage(d):
            out[st.name] = "finished"
        else:
            ckpt = latest_checkpoint(d)
            if ckpt:
                out[st.name] = f"at checkpoint {os.path.basename(ckpt)}"
    return out


def _users(key: str, trees: tuple[dict, dict]) -> set[str] | None:
    """The stages a key feeds (None: every stage)."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        return {parts[1]}
    stages = [s for t in trees for s in t.get("stages", [])]
    if parts[0] == "datasets":
        return {s["name"] for s in stages if s.get("data") == parts[1]}
    if parts[0] == "models":
        return {s["name"] for s in stages if parts[1] in (s.get("model"), s.get("teacher"))}
    return None


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a run with finished stages or checkpoints unless resuming (cheap, before init)."""
    if resume:
        return
    found = list(started_stages(cfg))
    if found:
        raise ConfigError(
            f"run.output_dir = {cfg.run.output_dir!r} already holds stages {found}: "
            f"expected --resume to continue that run, or another output_dir"
        )


def check_resume(cfg: TrainConfig, resume: bool) -> list[dict]:
    """The run-directory checks of `check_run_dir` and, with ``resume``, `check_resume_changes`."""
    check_run_dir(cfg, resume)
    return check_resume_changes(cfg) if resume else []


def _effective_beta(tree: dict) -> dict:
    """Each stage's beta as the loss uses it: None for a divergence without one, 0.5 for an unset one.
    Runs saved before beta became divergence-specific wrote ``distill.beta: 0.5`` for every divergence;
    compared this way they still resume, and so does a jsd stage saved with the old explicit default."""
    for stage in tree.get("stages") or []:
        distill = stage.get("distill") if isinstance(stage, dict) else None
        if isinstance(distill, dict):
            if distill.get("divergence") not in BETA_DIVERGENCES:
                distill["beta"] = None
            elif distill.get("beta") is None:
                distill["beta"] = DEFAULT_BETA
    return tree


def check_resume_changes(cfg: TrainConfig) -> list[dict]:
    """Compare ``cfg`` with the run's config.yaml; raise ConfigError on a change a stage's state
    contradicts, return the applied changes as ``{"key", "old", "new"}`` dicts."""
    path = os.path.join(cfg.run.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        old = _effective_beta(yaml.safe_load(f) or {})
    new = _effective_beta(cfg.to_dict())
    started = started_stages(cfg)
    synth_written = cfg.synth is not None and os.path.isfile(os.path.join(cfg.synth.out, "meta.json"))
    applied = []
    for key, was, now in config_changes(old, new):
        stage_key = key.split(".")[-1] if key.startswith("stages.") and key.count(".") >= 2 else None
        if key in ALWAYS_APPLIED or stage_key in ALWAYS_APPLIED_STAGE_KEYS:
            applied.append({"key": key, "old": was, "new": now})
            continue
        if key.startswith("synth.") and synth_written:
            raise ConfigError(f"--resume: {key} = {now!r}, but the run's data was synthesized with {was!r} "
                              f"({cfg.synth.out} exists and is not rewritten); expected {was!r}, or a new run.output_dir")
        if key == "stages":
            done = [n for n in (was or []) if n in started]
            if [n for n in (now or []) if n in started] != done:
                raise ConfigError(f"--resume: stages = {now} but the run started {done} in this order "
                                  f"(of {was}); expected the started stages unchanged")
            applied.append({"key": key, "old": was, "new": now})
            continue
        users = _users(key, (old, new))
        hit = [n for n in started if users is None or n in users]  # in pipeline order
        if key.startswith("engine."):
            hit = [n for n in hit if started[n] != "finished"]  # a finished stage does not run again
        if hit:
            st = hit[0]
            raise ConfigError(
                f"--resume: {key} = {now!r}, but stage {st!r} ({started[st]}) ran with {key} = {was!r} and its state "
                f"says so; expected {was!r} (or a new run.output_dir to train with {now!r})"
            )
        applied.append({"key": key, "old": was, "new": now})
    return applied
