"""One benchmark harness: timing, working-memory probes, subprocess isolation, tables and CSV.

Timing: median of ``repeats`` runs after ``warmup`` (``triton.testing.do_bench`` on CUDA).
Working memory on CPU: the peak resident set size during one step (Linux: VmHWM after writing 5
to /proc/self/clear_refs) minus the resident size before it, minus the bytes of the gradients the
step returns. Each measurement runs in a fresh interpreter with MALLOC_MMAP_THRESHOLD_ fixed, so
large buffers are returned to the OS when freed and one impl's leftovers never hide another's.
On CUDA: torch.cuda.max_memory_allocated around the step.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step(step: Callable[[], int], warmup: int = 1, repeats: int = 3) -> dict:
    """Run ``step`` (returns the bytes of gradients it produced) and report time and working memory.

    Returns {"ms": median milliseconds, "ms_all": [...], "work_mb": peak working memory in MiB}.
    """
    if torch.cuda.is_available():
        import triton.testing

        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grad_bytes = step()
        torch.cuda.synchronize()
        work = torch.cuda.max_memory_allocated() - base - grad_bytes
        ms = triton.testing.do_bench(step, warmup=25, rep=100)
        return {"ms": ms, "ms_all": [ms], "work_mb": work / 2**20}
    for _ in range(warmup):
        step()
    rss0 = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    grad_bytes = step()
    times = [time.perf_counter() - t0]
    work = _status_kb("VmHWM") * 1024 - rss0 * 1024 - grad_bytes
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "ms_all": [1e3 * t for t in times], "work_mb": work / 2**20}


def run_isolated(module: str, spec: dict, timeout: float = 1800) -> dict:
    """Run ``python -m module --worker JSON`` in a fresh interpreter; returns the JSON it prints last."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {module} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def env_info() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=root, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"commit": commit, "date": datetime.date.today().isoformat(), "device": device,
            "torch": torch.__version__, "triton": triton_version}


def print_table(rows: list[dict], cols: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    fmt = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(fmt[c]) for c in cols))
    print("  ".join("-" * fmt[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(fmt[c]) for c in cols))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "" if x is None else str(x)


def append_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    cols = list(rows[0].keys())
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
