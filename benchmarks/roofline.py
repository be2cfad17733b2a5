"""Roofline model (predicted, not measured) of the kdengine losses on A100 and H100, fwd + bwd.

    python -m benchmarks.roofline              # -> benchmarks/results/roofline.{csv,md}
    python -m benchmarks.roofline --programs-per-sm 2 --dtype fp32

What is modelled comes from the code as it is, not from a description of it: the public losses run
forward + backward on ``meta`` tensors (as in ``benchmarks.gpu_compile``). Every Triton launch is
recorded with its grid, arguments and block sizes (each ``triton.autotune`` config is evaluated and the
fastest predicted one kept); every torch op between the kernels (the backward's dX / dW GEMMs, casts,
buffers) is recorded by a TorchDispatchMode with its shapes and dtypes. Working memory is the peak of
the bytes alive during the run minus the inputs and their gradients.

Per Triton launch (``KERNEL_MODELS``, one small function per kernel naming the FLOPs of one program
and the tiles it reads):
    compute  = ceil(programs / (SMs x programs_per_sm)) x program FLOPs / (peak / SMs)
    HBM      = per wave of concurrently resident programs (programs in launch order, axis 0 fastest),
               every distinct tile is read once: L2 serves the repeats within a wave, nothing is
               reused across waves (the "wave" L2 assumption); "no_l2_gb" is every program reading
               every tile from HBM. Writes are counted once.
    time     = max(compute, HBM / bandwidth)
The peak of a launch is the tensor-core peak only when benchmarks/results/gpu_compile.csv shows
HMMA/HGMMA instructions for that kernel, target and dtype (else the FP32 CUDA-core peak; an fp32
kernel with tensor-core instructions gets the TF32 peak). Torch ops: matmuls at the peak of their
dtype (fp32 matmuls at the FP32 peak: torch's default allow_tf32=False), everything else at HBM speed.
Not modelled: exp/log throughput (SFU), launch latency, the elementwise FLOPs, L2 bandwidth, overlap
of compute and memory beyond max().
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import gpu_compile as aot
from kdengine.plan.live_bytes import TorchOps, nbytes as _nbytes

# Datasheet peaks (dense). A100 SXM4 80GB, H100 SXM5.
GPUS = {
    "A100": dict(target="sm_80", sms=108, tc16=312e12, tf32=156e12, fp32=19.5e12, hbm=2.0e12, l2_mb=40),
    "H100": dict(target="sm_90", sms=132, tc16=989e12, tf32=494e12, fp32=67e12, hbm=3.35e12, l2_mb=50),
}
# Liger-Kernel's published fused linear JSD benchmark, H100, N=8192, D=4096, V=128256, fwd+bwd.
LIGER = dict(shape="liger", gpu="H100", liger_ms=60.7, liger_gb=11.1, torch_ms=213.0, torch_gb=68.9)
# What each shape runs: (scenario label as in gpu_compile.scenarios, trainable student head)
CASES = {"liger": ["jsd", "forward_kl+ce"], "llava_kd_1b": ["forward_kl+ce", "rdist"], "cpu_bench": ["forward_kl+ce"]}
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4}


# ----------------------------------------------------------------------------------------------
# Triton launches: one model per kernel (program FLOPs and the tiles each program reads)
# ----------------------------------------------------------------------------------------------
@dataclass
class Program:
    """Cost of one program of a launch: FLOPs, the tiles it reads and the bytes it writes.

    ids: fn(pid array) -> {name: index array}, the program's coordinates in launch order.
    tiles: [(names, bytes)]: a tile indexed by those coordinates (() = one tile every program reads,
    e.g. the whole W a row block streams).
    skip: optional fn(ids) -> bool array of programs that return at once.
    """

    flops: float
    ids: object
    tiles: list
    writes: float
    skip: object = None


def _e(a, name):
    """Element size of a pointer argument (meta tensors of the recorded launch; None -> 0)."""
    x = a.get(name)
    return x.element_size() if isinstance(x, torch.Tensor) else 0


def row_col_ids(a, grid, n_rows, n_cols):
    """{"n": row block, "v": column block} of each program, as the kernel derives them.

    A flat grid of n_rows x n_cols programs with GROUP_N is the grouped order of
    kernels/fused_linear_divergence.py:_grouped_ids (GROUP_N row blocks walk the columns together);
    a 2D grid is (row block, column block) with axis 0 fastest; a 1D grid of n_rows is row blocks only.
    """
    g0, g1, _ = grid
    if g1 > 1:
        return lambda pid: {"n": pid % g0, "v": pid // g0}
    if n_cols > 1 and "GROUP_N" in a:
        group = a["GROUP_N"]

        def grouped(pid):
            per_group = group * n_cols
            first = (pid // per_group) * group
            size = np.minimum(n_rows - first, group)
            return {"n": first + (pid % per_group) % size, "v": (pid % per_group) // size}
        return grouped
    if n_cols > 1:
        return lambda pid: {"n": pid % n_rows, "v": pid // n_rows}
    return lambda pid: {"n": pid, "v": np.zeros_like(pid)}


def _xw_bytes(a, rows, cols, cols_t):
    """(X bytes of `rows` rows, W bytes of `cols` student and `cols_t` teacher columns) of both models."""
    xb = rows * (a["DS"] * _e(a, "p_xs") + a["DT"] * _e(a, "p_xt"))
    return xb, cols * a["DS"] * _e(a, "p_ws") + cols_t * a["DT"] * _e(a, "p_wt")


def _fld_stats(a, grid):
    """Pass 1: one program = BN rows x one vocabulary split (all of VTOT without splits), both GEMMs."""
    n_split = a.get("n_split", 1)
    cols, cols_t = a["VTOT"] / n_split, a["VC"] / n_split
    xb, wb = _xw_bytes(a, a["BN"], cols, cols_t)
    return Program(2 * a["BN"] * (cols * a["DS"] + cols_t * a["DT"]),
                   row_col_ids(a, grid, math.ceil(a["N"] / a["BN"]), n_split),
                   [(("n",), xb), (("v",) if n_split > 1 else (), wb)], a["BN"] * 4 * 4)


def _fld_rows(a, grid):
    return _fld_stats(dict(a, VTOT=a["VC"]), grid)


def _fld_dlogits(a, grid):
    """Backward: one [BN, BV] dlogits tile of the chunk [v_start, v_stop), both GEMMs over D, tile written."""
    xb, wb = _xw_bytes(a, a["BN"], a["BV"], a["BV"])
    n_cols = math.ceil((a["v_stop"] - a["v_start"]) / a["BV"])
    return Program(2 * a["BN"] * a["BV"] * (a["DS"] + a["DT"]), row_col_ids(a, grid, math.ceil(a["N"] / a["BN"]), n_cols),
                   [(("n",), xb), (("v",), wb)], a["BN"] * a["BV"] * max(_e(a, "p_g"), 2))


def _topk_fwd(a, grid):
    e = _e(a, "p_x")
    return Program(2 * a["BN"] * a["V"] * a["D"], row_col_ids(a, grid, grid[0], 1),
                   [(("n",), a["BN"] * a["D"] * e), ((), a["V"] * a["D"] * e)], a["BN"] * (a["K"] + 7) * 4)


def _topk_bwd(a, grid):
    e = _e(a, "p_x")
    n_cols = math.ceil((a["v_stop"] - a["v_start"]) / a["BV"])
    return Program(2 * a["BN"] * a["BV"] * a["D"], row_col_ids(a, grid, math.ceil(a["N"] / a["BN"]), n_cols),
                   [(("n",), a["BN"] * a["D"] * e), (("v",), a["BV"] * a["D"] * e)], a["BN"] * a["BV"] * 4)


def _axes(grid):
    g0, g1, _ = grid
    return lambda pid: {"i0": pid % g0, "i1": (pid // g0) % g1, "b": pid // (g0 * g1)}


def _gram_stats(a, grid):
    """Program (j, i, b): R_s and R_t tiles [BP, BP] from A rows i and H rows j; SYMMETRIC skips j < i."""
    bp, dsum = a["BP"], a["Ds"] + a["Dt"]
    return Program(2 * bp * bp * dsum, _axes(grid),
                   [(("i1", "b"), bp * dsum * 4), (("i0", "b"), bp * dsum * _e(a, "h_s"))], 12,
                   skip=(lambda ids: ids["i0"] < ids["i1"]) if a.get("SYMMETRIC") else None)


def _gram_grad(a, grid):
    """Program (k, i, b): every j tile of R recomputed (A rows i, all H rows of b), then (c R) @ m[b][:, k]."""
    bp, dsum, nj = a["BP"], a["Ds"] + a["Dt"], math.ceil(a["P"] / a["BP"])
    return Program(nj * (2 * bp * bp * dsum + 2 * bp * bp * a["BDM"]), _axes(grid),
                   [(("i1", "b"), bp * dsum * 4), (("b",), a["P"] * dsum * _e(a, "h_s")),
                    (("i0", "b"), a["P"] * a["BDM"] * _e(a, "m"))], bp * a["BDM"] * 4)


# kernel name -> model; the old names (before the 2D grid) share the models, which read the structure
KERNEL_MODELS = {"_fld_stats_kernel": _fld_stats, "_fld_fwd_kernel": _fld_stats, "_fld_rows_kernel": _fld_rows,
                 "_fld_dlogits_kernel": _fld_dlogits, "_fld_bwd_kernel": _fld_dlogits,
                 "_topk_fwd_kernel": _topk_fwd, "_topk_bwd_kernel": _topk_bwd,
                 "_gram_stats_kernel": _gram_stats, "_gram_grad_matmul_kernel": _gram_grad}


def hbm_bytes(prog: Program, grid, resident: int) -> tuple[float, float, int]:
    """(HBM bytes under the wave assumption, bytes with no L2 reuse, programs that do work)."""
    pid = np.arange(grid[0] * grid[1] * grid[2], dtype=np.int64)
    ids = prog.ids(pid)
    live = ~prog.skip(ids) if prog.skip else np.ones(pid.shape, bool)
    wave = (np.cumsum(live) - 1)[live] // resident  # resident slots are taken by programs that do work
    n = int(live.sum())
    wave_b = no_l2 = 0.0
    for names, nbytes in prog.tiles:
        key = np.zeros(n, np.int64)
        for name in names:
            col = ids[name][live]
            key = key * (int(col.max(initial=0)) + 1) + col
        distinct = np.unique(wave * (int(key.max(initial=0)) + 1) + key).size
        wave_b += distinct * nbytes
        no_l2 += n * nbytes
    return wave_b + n * prog.writes, no_l2 + n * prog.writes, n


def tc_table(path: Path) -> dict:
    """{(kernel, target, dtype): fewest tensor-core instructions over its compiled variants and configs}
    from the compile table (if present): a kernel counts as on tensor cores only if every variant is."""
    if not path.exists():
        return {}
    out: dict = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                key = (r["kernel"], r["target"], r["dtype"])
                out[key] = min(out.get(key, 1 << 30), int(r["tc_instr"] or 0))
    return out


def kernel_peak(name, dtype, gpu, tc) -> tuple[float, str]:
    """Peak FLOP/s of a kernel's dots: tensor cores only where the compiled binary has them."""
    g = GPUS[gpu]
    n = tc.get((name.lstrip("_"), g["target"], dtype))
    if n is None:  # not in the compile table: go by the input dtype
        return (g["tc16"], "tc16?") if dtype != "fp32" else (g["fp32"], "fp32?")
    if n > 0:
        return (g["tc16"], "tc16") if dtype != "fp32" else (g["tf32"], "tf32")
    return g["fp32"], "fp32"


def model_launch(rec, kernels, gpu, tc, per_sm):
    """Best predicted (over autotune configs) cost of one recorded launch on ``gpu``."""
    obj = kernels[(rec.module, rec.name)]
    _, jit = aot.unwrap(obj)
    fn = KERNEL_MODELS.get(rec.name) or KERNEL_MODELS.get(re.sub(r"_(fp32|bf16|fp16)$", "", rec.name))
    if fn is None:
        return None
    g = GPUS[gpu]
    peak, peak_kind = kernel_peak(rec.name, rec.dtype, gpu, tc)
    best = None
    for kwargs, _cfg in aot.expand_configs(obj, rec.args, rec.kwargs):
        a = {**dict(zip(jit.arg_names, rec.args)), **kwargs}
        grid = aot.eval_grid(rec.grid, jit, rec.args, kwargs)
        prog = fn(a, grid)
        wave_b, no_l2, n = hbm_bytes(prog, grid, g["sms"] * per_sm)
        t_c = math.ceil(n / (g["sms"] * per_sm)) * per_sm * prog.flops / (peak / g["sms"])
        t_m = wave_b / g["hbm"]
        cost = dict(flops=n * prog.flops, bytes=wave_b, no_l2=no_l2, programs=n, ms=1e3 * max(t_c, t_m),
                    bound="compute" if t_c >= t_m else "memory", peak=peak_kind,
                    config=" ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("B") and isinstance(v, int)))
        if best is None or cost["ms"] < best["ms"]:
            best = cost
    return best


def model_torch_op(op, gpu) -> dict:
    name, flops, moved, dtype = op
    g = GPUS[gpu]
    peak = g["tc16"] if dtype in ("bfloat16", "float16") else g["fp32"]
    t = max(flops / peak, moved / g["hbm"])
    return dict(flops=flops, bytes=moved, no_l2=moved, ms=1e3 * t, peak=("tc16" if peak == g["tc16"] else "fp32"),
                bound="compute" if flops / peak >= moved / g["hbm"] else "memory")


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
def gemm_ideal_flops(spec, label) -> float | None:
    """The unavoidable matmuls of a divergence fwd+bwd with a trainable student head: z_s, z_t, dX = G W,
    dW = G^T X. None for RDist (no single GEMM formulation to hold it to)."""
    if label == "rdist":
        return None
    n, ds, dt, v = spec["n"], spec["ds"], spec["dt"], spec["v"]
    return 2 * n * v * (ds + dt) + 4 * n * v * ds


def run_case(kernels, shape, label, dtype, per_sm, tc):
    """Capture one (shape, scenario) and return per-GPU breakdown rows and the totals."""
    launches, mode = _capture_one(kernels, shape, label, dtype)
    spec = aot.SHAPES[shape]
    out = []
    for gpu in GPUS:
        parts = defaultdict(lambda: dict(flops=0.0, bytes=0.0, no_l2=0.0, ms=0.0, n=0, bound=set(),
                                         peak=set(), config=set()))
        unmodelled = set()
        for rec in launches:
            c = model_launch(rec, kernels, gpu, tc, per_sm)
            if c is None:
                unmodelled.add(rec.name)
                continue
            p = parts[f"triton {rec.name.lstrip('_')}"]
            _accumulate(p, c)
            p["config"].add(c["config"])
        for op in mode.ops:
            _accumulate(parts[f"torch {op[0]}" if op[1] else "torch other ops"], model_torch_op(op, gpu))
        total_ms = sum(p["ms"] for p in parts.values())
        ideal = gemm_ideal_flops(spec, label)
        ideal_ms = 1e3 * ideal / GPUS[gpu]["tc16" if dtype != "fp32" else "fp32"] if ideal else None
        common = dict(shape=shape, case=label, dtype=dtype, gpu=gpu)
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["ms"]):
            out.append(dict(common, part=name, calls=p["n"], gflop=p["flops"] / 1e9, hbm_gb=p["bytes"] / 1e9,
                            no_l2_gb=p["no_l2"] / 1e9, predicted_ms=p["ms"], bound="/".join(sorted(p["bound"])),
                            peak="/".join(sorted(p["peak"])), config=";".join(sorted(p["config"]))))
        out.append(dict(common, part="TOTAL fwd+bwd", calls=sum(p["n"] for p in parts.values()),
                        gflop=sum(p["flops"] for p in parts.values()) / 1e9,
                        hbm_gb=sum(p["bytes"] for p in parts.values()) / 1e9,
                        no_l2_gb=sum(p["no_l2"] for p in parts.values()) / 1e9, predicted_ms=total_ms,
                        ideal_ms=ideal_ms, x_ideal=total_ms / ideal_ms if ideal_ms else None,
                        work_gb=(mode.peak - mode.resident) / 1e9, peak_gb=mode.peak / 1e9,
                        unmodelled=",".join(sorted(unmodelled))))
    return out


def _accumulate(p, c):
    for k in ("flops", "bytes", "no_l2", "ms"):
        p[k] += c[k]
    p["n"] += 1
    p["bound"].add(c["bound"])
    p["peak"].add(c["peak"])


def _capture_one(kernels, shape, label, dtype):
    """(launches, TorchOps) of exactly one scenario."""
    for sname, lab, fn in aot.scenarios([shape], aot.DIVERGENCE_SETS["all"]):
        if lab != label:
            continue
        log, mode = [], TorchOps()
        gc.collect()
        gc.disable()  # tensors in reference cycles then live to the end of the step in every run alike
        try:
            with aot.recording(kernels, log), mode:
                held = [t for t in fn(aot.SHAPES[sname], aot.DTYPES[dtype]) if t is not None]
        finally:
            gc.enable()
        # resident before and after the step: the inputs and their gradients (as benchmarks/harness.py)
        mode.resident = sum(_nbytes(t) + _nbytes(t.grad) for t in held)
        for rec in log:
            rec.scenario, rec.shape, rec.dtype = label, shape, dtype
        return log, mode
    raise ValueError(f"no scenario {label!r} for shape {shape!r}")


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
COLS = ["shape", "case", "dtype", "gpu", "part", "calls", "gflop", "hbm_gb", "no_l2_gb", "predicted_ms", "bound",
        "peak", "config", "ideal_ms", "x_ideal", "work_gb", "peak_gb", "unmodelled"]


def _f(x, nd=1):
    return "" if x in (None, "") else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def liger_lines(rows) -> list[str]:
    tot = [r for r in rows if r["part"].startswith("TOTAL") and r["shape"] == LIGER["shape"] and r["gpu"] == LIGER["gpu"]]
    out = []
    for r in tot:
        out.append(f"Liger shape (N=8192, D=4096, V=128256), H100, {r['case']} {r['dtype']}: kdengine predicted "
                   f"{r['predicted_ms']:.1f} ms fwd+bwd ({r['x_ideal']:.2f}x the pure-GEMM ideal {r['ideal_ms']:.1f} ms), "
                   f"working memory {r['work_gb']:.2f} GB (peak incl. inputs and grads {r['peak_gb']:.2f} GB) | "
                   f"Liger published (measured by Liger): {LIGER['liger_ms']} ms, {LIGER['liger_gb']} GB; "
                   f"torch published: {LIGER['torch_ms']} ms, {LIGER['torch_gb']} GB")
    return out


def write_tables(rows, out_dir: Path, args, commit, elapsed):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "roofline.csv", out_dir / "roofline.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["commit"] + COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(dict(r, commit=commit) for r in rows)
    tmp.replace(csv_path)
    lines = ["# Roofline model of kdengine's losses (PREDICTED from datasheet peaks, not measured)", "",
             f"Commit {commit}; {args.dtype} inputs, trainable student head, {args.programs_per_sm} resident "
             f"program(s) per SM. Peaks: " + "; ".join(
                 f"{g} {v['tc16'] / 1e12:.0f} TFLOP/s bf16 dense, {v['fp32'] / 1e12:.1f} fp32, "
                 f"{v['hbm'] / 1e12:.2f} TB/s HBM, {v['l2_mb']} MB L2, {v['sms']} SMs" for g, v in GPUS.items()) + ".",
             "", "L2 assumption (\"wave\"): programs resident at the same time share every tile they read (L2 serves "
             "the repeats); nothing is reused across waves. `no_l2_gb`: every program reads every tile from HBM. "
             "Tensor-core peak only where benchmarks/results/gpu_compile.csv shows HMMA/HGMMA for that kernel.", "",
             *[f"- {line}" for line in liger_lines(rows)], "",
             "| shape | case | gpu | total predicted ms | pure-GEMM ideal ms | x ideal | HBM GB (wave) | HBM GB (no L2) "
             "| working GB | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"].startswith("TOTAL"):
            lines.append(f"| {r['shape']} | {r['case']} | {r['gpu']} | {_f(r['predicted_ms'])} | {_f(r['ideal_ms'])} | "
                         f"{_f(r['x_ideal'], 2)} | {_f(r['hbm_gb'])} | {_f(r['no_l2_gb'])} | {_f(r['work_gb'], 2)} | "
                         f"{_f(r['peak_gb'], 2)} |")
    lines += ["", "Breakdown (predicted):", "",
              "| shape | case | gpu | part | calls | GFLOP | HBM GB | predicted ms | bound | peak | config |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["part"].startswith("TOTAL") and r["predicted_ms"] >= 0.05:
            lines.append(f"| {r['shape']} | {r['case']} | {r['gpu']} | {r['part']} | {r['calls']} | {_f(r['gflop'], 0)} | "
                         f"{_f(r['hbm_gb'], 2)} | {_f(r['predicted_ms'], 2)} | {r['bound']} | {r['peak']} | "
                         f"{r['config']} |")
    lines += ["", f"Reproduce: `python -m benchmarks.gpu_compile && python -m benchmarks.roofline` ({elapsed:.0f} s here)."]
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md_path)
    return csv_path, md_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=list(aot.DTYPES))
    ap.add_argument("--programs-per-sm", type=int, default=1, help="resident programs per SM (occupancy)")
    ap.add_argument("--compile-table", default=str(aot.RESULTS / "gpu_compile.csv"),
                    help="gpu_compile.csv: which kernels run their dots on tensor cores")
    ap.add_argument("--out", default=str(aot.RESULTS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    mods, import_errors = aot.import_kernel_modules()
    if import_errors:
        print(f"kernel modules that failed to import (not modelled): {import_errors}", file=sys.stderr)
    kernels = aot.discover(mods)
    tc = tc_table(Path(args.compile_table))
    if not tc:
        print(f"no compile table at {args.compile_table}: tensor cores assumed for 16-bit inputs", file=sys.stderr)
    rows = []
    for shape, labels in CASES.items():
        for label in labels:
            rows += run_case(kernels, shape, label, args.dtype, args.programs_per_sm, tc)
    commit = aot.commit_id()
    elapsed = time.perf_counter() - t0
    csv_path, md_path = write_tables(rows, Path(args.out), args, commit, elapsed)
    print(f"\nRoofline, PREDICTED (datasheet peaks), {args.dtype}, commit {commit}")
    print(f"{'shape':12s} {'case':14s} {'gpu':5s} {'part':34s} {'GFLOP':>9s} {'HBM GB':>8s} {'ms':>8s}  bound")
    for r in rows:
        if r["part"].startswith("TOTAL") or r["predicted_ms"] >= 0.05:
            ideal = f"ideal {r['ideal_ms']:.1f} ms ({r['x_ideal']:.2f}x), " if r.get("ideal_ms") else ""
            extra = (f"  {ideal}work {r['work_gb']:.2f} GB"
                     + (f", NO MODEL for {r['unmodelled']}" if r["unmodelled"] else "")
                     if r["part"].startswith("TOTAL") else f"  {r['bound']} {r['peak']}")
            print(f"{r['shape']:12s} {r['case']:14s} {r['gpu']:5s} {r['part']:34s} {r['gflop']:9.0f} {r['hbm_gb']:8.2f} "
                  f"{r['predicted_ms']:8.2f}{extra}")
    print("\n".join(liger_lines(rows)))
    print(f"wrote {csv_path} and {md_path} ({elapsed:.0f} s)")
    return 1 if any(r.get("unmodelled") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
