"""Map-style dataset of LLaVA records: tokenized, masked, truncated; images loaded lazily.

Every record is tokenized once at construction, so tokenization mismatches and
too-long samples are found (and raised or counted) before training starts, and the
exact per-sample lengths are known for length-grouped batching. Only the lengths are
kept; ``__getitem__`` tokenizes again (deterministic) and loads the images.

Length limit: the smaller of ``max_length`` and the model's ``context_length``
(``max_position_embeddings``); a longer sample is cut and counted (``truncation="truncate"``),
dropped and counted (``"skip"``) or refused (``"error"``). Nothing is cut silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, get_worker_info

from .images import process_images
from .records import BadSample, BadSampleSummary, Record, check_on_bad_sample, load_records, open_image
from .templates import check_template, image_token_id_of, tokenize_record, truncate

TRUNCATION = ("truncate", "skip", "error")


@dataclass(frozen=True)
class SkippedSample:
    """What ``__getitem__`` returns for a sample whose image failed to load lazily: under
    ``on_bad_sample="skip"`` (the collator lists it in ``batch["skipped"]``), or under "error" in a
    DataLoader worker (``fatal``; listed in ``batch["failed"]`` for the reader to raise, since a
    worker's exception reaches the main process as a multi-line RuntimeError)."""

    error: BadSample
    fatal: bool = False


class LlavaDataset(Dataset):
    """Samples ``{"id", "input_ids": Long[L], "labels": Long[L], "pixel_values": Float[n, 3, H, W] | None}``.

    Args:
        records: validated records (see :func:`kdengine.data.records.load_records`).
        tokenizer: a Hugging Face tokenizer where ``<image>`` is one token.
        image_processor: the vision tower's image processor; required if any record has images.
        template: "plain", "chat" (the tokenizer's chat template) or "vicuna".
        num_image_tokens: copies of the image token per image, ``(image_size // patch_size) ** 2``.
        max_length: length limit in tokens (image tokens included); None: the model's context.
        context_length: the model's ``max_position_embeddings`` (None: unknown); a
            ``max_length`` above it is refused.
        truncation: for samples above the limit: "truncate" cuts the text after the last image
            and counts it (samples a cut cannot serve are dropped and counted), "skip" drops and
            counts them, "error" raises ``BadSample("too_long")``.
        pad_to_square: pad images to squares with the processor's mean colour (LLaVA-1.5).
        on_bad_sample: "error" or "skip" for bad samples (tokenization mismatch here, and
            images that fail to load in ``__getitem__``; the latter returns a `SkippedSample`).
        summary: the bad-sample summary to count into (e.g. the one from loading).
    """

    def __init__(
        self,
        records: list[Record],
        tokenizer,
        image_processor=None,
        template: str = "chat",
        num_image_tokens: int = 1,
        max_length: int | None = None,
        truncation: str = "truncate",
        pad_to_square: bool = False,
        on_bad_sample: str = "error",
        summary: BadSampleSummary | None = None,
        context_length: int | None = None,
    ):
        check_template(template, tokenizer)
        check_on_bad_sample(on_bad_sample)
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: expected one of {TRUNCATION}")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens!r}: expected an int >= 1")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length!r}: expected None or an int >= 2")
        if context_length is not None and max_length is not None and max_length > context_length:
            raise ValueError(f"max_length={max_length} exceeds the model's context of {context_length} tokens "
                             f"(max_position_embeddings): expected max_length <= {context_length} or null")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: expected tokenizer.pad_token_id to be set")
        if image_processor is None and any(r.has_image for r in records):
            raise ValueError("records have images but image_processor is None: pass the vision tower's processor")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_token_id = image_token_id_of(tokenizer)
        if self.image_token_id == tokenizer.pad_token_id:
            raise ValueError(f"pad and image token share id {self.image_token_id}: expected distinct ids")
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.context_length = context_length
        # The one limit every sample obeys, and its name in messages.
        self.limit = max_length if max_length is not None else context_length
        self.limit_name = "max_length" if max_length is not None else "the model's context length"
        self.truncation = truncation
        self.pad_to_square = pad_to_square
        self.on_bad_sample = on_bad_sample
        self.summary = summary if summary is not None else BadSampleSummary()
        if summary is None:
            self.summary.total = len(records)

        self.records: list[Record] = []
        self.lengths: list[int] = []
        for rec in records:
            try:
                full, full_labels = tokenize_record(rec, tokenizer, template, self.image_token_id, num_image_tokens)
                if self.limit is not None and len(full) > self.limit and truncation != "truncate":
                    raise BadSample("too_long", f"{len(full)} tokens > {self.limit_name}={self.limit} "
                                    f"(truncation={truncation!r})", rec.id, rec.where)
                ids, _ = self._cut(full, full_labels, rec)
            except BadSample as err:
                cut = err.reason in ("too_long", "no_supervised_tokens")
                policy = ("error" if truncation == "error" else "skip") if cut else on_bad_sample
                if policy == "error":
                    raise
                self.summary.add(err)
                continue
            if len(ids) < len(full):
                self.summary.add_truncated(rec.id, rec.where)
            self.records.append(rec)
            self.lengths.append(len(ids))
        if self.summary.total and not self.records:
            raise ValueError(f"no usable samples out of {self.summary.total}:\n{self.summary.format()}")

    @property
    def is_multimodal(self) -> list[bool]:
        """Per sample: does it have at least one image."""
        return [r.has_image for r in self.records]

    def _cut(self, ids: list[int], labels: list[int], rec: Record) -> tuple[list[int], list[int]]:
        return truncate(ids, labels, self.limit, self.image_token_id, rec.id, rec.where, self.limit_name)

    def _tokenize(self, rec: Record) -> tuple[list[int], list[int]]:
        ids, labels = tokenize_record(rec, self.tokenizer, self.template, self.image_token_id, self.num_image_tokens)
        return self._cut(ids, labels, rec)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        rec = self.records[i]
        ids, labels = self._tokenize(rec)
        pixel_values = None
        if rec.images:
            try:
                images = [open_image(p, rec.id, rec.where) for p in rec.images]
            except BadSample as err:
                in_worker = get_worker_info() is not None
                if self.on_bad_sample == "error" and not in_worker:
                    raise
                # Counted (or raised) by whoever reads the batches (a worker's own counts would be lost).
                return SkippedSample(err, fatal=self.on_bad_sample == "error")
            pixel_values = process_images(images, self.image_processor, self.pad_to_square)
        return {
            "id": rec.id,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }


def build_dataset(
    data_path: str | os.PathLike | list,
    tokenizer,
    image_processor=None,
    image_folder: str | os.PathLike | None = None,
    template: str = "chat",
    num_image_tokens: int = 1,
    max_length: int | None = None,
    truncation: str = "truncate",
    pad_to_square: bool = False,
    on_bad_sample: str = "error",
    check_images: bool = True,
    verbose: bool = True,
    context_length: int | None = None,
) -> LlavaDataset:
    """Load LLaVA JSON/JSONL file(s) and build a :class:`LlavaDataset`.

    Template and tokenizer are checked before any file is read. With ``verbose`` the
    bad-sample summary is printed when the dataset is built. Images that fail later arrive
    as ``batch["skipped"]``: add them with ``dataset.summary.add_during_training``.
    """
    check_template(template, tokenizer)
    check_on_bad_sample(on_bad_sample)
    image_token_id_of(tokenizer)
    records, summary = load_records(data_path, image_folder, on_bad_sample, check_images)
    ds = LlavaDataset(
        records,
        tokenizer,
        image_processor,
        template=template,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
        truncation=truncation,
        pad_to_square=pad_to_square,
        on_bad_sample=on_bad_sample,
        summary=summary,
        context_length=context_length,
    )
    if verbose:
        print(ds.summary.format())
    return ds
