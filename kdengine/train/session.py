"""A training run's state across stages: process group, run directory, metrics log, the teacher
cache and where each model's latest weights are; opening it writes the synthetic data if missing."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import yaml

from kdengine.data import synthesize
from kdengine.train.checkpoint import remove_leftovers
from kdengine.train.resume import check_run_dir
from kdengine.train.stop import StopRequest
from kdengine.train.config import ConfigError, SynthConfig, TrainConfig
from kdengine.train.dist import DistInfo, barrier, init_distributed
from kdengine.train.metrics import MetricsLog
from kdengine.train.stage_models import TeacherCache

__all__ = ["Session", "close_session", "ensure_synth", "open_session"]


@dataclass
class Session:
    cfg: TrainConfig
    dist: DistInfo
    resume: bool
    log: MetricsLog
    teachers: TeacherCache = field(default_factory=TeacherCache)
    latest: dict[str, str] = field(default_factory=dict)  # model name -> its latest stage output dir
    stop: StopRequest | None = None  # SIGTERM while the stages run (set by `kdengine.train.run.train`)

    @property
    def run_dir(self) -> str:
        return self.cfg.run.output_dir

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.run_dir, name)


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
    if dist.is_main:
        _clean_up_after_a_kill(cfg, log)
    barrier()
    return Session(cfg=cfg, dist=dist, resume=resume, log=log)


def _clean_up_after_a_kill(cfg: TrainConfig, log: MetricsLog) -> None:
    """Remove temporary checkpoint / model directories and a torn metrics line; one line says each."""
    for st in cfg.stages:
        for path in remove_leftovers(os.path.join(cfg.run.output_dir, st.name)):
            print(f"removed {path}, left by an interrupted write", flush=True)
    note = log.repair()
    if note:
        print(note, flush=True)


def ensure_synth(synth: SynthConfig | None, dist: DistInfo) -> None:
    """Write the synthetic dataset to ``synth.out`` if its meta.json is missing (rank 0). `synthesize`
    writes a temporary sibling and renames it: a non-empty folder without meta.json is not its
    output, and is refused rather than replaced."""
    if synth is None or os.path.isfile(os.path.join(synth.out, "meta.json")):
        return
    if dist.is_main:
        print(f"synthesizing data into {synth.out}", flush=True)
        try:
            synthesize(
                synth.out, seed=synth.seed, n_caption=synth.n_caption, n_instruct=synth.n_instruct,
                n_eval=synth.n_eval, image_size=synth.image_size, vocab_size=synth.vocab_size,
                questions=synth.questions,
            )
        except ValueError as err:
            raise ConfigError(f"synth.out: {err}") from None
    barrier()


def close_session(session: Session) -> None:
    session.teachers.release()
    barrier()
