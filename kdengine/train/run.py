"""The train entry point: config -> session -> stages -> summary -> close."""

from __future__ import annotations

import json
import os

from kdengine.train.config import TrainConfig
from kdengine.train.metrics import format_summary
from kdengine.train.session import close_session, open_session
from kdengine.train.stages import run_stage
from kdengine.train.stop import Preempted, StopRequest

__all__ = ["train"]


def train(cfg: TrainConfig, resume: bool = False, changes: list[dict] | None = None) -> list[dict]:
    """Run every stage of ``cfg`` in order (with ``resume``: skip finished stages and continue the
    unfinished one from its last complete checkpoint). ``changes``: the config changes `--resume`
    applies (`kdengine.train.resume.check_resume`), recorded in metrics.jsonl. Returns the summary rows."""
    session = open_session(cfg, resume)
    try:
        for change in changes or []:
            session.log.write({"event": "config_change", **change})
            if session.dist.is_main:
                print(f"--resume applies {change['key']}: {change['old']!r} -> {change['new']!r}", flush=True)
        rows = []
        with StopRequest() as session.stop:
            for i, stage in enumerate(cfg.stages):
                rows.append(run_stage(session, i, stage))
                if i + 1 < len(cfg.stages) and session.stop.requested(session.dist.device):
                    raise Preempted(session.stop.signum, f"after stage {stage.name!r} finished; --resume continues "
                                    f"with stage {cfg.stages[i + 1].name!r}")
        if session.dist.is_main:
            with open(os.path.join(cfg.run.output_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1)
            print("\n" + format_summary(rows))
            print(f"metrics: {session.log.path}", flush=True)
    finally:
        close_session(session)
    return rows
