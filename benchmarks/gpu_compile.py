"""Ahead-of-time compile of every Triton kernel in kdengine.kernels for A100, H100 and MI300X (no GPU needed).

    python -m benchmarks.gpu_compile                       # full matrix -> benchmarks/results/gpu_compile.{csv,md}
    python -m benchmarks.gpu_compile --targets sm_90 --dtypes bf16 --shapes llava_kd_1b

One source of truth for the argument signatures: the public losses (``fused_linear_divergence``,
``gram_cosine_loss``, impl="triton") run forward + backward on ``meta`` tensors (no memory) while
every module-level kernel object of kdengine.kernels is replaced by a recorder; each recorded
launch (grid, args, kwargs) is then expanded over the kernel's ``triton.autotune`` configs (or the
launcher's own block sizes), its ``triton.heuristics`` are applied, and Triton's own binder turns
the values into the signature, constexprs and divisibility attributes it would compile at run time.
Identical (kernel, signature, constexprs, attributes, target, options) compiles are done once.

Per compile: registers (VGPRs on gfx942), shared memory (LDS), spill bytes (cuobjdump STACK + LOCAL; 4 x VGPR
spills on gfx942), tensor-core instructions (HMMA / HGMMA in SASS, v_mfma in amdgcn), FFMA count,
compile seconds. A failed compile is a row with the compiler's message; a backend the installed
Triton lacks is a "skipped" row. The exit code is 1 when any compile failed or a discovered kernel
was launched by no scenario. Must not run under TRITON_INTERPRET=1 (kernels would not be JIT functions).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Shapes of issues 11 and 19. P (visual tokens per image) and B (images) only matter to RDist.
# "liger" is Liger-Kernel's benchmark_distill_jsd_loss.py: student Linear(H // 2, V), teacher Linear(H, V),
# H = 4096, BT = 8192; "square_4096" is the same N and V with both heads at D = 4096 (issue 19's D=4096 target).
SHAPES = {
    "liger": dict(n=8192, ds=2048, dt=4096, v=128256),
    "square_4096": dict(n=8192, ds=4096, dt=4096, v=128256),
    "llava_kd_1b": dict(n=4096, ds=1024, dt=2560, v=151936, b=4, p=729),
    "cpu_bench": dict(n=512, ds=896, dt=1536, v=151936, b=2, p=729),
}
TARGETS = {  # name -> (backend, arch, warp size, device)
    "sm_80": ("cuda", 80, 32, "A100"),
    "sm_90": ("cuda", 90, 32, "H100"),
    "gfx942": ("hip", "gfx942", 64, "MI300X"),
}
# Opt-in maximum of shared memory per block (CUDA C Programming Guide, compute capabilities 8.0
# and 9.0: 163 KB and 227 KB); LDS per workgroup on CDNA3.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "gfx942": 64 * 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIVERGENCE_SETS = {"llava_kd": ("forward_kl", "jsd"),
                   "all": ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")}
TOPK, TOPK_TAILS = 64, ("renormalise", "tail")  # top-k teacher cache: K and the tail modes
KERNELS_PACKAGE = "kdengine.kernels"
CSV_COLS = ["kernel", "variant", "target", "dtype", "operands", "config", "status", "registers", "shared_bytes",
            "spill_bytes", "tc_instr", "tc_kind", "ffma", "compile_s", "shapes", "triton", "commit", "message"]


# ----------------------------------------------------------------------------------------------
# kernel discovery
# ----------------------------------------------------------------------------------------------
def _triton_types():
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    return JITFunction, Autotuner, Heuristics


def import_kernel_modules() -> tuple[list, dict]:
    """Import every module of kdengine.kernels with the interpreter off: (modules, {name: import error})."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: under the interpreter the kernels are not JIT "
                         "functions and cannot be compiled. Run with TRITON_INTERPRET unset.")
    pkg = importlib.import_module(KERNELS_PACKAGE)
    mods, errors = [], {}
    for m in pkgutil.iter_modules(pkg.__path__):
        name = f"{KERNELS_PACKAGE}.{m.name}"
        try:
            mods.append(importlib.import_module(name))
        except Exception as e:  # noqa: BLE001 - reported as a FAILED row
            errors[name] = f"import failed: {type(e).__name__}: {e}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit(f"importing {KERNELS_PACKAGE} set TRITON_INTERPRET=1: its kernels are interpreted, "
                         "not compiled; a module must not set it at import time")
    return mods, errors


def unwrap(obj):
    """Autotuner / Heuristics layers of a kernel object, outermost first, and its JITFunction."""
    jit_t, _, _ = _triton_types()
    layers = []
    while not isinstance(obj, jit_t):
        layers.append(obj)
        obj = obj.fn
    return layers, obj


def discover(mods) -> dict:
    """{(module name, attr): kernel object} for every module-level JIT/Autotuner/Heuristics object.

    An object imported into several modules appears once per module (each binding is replaced
    while recording, since a launcher looks the kernel up in its own module).
    """
    types = _triton_types()
    return {(m.__name__, name): obj for m in mods for name, obj in vars(m).items() if isinstance(obj, types)}


def is_kernel_name(name: str) -> bool:
    """A launchable kernel by the project's naming rule (``_name_kernel``, maybe ``_name_kernel_fp32``),
    not a @triton.jit helper."""
    return re.search(r"_kernel(_[a-z0-9]+)?$", name) is not None


# ----------------------------------------------------------------------------------------------
# capture: run the launchers on meta tensors with recorders in place of the kernels
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded launch: ``kernel[grid](*args, **kwargs)`` issued by a launcher."""

    module: str
    name: str
    grid: object
    args: tuple
    kwargs: dict
    scenario: str = ""
    shape: str = ""
    dtype: str = ""


class _Recorder:
    def __init__(self, module, name, log):
        self.module, self.name, self.log = module, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.module, self.name, grid, args, dict(kwargs)))
        return launch

    def run(self, *args, grid, warmup=False, **kwargs):  # kernel.run(...) style launches
        self.log.append(Launch(self.module, self.name, grid, args, dict(kwargs)))


@contextlib.contextmanager
def recording(kernels: dict, log: list):
    """Replace every discovered kernel object by a recorder for the duration of the block."""
    mods = {m: sys.modules[m] for m, _ in kernels}
    try:
        for (m, name) in kernels:
            setattr(mods[m], name, _Recorder(m, name, log))
        yield
    finally:
        for (m, name), obj in kernels.items():
            setattr(mods[m], name, obj)


def _meta(*shape, dtype, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def scenario_divergence(spec, dtype, divergence, labels):
    """fused_linear_divergence fwd+bwd, trainable student head, as LLaVA-KD's objective calls it.

    Returns the inputs (their .grad set), so a caller can keep them alive."""
    from kdengine.losses import fused_linear_divergence

    n, ds, dt, v = spec["n"], spec["ds"], spec["dt"], spec["v"]
    xs, ws = _meta(n, ds, dtype=dtype, grad=True), _meta(v, ds, dtype=dtype, grad=True)
    xt, wt = _meta(n, dt, dtype=dtype), _meta(v, dt, dtype=dtype)
    lab = _meta(n, dtype=torch.int64) if labels else None
    out = fused_linear_divergence(xs, ws, xt, wt, divergence=divergence, labels=lab, impl="triton")
    (out[0] + out[1] if labels else out).backward()
    return xs, ws, xt, wt, lab


def scenario_gram(spec, dtype):
    """gram_cosine_loss fwd+bwd (RDist) over B images of P visual tokens."""
    from kdengine.losses import gram_cosine_loss

    b, p, ds, dt, v = spec["b"], spec["p"], spec["ds"], spec["dt"], spec["v"]
    hs = _meta(b, p, ds, dtype=dtype, grad=True)
    ws = _meta(v, ds, dtype=dtype, grad=True)
    ht, wt = _meta(b, p, dt, dtype=dtype), _meta(v, dt, dtype=dtype)
    gram_cosine_loss(hs, ws, ht, wt, impl="triton").backward()
    return hs, ws, ht, wt


def scenario_topk(spec, dtype, tail, labels):
    """topk_divergence fwd+bwd (teacher cache of the top-K log-probs, K = spec["k"])."""
    from kdengine.losses import topk_divergence

    n, ds, v, k = spec["n"], spec["ds"], spec["v"], spec.get("k", TOPK)
    xs, ws = _meta(n, ds, dtype=dtype, grad=True), _meta(v, ds, dtype=dtype, grad=True)
    lab = _meta(n, dtype=torch.int64) if labels else None
    ids, logprobs = _meta(n, k, dtype=torch.int64), _meta(n, k, dtype=dtype)
    out = topk_divergence(xs, ws, ids, logprobs, tail=tail, labels=lab, impl="triton")
    (out[0] + out[1] if labels else out).backward()
    return xs, ws, ids, logprobs, lab


def scenarios(shape_names, divergences):
    """(shape, scenario label, fn(spec, dtype)) for every public op that reaches a Triton kernel."""
    out = []
    for sname in shape_names:
        spec = SHAPES[sname]
        for div in divergences:
            for labels in (True, False):
                label = f"{div}{'+ce' if labels else ''}"
                out.append((sname, label, lambda s, d, div=div, lab=labels: scenario_divergence(s, d, div, lab)))
        for tail in TOPK_TAILS:
            for labels in (True, False):
                out.append((sname, f"topk_{tail}{'+ce' if labels else ''}",
                            lambda s, d, tail=tail, lab=labels: scenario_topk(s, d, tail, lab)))
        if "p" in spec:
            out.append((sname, "rdist", scenario_gram))
    return out


def capture(kernels, shape_names, dtype_names, divergences):
    """Run every scenario on meta tensors; returns (launches, errors [(shape, scenario, dtype, message)])."""
    launches, errors = [], []
    for sname, label, fn in scenarios(shape_names, divergences):
        for dname in dtype_names:
            log = []
            try:
                with recording(kernels, log):
                    fn(SHAPES[sname], DTYPES[dname])
            except Exception as e:  # noqa: BLE001 - every failure becomes a table row
                errors.append((sname, label, dname, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
                continue
            for rec in log:
                rec.scenario, rec.shape, rec.dtype = label, sname, dname
            launches += log
    return launches, errors


# ----------------------------------------------------------------------------------------------
# expansion: configs, heuristics, Triton's own binder -> compile jobs
# ----------------------------------------------------------------------------------------------
def expand_configs(obj, args, kwargs):
    """[(kwargs for the JITFunction, autotune config or None)] following the kernel's wrapper layers."""
    _, autotuner_t, heuristics_t = _triton_types()
    if isinstance(obj, autotuner_t):
        out = []
        for cfg in obj.configs:
            out += [(kw, cfg) for kw, _ in expand_configs(obj.fn, args, {**kwargs, **cfg.all_kwargs()})]
        return out
    if isinstance(obj, heuristics_t):
        kw = dict(kwargs)
        for name, heur in obj.values.items():
            kw[name] = heur({**dict(zip(obj.arg_names, args)), **kw})
        return expand_configs(obj.fn, args, kw)
    return [(kwargs, None)]


def eval_grid(grid, jit, args, kwargs) -> tuple:
    """The launch grid as a 3-tuple of ints (a callable grid gets the bound arguments + meta)."""
    if callable(grid):
        grid = grid({**dict(zip(jit.arg_names, args)), **kwargs})
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


_BINDERS: dict = {}


def bind(jit, target_name, args, kwargs):
    """(signature, constexprs, attrs, options dict) exactly as JITFunction.run would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(jit), target_name)
    if key not in _BINDERS:
        be, arch, warp, _ = TARGETS[target_name]
        backend = make_backend(GPUTarget(be, arch, warp))
        _BINDERS[key] = (backend, create_function_from_signature(jit.signature, jit.params, backend))
    backend, binder = _BINDERS[key]
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, opts)
    return signature, constexprs, attrs, dict(options.__dict__)


def _plain(v):
    """Constexpr values as plain Python objects (picklable, readable)."""
    v = getattr(v, "value", v)
    return v


def split_constexprs(jit, constexprs: dict) -> tuple[str, str]:
    """(variant, blocks): flags such as DIV=0 HAS_LABELS=1 apart from block sizes BN=64 BV=128."""
    variant, blocks = [], []
    for path, v in sorted(constexprs.items()):
        name, v = jit.arg_names[path[0]], _plain(v)
        if isinstance(v, float):
            continue
        is_block = isinstance(v, int) and not isinstance(v, bool) and re.match(r"^(B[A-Z]*|BLOCK_\w+|GROUP\w*)$", name)
        (blocks if is_block else variant).append(f"{name}={int(v) if isinstance(v, bool) else v}")
    return " ".join(variant), " ".join(blocks)


def operand_types(signature: dict) -> str:
    """Distinct pointer element types of the signature, e.g. 'bf16,fp32,i64'."""
    return ",".join(sorted({t[1:] for t in signature.values() if t.startswith("*")}))


@dataclass
class Job:
    module: str
    attr: str
    target: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self):
        return (self.module, self.attr, self.target, repr(sorted(self.signature.items())),
                repr(sorted((k, repr(_plain(v))) for k, v in self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))


def plan(kernels, launches, target_names):
    """Compile jobs (de-duplicated) and table rows [(job key, row fields)] for every launch x config x target."""
    jobs, rows = {}, {}
    for rec in launches:
        obj = kernels[(rec.module, rec.name)]
        _, jit = unwrap(obj)
        for kwargs, _cfg in expand_configs(obj, rec.args, rec.kwargs):
            for tname in target_names:
                sig, cx, attrs, options = bind(jit, tname, rec.args, kwargs)
                job = Job(rec.module, rec.name, tname, sig, {k: _plain(v) for k, v in cx.items()}, attrs, options)
                k = job.key()
                jobs.setdefault(k, job)
                variant, blocks = split_constexprs(jit, cx)
                config = f"{blocks} w{options['num_warps']} s{options['num_stages']}"
                row_key = (rec.name, variant, tname, rec.dtype, config, k)
                row = rows.setdefault(row_key, dict(kernel=rec.name.lstrip("_"), variant=variant, target=tname,
                                                    dtype=rec.dtype, operands=operand_types(sig), config=config,
                                                    shapes=set(), job=k))
                row["shapes"].add(rec.shape)
    return jobs, list(rows.values())


# ----------------------------------------------------------------------------------------------
# compile + analysis (worker processes)
# ----------------------------------------------------------------------------------------------
def _worker_init(cache_dir):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import_kernel_modules()


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def analyse_cubin(cubin: bytes) -> dict:
    """Registers, spills (STACK + LOCAL bytes per thread), HMMA/HGMMA/FFMA counts of a cubin via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    hmma, hgmma = ops.count("HMMA"), ops.count("HGMMA")
    # Spilled registers land in the ABI stack frame (STACK), not in LOCAL, which stays 0 for Triton
    # cubins even when ptxas reports spill stores; count both.
    spill = int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0))
    return dict(registers=int(usage.get("REG", 0)), spill_bytes=spill,
                stack=int(usage.get("STACK", 0)), tc_instr=hmma + hgmma,
                tc_kind="+".join(k for k, n in (("HMMA", hmma), ("HGMMA", hgmma)) if n) or "-",
                ffma=ops.count("FFMA"))


def analyse_amdgcn(asm: str) -> dict:
    """VGPRs, scratch spills (4 x VGPR spills) and v_mfma count from the amdgcn text.

    SGPR spills go to VGPR lanes (v_writelane), not to memory: they are named in the message only.
    """
    def meta(key):
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0

    mfma = len(re.findall(r"^\s*v_mfma\w*", asm, re.MULTILINE))
    ffma = len(re.findall(r"^\s*v_(?:fma|fmac|pk_fma)_f32\b", asm, re.MULTILINE))
    sgpr = meta("sgpr_spill_count")
    return dict(registers=meta("vgpr_count"), spill_bytes=4 * meta("vgpr_spill_count"), stack=0, tc_instr=mfma,
                tc_kind="v_mfma" if mfma else "-", ffma=ffma,
                message=f"{sgpr} SGPR spills (to VGPR lanes)" if sgpr else "")


def compile_job(job: Job) -> dict:
    """Compile one job; never raises: failures come back as status FAILED with the compiler's message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    be, arch, warp, _ = TARGETS[job.target]
    _, jit = unwrap(getattr(importlib.import_module(job.module), job.attr))
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(jit, job.signature, job.constexprs, job.attrs),
                                target=GPUTarget(be, arch, warp), options=job.options)
        out = analyse_cubin(kernel.asm["cubin"]) if be == "cuda" else analyse_amdgcn(kernel.asm["amdgcn"])
        out.setdefault("message", "")
        out.update(status="ok", shared_bytes=int(kernel.metadata.shared))
    except Exception as e:  # noqa: BLE001 - reported in the table
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(e).__name__)
        out = dict(status="FAILED", message=f"{type(e).__name__}: {msg.strip()[:300]}")
    out["compile_s"] = time.perf_counter() - t0
    return out


def available_targets(names) -> tuple[list, dict]:
    """Targets whose backend the installed Triton has; skipped ones with the reason."""
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    ok, skipped = [], {}
    for t in names:
        be, arch, warp, _ = TARGETS[t]
        if any(b.compiler.supports_target(GPUTarget(be, arch, warp)) for b in backends.values()):
            ok.append(t)
        else:
            skipped[t] = f"no backend for {be} {arch} in this Triton build (has {sorted(backends)})"
    return ok, skipped


def run_jobs(jobs: dict, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kd_triton_cache_") as cache:
        if workers <= 1:
            _worker_init(cache)
            return {k: compile_job(j) for k, j in jobs.items()}
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init, initargs=(cache,)) as pool:
            futures = {k: pool.submit(compile_job, j) for k, j in jobs.items()}
            return {k: f.result() for k, f in futures.items()}


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def commit_id() -> str:
    """Short HEAD commit, with "+dirty" when kernels/ or kdengine/ have uncommitted changes (the run saw them)."""
    root = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "kdengine"], capture_output=True,
                               text=True, cwd=root, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_tables(rows: list[dict], out_dir: Path, elapsed: float, n_jobs: int) -> tuple[Path, Path]:
    """CSV (all rows) and a Markdown table; both written to a temp name then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "gpu_compile.csv", out_dir / "gpu_compile.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(csv_path)
    lines = ["# Ahead-of-time compile of kdengine.kernels (compiled, not run: no GPU)", "",
             f"Triton {rows[0]['triton'] if rows else '?'}, commit {rows[0]['commit'] if rows else '?'}; "
             f"{len(rows)} rows from {n_jobs} distinct compiles in {elapsed:.0f} s. "
             "registers: per thread (VGPRs on gfx942); shared: bytes per block (LDS); spill: STACK + LOCAL bytes per "
             "thread (sm) or 4 x VGPR spills (gfx942; SGPR spills, to VGPR lanes, are named in the status); "
             "tc: HMMA (sm_80) / HGMMA (sm_90 wgmma) / "
             "v_mfma (gfx942) instructions in the binary (static count).", "",
             "| kernel | variant | target | dtype | config | status | regs | shared | spill | tc | ffma | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["status"] == "ok"
        status = r["status"] + (f": {r['message']}" if r.get("message") else "")
        cells = [r.get(c, "") if ok else "" for c in ("registers", "shared_bytes", "spill_bytes")]
        tc = f"{r['tc_instr']} {r['tc_kind']}" if ok else ""
        secs = f"{r['compile_s']:.1f}" if isinstance(r.get("compile_s"), float) else ""
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['target']} | {r['dtype']} | {r['config']} | {status} | "
                     + " | ".join(map(str, cells)) + f" | {tc} | {r.get('ffma', '') if ok else ''} | {secs} |")
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md_path)
    return csv_path, md_path


def summary(rows: list[dict]) -> list[str]:
    """One line per (kernel, target, dtype): ranges of registers/shared/spills/tc over variants and configs."""
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["kernel"], r["target"], r["dtype"]), []).append(r)
    out = []
    for (k, t, d), rs in sorted(groups.items()):
        def rng(col):
            vals = [int(r[col]) for r in rs]
            return f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"
        kinds = ",".join(sorted({r["tc_kind"] for r in rs}))
        out.append(f"{k:28s} {t:7s} {d:5s} n={len(rs):3d} regs {rng('registers'):9s} shared {rng('shared_bytes'):13s} "
                   f"spill {rng('spill_bytes'):5s} tc {rng('tc_instr'):9s} {kinds:10s} ffma {rng('ffma')}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {list(TARGETS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {list(DTYPES)}")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--divergences", default="llava_kd",
                    help=f"{list(DIVERGENCE_SETS)} or a comma list of divergence names")
    ap.add_argument("--kernels", default="", help="regex: only kernels whose name matches")
    ap.add_argument("--max-configs", type=int, default=0, help="at most this many configs per launch (0 = all)")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (at most 2 on the shared machine)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for gpu_compile.csv / .md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import triton

    mods, import_errors = import_kernel_modules()
    kernels = discover(mods)
    divergences = DIVERGENCE_SETS.get(args.divergences) or tuple(args.divergences.split(","))
    targets, skipped = available_targets(args.targets.split(","))
    launches, errors = capture(kernels, args.shapes.split(","), args.dtypes.split(","), divergences)
    if args.kernels:
        launches = [r for r in launches if re.search(args.kernels, r.name)]
    if args.max_configs:
        kernels = dict(kernels)
        for key, obj in list(kernels.items()):
            layers, _ = unwrap(obj)
            for layer in layers:
                if hasattr(layer, "configs"):
                    layer.configs = layer.configs[:args.max_configs]
    jobs, rows = plan(kernels, launches, targets)
    print(f"{len(launches)} launches captured, {len(rows)} table rows, {len(jobs)} distinct compiles "
          f"on {targets} ({time.perf_counter() - t0:.1f} s)", flush=True)
    results = run_jobs(jobs, max(1, min(args.workers, 2)))
    info = dict(triton=triton.__version__, commit=commit_id())
    for r in rows:
        r.update(results[r["job"]], **info)
        r["shapes"] = ";".join(sorted(r["shapes"]))
    launched = {r.name for r in launches}
    # a kernel no scenario launched is a failure only when nothing was filtered out (all dtypes, a full
    # divergence set, every kernel): a subset legitimately leaves e.g. the fp32-only kernels unlaunched
    complete = set(args.dtypes.split(",")) == set(DTYPES) and args.divergences in DIVERGENCE_SETS and not args.kernels
    for (m, name), obj in kernels.items():
        if complete and is_kernel_name(name) and name not in launched:
            rows.append(dict(kernel=name.lstrip("_"), variant="", target="all", dtype="all", operands="",
                             config="", status="FAILED", shapes="", **info,
                             message=f"{m}.{name} was launched by no scenario: add one to "
                                     f"benchmarks/gpu_compile.py:scenarios()"))
    for name, msg in import_errors.items():
        rows.append(dict(kernel=name, variant="", target="all", dtype="all", operands="", config="",
                         status="FAILED", shapes="", message=msg, **info))
    for sname, label, dname, msg in errors:
        rows.append(dict(kernel=f"capture {label}", variant="", target="all", dtype=dname, operands="", config="",
                         status="FAILED", shapes=sname, message=msg, **info))
    for t, why in skipped.items():
        rows.append(dict(kernel="all", variant="", target=t, dtype="all", operands="", config="",
                         status="skipped", shapes="", message=why, **info))
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["target"], r["dtype"], r["config"]))
    elapsed = time.perf_counter() - t0
    csv_path, md_path = write_tables(rows, Path(args.out), elapsed, len(jobs))
    print("\n".join(summary(rows)))
    failed = [r for r in rows if r["status"] == "FAILED"]
    for r in failed:
        print(f"FAILED {r['kernel']} {r['variant']} {r['target']} {r['dtype']} {r['config']}: {r['message']}")
    print(f"wrote {csv_path} and {md_path} in {elapsed:.0f} s; {len(failed)} failed, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
