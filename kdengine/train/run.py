"""The train entry point: config -> session -> stages -> summary -> close."""

from __future__ import annotations

import json
import os

from kdengine.train.config import TrainConfig
from kdengine.train.metrics import format_summary
from kdengine.train.session import close_session, open_session
from kdengine.train.stages import run_stage

__all__ = ["train"]


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Run every stage of ``cfg`` in order (with ``resume``: skip finished stages and continue the
    unfinished one from its last complete checkpoint). Returns the summary rows."""
    session = open_session(cfg, resume)
    try:
        rows = [run_stage(session, i, stage) for i, stage in enumerate(cfg.stages)]
        if session.dist.is_main:
            with open(os.path.join(cfg.run.output_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1)
            print("\n" + format_summary(rows))
            print(f"metrics: {session.log.path}", flush=True)
    finally:
        close_session(session)
    return rows
