"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90): no spills, shared memory within the
per-block limit, tensor-core instructions in the bf16/fp16 paths. No GPU needed.

The compile runs ``python -m benchmarks.gpu_compile`` in a subprocess with TRITON_INTERPRET removed
(this test process runs under the interpreter, where kernels are not JIT functions).
    default                    quick subset: LLaVA-KD-1B shape, jsd (+CE), bf16, first config of each kernel
    KDENGINE_FULL_COMPILE=1    full matrix: every shape, every divergence, fp32/bf16/fp16, every config
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FULL = os.environ.get("KDENGINE_FULL_COMPILE", "0") == "1"
TARGETS = ("sm_80", "sm_90")
# Opt-in shared memory per block: compute capability 8.0 163 KB, 9.0 227 KB (CUDA C Programming Guide)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = ("fp32", "bf16", "fp16") if FULL else ("bf16",)
QUICK_ARGS = ["--shapes", "llava_kd_1b", "--divergences", "jsd", "--max-configs", "1"]
FULL_ARGS = ["--divergences", "all"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile")
    cmd = [sys.executable, "-m", "benchmarks.gpu_compile", "--targets", ",".join(TARGETS),
           "--dtypes", ",".join(DTYPES), "--out", str(out)] + (FULL_ARGS if FULL else QUICK_ARGS)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    path = out / "gpu_compile.csv"
    assert path.exists(), f"{' '.join(cmd)} wrote no table (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert table, "empty compile table"
    return table, proc


def _fmt(r):
    return (f"{r['kernel']} [{r['variant']}] {r['target']} {r['dtype']} {r['config']}: regs {r['registers']} "
            f"shared {r['shared_bytes']} spill {r['spill_bytes']} tc {r['tc_instr']} {r['tc_kind']} {r['message']}")


def test_every_kernel_is_compiled(rows):
    """Both kernel families appear, and the run exits 0 only when nothing failed."""
    table, proc = rows
    names = {r["kernel"] for r in table if r["status"] == "ok"}
    assert any(n.startswith("fld_") for n in names) and any(n.startswith("gram_") for n in names), names
    failed = [r for r in table if r["status"] != "ok"]
    assert (proc.returncode != 0) == any(r["status"] == "FAILED" for r in failed), proc.stdout[-2000:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
def test_compiles_without_spills_within_shared_limit(rows, target, dtype):
    table, _ = rows
    mine = [r for r in table if r["target"] in (target, "all") and r["dtype"] in (dtype, "all")]
    assert mine, f"no rows for {target} {dtype}"
    bad = [r for r in mine if r["status"] != "ok" or int(r["spill_bytes"]) != 0
           or int(r["shared_bytes"]) > SHARED_LIMIT[target]]
    assert not bad, (f"{len(bad)} of {len(mine)} compiles fail (status, spill > 0 or shared > "
                     f"{SHARED_LIMIT[target]} B):\n" + "\n".join(map(_fmt, bad)))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "fp32"])
@pytest.mark.parametrize("target", TARGETS)
def test_half_precision_uses_tensor_cores(rows, target, dtype):
    table, _ = rows
    mine = [r for r in table if r["target"] == target and r["dtype"] == dtype and r["status"] == "ok"]
    assert mine, f"no compiled rows for {target} {dtype}"
    bad = [r for r in mine if int(r["tc_instr"]) == 0]
    assert not bad, f"{len(bad)} of {len(mine)} {dtype} compiles have no HMMA/HGMMA:\n" + "\n".join(map(_fmt, bad))


def test_failed_compile_is_a_row_with_the_message(tmp_path):
    """A kernel the compiler rejects comes back as status FAILED with the compiler's message."""
    (tmp_path / "broken_kernel_mod.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def _broken_kernel(p_x, BN: tl.constexpr):
            o = tl.arange(0, BN)
            tl.store(p_x + o, tl.dot(tl.load(p_x + o), tl.load(p_x + o)))  # 1-D dot: rejected
    """))
    script = textwrap.dedent("""
        import sys
        from benchmarks.gpu_compile import Job, compile_job
        job = Job("broken_kernel_mod", "_broken_kernel", "sm_90", {"p_x": "*fp32", "BN": "constexpr"},
                  {(1,): 16}, {}, {"num_warps": 4, "num_stages": 3})
        out = compile_job(job)
        print(out["status"], "|", out["message"])
    """)
    env = dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, message = proc.stdout.strip().splitlines()[-1].split(" | ", 1)
    assert status == "FAILED" and message, proc.stdout


SPILLING_KERNEL = textwrap.dedent('''
    import json, triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from benchmarks.gpu_compile import analyse_cubin

    @triton.jit
    def big_tile(a, b, c, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        o_m, o_n, o_k = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for i in range(4):
            x = tl.load(a + o_m[:, None] * BK + o_k[None, :])
            y = tl.load(b + o_k[:, None] * BN + o_n[None, :])
            acc += tl.dot(x, y, input_precision="ieee")
        tl.store(c + o_m[:, None] * BN + o_n[None, :], acc)

    sig = {"a": "*fp32", "b": "*fp32", "c": "*fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    src = ASTSource(fn=big_tile, signature=sig, constexprs={"BM": 128, "BN": 128, "BK": 64})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "num_stages": 2})
    print(json.dumps(analyse_cubin(kernel.asm["cubin"])))
''')


def test_spill_probe_sees_a_spilling_kernel(tmp_path):
    """The spill column can fail: a 128x128 fp32 accumulator in one warp spills, and the probe reports it."""
    import json

    script = tmp_path / "spilling_kernel.py"  # @triton.jit reads the kernel's source from its file
    script.write_text(SPILLING_KERNEL)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert usage["spill_bytes"] > 1000, usage
