"""The train entry point: config -> session -> stages -> summary -> close."""

from __future__ import annotations

import json
import os

from kdengine.data.records import BadSample, BadSampleSummary, precheck_records
from kdengine.train.checkpoint import finished_stage
from kdengine.train.config import ConfigError, StageConfig, TrainConfig
from kdengine.train.kinds import KINDS
from kdengine.train.metrics import format_summary
from kdengine.train.session import close_session, open_session
from kdengine.train.stages import run_stage
from kdengine.train.stop import Preempted, StopRequest

__all__ = ["precheck_datasets", "train"]


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
        to_run = [st for st in cfg.stages  # a stage that trains nothing (a cache) always runs: it resumes its output
                  if not KINDS[st.kind].trains or finished_stage(session.stage_dir(st.name)) is None]
        for name, summary in precheck_datasets(cfg, to_run).items():
            if summary.skipped and session.dist.is_main:
                print(f"datasets.{name}, checked before training: {summary.format()}", flush=True)
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


def precheck_datasets(cfg: TrainConfig, stages: list[StageConfig]) -> dict[str, BadSampleSummary]:
    """The data of ``stages``, checked before the first of them trains, as far as that is cheap: every
    record of every dataset they read parses and validates, and every image file it names is present and
    not empty (no decode; images load when their stage builds its dataset, or lazily, as before).

    A bad record raises BadSample led by the dataset and the stages reading it, unless the dataset skips
    bad samples (``on_bad_sample: skip``): then it is counted. Returns {dataset name: summary}.
    A teacher_cache stage's output is a cache directory, not a dataset: nothing here reads it."""
    readers: dict[str, list[str]] = {}
    for st in stages:
        readers.setdefault(st.data, []).append(st.name)
    summaries = {}
    for name, names in readers.items():
        ds = cfg.datasets[name]
        where = f"datasets.{name} (stage{'s' if len(names) > 1 else ''} {', '.join(names)})"
        try:
            summary = precheck_records(ds.path, ds.image_folder, ds.on_bad_sample)
        except BadSample as err:
            raise err.within(where) from None
        except (ValueError, OSError) as err:  # a broken JSON list, a file gone since the config was checked
            raise ConfigError(f"{where}: {err}") from None
        if summary.total and not summary.kept:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.counts.items()))
            raise ConfigError(f"{where}: all {summary.total} records are bad ({reasons}); expected usable records")
        summaries[name] = summary
    return summaries
