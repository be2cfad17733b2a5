"""A training run's state across stages: process group, run directory, metrics log, the teacher
cache and where each model's latest weights are; opening it writes the synthetic data if missing."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field

import yaml

from kdengine.data import synthesize
from kdengine.train.checkpoint import finished_stage, latest_checkpoint
from kdengine.train.config import SynthConfig, TrainConfig
from kdengine.train.dist import DistInfo, barrier, init_distributed
from kdengine.train.metrics import MetricsLog
from kdengine.train.stage_models import TeacherCache

__all__ = ["Session", "check_run_dir", "close_session", "ensure_synth", "open_session"]


@dataclass
class Session:
    cfg: TrainConfig
    dist: DistInfo
    resume: bool
    log: MetricsLog
    teachers: TeacherCache = field(default_factory=TeacherCache)
    latest: dict[str, str] = field(default_factory=dict)  # model name -> its latest stage output dir
    steps_done: int = 0  # optimizer steps run by this process (all stages; for KDENGINE_KILL_AFTER_STEPS)

    @property
    def run_dir(self) -> str:
        return self.cfg.run.output_dir

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.run_dir, name)


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a run with finished stages or checkpoints unless resuming (cheap, before init)."""
    if resume:
        return
    found = [st.name for st in cfg.stages
             if finished_stage(os.path.join(cfg.run.output_dir, st.name))
             or latest_checkpoint(os.path.join(cfg.run.output_dir, st.name))]
    if found:
        raise ValueError(
            f"run.output_dir = {cfg.run.output_dir!r} already holds stages {found}: "
            f"expected --resume to continue that run, or another output_dir"
        )


def open_session(cfg: TrainConfig, resume: bool) -> Session:
    check_run_dir(cfg, resume)
    dist = init_distributed(cfg.engine.dist_backend, cfg.engine.cpu_threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per stage is ours; no bars for shard reads and writes
    if dist.is_main:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        with open(os.path.join(cfg.run.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    barrier()
    ensure_synth(cfg.synth, dist)
    log = MetricsLog(os.path.join(cfg.run.output_dir, "metrics.jsonl"), enabled=dist.is_main)
    return Session(cfg=cfg, dist=dist, resume=resume, log=log)


def ensure_synth(synth: SynthConfig | None, dist: DistInfo) -> None:
    """Write the synthetic dataset to ``synth.out`` if its meta.json is missing (rank 0, atomic)."""
    if synth is None or os.path.isfile(os.path.join(synth.out, "meta.json")):
        return
    if dist.is_main:
        tmp = synth.out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"synthesizing data into {synth.out}", flush=True)
        synthesize(
            tmp, seed=synth.seed, n_caption=synth.n_caption, n_instruct=synth.n_instruct, n_eval=synth.n_eval,
            image_size=synth.image_size, vocab_size=synth.vocab_size, questions=synth.questions,
        )
        if os.path.isdir(synth.out):  # a folder without meta.json: an interrupted write, replace it
            shutil.rmtree(synth.out)
        os.replace(tmp, synth.out)
    barrier()


def close_session(session: Session) -> None:
    session.teachers.release()
    barrier()
