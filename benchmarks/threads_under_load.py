"""Training step time with and without a busy process beside it, per CPU thread policy.

    python -m benchmarks.threads_under_load [--steps 20] [--variants 1,2,2-passive,auto] [--no-busy]

Each run is ``kdengine train configs/demo.yaml`` cut down to one stage (the demo teacher's sft,
the demo's biggest model, batch 8) for ``--steps`` optimizer steps, in a fresh process. It runs
once on its own ("quiet") and once beside ``python -c "while True: pass"`` ("busy"), back to
back, for each thread policy:

    1           engine.cpu_threads 1, OMP_NUM_THREADS=1
    2           engine.cpu_threads = usable cores (os.sched_getaffinity), OMP_NUM_THREADS likewise
    2-passive   as 2, plus OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)
    auto        engine.cpu_threads auto: usable cores minus the 1-minute load average, at least 1

Reported per run: the median step time over the steps after the first two (from metrics.jsonl)
and the process wall time; then busy / quiet per policy. Rows are appended to
benchmarks/results/threads_under_load.csv with device, versions, commit and date. These are
measured numbers; on a machine shared with other jobs the "quiet" runs are not quiet, so read
the ratios, not the absolute times, and rerun on an idle machine for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import append_csv, env_info, print_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSY = [sys.executable, "-c", "while True: pass"]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def variants() -> dict[str, tuple[str, dict]]:
    """name -> (engine.cpu_threads value, extra environment)."""
    n = str(usable_cores())
    return {
        "1": ("1", {"OMP_NUM_THREADS": "1"}),
        n: (n, {"OMP_NUM_THREADS": n}),
        f"{n}-passive": (n, {"OMP_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE"}),
        "auto": ("auto", {}),
    }


def overrides(out: str, steps: int, threads: str) -> list[str]:
    stage = ("[{name: teacher_sft, kind: sft, model: teacher, data: instruct, lr: 2.0e-4, "
             f"max_steps: {steps}}}]")
    sets = [f"run.output_dir={out}", "run.log_every=1", "synth.n_caption=16", "synth.n_instruct=200",
            "synth.n_eval=2", f"engine.cpu_threads={threads}", f"stages={stage}"]
    return [a for s in sets for a in ("--set", s)]


def run_once(steps: int, threads: str, env_extra: dict, busy: bool, timeout: float) -> dict:
    """One fresh training process; returns median step time and wall time (seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "kdengine.cli", "train", os.path.join(ROOT, "configs", "demo.yaml"),
               *overrides(out, steps, threads)]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        env.update(env_extra)
        hog = subprocess.Popen(BUSY) if busy else None
        try:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            wall = time.perf_counter() - t0
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            times = [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]
    used = re.search(r"(\d+) cpu threads", proc.stdout)  # the stage header says what the trainer used
    return {"median_step_s": statistics.median(times[2:] or times), "wall_s": wall,
            "threads_used": int(used.group(1)) if used else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--no-busy", action="store_true", help="quiet runs only")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    args = ap.parse_args()
    table = variants()
    names = args.variants.split(",") if args.variants else list(table)
    info = env_info()
    rows = []
    for name in names:
        threads, env_extra = table[name]
        quiet = run_once(args.steps, threads, env_extra, busy=False, timeout=args.timeout)
        busy = None if args.no_busy else run_once(args.steps, threads, env_extra, busy=True, timeout=args.timeout)
        row = {"policy": name, "cpu_threads": threads, "threads_used_quiet": quiet["threads_used"],
               "threads_used_busy": busy and busy["threads_used"],
               "env": " ".join(f"{k}={v}" for k, v in env_extra.items()),
               "steps": args.steps, "quiet_step_s": quiet["median_step_s"], "quiet_wall_s": quiet["wall_s"],
               "busy_step_s": busy and busy["median_step_s"], "busy_wall_s": busy and busy["wall_s"],
               "busy_over_quiet": busy and busy["median_step_s"] / quiet["median_step_s"],
               "usable_cores": usable_cores(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
               "label": "measured", **info}
        rows.append(row)
        print_table([row], ["policy", "quiet_step_s", "busy_step_s", "busy_over_quiet", "quiet_wall_s", "busy_wall_s"])
    print_table(rows, ["policy", "quiet_step_s", "busy_step_s", "busy_over_quiet", "quiet_wall_s", "busy_wall_s",
                       "loadavg_1m_at_end"], title="median step time (s), measured; busy = beside one spinning process")
    print(f"wrote {append_csv('threads_under_load.csv', rows)}")


if __name__ == "__main__":
    main()
