"""Loss benchmark: fused divergence and RDist vs the plain PyTorch a user writes, the generic reference
and Liger-Kernel, in one run.

    python -m benchmarks.losses            # CPU benchmark shape: N=512, Ds=896, Dt=1536, V=151936, fp32
    python -m benchmarks.losses --quick    # a smaller shape for a fast look
    python -m benchmarks.losses --tiny     # a toy shape: checks that every row runs (seconds)

Every row is one step (forward + backward, CE in the same pass) measured in a fresh process.
Baselines: "plain" is what LLaVA-KD's code writes on full logits, F.kl_div(F.log_softmax(z_s / T),
F.log_softmax(z_t / T), log_target=True, reduction="batchmean") plus F.cross_entropy(z_s) (for RDist:
the Gram matrices of the full logits and one cosine); "reference" is kdengine's generic materialising
impl="reference" (the test oracle). Ratios are against "plain". Times are also reported as multiples
of the GEMM floor measured in the same run: the unavoidable matmuls (teacher logits, student logits,
dX, and dW for a trainable head). The torch path runs twice: at its default memory budget (512 MB on
CPU: row chunks, the four GEMMs once each) and at budget_mb=32 (streaming: bounded blocks, the lm_head
GEMMs recomputed); the schedule each took and its chunk rows C (or block shape) are in the impl column,
e.g. "torch[row_chunk C=256]" or "torch[streaming 512x2560]" (kdengine/losses/budget.py).
Rows are appended to benchmarks/results/losses.csv with device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import torch.nn.functional as F

from benchmarks.harness import append_csv, env_info, measure_step, print_table, run_isolated

FULL = dict(n=512, ds=896, dt=1536, v=151936, b=2, p=729)
QUICK = dict(n=256, ds=256, dt=512, v=32768, b=2, p=128)
TINY = dict(n=32, ds=32, dt=48, v=512, b=2, p=8)
BASELINE = "plain"


def plain_kd_loss(xs, ws, xt, wt, labels=None, temperature=1.0):
    """What a user writes (LLaVA-KD's code): full logits, KL(p_t || p_s) with batchmean, + CE on z_s.

    xs [N, Ds], ws [V, Ds], xt [N, Dt], wt [V, Dt], labels [N] or None. Returns (kl, ce) or kl.
    """
    zs = xs @ ws.T
    with torch.no_grad():
        zt = xt @ wt.T
    kl = F.kl_div(F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1), log_target=True,
                  reduction="batchmean")
    return (kl, F.cross_entropy(zs, labels)) if labels is not None else kl


def plain_gram_loss(hs, ws, ht, wt):
    """RDist as a user writes it: logits of the visual tokens, their Gram matrices, one cosine over all.

    hs [B, P, Ds], ws [V, Ds], ht [B, P, Dt], wt [V, Dt] -> scalar 1 - cos(R_s, R_t).
    """
    zs = hs @ ws.T
    with torch.no_grad():
        zt = ht @ wt.T
        rt = zt @ zt.transpose(1, 2)
    rs = zs @ zs.transpose(1, 2)
    return 1 - F.cosine_similarity(rs.flatten(), rt.flatten(), dim=0)


def _inputs(spec, dtype):
    g = torch.Generator().manual_seed(0)
    n, ds, dt, v = spec["n"], spec["ds"], spec["dt"], spec["v"]
    xs = torch.randn(n, ds, generator=g).to(dtype)
    ws = (torch.randn(v, ds, generator=g) / math.sqrt(ds)).to(dtype)
    xt = torch.randn(n, dt, generator=g).to(dtype)
    wt = (torch.randn(v, dt, generator=g) / math.sqrt(dt)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return [t.to(dev) for t in (xs, ws, xt, wt, labels)]


def divergence_step(spec):
    """Build inputs and return a step() that runs forward + backward and returns the gradient bytes."""
    from kdengine.losses import fused_linear_divergence

    dtype = getattr(torch, spec.get("dtype", "float32"))
    xs, ws, xt, wt, labels = _inputs(spec, dtype)
    frozen = spec["frozen"]
    xs.requires_grad_(True)
    ws.requires_grad_(not frozen)
    grad_bytes = xs.numel() * xs.element_size() + (0 if frozen else ws.numel() * ws.element_size())
    impl = spec["impl"]

    if impl.startswith("floor"):  # the GEMMs alone, into preallocated outputs
        zt = torch.empty(xs.shape[0], wt.shape[0], device=xs.device, dtype=dtype)
        zs = torch.empty_like(zt)
        dx = torch.empty_like(xs)
        dw = torch.empty_like(ws)

        def step():
            with torch.no_grad():
                torch.mm(xt, wt.T, out=zt)
                torch.mm(xs, ws.T, out=zs)
                torch.mm(zs, ws, out=dx)
                if not frozen:
                    torch.mm(zs.T, xs, out=dw)
            return 0

        return step

    if impl == BASELINE:
        def loss():
            kl, ce = plain_kd_loss(xs, ws, xt, wt, labels)
            return 0.5 * kl + 0.5 * ce
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0,
                                          compiled=torch.cuda.is_available())

        def loss():
            return loss_fn(xs, ws, xt, wt, labels)
    else:
        kw = dict(impl=impl, labels=labels, budget_mb=spec.get("budget_mb"))

        def loss():
            div, ce = fused_linear_divergence(xs, ws, xt, wt, **kw)
            return 0.5 * div + 0.5 * ce

    def step():  # gradients are freed after the step so each step starts from the same resident set
        loss().backward()
        xs.grad = None
        ws.grad = None
        return grad_bytes

    return step


def schedule_label(spec) -> str:
    """The torch path's schedule for this row, as it will log it: "row_chunk C=<rows>" or "streaming <rows>x<cols>"."""
    from kdengine.losses.budget import choose_schedule, resolve_budget_mb

    budget, _ = resolve_budget_mb(spec.get("budget_mb"), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    elem = 8 if spec.get("dtype") == "float64" else 4
    s = choose_schedule(spec["n"], spec["v"], spec["v"], spec["ds"] + spec["dt"], elem, budget, "mean")
    return f"row_chunk C={s.rows}" if s.kind == "row_chunk" else f"streaming {s.rows}x{s.cols}"


def gram_step(spec):
    from kdengine.losses import gram_cosine_loss

    g = torch.Generator().manual_seed(0)
    b, p, ds, dt, v = spec["b"], spec["p"], spec["ds"], spec["dt"], spec["v"]
    hs = torch.randn(b, p, ds, generator=g, requires_grad=True)
    ws = torch.randn(v, ds, generator=g) / math.sqrt(ds)
    ht = torch.randn(b, p, dt, generator=g)
    wt = torch.randn(v, dt, generator=g) / math.sqrt(dt)
    impl = spec["impl"]

    def step():
        if impl == BASELINE:
            plain_gram_loss(hs, ws, ht, wt).backward()
        else:
            gram_cosine_loss(hs, ws, ht, wt, impl=impl).backward()
        hs.grad = None
        return hs.numel() * 4

    return step


def worker(spec: dict) -> dict:
    step = gram_step(spec) if spec["kind"] == "gram" else divergence_step(spec)
    return measure_step(step, warmup=1, repeats=spec.get("repeats", 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller shape (N=256, V=32768)")
    size.add_argument("--tiny", action="store_true", help="toy shape (N=32, V=512): a check that every row runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-mb", type=float, default=32.0,
                    help="budget_mb of the torch path's streaming row (default 32: today's streaming blocks)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--no-gram", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    shape = TINY if args.tiny else QUICK if args.quick else FULL
    info = env_info()
    cuda = torch.cuda.is_available()
    base = dict(kind="div", dtype="float32", repeats=args.repeats, **shape)
    stream = {"budget_mb": args.stream_mb}
    runs = [("floor4", False, {}), (BASELINE, False, {}), ("reference", False, {}), ("torch", False, {}),
            ("torch", False, stream)]
    if not args.no_liger:
        runs.append(("liger", False, {}))
    if cuda:
        runs.append(("triton", False, {}))
    runs += [("floor3", True, {}), (BASELINE, True, {}), ("reference", True, {}), ("torch", True, {}),
             ("torch", True, stream)]
    rows = []
    floors = {}
    for impl, frozen, extra in runs:
        spec = dict(base, impl=impl, frozen=frozen, **extra)
        res = run_isolated("benchmarks.losses", spec)
        name = impl + (f"[{schedule_label(spec)}]" if impl == "torch" else "")
        head = "frozen" if frozen else "trainable"
        if impl.startswith("floor"):
            floors[head] = res["ms"]
        row = dict(op="divergence+ce", head=head, impl=name,
                   shape=f"N{shape['n']} Ds{shape['ds']} Dt{shape['dt']} V{shape['v']}",
                   dtype="float32", ms=res["ms"], x_floor=res["ms"] / floors[head],
                   work_mb=res["work_mb"] if not impl.startswith("floor") else None, **info)
        rows.append(row)
        print(f"  {head:9s} {name:28s} {res['ms']:9.1f} ms  {row['x_floor']:.2f}x floor  "
              f"work {row['work_mb'] or 0:.0f} MB", flush=True)
    if not args.no_gram:
        for impl in (BASELINE, "reference", "torch") + (("triton",) if cuda else ()):
            spec = dict(kind="gram", impl=impl, repeats=max(2, args.repeats - 1), **shape)
            res = run_isolated("benchmarks.losses", spec)
            rows.append(dict(op="rdist", head="frozen", impl=impl,
                             shape=f"B{shape['b']} P{shape['p']} Ds{shape['ds']} Dt{shape['dt']} V{shape['v']}",
                             dtype="float32", ms=res["ms"], x_floor=None, work_mb=res["work_mb"], **info))
            print(f"  rdist     {impl:12s} {res['ms']:9.1f} ms  work {res['work_mb']:.0f} MB", flush=True)
    by = {(r["op"], r["head"], r["impl"]): r for r in rows}
    for r in rows:
        plain = by.get((r["op"], r["head"], BASELINE))
        ref = by.get((r["op"], r["head"], "reference"))
        r["speedup_vs_plain"] = plain["ms"] / r["ms"] if plain else None
        r["mem_vs_plain"] = (r["work_mb"] / plain["work_mb"]) if (plain and r["work_mb"] is not None) else None
        r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref else None
    cols = ["op", "head", "impl", "ms", "x_floor", "work_mb", "speedup_vs_plain", "mem_vs_plain", "speedup_vs_reference"]
    print_table(rows, cols, title=f"fwd+bwd per step, {info['device']}, torch {info['torch']}, commit {info['commit']}")
    if args.tiny:
        print("\n--tiny: a run check, no rows appended to benchmarks/results/losses.csv")
        return
    path = append_csv("losses.csv", [{k: r[k] for k in ["date", "commit", "device", "torch", "triton", "op", "head",
                                                         "impl", "shape", "dtype", "ms", "x_floor", "work_mb"]}
                                     for r in rows])
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
