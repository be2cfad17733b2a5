"""Read a teacher cache during training: verified once, then memory-mapped, sample by sample.

Opening a cache checks that it is complete and verifies every shard (size and sha256) before a
step runs. Samples are keyed by dataset index (and checked against the record id), so a rank
reads only the samples its sampler hands it (`LengthGroupedBatchSampler`, any world size), each
straight from its shard with ``safetensors.safe_open`` (memory-mapped, nothing else is loaded).

In a stage: wrap the dataset in `IndexedDataset` and the collator in `CachedCollator`; the
batch then carries ``batch["teacher_cache"]``, a `TeacherBatch`, which `CachedTeacher` turns into
what the loss takes: a teacher-side `DistillOutputs` (hidden mode, for `llava_kd_loss` unchanged)
or `TopKTargets` (topk mode, for `kdengine.cache.objective.topk_kd_loss`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from kdengine.cache.format import DTYPES, HEAD, read_tensors, unpack_gram, verify_file
from kdengine.cache.manifest import CacheError, Manifest, check_matches, load_manifest
from kdengine.cache.writer import distilled_positions

__all__ = ["CachedCollator", "CachedTeacher", "IndexedDataset", "TeacherBatch", "TeacherCacheReader",
           "TopKTargets", "stage_positions"]

IGNORE_INDEX = -100
VERIFY = ("sha256", "size")


class TeacherCacheReader:
    """A complete cache directory; ``sample(index, id)`` returns that sample's cached tensors.

    verify: "sha256" (every shard hashed at open, the default) or "size" (sizes only, for
    caches too large to hash at every start). The shard handles are opened lazily in each
    process (DataLoader workers included) and are not pickled."""

    def __init__(self, directory: str, verify: str = "sha256"):
        if verify not in VERIFY:
            raise CacheError(f"verify = {verify!r}: expected one of {list(VERIFY)}")
        self.directory = directory
        self.manifest: Manifest = load_manifest(directory)
        m = self.manifest
        if not m.complete:
            raise CacheError(f"teacher cache {directory!r} is incomplete: {len(m.written())} of {m.num_samples} "
                             f"samples written; expected a finished cache (rerun teacher-cache: it resumes)")
        for entry in m.shards + ([m.head] if m.head else []):
            verify_file(directory, entry, full=verify == "sha256")
        if m.mode == "hidden" and m.head is None:
            raise CacheError(f"teacher cache {directory!r}: hidden mode but no {HEAD} in the manifest")
        self._where = {int(i): (sh["file"], sid) for sh in m.shards for i, sid in sh["samples"]}
        ids = [str(sid) for _, sid in self._where.values()]
        # unique record ids: a sample is found by its id, so a stage whose dataset drops other samples
        # (another context length) still finds it; else by dataset index, checked against the id
        self._by_id = {str(sid): i for i, (_, sid) in self._where.items()} if len(set(ids)) == len(ids) else None
        self._skipped = {int(i): sid for i, sid in m.skipped}
        self._handles: dict = {}
        self.reads = 0  # samples read by this process (tests check that a rank reads only its own)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def check(self, expected: dict) -> None:
        """CacheError naming the first field of ``expected`` the cache differs in (see `check_matches`)."""
        check_matches(self.manifest, expected, self.directory)

    def head(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(lm_head_weight [Vt, Dt] in the teacher dtype, W^T W Float32[Dt, Dt]) of a hidden cache."""
        if self.manifest.head is None:
            raise CacheError(f"teacher cache {self.directory!r} ({self.manifest.mode} mode) has no teacher head")
        t = read_tensors(os.path.join(self.directory, HEAD), ["lm_head_weight", "weight_gram"])
        return t["lm_head_weight"].to(device), t["weight_gram"].to(device)

    def locate(self, index: int, sample_id=None) -> tuple[str, int]:
        """(shard, cache index) of the stage's sample ``index`` with record id ``sample_id``: found by id when
        the cache's ids are unique, else by index; CacheError if it is missing or holds another record id."""
        given = int(index)
        index = given if self._by_id is None or sample_id is None else self._by_id.get(str(sample_id), -1)
        if index not in self._where:
            skipped = given in self._skipped and str(self._skipped[given]) == str(sample_id)
            why = ("its images failed to load when the cache was written" if skipped
                   else f"the cache holds {len(self._where)} samples of {self.manifest.num_samples}")
            raise CacheError(f"sample {sample_id!r} (index {given}) is missing from teacher cache "
                             f"{self.directory!r}: {why}; expected every sample the stage reads")
        file, sid = self._where[index]
        if sample_id is not None and str(sid) != str(sample_id):
            raise CacheError(f"sample index {index}: the stage's record id is {sample_id!r} but teacher cache "
                             f"{self.directory!r} holds id {sid!r} there; expected the dataset the cache was "
                             f"written from")
        return file, index

    def sample(self, index: int, sample_id=None) -> dict[str, torch.Tensor]:
        """positions Int32[n] and hidden [n, Dt] | ids Int32[n, K], logprobs [n, K], gram (if images)."""
        file, index = self.locate(index, sample_id)
        if file not in self._handles:
            handle = safe_open(os.path.join(self.directory, file), framework="pt")
            self._handles[file] = (handle, set(handle.keys()))
        handle, keys = self._handles[file]
        names = ("positions", "hidden") if self.manifest.mode == "hidden" else ("positions", "ids", "logprobs")
        out = {n: handle.get_tensor(f"{index}/{n}") for n in names}
        if f"{index}/gram" in keys:
            out["gram"] = handle.get_tensor(f"{index}/gram")
        self.reads += 1
        return out


def stage_positions(batch: dict, b: int, rows: str) -> torch.Tensor:
    """Int32[n] positions of sample ``b`` the cache must hold: response (labels[i + 1] != -100)
    and, for rows = "response+visual", visual positions; as `distill_forward` masks them."""
    labels = batch["labels"][b]
    resp = torch.zeros_like(labels, dtype=torch.bool)
    resp[:-1] = labels[1:] != IGNORE_INDEX
    vis = batch["visual_mask"][b] if rows == "response+visual" else torch.zeros_like(resp)
    return distilled_positions(resp, vis.bool(), int(batch["attention_mask"][b].sum()))


@dataclass
class TeacherBatch:
    """The cached teacher side of one collated batch (B samples, L positions).

    mask:     Bool[B, L]   positions held by the cache
    hidden:   [B, L, Dt] | None   hidden mode: cached states scattered to their positions, 0 elsewhere
    ids:      Int32[R, K] | None  topk mode, R = mask.sum() rows in row-major (b, position) order
    logprobs: [R, K] | None
    gram:     Float32[n_img, P(P+1)/2] | None   packed teacher Gram per image, in batch image order
    """

    mask: torch.Tensor
    hidden: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    gram: torch.Tensor | None = None


def assemble(reader: TeacherCacheReader, indices: list[int], batch: dict) -> TeacherBatch:
    """Read the batch's samples and lay them out against the collated batch, checking positions."""
    m = reader.manifest
    B, L = batch["input_ids"].shape
    mask = torch.zeros(B, L, dtype=torch.bool)
    per = []
    for b, index in enumerate(indices):
        sid = batch["ids"][b]
        t = reader.sample(index, sid)
        want = stage_positions(batch, b, m.rows)
        got = t["positions"]
        if not torch.equal(got, want):
            n = min(len(got), len(want))
            j = next((i for i in range(n) if got[i] != want[i]), n)
            raise CacheError(
                f"sample {sid!r} (index {index}): teacher cache {reader.directory!r} holds {len(got)} positions, "
                f"the stage distils {len(want)}; first difference at entry {j} (cache {got[j:j + 3].tolist()}, "
                f"stage {want[j:j + 3].tolist()}); expected the same tokenization (template, max_length, tokenizer)")
        mask[b, got.long()] = True
        per.append(t)
    if m.mode == "hidden":
        dt = m.teacher["hidden_size"]
        hidden = torch.zeros(B, L, dt, dtype=DTYPES[m.dtype])
        for b, t in enumerate(per):
            hidden[b, t["positions"].long()] = t["hidden"]
        return TeacherBatch(mask=mask, hidden=hidden)
    grams = [t["gram"] for t in per if "gram" in t]
    return TeacherBatch(
        mask=mask,
        ids=torch.cat([t["ids"] for t in per]) if per else torch.zeros(0, m.k, dtype=torch.int32),
        logprobs=torch.cat([t["logprobs"] for t in per]) if per else torch.zeros(0, m.k),
        gram=torch.cat(grams) if grams else None,
    )


class IndexedDataset(Dataset):
    """A dataset whose samples also carry ``cache_index`` (their index); other attributes pass through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = self.dataset[i]
        return None if s is None else {**s, "cache_index": int(i)}

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class CachedCollator:
    """``collator`` plus ``batch["teacher_cache"]``: the cached teacher rows of the batch's samples
    (read in the DataLoader, so workers prefetch them). Samples come from an `IndexedDataset`."""

    collator: object
    reader: TeacherCacheReader

    def __call__(self, samples: list[dict | None]) -> dict | None:
        kept = [s for s in samples if s is not None]
        batch = self.collator(kept)
        if batch is None:
            return None
        batch["teacher_cache"] = assemble(self.reader, [s["cache_index"] for s in kept], batch)
        return batch


@dataclass
class TopKTargets:
    """The topk teacher of a batch, on the training device (see `TeacherBatch` for shapes).

    vocab_rows: rows of the cached softmax and Gram; temperature: the cache's softmax temperature."""

    mask: torch.Tensor
    ids: torch.Tensor
    logprobs: torch.Tensor
    gram: torch.Tensor | None
    vocab_rows: int
    temperature: float
    rows: str


class CachedTeacher:
    """Stands in for the teacher in a stage: ``outputs(batch)`` gives the loss its teacher side.

    hidden mode: a `DistillOutputs` with the cached states at their positions (zeros elsewhere,
    never read), the cached lm_head weight and the batch's masks, so `llava_kd_loss` runs as
    with the live teacher. topk mode: `TopKTargets`."""

    def __init__(self, reader: TeacherCacheReader, device: torch.device | str = "cpu"):
        self.reader = reader
        self.device = torch.device(device)
        self.mode = reader.manifest.mode
        self.lm_head_weight = reader.head(self.device)[0] if self.mode == "hidden" else None

    def check_student(self, student_vocab: int) -> None:
        """A top-k cache's softmax and Gram rows must be the student's lm_head rows (the student's
        log-sum-exp runs over all of them); a hidden cache needs nothing (the losses take min(V, Vt))."""
        rows = self.reader.manifest.teacher["vocab_rows"]
        if self.mode == "topk" and rows != student_vocab:
            raise CacheError(f"teacher cache {self.reader.directory!r} holds a softmax over {rows} vocabulary rows "
                             f"but the student has {student_vocab} lm_head rows; expected equal (write the cache "
                             f"with vocab_rows: {student_vocab})")

    def outputs(self, batch: dict):
        from kdengine.model import DistillOutputs

        tb: TeacherBatch = batch["teacher_cache"]
        dev = self.device
        if self.mode == "hidden":
            labels = batch["labels"].to(dev)
            next_labels = torch.full_like(labels, IGNORE_INDEX)
            next_labels[:, :-1] = labels[:, 1:]
            visual = batch["visual_mask"].to(dev)
            return DistillOutputs(hidden=tb.hidden.to(dev), lm_head_weight=self.lm_head_weight, visual_mask=visual,
                                  response_mask=next_labels != IGNORE_INDEX, next_labels=next_labels)
        m = self.reader.manifest
        p = m.fingerprint["num_image_tokens"]
        gram = None if tb.gram is None else unpack_gram(tb.gram.to(dev), p)
        return TopKTargets(mask=tb.mask.to(dev), ids=tb.ids.to(dev), logprobs=tb.logprobs.to(dev), gram=gram,
                           vocab_rows=m.teacher["vocab_rows"], temperature=m.temperature, rows=m.rows)
