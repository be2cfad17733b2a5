"""Roofline model (predicted, not measured) of the kdengine losses on A100 and H100, fwd + bwd.

    python -m benchmarks.roofline              # -> benchmarks/results/roofline.{csv,md}
    python -m benchmarks.roofline --programs-per-sm 2 --dtype fp32

What is modelled comes from the code as it is, not from a description of it: the public losses run
forward + backward on ``meta`` tensors (as in ``benchmarks.gpu_compile``). Every Triton launch is
recorded with its grid, arguments and block sizes (each ``triton.autotune`` config is evaluated and the
fastest predicted one kept); every torch op between the kernels (the backward's dX / dW GEMMs, casts,
buffers) is recorded by a TorchDispatchMode with its shapes and dtypes. Working memory is the peak of
the bytes alive during the run minus the inputs and their gradients.

Per Triton launch (``KERNEL_MODELS``, one small function per kernel naming the FLOPs of one program,
the tiles it reads and the bytes it loads, read off the kernel's loops and block sizes):
    waves    = ceil(programs / (SMs x programs_per_sm))
    compute  = waves x programs_per_sm x program FLOPs / (peak x EFF_GEMM / SMs)
    HBM      = per wave of concurrently resident programs (programs in launch order, axis 0 fastest),
               every distinct tile is read once: L2 serves the repeats within a wave, nothing is
               reused across waves (the "wave" L2 assumption); writes are counted once;
               time = bytes / (HBM bandwidth x EFF_HBM)
    L2       = every byte a program loads: each X and W tile of every vocabulary tile it computes
               (``_tile_logits`` reloads both per BV columns), re-reads included; the data reach the
               SMs from L2 whatever the HBM traffic was; time = waves x programs_per_sm x program bytes
               / (L2-to-SM bandwidth / SMs)
    time     = max(compute, HBM, L2)
"no_l2_gb" is every load going to HBM (the L2 bytes plus the writes). The peak of a launch is the
tensor-core peak only when benchmarks/results/gpu_compile.csv shows HMMA/HGMMA instructions for that
kernel, target and dtype (else the FP32 CUDA-core peak; an fp32 kernel with tensor-core instructions
gets the TF32 peak). Torch ops: matmuls at the peak of their dtype x EFF_GEMM (fp32 matmuls at the FP32
peak: torch's default allow_tf32=False; cuBLAS tiles are large, no L2 term), everything else at HBM
speed x EFF_HBM.

GEMM units: one unit is the [N, V] x D product of one lm_head (2 N V D FLOPs with that head's D). A
launch's units are its dot FLOPs per head over that head's unit, torch matmuls are the student head's
(its backward dX and dW: the only head with a gradient). A trainable student head needs 4: z_s, z_t, dX, dW.
Memory: "working" is the peak of the bytes alive minus the inputs, weights and their gradients; "total" is
the peak of all of them together, the quantity torch.cuda.max_memory_allocated reports (Liger's basis).
Not modelled: exp/log throughput (SFU), launch latency, the elementwise FLOPs, overlap of compute and
memory beyond max(), L2 capacity misses beyond the wave assumption.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import gpu_compile as aot
from kdengine.plan.live_bytes import MM_OPS, TorchOps, nbytes as _nbytes

# Datasheet peaks (dense). A100 SXM4 80GB, H100 SXM5. l2_bw: L2-to-SM read bandwidth, an ESTIMATE (no
# datasheet gives it; microbenchmarks put A100 near 7 TB/s and H100 between 7 and 12 TB/s); --l2-scale
# scales it.
GPUS = {
    "A100": dict(target="sm_80", sms=108, tc16=312e12, tf32=156e12, fp32=19.5e12, hbm=2.0e12, l2_mb=40, l2_bw=7.2e12),
    "H100": dict(target="sm_90", sms=132, tc16=989e12, tf32=494e12, fp32=67e12, hbm=3.35e12, l2_mb=50, l2_bw=10e12),
}
# Efficiency factors: the fraction of a datasheet figure a kernel is assumed to reach (estimates, not
# measurements). EFF_GEMM: dense matmuls, for the Triton dots as for cuBLAS; H100's lower figure because its
# wgmma peak is harder to reach with 64 x 64 tiles and 4 warps. EFF_HBM: streaming reads and writes.
EFF_GEMM = {"A100": 0.80, "H100": 0.70}
EFF_HBM = 0.85
GEMM_UNITS_MIN = 4  # z_s, z_t, dX, dW: what a trainable student head cannot avoid
# Liger-Kernel's published fused linear JSD benchmark (benchmark/scripts/benchmark_distill_jsd_loss.py,
# kernel distill_jsd_loss), measured by Liger on an H100: BT = 8192, student Linear(H // 2, V), teacher
# Linear(H, V), H = 4096, V = 128256, bf16, jsd beta 0.5 with CE at weight 0.5, fwd+bwd. Its memory is
# torch.cuda.max_memory_allocated over the step: everything on the device, inputs, weights and gradients
# included, and the weights of the torch module the same function builds beside Liger's (never run in the
# Liger measurement; extra_modules=1 counts them).
LIGER = dict(shape="liger", case="jsd+ce", gpu="H100", liger_ms=60.7, liger_gb=11.1, torch_ms=213.0, torch_gb=68.9,
             extra_modules=1)
# What each shape runs (scenario labels as in gpu_compile.scenarios; trainable student head)
CASES = {"liger": ["jsd+ce", "forward_kl+ce"], "square_4096": ["jsd+ce", "jsd", "forward_kl+ce"],
         "llava_kd_1b": ["forward_kl+ce", "rdist"], "cpu_bench": ["forward_kl+ce"]}
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4}


# ----------------------------------------------------------------------------------------------
# Triton launches: one model per kernel (program FLOPs and the tiles each program reads)
# ----------------------------------------------------------------------------------------------
@dataclass
class Program:
    """Cost of one program of a launch: FLOPs, the tiles it reads and the bytes it writes.

    ids: fn(pid array) -> {name: index array}, the program's coordinates in launch order.
    tiles: [(names, bytes)]: a tile indexed by those coordinates (() = one tile every program reads,
    e.g. the whole W a row block streams); HBM reads are distinct tiles per wave.
    skip: optional fn(ids) -> bool array of programs that return at once.
    l2: bytes the program loads, every re-read included (None: each tile once).
    heads: {"s" | "t": dot FLOPs on that lm_head} (GEMM units); empty for kernels that are not lm_head products.
    """

    flops: float
    ids: object
    tiles: list
    writes: float
    skip: object = None
    l2: float | None = None
    heads: dict = field(default_factory=dict)


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


def _fld_tiles(a, tiles_s, tiles_t, grid, n_cols, tiles):
    """A program that computes `tiles_s` student and `tiles_t` teacher [BN, BV] logits tiles with
    ``_tile_logits``: every tile loads its X rows [BN, D] and W columns [BV, D] again (loop over D in BD
    chunks inside, over the vocabulary outside), so the L2 bytes are per tile."""
    bn, bv = a["BN"], a["BV"]
    tile_s = bn * a["DS"] * _e(a, "p_xs") + bv * a["DS"] * _e(a, "p_ws")
    tile_t = bn * a["DT"] * _e(a, "p_xt") + bv * a["DT"] * _e(a, "p_wt")
    heads = {"s": 2 * bn * bv * a["DS"] * tiles_s, "t": 2 * bn * bv * a["DT"] * tiles_t}
    return dict(flops=sum(heads.values()), ids=row_col_ids(a, grid, math.ceil(a["N"] / bn), n_cols), tiles=tiles,
                l2=tiles_s * tile_s + tiles_t * tile_t, heads=heads)


def _fld_stats(a, grid):
    """Pass 1: one program = BN rows x one vocabulary split of `split` columns (the last one shorter), both
    GEMMs. Per split, the kernel walks ceil(columns / BV) tiles; split is a multiple of BV, so over the
    splits of a row block the tiles add up to ceil(VTOT / BV): the mean per program is that / n_split."""
    n_split = a.get("n_split", 1)
    cols, cols_t = a["VTOT"] / n_split, a["VC"] / n_split
    xb, wb = _xw_bytes(a, a["BN"], cols, cols_t)
    tiles_s, tiles_t = math.ceil(a["VTOT"] / a["BV"]) / n_split, math.ceil(a["VC"] / a["BV"]) / n_split
    return Program(**_fld_tiles(a, tiles_s, tiles_t, grid, n_split, [(("n",), xb), (("v",) if n_split > 1 else (), wb)]),
                   writes=a["BN"] * 4 * 4)


def _fld_rows(a, grid):
    return _fld_stats(dict(a, VTOT=a["VC"]), grid)


def _fld_dlogits(a, grid):
    """Backward: one [BN, BV] dlogits tile of the chunk [v_start, v_stop), both GEMMs over D, tile written."""
    xb, wb = _xw_bytes(a, a["BN"], a["BV"], a["BV"])
    n_cols = math.ceil((a["v_stop"] - a["v_start"]) / a["BV"])
    return Program(**_fld_tiles(a, 1, 1, grid, n_cols, [(("n",), xb), (("v",), wb)]),
                   writes=a["BN"] * a["BV"] * max(_e(a, "p_g"), 2))


def _topk_fwd(a, grid):
    """One program = BN rows x the whole vocabulary in BV tiles, student head only."""
    e, tiles = _e(a, "p_x"), math.ceil(a["V"] / a["BV"])
    flops = 2 * a["BN"] * a["BV"] * a["D"] * tiles
    return Program(flops, row_col_ids(a, grid, grid[0], 1),
                   [(("n",), a["BN"] * a["D"] * e), ((), a["V"] * a["D"] * e)], a["BN"] * (a["K"] + 7) * 4,
                   l2=tiles * (a["BN"] + a["BV"]) * a["D"] * e, heads={"s": flops})


def _topk_bwd(a, grid):
    e = _e(a, "p_x")
    n_cols = math.ceil((a["v_stop"] - a["v_start"]) / a["BV"])
    flops = 2 * a["BN"] * a["BV"] * a["D"]
    return Program(flops, row_col_ids(a, grid, math.ceil(a["N"] / a["BN"]), n_cols),
                   [(("n",), a["BN"] * a["D"] * e), (("v",), a["BV"] * a["D"] * e)], a["BN"] * a["BV"] * 4,
                   l2=(a["BN"] + a["BV"]) * a["D"] * e, heads={"s": flops})


def _axes(grid):
    g0, g1, _ = grid
    return lambda pid: {"i0": pid % g0, "i1": (pid // g0) % g1, "b": pid // (g0 * g1)}


def _gram_rows(a, rows):
    """(A bytes, H bytes) of `rows` rows of both models (A = H G is fp32 or bf16, see kernels/gram_cosine.py)."""
    return (rows * (a["Ds"] * _e(a, "a_s") + a["Dt"] * _e(a, "a_t")),
            rows * (a["Ds"] * _e(a, "h_s") + a["Dt"] * _e(a, "h_t")))


def _gram_stats(a, grid):
    """Program (j, i, b): R_s and R_t tiles [BP, BP] from A rows i and H rows j; SYMMETRIC skips j < i."""
    bp, dsum = a["BP"], a["Ds"] + a["Dt"]
    ab, hb = _gram_rows(a, bp)
    return Program(2 * bp * bp * dsum, _axes(grid), [(("i1", "b"), ab), (("i0", "b"), hb)], 12,
                   skip=(lambda ids: ids["i0"] < ids["i1"]) if a.get("SYMMETRIC") else None, l2=ab + hb)


def _gram_grad(a, grid):
    """Program (k, i, b): every j tile of R recomputed (A rows i, all H rows of b), then (c R) @ m[b][:, k];
    each of the nj steps reloads the A rows i, H rows j and the m tile."""
    bp, dsum, nj = a["BP"], a["Ds"] + a["Dt"], math.ceil(a["P"] / a["BP"])
    ab, hb = _gram_rows(a, bp)
    mb = bp * a["BDM"] * _e(a, "m")
    return Program(nj * (2 * bp * bp * dsum + 2 * bp * bp * a["BDM"]), _axes(grid),
                   [(("i1", "b"), ab), (("b",), _gram_rows(a, a["P"])[1]),
                    (("i0", "b"), a["P"] * a["BDM"] * _e(a, "m"))], bp * a["BDM"] * 4, l2=nj * (ab + hb + mb))


# kernel name -> model; the old names (before the 2D grid) share the models, which read the structure
KERNEL_MODELS = {"_fld_stats_kernel": _fld_stats, "_fld_fwd_kernel": _fld_stats, "_fld_rows_kernel": _fld_rows,
                 "_fld_dlogits_kernel": _fld_dlogits, "_fld_bwd_kernel": _fld_dlogits,
                 "_topk_fwd_kernel": _topk_fwd, "_topk_bwd_kernel": _topk_bwd,
                 "_gram_stats_kernel": _gram_stats, "_gram_grad_matmul_kernel": _gram_grad}


def hbm_bytes(prog: Program, grid, resident: int) -> tuple[float, float, int]:
    """(HBM bytes under the wave assumption, bytes with no L2 reuse, programs that do work). With no L2 reuse
    every load goes to HBM: the program's L2 bytes (re-reads per vocabulary tile included) plus its writes."""
    pid = np.arange(grid[0] * grid[1] * grid[2], dtype=np.int64)
    ids = prog.ids(pid)
    live = ~prog.skip(ids) if prog.skip else np.ones(pid.shape, bool)
    wave = (np.cumsum(live) - 1)[live] // resident  # resident slots are taken by programs that do work
    n = int(live.sum())
    wave_b = 0.0
    for names, nbytes in prog.tiles:
        key = np.zeros(n, np.int64)
        for name in names:
            col = ids[name][live]
            key = key * (int(col.max(initial=0)) + 1) + col
        distinct = np.unique(wave * (int(key.max(initial=0)) + 1) + key).size
        wave_b += distinct * nbytes
    return wave_b + n * prog.writes, n * (program_l2(prog) + prog.writes), n


def program_l2(prog: Program) -> float:
    return prog.l2 if prog.l2 is not None else sum(nbytes for _, nbytes in prog.tiles)


def launch_cost(prog: Program, grid, gpu: str, peak: float, per_sm: int, l2_scale: float = 1.0) -> dict:
    """Predicted cost of one launch of ``prog`` on ``grid``: the max of the compute, HBM and L2 times."""
    g = GPUS[gpu]
    wave_b, no_l2, n = hbm_bytes(prog, grid, g["sms"] * per_sm)
    slots = math.ceil(n / (g["sms"] * per_sm)) * per_sm  # programs one SM runs, in waves
    times = {"compute": slots * prog.flops / (peak * EFF_GEMM[gpu] / g["sms"]),
             "HBM": wave_b / (g["hbm"] * EFF_HBM),
             "L2": slots * program_l2(prog) / (g["l2_bw"] * l2_scale / g["sms"])}
    bound = max(times, key=times.get)
    return dict(flops=n * prog.flops, bytes=wave_b, no_l2=no_l2, l2=n * program_l2(prog), programs=n,
                ms=1e3 * times[bound], bound=bound, heads={k: n * v for k, v in prog.heads.items()},
                **{f"{k}_ms": 1e3 * v for k, v in times.items()})


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


def model_launch(rec, kernels, gpu, tc, per_sm, l2_scale=1.0):
    """Best predicted (over autotune configs) cost of one recorded launch on ``gpu``. Configs the model
    cannot tell apart (e.g. BD or num_stages only) tie; the first is kept and ``ties`` counts the others."""
    obj = kernels[(rec.module, rec.name)]
    _, jit = aot.unwrap(obj)
    fn = KERNEL_MODELS.get(rec.name) or KERNEL_MODELS.get(re.sub(r"_(fp32|bf16|fp16)$", "", rec.name))
    if fn is None:
        return None
    peak, peak_kind = kernel_peak(rec.name, rec.dtype, gpu, tc)
    best, ties = None, 0
    for kwargs, _cfg in aot.expand_configs(obj, rec.args, rec.kwargs):
        a = {**dict(zip(jit.arg_names, rec.args)), **kwargs}
        grid = aot.eval_grid(rec.grid, jit, rec.args, kwargs)
        cost = dict(launch_cost(fn(a, grid), grid, gpu, peak, per_sm, l2_scale), peak=peak_kind,
                    config=" ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("B") and isinstance(v, int)))
        if best is not None and math.isclose(cost["ms"], best["ms"], rel_tol=1e-9):
            ties += 1
        elif best is None or cost["ms"] < best["ms"]:
            best, ties = cost, 0
    best["ties"] = ties
    return best


def model_torch_op(op, gpu) -> dict:
    name, flops, moved, dtype = op
    g = GPUS[gpu]
    peak = g["tc16"] if dtype in ("bfloat16", "float16") else g["fp32"]
    t_c, t_m = flops / (peak * EFF_GEMM[gpu]), moved / (g["hbm"] * EFF_HBM)
    return dict(flops=flops, bytes=moved, no_l2=moved, l2=0.0, ms=1e3 * max(t_c, t_m),
                peak=("tc16" if peak == g["tc16"] else "fp32"), bound="compute" if t_c >= t_m else "HBM",
                heads={"s": flops} if name in MM_OPS else {})


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


def gemm_units(heads: dict, spec) -> float:
    """GEMM units of dot FLOPs per lm_head ({"s" | "t": FLOPs}): one unit is 2 N V D of that head."""
    return sum(f / (2 * spec["n"] * spec["v"] * spec["ds" if h == "s" else "dt"]) for h, f in heads.items())


def _new_part():
    return dict(flops=0.0, bytes=0.0, no_l2=0.0, l2=0.0, ms=0.0, n=0, heads=defaultdict(float),
                by_bound=defaultdict(float), comp=defaultdict(float), peak=set(), config=set())


def _accumulate(p, c):
    for k in ("flops", "bytes", "no_l2", "l2", "ms"):
        p[k] += c[k]
    p["n"] += 1
    p["by_bound"][c["bound"]] += c["ms"]
    for k in ("compute", "HBM", "L2"):
        p["comp"][k] += c.get(f"{k}_ms", c["ms"] if c["bound"] == k else 0.0)
    for h, f in c["heads"].items():
        p["heads"][h] += f
    p["peak"].add(c["peak"])


def _bound(by_bound: dict, total: float) -> str:
    """'L2' or, for a mix, 'L2 71% / compute 25% / HBM 4%' (share of the predicted time)."""
    kinds = sorted((k for k, v in by_bound.items() if v > 0), key=lambda k: -by_bound[k])
    if len(kinds) <= 1:
        return kinds[0] if kinds else ""
    return " / ".join(f"{k} {100 * by_bound[k] / total:.0f}%" for k in kinds)


def run_case(kernels, shape, label, dtype, per_sm, tc, l2_scale=1.0):
    """Capture one (shape, scenario) and return per-GPU breakdown rows and the totals."""
    launches, mode = _capture_one(kernels, shape, label, dtype)
    spec = aot.SHAPES[shape]
    out = []
    for gpu in GPUS:
        parts = defaultdict(_new_part)
        unmodelled = set()
        for rec in launches:
            c = model_launch(rec, kernels, gpu, tc, per_sm, l2_scale)
            if c is None:
                unmodelled.add(rec.name)
                continue
            p = parts[f"triton {rec.name.lstrip('_')}"]
            _accumulate(p, c)
            p["config"].add(c["config"] + (f" (+{c['ties']} tied)" if c["ties"] else ""))
        for op in mode.ops:
            _accumulate(parts[f"torch {op[0]}" if op[1] else "torch other ops"], model_torch_op(op, gpu))
        total = _new_part()
        common = dict(shape=shape, case=label, dtype=dtype, gpu=gpu)
        lm_head = label != "rdist"
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["ms"]):
            out.append(dict(common, part=name, **_part_cols(p, spec, lm_head),
                            config=";".join(sorted(p["config"]))))
            for k in ("flops", "bytes", "no_l2", "l2", "ms", "n"):
                total[k] += p[k]
            for d in ("heads", "by_bound", "comp"):
                for k, v in p[d].items():
                    total[d][k] += v
            total["peak"] |= p["peak"]
        ideal = gemm_ideal_flops(spec, label)
        peak = GPUS[gpu]["tc16" if dtype != "fp32" else "fp32"] * EFF_GEMM[gpu]
        ideal_ms = 1e3 * ideal / peak if ideal else None
        out.append(dict(common, part="TOTAL fwd+bwd", **_part_cols(total, spec, lm_head),
                        units_min=GEMM_UNITS_MIN if lm_head else None,
                        ideal_ms=ideal_ms, x_ideal=total["ms"] / ideal_ms if ideal_ms else None,
                        work_gb=(mode.peak - mode.resident) / 1e9, inputs_gb=mode.resident / 1e9,
                        total_gb=mode.peak / 1e9, unmodelled=",".join(sorted(unmodelled))))
    return out


def _part_cols(p, spec, lm_head) -> dict:
    return dict(calls=p["n"], gflop=p["flops"] / 1e9, units=gemm_units(p["heads"], spec) if lm_head else None,
                l2_gb=p["l2"] / 1e9, hbm_gb=p["bytes"] / 1e9, no_l2_gb=p["no_l2"] / 1e9,
                compute_ms=p["comp"]["compute"], hbm_ms=p["comp"]["HBM"], l2_ms=p["comp"]["L2"],
                predicted_ms=p["ms"], bound=_bound(p["by_bound"], p["ms"]), peak="/".join(sorted(p["peak"])))


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
        # resident before and after the step: the inputs, weights and their gradients (as benchmarks/harness.py)
        mode.resident = sum(_nbytes(t) + _nbytes(t.grad) for t in held)
        for rec in log:
            rec.scenario, rec.shape, rec.dtype = label, shape, dtype
        return log, mode
    raise ValueError(f"no scenario {label!r} for shape {shape!r}")


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
COLS = ["shape", "case", "dtype", "gpu", "part", "calls", "gflop", "units", "units_min", "l2_gb", "hbm_gb", "no_l2_gb",
        "compute_ms", "hbm_ms", "l2_ms", "predicted_ms", "bound", "peak", "config", "ideal_ms", "x_ideal", "work_gb",
        "inputs_gb", "total_gb", "unmodelled"]


def _f(x, nd=1):
    return "" if x in (None, "") else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def shape_text(shape) -> str:
    s = aot.SHAPES[shape]
    d = f"D={s['ds']}" if s["ds"] == s["dt"] else f"Ds={s['ds']}, Dt={s['dt']}"
    return f"N={s['n']}, {d}, V={s['v']}" + (f", B={s['b']}, P={s['p']}" if "p" in s else "")


def liger_lines(rows) -> list[str]:
    """The comparison with Liger's published figures at Liger's own shape, memory on Liger's basis."""
    spec = aot.SHAPES[LIGER["shape"]]
    out = []
    for r in rows:
        if not (r["part"].startswith("TOTAL") and r["shape"] == LIGER["shape"] and r["gpu"] == LIGER["gpu"]):
            continue
        esize = aot.DTYPES[r["dtype"]].itemsize
        extra_gb = LIGER["extra_modules"] * spec["v"] * (spec["ds"] + spec["dt"]) * esize / 1e9
        same = "Liger's own case" if r["case"] == LIGER["case"] else f"not Liger's case ({LIGER['case']})"
        out.append(
            f"Liger's shape ({shape_text(LIGER['shape'])}), {LIGER['gpu']}, {r['case']} ({same}), {r['dtype']}: "
            f"kdengine PREDICTED {r['predicted_ms']:.1f} ms fwd+bwd ({r['predicted_ms'] / LIGER['liger_ms']:.2f}x "
            f"Liger's measured {LIGER['liger_ms']} ms; {r['units']:.0f} GEMM units against the {GEMM_UNITS_MIN} "
            f"unavoidable; bound: {r['bound']}). Memory on Liger's basis (peak of everything alive: inputs, weights, "
            f"their gradients, working): kdengine {r['total_gb']:.2f} GB predicted against Liger's {LIGER['liger_gb']} "
            f"GB measured, which also holds the {extra_gb:.2f} GB of weights of the torch module its benchmark builds "
            f"beside Liger's ({LIGER['liger_gb'] - extra_gb:.1f} GB without them). kdengine's working memory "
            f"(beyond inputs, weights and gradients): {r['work_gb']:.2f} GB. "
            f"Torch (Liger's measurement): {LIGER['torch_ms']} ms, {LIGER['torch_gb']} GB.")
    return out


def assumption_lines(args) -> list[str]:
    return [
        "Peaks (datasheet, dense): " + "; ".join(
            f"{g} {v['tc16'] / 1e12:.0f} TFLOP/s bf16, {v['fp32'] / 1e12:.1f} fp32, {v['hbm'] / 1e12:.2f} TB/s HBM, "
            f"{v['l2_mb']} MB L2, {v['sms']} SMs" for g, v in GPUS.items()) + ".",
        "L2-to-SM bandwidth (an ESTIMATE, no datasheet figure): " + ", ".join(
            f"{g} {v['l2_bw'] * args.l2_scale / 1e12:.1f} TB/s" for g, v in GPUS.items())
        + f" (--l2-scale {args.l2_scale:g}).",
        "Efficiency factors (assumed fractions of the datasheet figures): GEMM / tensor-core dots " + ", ".join(
            f"{g} {e:.2f}" for g, e in EFF_GEMM.items()) + f" (Triton tiles and cuBLAS alike); HBM {EFF_HBM:.2f}.",
        "Per Triton launch: time = max(compute = FLOPs / (peak x GEMM eff), HBM = distinct tiles per wave of "
        "resident programs / (bandwidth x HBM eff), L2 = every byte each program loads, the X and W tiles of "
        "every vocabulary tile it computes / L2 bandwidth), compute and L2 quantised to waves of resident "
        f"programs ({args.programs_per_sm} per SM). Torch ops: max(FLOPs / (peak x GEMM eff), bytes / (HBM x HBM eff)).",
        "`HBM GB (no L2)`: every load from HBM, re-reads per vocabulary tile included. Tensor-core peak only where "
        "benchmarks/results/gpu_compile.csv shows HMMA/HGMMA for that kernel.",
        f"GEMM units: one unit is the [N, V] x D product of one lm_head; counted from the recorded launches' dot FLOPs "
        f"per head and the torch matmuls (the student head's dX and dW); {GEMM_UNITS_MIN} are unavoidable for a "
        "trainable student head (z_s, z_t, dX, dW). Pure-GEMM ideal: those 4 units at peak x GEMM eff.",
        "Memory (meta run, live bytes): `working` = peak minus inputs, weights and their gradients; `total` = peak of "
        "all of them together (what torch.cuda.max_memory_allocated measures, Liger's basis); `inputs` = inputs, "
        "weights and gradients.",
        "Not modelled: exp/log (SFU) throughput, launch latency, elementwise FLOPs, overlap beyond max(), L2 "
        "capacity misses beyond the wave assumption.",
    ]


def write_tables(rows, out_dir: Path, args, commit, elapsed):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "roofline.csv", out_dir / "roofline.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["commit"] + COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(dict(r, commit=commit) for r in rows)
    tmp.replace(csv_path)
    lines = ["# Roofline model of kdengine's losses (PREDICTED from datasheet peaks and stated estimates, not measured)",
             "", f"Commit {commit}; {args.dtype} inputs, fwd + bwd, trainable student head.", "",
             *[f"- {line}" for line in assumption_lines(args)], "", "Shapes: " + "; ".join(
                 f"{s} ({shape_text(s)})" for s in CASES) + ".", "",
             *[f"- {line}" for line in liger_lines(rows)], "",
             "| shape | case | gpu | predicted ms | bound (share of time) | GEMM units (min 4) | ideal ms | x ideal "
             "| L2 GB | HBM GB (wave / no L2) | working GB | total GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"].startswith("TOTAL"):
            lines.append(f"| {r['shape']} | {r['case']} | {r['gpu']} | {_f(r['predicted_ms'])} | {r['bound']} | "
                         f"{_f(r['units'], 1)} | {_f(r['ideal_ms'])} | {_f(r['x_ideal'], 2)} | {_f(r['l2_gb'], 0)} | "
                         f"{_f(r['hbm_gb'], 0)} / {_f(r['no_l2_gb'], 0)} | {_f(r['work_gb'], 2)} | {_f(r['total_gb'], 2)} |")
    lines += ["", "Breakdown (predicted; compute / HBM / L2 ms are each term alone, summed over the launches):", "",
              "| shape | case | gpu | part | calls | GFLOP | units | L2 GB | HBM GB | compute ms | HBM ms | L2 ms "
              "| predicted ms | bound | peak | config |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["part"].startswith("TOTAL") and r["predicted_ms"] >= 0.05:
            lines.append(f"| {r['shape']} | {r['case']} | {r['gpu']} | {r['part']} | {r['calls']} | {_f(r['gflop'], 0)} | "
                         f"{_f(r['units'], 2)} | {_f(r['l2_gb'], 0)} | {_f(r['hbm_gb'], 2)} | {_f(r['compute_ms'], 2)} | "
                         f"{_f(r['hbm_ms'], 2)} | {_f(r['l2_ms'], 2)} | {_f(r['predicted_ms'], 2)} | {r['bound']} | "
                         f"{r['peak']} | {r['config']} |")
    lines += ["", f"Reproduce: `python -m benchmarks.gpu_compile && python -m benchmarks.roofline` ({elapsed:.0f} s here)."]
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md_path)
    return csv_path, md_path


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not x > 0 or math.isinf(x):
        raise argparse.ArgumentTypeError(f"--l2-scale={text!r}; expected a finite number > 0")
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=list(aot.DTYPES))
    ap.add_argument("--programs-per-sm", type=int, default=1, help="resident programs per SM (occupancy)")
    ap.add_argument("--l2-scale", type=_positive, default=1.0,
                    help="multiplies the L2-to-SM bandwidth estimates (A100 7.2, H100 10 TB/s)")
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
            rows += run_case(kernels, shape, label, args.dtype, args.programs_per_sm, tc, args.l2_scale)
    commit = aot.commit_id()
    elapsed = time.perf_counter() - t0
    csv_path, md_path = write_tables(rows, Path(args.out), args, commit, elapsed)
    print(f"\nRoofline, PREDICTED, {args.dtype}, commit {commit}")
    print("\n".join(assumption_lines(args)))
    print(f"{'shape':12s} {'case':14s} {'gpu':5s} {'part':32s} {'units':>6s} {'L2 GB':>7s} {'HBM GB':>7s} {'ms':>8s}  bound")
    for r in rows:
        if r["part"].startswith("TOTAL") or r["predicted_ms"] >= 0.05:
            ideal = f"ideal {r['ideal_ms']:.1f} ms ({r['x_ideal']:.2f}x), " if r.get("ideal_ms") else ""
            extra = (f"  {r['bound']}; {ideal}work {r['work_gb']:.2f} GB, total {r['total_gb']:.2f} GB"
                     + (f", NO MODEL for {r['unmodelled']}" if r["unmodelled"] else "")
                     if r["part"].startswith("TOTAL") else f"  {r['bound']} {r['peak']}")
            print(f"{r['shape']:12s} {r['case']:14s} {r['gpu']:5s} {r['part']:32s} {_f(r['units'], 2):>6s} "
                  f"{r['l2_gb']:7.0f} {r['hbm_gb']:7.1f} {r['predicted_ms']:8.2f}{extra}")
    print("\n".join(liger_lines(rows)))
    print(f"wrote {csv_path} and {md_path} ({elapsed:.0f} s)")
    return 1 if any(r.get("unmodelled") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
