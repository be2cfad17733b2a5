"""The GPUs ``kdengine plan`` knows (one table, this one) and ``--gpu`` parsing.

Plain Python, no torch. Memory is the device total the driver reports (nvidia-smi / rocm-smi
"total", in MiB), not the marketing figure: an "80GB" A100 holds 81920 MiB, an H100 SXM 81559 MiB.
"""

from __future__ import annotations

import re

__all__ = ["GPUS", "MIB", "GIB", "parse_gpu"]

MIB = 1 << 20
GIB = 1 << 30

# name -> device memory in MiB (driver-reported totals)
GPUS = {
    "A100-40GB": 40960,
    "A100-80GB": 81920,
    "H100-80GB": 81559,
    "H200-141GB": 143771,
    "L4-24GB": 23034,
    "RTX4090-24GB": 24564,
    "MI300X-192GB": 196592,
}

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GB|GiB|G)$", re.IGNORECASE)


def parse_gpu(text: str) -> tuple[str, int]:
    """(name, bytes) of a known GPU name (case-insensitive) or a custom size such as ``24GB`` (GiB).
    ValueError naming the value and the valid names otherwise."""
    by_lower = {name.lower(): name for name in GPUS}
    if text.lower() in by_lower:
        name = by_lower[text.lower()]
        return name, GPUS[name] * MIB
    m = _SIZE.match(text.strip())
    if m and float(m.group(1)) > 0:
        gib = float(m.group(1))
        return f"{m.group(1)}GB", int(gib * GIB)
    raise ValueError(f"--gpu {text!r}: expected one of {', '.join(GPUS)} or a size such as 24GB")
