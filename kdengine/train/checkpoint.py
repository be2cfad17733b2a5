"""Checkpoints that are never half-written: everything goes into a temporary directory, a
completeness marker is written last, then one rename makes it visible.

Per stage directory::

    <run_dir>/<stage>/model/              Hugging Face llava directory (safetensors, config, processor,
                                          tokenizer) + stage.json, the marker of a finished stage
    <run_dir>/<stage>/checkpoints/stepNNNNNNNN/
        ds/                               DeepSpeed engine state (trainable weights, optimizer, scheduler)
        rng_rank<r>.pt                    python / numpy / torch RNG states of rank r
        complete.json                     the marker: step, world size (written last, before the rename)

Mid-stage checkpoints of a stage are deleted once its model directory is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from kdengine.train.dist import DistInfo, barrier
from kdengine.train.faults import fault

__all__ = [
    "finished_stage",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_checkpoints",
    "remove_leftovers",
    "save_checkpoint",
    "save_stage_model",
]

STAGE_MARKER = "stage.json"
CKPT_MARKER = "complete.json"
DS_TAG = "ds"


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- stage outputs


def model_dir(stage_dir: str) -> str:
    return os.path.join(stage_dir, "model")


def finished_stage(stage_dir: str) -> dict | None:
    """The stage.json of a finished stage, else None."""
    return _read_json(os.path.join(model_dir(stage_dir), STAGE_MARKER))


def save_stage_model(model, processor, stage_dir: str, info: dict, dist: DistInfo, zero3: bool) -> str:
    """Write the stage's Hugging Face directory atomically; all ranks call (ZeRO-3 gathers)."""
    final, tmp = model_dir(stage_dir), os.path.join(stage_dir, ".model.tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.is_main:
                _save_pretrained(model, processor, tmp)
    elif dist.is_main:
        _save_pretrained(model, processor, tmp)
    if dist.is_main:
        _write_json(os.path.join(tmp, STAGE_MARKER), info)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def _save_pretrained(model, processor, out: str) -> None:
    was_training = model.training
    model.eval()
    model.save_pretrained(out)
    fault("model_mid")  # the weights written, the processor and the marker not yet
    processor.save_pretrained(out)
    model.train(was_training)


# ----------------------------------------------------------------------------- resumable checkpoints


def _ckpt_root(stage_dir: str) -> str:
    return os.path.join(stage_dir, "checkpoints")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, stage_dir: str, step: int, client_state: dict, dist: DistInfo, keep: int) -> str:
    """DeepSpeed state after ``step`` optimizer steps, plus every rank's RNG; all ranks call."""
    root = _ckpt_root(stage_dir)
    name = f"step{step:08d}"
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    engine.save_checkpoint(tmp, tag=DS_TAG, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    fault("ckpt_mid")  # DeepSpeed's state written, no RNG state, no marker
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{dist.rank}.pt"))
    barrier()
    if dist.is_main:
        _write_json(os.path.join(tmp, CKPT_MARKER), {"step": step, "world_size": dist.world_size, **client_state})
        fault("ckpt_before_rename")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _complete(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return final


def _complete(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step") and os.path.isfile(os.path.join(root, n, CKPT_MARKER))]
    return sorted(names)


def latest_checkpoint(stage_dir: str) -> str | None:
    """The newest complete checkpoint directory of a stage (temporary leftovers are ignored)."""
    names = _complete(_ckpt_root(stage_dir))
    return os.path.join(_ckpt_root(stage_dir), names[-1]) if names else None


def load_checkpoint(engine, path: str, dist: DistInfo) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the marker dict."""
    meta = _read_json(os.path.join(path, CKPT_MARKER))
    if meta is None:
        raise ValueError(f"{path}: no {CKPT_MARKER}; expected a complete checkpoint")
    if meta["world_size"] != dist.world_size:
        raise ValueError(
            f"{path} was written by {meta['world_size']} ranks but this run has {dist.world_size}; "
            f"expected the same world size to resume"
        )
    loaded, _ = engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise ValueError(f"{path}: DeepSpeed could not load the checkpoint")
    set_rng_state(torch.load(os.path.join(path, f"rng_rank{dist.rank}.pt"), weights_only=False))
    return meta


def remove_leftovers(stage_dir: str) -> list[str]:
    """Remove the temporary directories an interrupted write left in a stage directory (rank 0);
    returns their paths. They are never read (only renamed, complete directories are)."""
    root = _ckpt_root(stage_dir)
    found = [os.path.join(stage_dir, ".model.tmp")]
    if os.path.isdir(root):
        found += [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith(".tmp-")]
    found = [p for p in found if os.path.exists(p)]
    for p in found:
        shutil.rmtree(p)
    return found


def remove_checkpoints(stage_dir: str, dist: DistInfo) -> None:
    if dist.is_main:
        shutil.rmtree(_ckpt_root(stage_dir), ignore_errors=True)
    barrier()
