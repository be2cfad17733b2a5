"""One DFT training step: kdengine's fused objective vs full logits through the HF head (naive),
and the same step with the teacher cached (kdengine.cache) instead of in memory.

    python -m benchmarks.train_step [--repeats 3] [--impls naive,kdengine,teacher_forward,sft,cached_hidden,cached_topk64]

Both sides run the same tiny teacher and student (SigLIP + Qwen2 from config) with a real Qwen
vocabulary (V = 151,936), a batch of 4 samples each with 64 visual and 64 response tokens, and
do: teacher forward (no grad), student forward, CE + L_res + L_vis + L_rel, backward, AdamW step
(projector + language model trainable, as in DFT). The naive side computes
``model(...).logits`` for both models and the KL / Gram losses from them, as the public LLaVA-KD
code does. ``teacher_forward`` is the online step's teacher forward alone (what a cache saves), ``sft`` is the student-only CE step (no teacher: the memory floor a cached step aims at).
``cached_hidden`` / ``cached_topk64`` write the teacher's cache of the batch first (not timed), drop
the teacher, and then each step reads the batch's rows from the memory-mapped cache (timed) and runs
the same fused losses (hidden: exact) or the top-k objective (k = 64). Each side runs in a fresh
process; rows go to benchmarks/results/train_step.csv.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile

import torch

from benchmarks.harness import append_csv, env_info, measure_step, print_table, run_isolated

QWEN_VOCAB = 151936
SHAPE = dict(batch=4, visual=64, response=64, prompt=12)


def build(seed=0):
    """Tiny teacher/student on a throwaway tokenizer padded to the Qwen vocabulary, and one batch."""
    from kdengine.data.tokenizer import train_tokenizer
    from kdengine.model.build import TINY_STUDENT, TINY_TEACHER, build_tiny, num_image_tokens
    from kdengine.model.freeze import set_trainable

    tok_dir = tempfile.mkdtemp(prefix="kdengine_bench_tok_")
    texts = [f"a {c} {s} at the {p} of the picture" for c in ("red", "green", "blue", "yellow")
             for s in ("circle", "square", "triangle", "star") for p in ("top", "left", "right", "bottom")]
    train_tokenizer(texts * 4, tok_dir, vocab_size=400)
    models = []
    for tiny in (TINY_TEACHER, TINY_STUDENT):
        tiny = type(tiny)(**{**tiny.__dict__, "pad_vocab_to_multiple_of": QWEN_VOCAB})
        model, processor = build_tiny(tiny, tok_dir)
        models.append(model)
    teacher, student = models
    teacher.eval().requires_grad_(False)
    set_trainable(student, ("projector", "language_model"))
    p = num_image_tokens(student)
    assert p == SHAPE["visual"], p
    image_id = student.config.image_token_id
    g = torch.Generator().manual_seed(seed)
    b, n_prompt, n_resp = SHAPE["batch"], SHAPE["prompt"], SHAPE["response"]
    text = lambda n: torch.randint(10, 300, (b, n), generator=g)  # noqa: E731
    input_ids = torch.cat([text(4), torch.full((b, p), image_id), text(n_prompt - 4), text(n_resp)], 1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -n_resp:] = input_ids[:, -n_resp:]
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 visual_mask=input_ids == image_id, pixel_values=torch.randn(b, 3, 64, 64, generator=g))
    return teacher, student, batch, p


def fused_loss(teacher, student, batch, p):
    from kdengine.losses import DistillSettings, LossWeights, llava_kd_loss
    from kdengine.model.forward import distill_forward, vision_features

    with torch.no_grad():
        feats = vision_features(student, batch["pixel_values"])  # identical frozen towers: computed once
        t_out = distill_forward(teacher, batch, vision_features=feats)
    s_out = distill_forward(student, batch, vision_features=feats)
    return llava_kd_loss(s_out, t_out, LossWeights(), DistillSettings(), num_image_tokens=p)[0]


def naive_loss(teacher, student, batch, p):
    """Full [B, L, V] logits for both models; KL and Gram from them (the public code's way)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        zt = teacher(**inputs).logits.float()
    zs = student(**inputs).logits.float()
    labels = batch["labels"]
    resp = torch.zeros_like(labels, dtype=torch.bool)
    resp[:, :-1] = labels[:, 1:] != -100
    vis = batch["visual_mask"]
    ce = torch.nn.functional.cross_entropy(zs[resp], labels[:, 1:][resp[:, :-1]])

    def kl(mask):
        log_ps, log_pt = torch.log_softmax(zs[mask], -1), torch.log_softmax(zt[mask], -1)
        return torch.nn.functional.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")

    ys, yt = zs[vis].view(-1, p, zs.shape[-1]), zt[vis].view(-1, p, zt.shape[-1])
    rs, rt = ys @ ys.transpose(1, 2), yt @ yt.transpose(1, 2)
    rel = 1 - torch.nn.functional.cosine_similarity(rs.flatten(), rt.flatten(), dim=0)
    return ce + kl(resp) + kl(vis) + 0.5 * rel


def sft_loss(teacher, student, batch, p):
    from kdengine.losses import DistillSettings, LossWeights, llava_kd_loss
    from kdengine.model.forward import distill_forward

    return llava_kd_loss(distill_forward(student, batch), None, LossWeights(), DistillSettings())[0]


def cached_loss(mode, k=64):
    """A loss closure over a cache of ``batch`` written by the teacher into a temporary directory."""
    from kdengine.cache import CacheSettings, CachedCollator, CachedTeacher, IndexedDataset, TeacherCacheReader
    from kdengine.cache import topk_kd_loss, write_teacher_cache
    from kdengine.data import LlavaCollator
    from kdengine.losses import DistillSettings, LossWeights, llava_kd_loss
    from kdengine.model.forward import distill_forward

    state = {}

    def setup(teacher, batch, p):
        samples = [{"id": str(b), "input_ids": batch["input_ids"][b], "labels": batch["labels"][b],
                    "pixel_values": batch["pixel_values"][b:b + 1]} for b in range(batch["input_ids"].shape[0])]
        collator = LlavaCollator(-1, teacher.config.image_token_id, p)
        out = tempfile.mkdtemp(prefix="kdengine_bench_cache_")
        atexit.register(shutil.rmtree, out, True)
        settings = CacheSettings(mode=mode, k=k, batch_size=len(samples))
        write_teacher_cache(teacher, samples, collator, out, settings, {}, log=lambda *_: None)
        reader = TeacherCacheReader(out)
        state.update(data=IndexedDataset(samples), collate=CachedCollator(collator, reader),
                     teacher=CachedTeacher(reader))

    def loss(teacher, student, batch, p):
        data = state["data"]
        batch = state["collate"]([data[i] for i in range(len(data))])  # reads the rows from the shards
        t_out = state["teacher"].outputs(batch)
        s_out = distill_forward(student, batch)
        fn = llava_kd_loss if mode == "hidden" else topk_kd_loss
        return fn(s_out, t_out, LossWeights(), DistillSettings(), p)[0]

    return setup, loss


def worker(spec):
    torch.manual_seed(0)
    teacher, student, batch, p = build()
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = {"kdengine": fused_loss, "naive": naive_loss, "sft": sft_loss}.get(spec["impl"])
    if spec["impl"].startswith("cached_"):
        setup, loss_fn = cached_loss("hidden") if spec["impl"] == "cached_hidden" else cached_loss("topk", 64)
        setup(teacher, batch, p)
    if spec["impl"] in ("sft", "cached_hidden", "cached_topk64"):
        teacher = None  # not in memory: the loss never reads it
    grad_bytes = sum(q.numel() * q.element_size() for q in params)
    losses = []
    if spec["impl"] == "teacher_forward":  # what a cached step saves: the online step's teacher forward alone
        from kdengine.model.forward import distill_forward, vision_features

        def forward_only():
            with torch.no_grad():
                distill_forward(teacher, batch, vision_features=vision_features(student, batch["pixel_values"]))
            losses.append(float("nan"))
            return 0

        out = measure_step(forward_only, warmup=1, repeats=spec["repeats"])
        out["first_loss"] = losses[0]
        return out

    def step():
        loss = loss_fn(teacher, student, batch, p)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        return grad_bytes

    step()  # optimizer state allocated before the measured steps
    out = measure_step(step, warmup=1, repeats=spec["repeats"])
    out["first_loss"] = losses[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default="naive,kdengine,teacher_forward,sft,cached_hidden,cached_topk64",
                    help="comma-separated sides to run (naive first: the ratios are against it)")
    ap.add_argument("--no-csv", action="store_true", help="print only (smoke runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    info = env_info()
    rows = []
    for impl in args.impls.split(","):
        res = run_isolated("benchmarks.train_step", dict(impl=impl, repeats=args.repeats))
        rows.append(dict(impl=impl, ms=res["ms"], work_mb=res["work_mb"], first_loss=res["first_loss"],
                         shape=f"B{SHAPE['batch']} vis{SHAPE['visual']} resp{SHAPE['response']} V{QWEN_VOCAB}",
                         dtype="float32", **info))
        print(f"  {impl:9s} {res['ms']:8.0f} ms/step  peak working memory {res['work_mb']:.0f} MB", flush=True)
    naive = rows[0]  # the first side listed
    for r in rows:
        r["speedup"] = naive["ms"] / r["ms"]
        r["mem_ratio"] = naive["work_mb"] / r["work_mb"]
    print_table(rows, ["impl", "ms", "work_mb", "speedup", "mem_ratio", "first_loss"],
                title=f"DFT step (fwd teacher+student, 4 loss terms, bwd, AdamW), {info['device']}; "
                      f"ratios against {rows[0]['impl']}; sft = student CE only; "
                      f"cached_* = teacher from kdengine.cache")
    if args.no_csv:
        return
    path = append_csv("train_step.csv", [{k: r[k] for k in ("date", "commit", "device", "torch", "impl", "shape",
                                                           "dtype", "ms", "work_mb")} for r in rows])
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
