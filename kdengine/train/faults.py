"""Fault injection for the crash-safety tests: kill (or signal) this process at a named point.

    KDENGINE_FAULT=<point>[:<n>[:<signal>]]     e.g. ckpt_mid:2, after_step:3:TERM

fires at the n-th time (default 1) this process reaches ``point``, with SIGKILL (default) or
the named signal. Points, in the order a step meets them:

    after_step          after an optimizer step (and its metrics record), before any checkpoint
    metrics_mid         half of a metrics.jsonl record written and flushed
    ckpt_mid            DeepSpeed's state written into the temporary checkpoint, no RNG, no marker
    ckpt_before_rename  the temporary checkpoint complete (marker written), not yet renamed
    model_mid           the final model's weights written into .model.tmp, no processor, no marker

``KDENGINE_KILL_AFTER_STEPS=n`` (the older switch) is ``after_step:n``. Unset, `fault` costs a
dict lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "FAULT_POINTS", "fault"]

FAULT_ENV = "KDENGINE_FAULT"
KILL_ENV = "KDENGINE_KILL_AFTER_STEPS"
FAULT_POINTS = ("after_step", "metrics_mid", "ckpt_mid", "ckpt_before_rename", "model_mid")

_seen: dict[str, int] = {}


def _target() -> tuple[str, int, int] | None:
    spec = os.environ.get(FAULT_ENV) or (f"after_step:{os.environ[KILL_ENV]}" if os.environ.get(KILL_ENV) else "")
    if not spec:
        return None
    parts = spec.split(":")
    name, n, sig = parts[0], int(parts[1]) if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else "KILL"
    if name not in FAULT_POINTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown point {name!r}; expected one of {FAULT_POINTS}")
    return name, n, getattr(signal, f"SIG{sig}")


def fault(point: str) -> None:
    """Count a visit to ``point``; signal this process if the environment asks for this visit."""
    target = _target()
    if target is None or target[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == target[1]:
        os.kill(os.getpid(), target[2])
