"""What a user sees: the metrics JSONL, a progress bar per stage, peak memory, the final summary.

One JSON object per logged optimizer step in ``<run_dir>/metrics.jsonl``::

    {"stage", "kind", "step" (1-based, within the stage), "total_steps", "epoch",
     "loss", "ce", ["res", "vis", "rel"]  (means over the step's micro-batches and ranks),
     "lr", "grad_norm", "tokens" (non-pad tokens of the global batch), "tokens_per_s",
     "step_time_s", "peak_mem_mb", "time" (unix seconds)}

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

__all__ = ["MetricsLog", "Progress", "format_summary", "peak_memory_mb"]


class MetricsLog:
    """Append-only JSONL of metrics records, written by rank 0 only."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self, stage: str | None = None) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if stage is None or r.get("stage") == stage]

    def truncate(self, stage: str, max_step: int) -> None:
        """Drop ``stage`` records past ``max_step`` (logged after the checkpoint a resume starts from)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        keep = [r for r in self.records() if r.get("stage") != stage or r.get("step", 0) <= max_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
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
    """Fixed-width table of finished stages: name, kind, model, steps, time, last loss, output."""
    head = f"{'stage':<16}{'kind':<6}{'model':<10}{'steps':>7}{'time':>10}{'loss':>10}  checkpoint"
    lines = [head, "-" * len(head)]
    for r in rows:
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        time = f"{r['seconds']:.1f}s" if r.get("seconds") is not None else "-"
        lines.append(f"{r['stage']:<16}{r['kind']:<6}{r['model']:<10}{r['steps']:>7}{time:>10}{loss:>10}  "
                     f"{r['path']}{'  (already done)' if r.get('skipped') else ''}")
    return "\n".join(lines)
