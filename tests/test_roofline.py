"""The roofline model (benchmarks/roofline.py): HBM per wave of resident programs, the L2-to-SM term per
vocabulary tile, GEMM units counted from the recorded launches, and memory on Liger's basis.

The in-process tests call the model functions directly; the others read the tables of one
``python -m benchmarks.roofline`` run in a subprocess without TRITON_INTERPRET (this test process may run
under the interpreter, where the kernels are not JIT functions and cannot be recorded)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_compile as aot
from benchmarks.roofline import GPUS, Program, _fld_stats, hbm_bytes, launch_cost, row_col_ids

ROOT = Path(__file__).resolve().parent.parent


def test_streamed_weight_is_read_once_per_wave():
    # 1D grid of 5 row blocks, each streams the whole W (one shared tile): 2 resident -> 3 waves
    prog = Program(flops=1.0, ids=row_col_ids({}, (5, 1, 1), 5, 1), tiles=[(("n",), 10), ((), 1000)], writes=1)
    wave, no_l2, n = hbm_bytes(prog, (5, 1, 1), resident=2)
    assert n == 5
    assert wave == 5 * 10 + 3 * 1000 + 5 * 1
    assert no_l2 == 5 * 10 + 5 * 1000 + 5 * 1


def test_grouped_order_keeps_row_blocks_hot():
    # 4 row blocks x 3 column blocks, flat grid; GROUP_N=2: programs (n, v) = (0,0) (1,0) (0,1) (1,1) ...
    ids = row_col_ids({"GROUP_N": 2}, (12, 1, 1), 4, 3)(np.arange(12))
    assert list(ids["n"][:6]) == [0, 1, 0, 1, 0, 1] and list(ids["v"][:6]) == [0, 0, 1, 1, 2, 2]
    prog = Program(1.0, row_col_ids({"GROUP_N": 2}, (12, 1, 1), 4, 3), [(("n",), 1), (("v",), 100)], 0)
    wave, _, _ = hbm_bytes(prog, (12, 1, 1), resident=6)
    # wave 1 = row blocks {0,1} x all 3 columns, wave 2 = {2,3} x all 3: W read twice, X once
    assert wave == 4 * 1 + 2 * 3 * 100
    plain = Program(1.0, row_col_ids({}, (4, 3, 1), 4, 3), [(("n",), 1), (("v",), 100)], 0)
    wave_2d, _, _ = hbm_bytes(plain, (4, 3, 1), resident=6)
    # axis 0 fastest: wave 1 = all 4 row blocks x columns {0, 1}, wave 2 = all 4 row blocks x columns {1, 2}
    assert wave_2d == (4 + 4) * 1 + (2 + 2) * 100


def test_skipped_programs_take_no_slot():
    prog = Program(1.0, lambda pid: {"n": pid}, [(("n",), 1)], 0, skip=lambda ids: ids["n"] % 2 == 1)
    wave, no_l2, n = hbm_bytes(prog, (6, 1, 1), resident=2)
    assert n == 3 and wave == 3 and no_l2 == 3


# Liger's benchmark shape (benchmark_distill_jsd_loss.py: BT = 8192, student Linear(H // 2, V), H = 4096)
N, DS, DT, V, SPLIT = 8192, 2048, 4096, 128256, 2048


def _pass1(bn, bv):
    """Pass-1 program and grid at Liger's shape in bf16 with blocks BN x BV (as the launcher passes them)."""
    bf16 = lambda: torch.empty(0, dtype=torch.bfloat16, device="meta")  # noqa: E731 - element size only
    n_split = -(-V // SPLIT)
    a = dict(p_xs=bf16(), p_ws=bf16(), p_xt=bf16(), p_wt=bf16(), N=N, V=V, VC=V, VTOT=V, DS=DS, DT=DT,
             split=SPLIT, n_split=n_split, GROUP_N=16, BN=bn, BV=bv, BD=16)
    grid = (-(-N // bn) * n_split, 1, 1)
    return _fld_stats(a, grid), grid


def test_pass1_l2_bytes_count_every_vocabulary_tile():
    prog, grid = _pass1(64, 64)
    wave, no_l2, n = hbm_bytes(prog, grid, resident=132)
    # independent count: each of the 128 row blocks walks ceil(V / 64) = 2004 vocabulary tiles, and every
    # tile loads its X rows and W columns of both heads again: (64 + 64) x (2048 + 4096) x 2 bytes
    per_tile = (64 + 64) * (2048 + 4096) * 2
    l2 = 128 * 2004 * per_tile
    assert n * prog.l2 == pytest.approx(l2, rel=1e-12)
    assert no_l2 == pytest.approx(l2 + n * prog.writes, rel=1e-12)  # "no L2": the re-reads go to HBM
    assert wave < l2 / 10  # L2 serves the re-reads: HBM sees far less
    # two units: z_s and z_t over every row and column
    assert prog.heads["s"] * n == pytest.approx(2 * N * V * DS) and prog.heads["t"] * n == pytest.approx(2 * N * V * DT)


@pytest.mark.parametrize("gpu", list(GPUS))
def test_l2_term_binds_64x64_tiles_not_128x256(gpu):
    """64 x 64 tiles do 2 x 64 x 64 / ((64 + 64) x 2) = 32 FLOP per L2 byte: below what the tensor cores need,
    so L2 binds; 128 x 256 tiles (85 FLOP/byte) are compute-bound at the same bandwidth."""
    peak = GPUS[gpu]["tc16"]
    small = launch_cost(*_pass1(64, 64), gpu, peak, per_sm=1)
    assert small["bound"] == "L2", small
    # A100 needs 312 x 0.8 / 32 = 7.8 TB/s from L2 (7.2 assumed), H100 989 x 0.7 / 32 = 21.6 TB/s (10 assumed)
    assert small["L2_ms"] / small["compute_ms"] == pytest.approx(
        {"A100": 7.8e12 / 7.2e12, "H100": 21.6e12 / 10e12}[gpu], rel=0.02)
    big = launch_cost(*_pass1(128, 256), gpu, peak, per_sm=1)
    assert big["bound"] == "compute", big
    assert big["l2"] < small["l2"] / 2  # fewer re-reads: the X rows once per 256 columns, W once per 128 rows


def test_l2_scale_moves_the_bound():
    prog, grid = _pass1(64, 64)
    base = launch_cost(prog, grid, "H100", GPUS["H100"]["tc16"], per_sm=1)
    fast = launch_cost(prog, grid, "H100", GPUS["H100"]["tc16"], per_sm=1, l2_scale=10.0)
    assert fast["L2_ms"] == pytest.approx(base["L2_ms"] / 10) and fast["bound"] == "compute"


def test_liger_shape_is_liger_benchmark():
    assert aot.SHAPES["liger"] == dict(n=8192, ds=2048, dt=4096, v=128256)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    cmd = [sys.executable, "-m", "benchmarks.roofline", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    with open(out / "roofline.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, (out / "roofline.md").read_text()


def _total(rows, shape, case, gpu="H100"):
    (r,) = [r for r in rows if r["shape"] == shape and r["case"] == case and r["gpu"] == gpu
            and r["part"].startswith("TOTAL")]
    return r


# Independent count from kernels/fused_linear_divergence.py: pass 1 (z_s, z_t), the backward's recomputation
# (z_s, z_t), dX, dW = 6; the other divergences add pass 2 (z_s, z_t) = 8.
UNITS = {"forward_kl+ce": 6, "jsd+ce": 8, "jsd": 8}


@pytest.mark.parametrize("shape, case", [("liger", "jsd+ce"), ("liger", "forward_kl+ce"), ("square_4096", "jsd"),
                                         ("llava_kd_1b", "forward_kl+ce")])
def test_gemm_units_per_divergence(table, shape, case):
    rows, _ = table
    r = _total(rows, shape, case)
    assert float(r["units"]) == pytest.approx(UNITS[case], abs=1e-6) and r["units_min"] == "4", r


def test_total_peak_holds_working_inputs_weights_and_grads(table):
    rows, md = table
    r = _total(rows, "liger", "jsd+ce")
    # bf16 inputs, weights and gradients at Liger's shape: xs, ws, xt, wt, int64 labels, grads of xs and ws
    held = 2 * (N * DS + V * DS + N * DT + V * DT) + 8 * N + 2 * (N * DS + V * DS)
    assert float(r["inputs_gb"]) * 1e9 == pytest.approx(held, rel=1e-9)
    assert float(r["total_gb"]) * 1e9 >= float(r["work_gb"]) * 1e9 + held - 1
    assert f"kdengine {float(r['total_gb']):.2f} GB predicted against Liger's 11.1 GB" in md


def test_triton_passes_are_l2_bound_at_liger_shape(table):
    rows, _ = table
    fld = [r for r in rows if r["shape"] == "liger" and r["gpu"] == "H100" and r["part"].startswith("triton fld_")]
    assert {r["part"] for r in fld} >= {"triton fld_stats_kernel", "triton fld_rows_kernel", "triton fld_dlogits_kernel"}
    assert all(r["bound"] == "L2" and "BN=64 BV=64" in r["config"] for r in fld), fld


def test_bad_l2_scale_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.roofline", "--l2-scale", "0"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--l2-scale='0'; expected a finite number > 0" in proc.stderr, proc.stderr
