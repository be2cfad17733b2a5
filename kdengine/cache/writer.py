"""Write a teacher cache: run the frozen teacher once over a dataset, keep what the objective reads.

Per sample, the rows `llava_kd_loss` distils are the positions i with response_mask[i]
(labels[i + 1] != -100) or visual_mask[i]: MDist reads the teacher's state there, RDist the
visual ones regrouped per image. ``hidden`` keeps those states (exact); ``topk`` keeps the top-k
of log softmax(h W[:vocab_rows]^T / T) and each image's Gram matrix (compact).

Samples go in dataset-index order into shards of ``shard_samples``; each shard is renamed into
place and then recorded in the manifest, so a killed run resumes after its last complete shard.
"""

from __future__ import annotations

import os
import time

import torch

from kdengine.cache.format import (
    DTYPES,
    HEAD,
    check_disk,
    dtype_name,
    head_bytes,
    pack_gram,
    shard_name,
    verify_file,
    write_tensors,
)
from kdengine.cache.manifest import CacheError, Manifest, check_matches, load_manifest, save_manifest
from kdengine.cache.settings import CacheSettings  # torch-free, for the config
from kdengine.losses.gram_cosine import weight_gram

__all__ = ["CacheSettings", "CacheWriter", "distilled_positions", "teacher_gram", "topk_logprobs",
           "write_teacher_cache"]


class CacheWriter:
    """Appends samples to a cache directory, one atomic shard at a time.

    ``open`` starts a new cache or resumes one: an existing manifest must describe the same cache
    (else CacheError naming the field), its shards are verified, leftover temporary files dropped.
    """

    def __init__(self, directory: str, manifest: Manifest, shard_samples: int):
        self.directory = directory
        self.manifest = manifest
        self.shard_samples = shard_samples
        self._buffer: dict[str, torch.Tensor] = {}
        self._samples: list[list] = []

    @classmethod
    def open(cls, directory: str, manifest: Manifest, shard_samples: int) -> CacheWriter:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))
        if os.path.isfile(os.path.join(directory, "manifest.json")):
            old = load_manifest(directory)
            check_matches(old, {**manifest.fingerprint, "mode": manifest.mode, "k": manifest.k,
                                "temperature": manifest.temperature, "dtype": manifest.dtype}, directory)
            if old.num_samples != manifest.num_samples or old.teacher != manifest.teacher:
                raise CacheError(f"teacher cache {directory!r} was started for {old.num_samples} samples and teacher "
                                 f"{old.teacher}; this run has {manifest.num_samples} and {manifest.teacher}")
            for entry in old.shards + ([old.head] if old.head else []):
                verify_file(directory, entry)
            manifest = old
        else:
            save_manifest(directory, manifest)
        return cls(directory, manifest, shard_samples)

    def pending(self) -> list[int]:
        return self.manifest.pending()

    def write_head(self, tensors: dict[str, torch.Tensor]) -> None:
        self.manifest.head = write_tensors(self.directory, HEAD, tensors)
        save_manifest(self.directory, self.manifest)

    def add(self, index: int, sample_id, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self._buffer[f"{index}/{name}"] = t.detach().cpu().clone()
        self._samples.append([int(index), sample_id])
        if len(self._samples) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        if not self._samples:
            return
        taken = {sh["file"] for sh in self.manifest.shards}
        i = len(self.manifest.shards)
        while shard_name(i) in taken:
            i += 1
        entry = write_tensors(self.directory, shard_name(i), self._buffer)
        entry["samples"] = self._samples
        self.manifest.shards.append(entry)
        save_manifest(self.directory, self.manifest)  # the shard counts only once it is in the manifest
        self._buffer, self._samples = {}, []

    def finish(self) -> Manifest:
        self.flush()
        self.manifest.complete = not self.pending()
        save_manifest(self.directory, self.manifest)
        return self.manifest


def distilled_positions(response_mask: torch.Tensor, visual_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Int32[n] ascending positions < length where response_mask | visual_mask ([L] bool each)."""
    rows = (response_mask | visual_mask)[:length]
    return rows.nonzero().flatten().to(torch.int32)


def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, vocab_rows: int, k: int, temperature: float,
                  chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log softmax(hidden [n, D] @ weight[:vocab_rows]^T / T) in fp32, [chunk, V] logits at a time.

    Returns (Int32[n, k] ids, Float32[n, k] log-probs), highest first."""
    if k > vocab_rows:
        raise CacheError(f"k = {k} exceeds the {vocab_rows} vocabulary rows; expected k <= {vocab_rows}")
    ids, lps = [], []
    w = weight[:vocab_rows].float()
    for r0 in range(0, hidden.shape[0], chunk_rows):
        z = hidden[r0:r0 + chunk_rows].float() @ w.T
        lp = torch.log_softmax(z / temperature, dim=-1)
        top = lp.topk(k, dim=-1, sorted=True)
        ids.append(top.indices.to(torch.int32))
        lps.append(top.values)
    empty = hidden.new_zeros((0, k))
    return (torch.cat(ids) if ids else empty.to(torch.int32)), (torch.cat(lps) if lps else empty.float())


def teacher_gram(visual_hidden: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Float[n_img, P, Dt] states, G = W^T W Float32[Dt, Dt] -> Float32[n_img, P, P] R = (H G) H^T,
    the teacher's visual Gram matrix as `gram_cosine_loss` (torch path) forms it."""
    h = visual_hidden.float()
    return (h @ gram) @ h.transpose(1, 2)


@torch.no_grad()
def write_teacher_cache(model, dataset, collator, directory: str, settings: CacheSettings, fingerprint: dict,
                        log=print) -> Manifest:
    """Run ``model`` (a frozen LLaVA teacher) over ``dataset`` and write or resume the cache in ``directory``.

    dataset: a `kdengine.data.LlavaDataset`; collator: its `LlavaCollator`; fingerprint: the
    manifest's fingerprint fields (`kdengine.cache.manifest.FINGERPRINT_FIELDS`).
    Prints the estimated size before the first shard and refuses when the disk lacks room.
    """
    from kdengine.model import distill_forward, num_image_tokens

    head = model.get_output_embeddings().weight.detach()
    dtype = dtype_name(next(model.parameters()).dtype)
    if settings.mode == "hidden" and settings.dtype not in (None, dtype):
        raise CacheError(f"dtype = {settings.dtype!r}: hidden mode stores the teacher's compute dtype {dtype!r} "
                         f"(exact losses); expected null or {dtype!r}")
    vocab_rows = settings.vocab_rows or head.shape[0]
    if vocab_rows > head.shape[0]:
        raise CacheError(f"vocab_rows = {vocab_rows} exceeds the teacher's {head.shape[0]} lm_head rows")
    p = num_image_tokens(model)
    topk = settings.mode == "topk"
    manifest = Manifest(
        mode=settings.mode, dtype=(settings.dtype or "float16") if topk else dtype,
        fingerprint={**fingerprint, "num_image_tokens": p},
        teacher={"hidden_size": head.shape[1], "vocab_rows": vocab_rows, "gram_rows": vocab_rows},
        num_samples=len(dataset), k=settings.k if topk else None,
        temperature=float(settings.temperature) if topk else None, has_gram=topk,
    )
    writer = CacheWriter.open(directory, manifest, settings.shard_samples)
    gram = weight_gram(head, vocab_rows)
    extra = 0
    if not topk and writer.manifest.head is None:
        extra = head_bytes(vocab_rows, head.shape[1], head.element_size())
        check_disk(directory, extra, "the teacher head")
        writer.write_head({"lm_head_weight": head, "weight_gram": gram})
    todo = writer.pending()
    lp_dtype = DTYPES[writer.manifest.dtype]
    t0, skipped, checked = time.perf_counter(), 0, False
    for b0 in range(0, len(todo), settings.batch_size):
        idx = todo[b0:b0 + settings.batch_size]
        samples = [dataset[i] for i in idx]
        kept = [(i, s) for i, s in zip(idx, samples) if s is not None]
        skipped += len(idx) - len(kept)
        writer.manifest.skipped += [[i, dataset.records[i].id] for i, s in zip(idx, samples) if s is None]
        if not kept:
            continue
        batch = collator([s for _, s in kept])
        out = distill_forward(model, batch)
        rows = []
        for b, (i, s) in enumerate(kept):
            n = int(batch["attention_mask"][b].sum())
            pos = distilled_positions(out.response_mask[b].cpu(), out.visual_mask[b].cpu(), n)
            h = out.hidden[b, pos.long()]
            t = {"positions": pos}
            if topk:
                ids, lps = topk_logprobs(h, head, vocab_rows, settings.k, settings.temperature)
                t.update(ids=ids, logprobs=lps.to(lp_dtype))
                vis = out.visual_mask[b, pos.long()]
                if bool(vis.any()):
                    t["gram"] = pack_gram(teacher_gram(h[vis].view(-1, p, h.shape[1]), gram))
            else:
                t["hidden"] = h
            rows.append((i, s["id"], t))
        if not checked:  # the estimate, from this first batch, before any shard is written
            per = sum(sum(x.numel() * x.element_size() for x in t.values()) for _, _, t in rows) / len(rows)
            need = int(per * len(todo) * 1.05)
            log(f"teacher cache {directory}: {settings.mode} mode, estimated {per:,.0f} bytes/sample x "
                f"{len(todo)} samples = {need:,} bytes ({need / 1e9:.3f} GB)"
                + (f" + head {extra:,} bytes" if extra else ""))
            check_disk(directory, need, f"the teacher cache ({len(todo)} samples)")
            checked = True
        for i, sid, t in rows:
            writer.add(i, sid, t)
    manifest = writer.finish()
    dt = time.perf_counter() - t0
    log(f"teacher cache {directory}: wrote {len(todo) - skipped} samples in {dt:.1f} s "
        f"({(len(todo) - skipped) / max(dt, 1e-9):.1f} samples/s), {len(manifest.shards)} shards"
        + (f"; {skipped} samples skipped (images failed to load)" if skipped else ""))
    return manifest
