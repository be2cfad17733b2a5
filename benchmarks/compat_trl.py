"""Working memory of one GKD step: trl's GKDTrainer (full [B, S, V] logits) vs KDEngineGKDTrainer.

    python -m benchmarks.compat_trl            # B=4, S=128, V=32768, D=64: a tiny LM with a large vocabulary
    python -m benchmarks.compat_trl --quick    # V=8192

One step = the trainer's own ``compute_loss`` + backward on one batch, measured in a fresh process
(benchmarks/harness.py: peak RSS over the step minus RSS before it, minus the gradient bytes).
"On paper" is the size of ONE fp32 [B, S-1, V] logits tensor; TRL's loss holds several of them
(student and teacher logits, their log-softmaxes, the mixture and the KL terms), the fused op none.
Also holds the tiny-LM builders that tests/test_compat_trl.py trains with.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.harness import append_csv, env_info, measure_step, print_table, run_isolated

FULL = dict(b=4, s=128, v=32768, d=64, dt=96)
QUICK = dict(b=4, s=64, v=8192, d=64, dt=96)


def word_tokenizer(vocab_size: int):
    """A WordLevel tokenizer built in memory (no hub): <pad> = 0, <eos> = 1, t2 .. t{V-1}."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_causal_lm(seed: int, vocab_size: int, hidden: int, **extra):
    """A one-layer Qwen2 causal LM from config; initializer_range 0.2 gives O(1) distillation losses."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.2, **extra)
    return Qwen2ForCausalLM(cfg)


def prompt_completion_rows(n: int, vocab_size: int, prompt_len: tuple[int, int], completion_len: tuple[int, int],
                           seed: int = 0) -> list[dict]:
    """``n`` random {"prompt_ids", "completion_ids"} rows with lengths in the given [lo, hi) ranges."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        n_p = int(torch.randint(*prompt_len, (1,), generator=g))
        n_c = int(torch.randint(*completion_len, (1,), generator=g))
        rows.append({"prompt_ids": torch.randint(2, vocab_size, (n_p,), generator=g).tolist(),
                     "completion_ids": torch.randint(2, vocab_size, (n_c,), generator=g).tolist()})
    return rows


def collate_prompt_completion(batch: list[dict]) -> dict:
    """Right-padded prompt+completion with labels on the completion; left-padded prompts for generate."""
    width = max(len(b["prompt_ids"]) + len(b["completion_ids"]) for b in batch)
    p_width = max(len(b["prompt_ids"]) for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    prompts = torch.zeros(len(batch), p_width, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompts)
    for i, b in enumerate(batch):
        seq, n_p = b["prompt_ids"] + b["completion_ids"], len(b["prompt_ids"])
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        labels[i, n_p: len(seq)] = torch.tensor(b["completion_ids"])
        prompts[i, p_width - n_p:], prompt_mask[i, p_width - n_p:] = torch.tensor(b["prompt_ids"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts,
            "prompt_attention_mask": prompt_mask}


def gkd_step(spec: dict):
    """A step() running one trainer's compute_loss + backward; returns the gradient bytes."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdengine.compat.trl import KDEngineGKDTrainer

    b, s, v = spec["b"], spec["s"], spec["v"]
    student, teacher = tiny_causal_lm(0, v, spec["d"]), tiny_causal_lm(1, v, spec["dt"])
    rows = prompt_completion_rows(b, v, (s // 4, s // 4 + 1), (s - s // 4, s - s // 4 + 1))
    args = GKDConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, lmbda=0.0,
                     beta=spec["beta"], disable_tqdm=True)
    cls = KDEngineGKDTrainer if spec["impl"] == "kdengine" else GKDTrainer
    trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=word_tokenizer(v), data_collator=collate_prompt_completion)
    batch = collate_prompt_completion(rows)
    params = [p for p in student.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)

    def step():
        for p in params:
            p.grad = None
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        spec["loss"] = float(loss.detach())
        return grad_bytes

    return step


def worker(spec: dict) -> dict:
    torch.set_num_threads(1)
    step = gkd_step(spec)
    out = measure_step(step, warmup=1, repeats=1)
    return {"work_mb": out["work_mb"], "loss": spec["loss"]}


def main() -> None:
    import json
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        sys.stdout.flush()
        return
    shape = QUICK if a.quick else FULL
    rows, info = [], env_info()
    logits_mb = shape["b"] * (shape["s"] - 1) * shape["v"] * 4 / 2**20
    for impl in ("trl", "kdengine"):
        spec = dict(shape, impl=impl, beta=0.5)
        res = run_isolated("benchmarks.compat_trl", spec)
        rows.append({**info, "op": "gkd compute_loss+backward", "impl": impl,
                     "shape": f"B{shape['b']} S{shape['s']} V{shape['v']} D{shape['d']} Dt{shape['dt']}",
                     "dtype": "float32", "logits_mb_on_paper": logits_mb, "work_mb_measured": res["work_mb"],
                     "loss": res["loss"]})
    trl_mb = rows[0]["work_mb_measured"]
    for r in rows:
        r["vs_trl"] = r["work_mb_measured"] / trl_mb
    print_table(rows, ["impl", "shape", "logits_mb_on_paper", "work_mb_measured", "vs_trl", "loss"],
                title="GKD step working memory (measured, MiB; on paper: one fp32 [B, S-1, V] logits tensor)")
    print(f"appended to {append_csv('compat_trl.csv', rows)}")


if __name__ == "__main__":
    main()
