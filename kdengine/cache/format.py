"""On-disk layout of a teacher cache: safetensors shards, per-sample tensor names, sizes.

A cache directory holds ``manifest.json`` (`kdengine.cache.manifest`), ``head.safetensors``
(hidden mode) and ``shard-NNNNN.safetensors``. In a shard, sample ``i`` (its dataset index) owns

    i/positions  Int32[n]       sequence positions whose next-token distribution is distilled
                                (ascending; response positions, plus the visual ones unless
                                the manifest says rows = "response")
    hidden mode:
    i/hidden     [n, Dt]        teacher final normed hidden states there (teacher compute dtype)
    topk mode:
    i/ids        Int32[n, K]    teacher top-k token ids per position, highest log-prob first
    i/logprobs   [n, K]         log softmax(z_t / T) at those ids (float16 or float32)
    i/gram       Float32[n_img, P(P+1)/2]   per image, the upper triangle (row major) of the teacher's
                                visual Gram matrix R = Z Z^T, Z = H W[:gram_rows]^T (when has_gram)

and ``head.safetensors`` holds ``lm_head_weight`` [Vt, Dt] (teacher dtype) and ``weight_gram``
Float32[Dt, Dt] = W[:gram_rows]^T W[:gram_rows], what RDist needs. Shards are written to a
temporary name, fsynced, renamed, then recorded in the manifest with their sha256.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdengine.cache.manifest import CacheError, file_digest

__all__ = [
    "DTYPES",
    "bytes_per_sample",
    "check_disk",
    "dtype_name",
    "head_bytes",
    "pack_gram",
    "read_tensors",
    "unpack_gram",
    "verify_file",
    "write_tensors",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD = "head.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CacheError(f"dtype {dtype}: expected one of {list(DTYPES)}")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_tensors(directory: str, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Save ``tensors`` as ``directory/name`` atomically; returns its manifest entry {file, sha256, bytes}."""
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    entry = {"file": name, "sha256": file_digest(tmp), "bytes": os.path.getsize(tmp)}
    os.replace(tmp, path)
    return entry


def verify_file(directory: str, entry: dict, full: bool = True) -> None:
    """Size and (with ``full``) sha256 of a shard against its manifest entry, else CacheError naming it."""
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise CacheError(f"teacher cache shard {path} is missing (listed in the manifest)")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise CacheError(f"teacher cache shard {path} has {size} bytes, the manifest records {entry['bytes']}: "
                         f"truncated or overwritten; expected the file the cache run wrote (rerun teacher-cache)")
    if full:
        digest = file_digest(path)
        if digest != entry["sha256"]:
            raise CacheError(f"teacher cache shard {path} is corrupted: sha256 {digest[:16]}... but the manifest "
                             f"records {entry['sha256'][:16]}...; expected an intact shard (rerun teacher-cache)")


def read_tensors(path: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped (only ``keys`` are read when given)."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}


# ----------------------------------------------------------------------------- Gram packing


def pack_gram(r: torch.Tensor) -> torch.Tensor:
    """Float[n_img, P, P] symmetric -> Float32[n_img, P(P+1)/2], the upper triangle row by row."""
    p = r.shape[-1]
    i, j = torch.triu_indices(p, p, device=r.device)
    return r[:, i, j].float()


def unpack_gram(packed: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `pack_gram`: Float32[n_img, P(P+1)/2] -> Float32[n_img, P, P]."""
    if packed.shape[-1] != p * (p + 1) // 2:
        raise CacheError(f"packed Gram has {packed.shape[-1]} entries per image; expected P(P+1)/2 = "
                         f"{p * (p + 1) // 2} for P = {p}")
    i, j = torch.triu_indices(p, p, device=packed.device)
    r = packed.new_zeros(packed.shape[0], p, p)
    r[:, i, j] = packed
    r[:, j, i] = packed
    return r


# ----------------------------------------------------------------------------- sizes


def bytes_per_sample(mode: str, n_visual: int, n_response: int, hidden_size: int = 0, hidden_bytes: int = 2,
                     k: int = 0, logprob_bytes: int = 2, n_images: int = 1, p: int = 0, gram: bool = True) -> int:
    """Bytes one sample takes in a shard (tensor data; the safetensors header adds ~100 bytes a tensor).

    hidden: n (Dt hidden_bytes + 4); topk: n (4K + K logprob_bytes + 4) + n_images 4 P(P+1)/2,
    with n = n_visual + n_response distilled positions."""
    n = n_visual + n_response
    if mode == "hidden":
        return n * (hidden_size * hidden_bytes + 4)
    if mode == "topk":
        return n * (k * (4 + logprob_bytes) + 4) + (n_images * 4 * p * (p + 1) // 2 if gram else 0)
    raise CacheError(f"mode = {mode!r}: expected 'hidden' or 'topk'")


def head_bytes(vocab_rows: int, hidden_size: int, hidden_bytes: int = 2) -> int:
    """Once per hidden cache: lm_head weight [Vt, Dt] plus W^T W in fp32 [Dt, Dt]."""
    return vocab_rows * hidden_size * hidden_bytes + 4 * hidden_size * hidden_size


def check_disk(directory: str, needed: int, what: str) -> None:
    """Refuse (CacheError) when the file system of ``directory`` has fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise CacheError(f"not enough disk for {what}: it needs about {_gb(needed)} but {directory!r} has "
                         f"{_gb(free)} free; expected free space >= the estimate (free some, or choose another "
                         f"output directory, or a smaller mode: topk with a smaller k)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB ({n:,} bytes)"
