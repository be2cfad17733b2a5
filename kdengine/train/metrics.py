"""What a user sees: the metrics JSONL, a progress bar per stage, peak memory, the final summary.

One JSON object per logged optimizer step in ``<run_dir>/metrics.jsonl``::

    {"stage", "kind", "step" (1-based, within the stage), "total_steps", "epoch",
     "loss", "ce", ["res", "vis", "rel"]  (means over the step's micro-batches and ranks),
     "lr", "grad_norm", "tokens" (non-pad tokens of the global batch), "tokens_per_s",
     "step_time_s", "peak_mem_mb", "time" (unix seconds),
     "skipped" (samples dropped while loading since the previous record, all ranks),
     ["skipped_ids"] (rank 0's first few)}

peak_mem_mb: on CUDA the peak memory allocated by torch on this rank's device, on CPU the
process's peak resident set size (rank 0).
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

from kdengine.losses.checks import LOSS_TERMS
from kdengine.train.config import ConfigError
from kdengine.train.faults import fault

__all__ = ["MetricsLog", "Progress", "format_summary", "peak_memory_mb"]


class MetricsLog:
    """Append-only JSONL of metrics records, written by rank 0 only.

    Besides the step records it holds events, ``{"event": "config_change", "key", "old", "new"}``
    (what ``--resume`` changed). A kill in the middle of a write leaves a torn last line; `repair`
    drops it (and says so) when the next run starts.
    """

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            line = json.dumps(record) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                fault("metrics_mid")
                f.write(line[len(line) // 2 :])

    def _read(self) -> tuple[list[dict], str | None]:
        """(records, the torn last line or None); a bad line before the last is an error naming it."""
        if not os.path.isfile(self.path):
            return [], None
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
        rows = []
        for k, (lineno, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if k == len(lines) - 1:
                    return rows, line
                raise ConfigError(f"{self.path}:{lineno}: not a JSON record (only the last line can be torn by a "
                                  f"kill); expected one JSON object per line") from None
        return rows, None

    def records(self, stage: str | None = None) -> list[dict]:
        rows, _ = self._read()
        return [r for r in rows if stage is None or r.get("stage") == stage]

    def repair(self) -> str | None:
        """Drop a torn last line (a kill during `write`); returns the one-line note, or None."""
        if not self.enabled:
            return None
        rows, torn = self._read()
        if torn is None:
            return None
        self._rewrite(rows)
        return f"{self.path}: dropped its torn last line ({len(torn.encode())} bytes, a write cut short by a kill)"

    def truncate(self, stage: str, max_step: int) -> None:
        """Drop ``stage`` records past ``max_step`` (logged after the checkpoint a resume starts from)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        self._rewrite([r for r in self.records() if r.get("stage") != stage or r.get("step", 0) <= max_step])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Progress:
    """A tqdm bar per stage on rank 0: loss terms, tokens/s and tqdm's ETA."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5, file=sys.stderr)

    def update(self, record: dict | None, n: int) -> None:
        if record is None:
            self.bar.update(n)
            return
        terms = " ".join(f"{k} {record[k]:.4g}" for k in LOSS_TERMS if k in record)
        rate = f"{record['tokens_per_s']:,.0f} tok/s"
        self.bar.set_postfix_str(f"{terms} | {rate} | lr {record['lr']:.2e}", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def format_summary(rows: list[dict]) -> str:
    """Table of finished stages: name, kind, model, steps, time, last loss, samples truncated (at
    build) and skipped while training, output. The text columns are as wide as their longest entry."""
    w_stage, w_kind, w_model = (max([len(title)] + [len(str(r[key])) for r in rows]) + 2
                                for key, title in (("stage", "stage"), ("kind", "kind"), ("model", "model")))
    head = (f"{'stage':<{w_stage}}{'kind':<{w_kind}}{'model':<{w_model}}{'steps':>7}{'time':>10}{'loss':>10}"
            f"{'truncated':>10}{'skipped':>8}  checkpoint")
    lines = [head, "-" * len(head)]
    for r in rows:
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        time = f"{r['seconds']:.1f}s" if r.get("seconds") is not None else "-"
        counts = "".join(f"{r[k] if r.get(k) is not None else '-':>{w}}" for k, w in (("truncated", 10), ("skipped", 8)))
        lines.append(f"{r['stage']:<{w_stage}}{r['kind']:<{w_kind}}{r['model']:<{w_model}}{r['steps']:>7}{time:>10}"
                     f"{loss:>10}{counts}  {r['path']}{'  (already done)' if r.get('already_done') else ''}")
    return "\n".join(lines)
