"""Pad samples into a batch with the visual-token mask.

Batch contract (B samples, L = longest sample, right padding)::

    input_ids       Long[B, L]   pad_token_id after each sample's end
    attention_mask  Long[B, L]   1 on real tokens, 0 on padding
    labels          Long[B, L]   unshifted: input_ids where supervised, else -100 (padding too)
    visual_mask     Bool[B, L]   input_ids == image_token_id
    pixel_values    Float[N, 3, H, W] | None   every image of the batch, in sample order;
                                 None when no sample has an image
    ids             list         record ids, length B
    skipped         list[BadSample]   samples of this micro-batch dropped while loading (lazily
                                 decoded images under on_bad_sample="skip"), for the trainer to count
    failed          list[BadSample]   (only when not empty) samples that failed under "error" in a
                                 DataLoader worker: the reader raises the first

When every sample of a micro-batch was dropped the batch is ``{"ids": [], "skipped": [...]}``
(no tensors). Truncation is the dataset's job (it knows the policy and counts cuts and drops);
the collator checks that every sample's image tokens match its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dataset import SkippedSample
from .templates import IGNORE_INDEX


@dataclass
class LlavaCollator:
    """Collate :class:`kdengine.data.dataset.LlavaDataset` samples (`SkippedSample`s are listed, not padded).

    Args:
        pad_token_id: id written into padding positions.
        image_token_id: id of the image placeholder token.
        num_image_tokens: image tokens per image; each sample must hold
            ``n_images * num_image_tokens`` of them.
        pad_to_multiple_of: round L up to a multiple of this (None: no rounding).

    Returns (from ``__call__``): the batch dict above.
    """

    pad_token_id: int
    image_token_id: int
    num_image_tokens: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_token_id == self.image_token_id:
            raise ValueError(f"pad_token_id == image_token_id == {self.pad_token_id}: expected distinct ids")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of}: expected None or >= 1")

    def __call__(self, samples: list[dict | SkippedSample]) -> dict:
        dropped = [s for s in samples if isinstance(s, SkippedSample)]
        skipped = [s.error for s in dropped if not s.fatal]
        failed = {"failed": [s.error for s in dropped if s.fatal]} if any(s.fatal for s in dropped) else {}
        samples = [s for s in samples if not isinstance(s, SkippedSample)]
        if not samples:
            return {"ids": [], "skipped": skipped, **failed}
        L = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        pixels = []
        for b, s in enumerate(samples):
            ids, lab = s["input_ids"], s["labels"]
            if ids.shape != lab.shape or ids.dim() != 1:
                raise ValueError(f"sample {s['id']!r}: input_ids {tuple(ids.shape)} and labels {tuple(lab.shape)}: expected equal 1-D shapes")
            n = ids.shape[0]
            n_img = 0 if s["pixel_values"] is None else s["pixel_values"].shape[0]
            n_tok = int((ids == self.image_token_id).sum())
            if n_tok != n_img * self.num_image_tokens:
                raise ValueError(
                    f"sample {s['id']!r}: {n_tok} image tokens for {n_img} image(s): "
                    f"expected {n_img} * {self.num_image_tokens} = {n_img * self.num_image_tokens}"
                )
            input_ids[b, :n] = ids
            attention_mask[b, :n] = 1
            labels[b, :n] = lab
            if n_img:
                pixels.append(s["pixel_values"])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "visual_mask": input_ids == self.image_token_id,
            "pixel_values": torch.cat(pixels, dim=0) if pixels else None,
            "ids": [s["id"] for s in samples],
            "skipped": skipped,
            **failed,
        }
