"""Teacher cache: write throughput, bytes per sample, and disk vs memory vs exactness.

    python -m benchmarks.teacher_cache [--samples 128] [--batch 8] [--no-csv]

Measured (this machine): the tiny teacher (kdengine.model.TINY_TEACHER, 128 hidden, fp32) writes
a cache of ``--samples`` synthetic instruct samples per mode; samples/s and the bytes per sample
on disk (shard files / samples). Predicted (on paper, `kdengine.cache.bytes_per_sample`): bytes
per sample at the tiny shape (its mean visual / response tokens) and at the LLaVA-KD-1B shape
(teacher Qwen1.5-4B: hidden 2560, bf16; student hidden 1024; V = 151,936; 729 visual + ~100
response tokens), plus the disk for LLaVA-mix-665k and what each mode keeps in memory.
Rows go to benchmarks/results/teacher_cache.csv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from benchmarks.harness import append_csv, env_info, print_table
from kdengine.cache import CacheSettings, bytes_per_sample, head_bytes, load_manifest, write_teacher_cache
from kdengine.cache.manifest import fingerprint

# LLaVA-KD-1B (paper Sec. 4.1): SigLIP-B/14@384 (729 tokens) + Qwen1.5-4B teacher / Qwen1.5-0.5B student
KD1B = dict(teacher_hidden=2560, student_hidden=1024, vocab=151936, visual=729, response=100,
            teacher_params=3.95e9 + 0.4e9, samples=665_000)
MODES = [("hidden", {}), ("topk", {"k": 64}), ("topk", {"k": 8})]


def tiny_world(root: str, samples: int):
    from kdengine.data import LlavaCollator, build_dataset, synthesize
    from kdengine.model import TINY_TEACHER, ModelSpec, build_model, num_image_tokens

    data = os.path.join(root, "data")
    synthesize(data, seed=0, n_caption=1, n_instruct=samples, n_eval=1, image_size=32, vocab_size=1024)
    tiny = type(TINY_TEACHER)(**{**TINY_TEACHER.__dict__, "image_size": 32, "max_positions": 512})
    model, proc = build_model(ModelSpec(source="tiny", tokenizer=os.path.join(data, "tokenizer"), tiny=tiny))
    model.eval().requires_grad_(False)
    p = num_image_tokens(model)
    path = os.path.join(data, "instruct.json")
    ds = build_dataset(path, proc.tokenizer, proc.image_processor, image_folder=os.path.join(data, "images"),
                       template="chat", num_image_tokens=p, verbose=False)
    collator = LlavaCollator(proc.tokenizer.pad_token_id, model.config.image_token_id, p)
    fp = fingerprint({"name": "tiny-teacher"}, path, "chat", None, proc)
    return model, ds, collator, fp, p


def mean_rows(ds, collator, p) -> tuple[float, float]:
    """Mean visual and response positions per sample of the tiny dataset."""
    from kdengine.cache.reader import stage_positions

    vis = resp = 0
    for i in range(len(ds)):
        batch = collator([ds[i]])
        vis += int(batch["visual_mask"].sum())
        resp += len(stage_positions(batch, 0, "response"))
    return vis / len(ds), resp / len(ds)


def measured(args, info) -> list[dict]:
    root = tempfile.mkdtemp(prefix="kdengine_bench_cache_")
    try:
        model, ds, collator, fp, p = tiny_world(root, args.samples)
        n_vis, n_resp = mean_rows(ds, collator, p)
        rows = []
        for mode, extra in MODES:
            out = os.path.join(root, f"{mode}{extra.get('k', '')}")
            settings = CacheSettings(mode=mode, batch_size=args.batch, shard_samples=64, **extra)
            t0 = time.perf_counter()
            write_teacher_cache(model, ds, collator, out, settings, fp, log=lambda *_: None)
            dt = time.perf_counter() - t0
            m = load_manifest(out)
            disk = sum(sh["bytes"] for sh in m.shards)
            d = model.get_output_embeddings().weight.shape[1]
            paper = bytes_per_sample(mode, round(n_vis), round(n_resp), hidden_size=d, hidden_bytes=4,
                                     k=extra.get("k", 0), logprob_bytes=2, p=p)
            rows.append(dict(kind="measured", shape=f"tiny D{d} P{p} vis{n_vis:.0f} resp{n_resp:.1f}",
                             mode=mode + (f" k={extra['k']}" if extra else ""), samples=len(ds),
                             samples_per_s=len(ds) / dt, bytes_per_sample=disk / len(ds),
                             predicted_bytes_per_sample=paper, **info))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def predicted() -> list[dict]:
    s = KD1B
    teacher_gb = s["teacher_params"] * 2 / 1e9
    head = head_bytes(s["vocab"], s["teacher_hidden"], 2)
    rows = []
    for mode, extra in MODES:
        per = bytes_per_sample(mode, s["visual"], s["response"], hidden_size=s["teacher_hidden"], hidden_bytes=2,
                               k=extra.get("k", 0), logprob_bytes=2, p=s["visual"])
        if mode == "hidden":
            memory, exact = f"lm_head + W^T W {head / 1e9:.2f} GB", "exact (same fused losses)"
        else:
            memory, exact = "none", f"forward KL on top-{extra['k']} only; RDist exact (stored Gram)"
        rows.append(dict(kind="predicted", shape="LLaVA-KD-1B", mode=mode + (f" k={extra['k']}" if extra else ""),
                         bytes_per_sample=per, disk_665k_tb=(per * s["samples"] + (head if mode == "hidden" else 0))
                         / 1e12, teacher_memory=memory, exactness=exact))
    rows.append(dict(kind="predicted", shape="LLaVA-KD-1B", mode="online teacher", bytes_per_sample=0,
                     disk_665k_tb=0.0, teacher_memory=f"weights {teacher_gb:.1f} GB + forward activations",
                     exactness="exact"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-csv", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args(argv)
    info = env_info()
    rows = measured(args, info)
    print_table(rows, ["mode", "samples", "samples_per_s", "bytes_per_sample", "predicted_bytes_per_sample",
                       "shape"], title=f"Measured: cache writes on {info['device']} (tiny teacher, fp32)")
    paper = predicted()
    print_table(paper, ["mode", "bytes_per_sample", "disk_665k_tb", "teacher_memory", "exactness"],
                title="Predicted (on paper): LLaVA-KD-1B shape, bf16 hidden / fp16 log-probs, fp32 Gram (packed)")
    if args.no_csv:
        return
    path = append_csv("teacher_cache.csv", [{k: r.get(k) for k in (
        "date", "commit", "device", "torch", "kind", "shape", "mode", "samples", "samples_per_s", "bytes_per_sample",
        "predicted_bytes_per_sample")} for r in rows + [{**r, **info} for r in paper]])
    print(f"\nappended {len(rows) + len(paper)} rows to {path}")


if __name__ == "__main__":
    main()
