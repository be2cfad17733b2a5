"""Import top-k log-probabilities computed elsewhere (an inference server) as a topk teacher cache.

Input: JSONL, one object per sample of the stage's dataset, in any order::

    {"id": "000123",                  the LLaVA record id (as in the dataset file)
     "index": 17,                     optional: the sample's dataset index (needed only when ids repeat)
     "positions": [40, 41, 42],       0-based positions in kdengine's tokenization of the sample, ascending;
                                      the distribution at position i is over token i + 1
     "top_ids": [[5, 9, 2], ...],     per position up to k token ids, no id twice
     "top_logprobs": [[-0.1, -2.5, -3.0], ...]}   their log-probabilities at the stage's temperature,
                                      highest first, each <= 0 (-inf allowed: no mass)

``positions`` must be exactly the sample's response positions (labels[i + 1] != -100, what an
inference server's prompt log-probabilities give), or those plus its visual (image-token)
positions; every record of a file uses the same choice. A position with fewer than k entries is
padded (id -1, which the loss never reads). An imported cache holds no teacher Gram matrices,
so a stage reading it needs weights.rel = 0 (and weights.vis = 0 without visual positions).

Errors name the line and record id: invalid JSON, a missing field, an unknown or repeated
sample, positions that differ from the tokenization, ragged lists, more than k entries, an id
out of the vocabulary or repeated in one position, a positive or NaN log-probability,
entries not sorted by log-probability, or a position whose probabilities sum above 1.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from kdengine.cache.format import DTYPES
from kdengine.cache.manifest import CacheError, Manifest
from kdengine.cache.writer import CacheWriter, distilled_positions

__all__ = ["import_topk_jsonl"]

PAD_ID = -1
MASS_SLACK = 1e-3  # summed probabilities may exceed 1 by this much (rounding of the server's output)
FIELDS = ("id", "positions", "top_ids", "top_logprobs")


def import_topk_jsonl(path: str, dataset, directory: str, k: int, temperature: float, fingerprint: dict,
                      vocab_rows: int, dtype: str = "float32", shard_samples: int = 256, log=print) -> Manifest:
    """Validate ``path`` against ``dataset`` (a `kdengine.data.LlavaDataset`) and write a topk cache.

    fingerprint: the manifest fingerprint (teacher e.g. {"external": "model name"}, dataset,
    template, max_length, tokenizer, num_image_tokens). vocab_rows: the teacher's vocabulary size.
    Raises CacheError naming the record on the first bad one, or naming the first missing sample;
    the cache is written under a temporary name and renamed into place only when all is valid."""
    if dtype not in ("float16", "float32"):
        raise CacheError(f"dtype = {dtype!r}: expected float16 or float32")
    if os.path.exists(directory) and os.listdir(directory):
        raise CacheError(f"{directory!r} is not empty; expected a new directory for the import")
    tmp = directory.rstrip("/") + ".importing"  # renamed into place when every record is valid
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _import(path, dataset, tmp, k, temperature, fingerprint, vocab_rows, dtype, shard_samples)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(directory):
        os.rmdir(directory)
    os.replace(tmp, directory)
    log(f"imported {len(dataset)} samples from {path} into {directory} ({len(manifest.shards)} shards, k = {k})")
    return manifest


def _import(path, dataset, directory, k, temperature, fingerprint, vocab_rows, dtype, shard_samples) -> Manifest:
    by_id: dict[str, list[int]] = {}
    for i, rec in enumerate(dataset.records):
        by_id.setdefault(str(rec.id), []).append(i)
    manifest = Manifest(mode="topk", dtype=dtype, fingerprint=fingerprint, num_samples=len(dataset), k=k,
                        temperature=float(temperature), has_gram=False, rows="response",
                        teacher={"hidden_size": None, "vocab_rows": vocab_rows, "gram_rows": None})
    writer = CacheWriter.open(directory, manifest, shard_samples)
    rows_kind, seen = None, set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            rec = _parse(line, where)
            where += f" (id {rec['id']!r})"
            index = _resolve(rec, by_id, len(dataset), where)
            if index in seen:
                raise CacheError(f"{where}: sample index {index} appears twice; expected one record per sample")
            kind, pos = _check_positions(rec["positions"], dataset, index, where)
            if rows_kind not in (None, kind):
                raise CacheError(f"{where}: positions are the {kind!r} rows but earlier records gave {rows_kind!r}; "
                                 f"expected one choice per file")
            rows_kind = kind
            seen.add(index)
            ids, lps = _check_topk(rec, len(pos), k, vocab_rows, where)
            writer.add(index, dataset.records[index].id, {"positions": pos, "ids": ids,
                                                          "logprobs": lps.to(DTYPES[dtype])})
    writer.flush()
    missing = writer.pending()
    if missing:
        first = missing[0]
        raise CacheError(f"{path}: {len(missing)} of {len(dataset)} dataset samples have no record, the first is "
                         f"index {first} (id {dataset.records[first].id!r}); expected one record per sample")
    writer.manifest.rows = rows_kind or "response"
    return writer.finish()


def _parse(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CacheError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise CacheError(f"{where}: a {type(rec).__name__}; expected an object with fields {list(FIELDS)}")
    missing = [name for name in FIELDS if name not in rec]
    if missing:
        raise CacheError(f"{where}: missing fields {missing}; expected {list(FIELDS)}")
    return rec


def _resolve(rec: dict, by_id: dict, n: int, where: str) -> int:
    candidates = by_id.get(str(rec["id"]))
    if not candidates:
        raise CacheError(f"{where}: no sample with this id in the dataset; expected ids of the stage's dataset")
    if "index" in rec:
        if rec["index"] not in candidates:
            raise CacheError(f"{where}: index {rec['index']!r} is not a sample with this id (those are {candidates})")
        return int(rec["index"])
    if len(candidates) > 1:
        raise CacheError(f"{where}: the dataset has {len(candidates)} samples with this id (indices "
                         f"{candidates[:5]}); expected an 'index' field to tell them apart")
    return candidates[0]


def _check_positions(positions, dataset, index: int, where: str) -> tuple[str, torch.Tensor]:
    """('response' | 'response+visual', Int32[n]) when ``positions`` is one of the sample's two row sets."""
    # the dataset's own tokenization of the record (deterministic; images are not loaded)
    ids, labels = (torch.tensor(x) for x in dataset._tokenize(dataset.records[index]))
    resp = torch.zeros(len(ids), dtype=torch.bool)
    resp[:-1] = labels[1:] != -100
    vis = ids == dataset.image_token_id
    want = {"response": distilled_positions(resp, torch.zeros_like(vis), len(ids)),
            "response+visual": distilled_positions(resp, vis, len(ids))}
    if not isinstance(positions, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise CacheError(f"{where}: positions must be a list of integers")
    got = torch.tensor(positions, dtype=torch.int32)
    for kind, w in want.items():
        if torch.equal(got, w):
            return kind, got
    w = want["response"]
    j = next((i for i in range(min(len(got), len(w))) if got[i] != w[i]), min(len(got), len(w)))
    raise CacheError(f"{where}: {len(got)} positions do not match the sample's {len(w)} response positions "
                     f"(or {len(want['response+visual'])} response + visual ones) in kdengine's tokenization; first "
                     f"difference at entry {j}: record {positions[j:j + 3]}, expected {w[j:j + 3].tolist()}")


def _check_topk(rec: dict, n: int, k: int, vocab: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Int32[n, k] ids (padded with -1) and Float32[n, k] log-probs (padding 0) of a valid record."""
    top_ids, top_lps = rec["top_ids"], rec["top_logprobs"]
    if not isinstance(top_ids, list) or not isinstance(top_lps, list) or len(top_ids) != n or len(top_lps) != n:
        raise CacheError(f"{where}: top_ids / top_logprobs have {_len(top_ids)} / {_len(top_lps)} rows for {n} "
                         f"positions; expected one row per position")
    ids = torch.full((n, k), PAD_ID, dtype=torch.int64)
    lps = torch.full((n, k), -torch.inf, dtype=torch.float64)
    for j, (a, b) in enumerate(zip(top_ids, top_lps)):
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b) or not 1 <= len(a) <= k:
            raise CacheError(f"{where}: position {rec['positions'][j]} has {_len(a)} ids and {_len(b)} log-probs; "
                             f"expected equal counts between 1 and k = {k}")
        try:
            ids[j, :len(a)] = torch.tensor(a, dtype=torch.int64)
            lps[j, :len(b)] = torch.tensor(b, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise CacheError(f"{where}: position {rec['positions'][j]}: ids must be integers and log-probs numbers, "
                             f"got {a[:4]} / {b[:4]}") from None
    valid = torch.arange(k)[None, :] < torch.tensor([len(a) for a in top_ids])[:, None]
    srt = ids.masked_fill(~valid, vocab + 1).sort(-1).values
    checks = (
        (valid & ((ids < 0) | (ids >= vocab)), f"token id outside [0, {vocab})"),
        (valid & torch.isnan(lps), "log-probability is NaN"),
        (valid & (lps > 0), "log-probability is positive (expected log p <= 0)"),
        (valid[:, 1:] & (lps[:, 1:] > lps[:, :-1]), "entries are not sorted by log-probability, highest first"),
        ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] <= vocab), "a token id appears twice"),
    )
    for bad, what in checks:
        if bool(bad.any()):
            j, e = (int(x) for x in bad.nonzero()[0])
            raise CacheError(f"{where}: position {rec['positions'][j]}, entry {e}: {what} "
                             f"(ids {top_ids[j][:6]}, log-probs {top_lps[j][:6]})")
    mass = torch.where(valid, lps, -torch.inf).logsumexp(-1).exp()
    if bool((mass > 1 + MASS_SLACK).any()):
        j = int((mass > 1 + MASS_SLACK).nonzero()[0])
        raise CacheError(f"{where}: position {rec['positions'][j]}: probabilities sum to {float(mass[j]):.4f}; "
                         f"expected <= 1 (log-probabilities of one distribution)")
    return ids.to(torch.int32), torch.where(valid, lps, 0.0).float()


def _len(x) -> str:
    return str(len(x)) if isinstance(x, list) else type(x).__name__
