"""Distillation diagnostics on held-out conversations: the student's perplexity on the answers
and its mean KL to the teacher on response and visual tokens.

Both come from final hidden states through the fused losses, never from [tokens, V] logits:

    perplexity   exp(sum of CE over response tokens / response tokens), the whole set pooled
    kl_response  mean over response tokens of KL(p_teacher || p_student), temperature 1
    kl_visual    the same over visual-token positions (the state at image token i predicts
                 token i+1, as in training's visual distillation)

Response tokens are the supervised next-token positions of the training template, so the
numbers match the training losses' masks. Held-out records are LLaVA conversations: a file
(`kdengine.data.load_records`) or a question file plus its answer key (`heldout_records`).
"""

from __future__ import annotations

import os

import torch

from kdengine.data.records import Record, Turn

__all__ = ["distill_diagnostics", "heldout_records"]


def heldout_records(questions: list, key: dict, image_folder: str | os.PathLike | None = None) -> list[Record]:
    """One single-turn record per question: the question as the human turn (as `generate`
    prompts it) and the key's answer as the reply (the first one when several are accepted)."""
    from kdengine.eval.generate import human_turn, image_path

    records = []
    for q in questions:
        if q.id not in key:
            raise ValueError(f"{q.where}: answer key has no entry for question {q.id!r}")
        answer = key[q.id].answer
        answer = answer if isinstance(answer, str) else answer[0]
        path = image_path(q, image_folder)
        turns = (Turn("human", human_turn(q)), Turn("gpt", answer))
        records.append(Record(q.id, (path,) if path else (), turns, q.where))
    return records


@torch.no_grad()
def distill_diagnostics(
    student,
    processor,
    records: list[Record],
    teacher=None,
    template: str = "chat",
    batch_size: int = 8,
    pad_to_square: bool = False,
    impl: str = "auto",
    progress: bool = True,
) -> dict:
    """Perplexity of ``student`` on the records' answers and, with ``teacher``, its mean KL to it.

    Args:
        student, teacher: ``LlavaForConditionalGeneration`` models sharing one tokenizer and
            the same image-token count P (checked); the teacher may be wider, even the same model.
        processor: the student's LlavaProcessor; its tokenizer and image processor build the batches.
        records: held-out LLaVA records (images as paths).
        template: the training template of the answers.
        impl: ``fused_linear_divergence`` backend.

    Returns:
        {"samples", "response_tokens", "nll" (mean CE, nats), "perplexity"} and, with a
        teacher, {"visual_tokens", "kl_response", "kl_visual"} (0 when there are no such tokens).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from kdengine.data.collator import LlavaCollator
    from kdengine.data.dataset import LlavaDataset
    from kdengine.losses import fused_linear_divergence, linear_cross_entropy
    from kdengine.model import check_compatible, distill_forward, num_image_tokens

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if not records:
        raise ValueError("no held-out records: expected at least one")
    P = num_image_tokens(student)
    if teacher is not None:
        if num_image_tokens(teacher) != P:
            raise ValueError(
                f"teacher has {num_image_tokens(teacher)} image tokens per image, the student {P}: "
                f"visual KL needs the same P"
            )
        check_compatible(teacher, processor, student, processor)
    tokenizer = processor.tokenizer
    dataset = LlavaDataset(records, tokenizer, processor.image_processor, template=template,
                           num_image_tokens=P, pad_to_square=pad_to_square)
    collate = LlavaCollator(tokenizer.pad_token_id, dataset.image_token_id, P)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)

    ce_sum = kl_resp_sum = kl_vis_sum = 0.0
    n_resp = n_vis = 0
    for batch in tqdm(loader, desc="diagnostics", unit="batch", disable=not progress):
        s = distill_forward(student, batch)
        resp, vis = s.response_mask, s.visual_mask
        n_resp += int(resp.sum())
        if teacher is None:
            ce = linear_cross_entropy(s.hidden[resp], s.lm_head_weight, s.next_labels[resp])
            ce_sum += float(ce) * int(resp.sum())
            continue
        t = distill_forward(teacher, batch)
        rows = resp | vis
        xs = s.hidden[rows]
        labels = s.next_labels[rows]
        div, ce = fused_linear_divergence(
            xs, s.lm_head_weight.detach(), t.hidden[rows].to(xs.dtype), t.lm_head_weight.detach().to(xs.dtype),
            divergence="forward_kl", labels=labels, reduction="none", impl=impl,
        )
        ce_sum += float(ce) * int((labels != -100).sum())
        kl_resp_sum += float(div[resp[rows]].double().sum())
        kl_vis_sum += float(div[vis[rows]].double().sum())
        n_vis += int(vis.sum())
    if n_resp == 0:
        raise ValueError(f"{len(records)} held-out records have no response tokens under template {template!r}")
    nll = ce_sum / n_resp
    out = {"samples": len(dataset), "response_tokens": n_resp, "nll": nll, "perplexity": float(torch.tensor(nll).exp())}
    if teacher is not None:
        out.update(
            visual_tokens=n_vis,
            kl_response=kl_resp_sum / n_resp,
            kl_visual=kl_vis_sum / n_vis if n_vis else 0.0,
        )
    return out
