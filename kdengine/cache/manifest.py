"""The cache manifest: what a teacher cache was written from, its shards and their sha256.

``manifest.json`` in the cache directory (rewritten atomically after every shard)::

    format, version        "kdengine-teacher-cache", 1
    mode                   "hidden" | "topk"
    k, temperature         top-k entries per row and the softmax temperature (topk mode; None for hidden)
    dtype                  hidden states' dtype (hidden) or log-probabilities' dtype (topk)
    fingerprint            {teacher, dataset, template, max_length, tokenizer, num_image_tokens}
    teacher                {hidden_size, vocab_rows, gram_rows}: Dt, rows of the softmax, rows of RDist's Gram
    rows                   "response+visual" | "response": the positions stored per sample
    has_gram               topk: per-image teacher Gram matrices present (RDist possible)
    num_samples            samples of the dataset the cache covers
    head                   {file, sha256, bytes} or None (hidden mode: lm_head weight and W^T W)
    shards                 [{file, sha256, bytes, samples: [[dataset index, record id], ...]}]
    skipped                [[dataset index, record id]] not written (their images failed to load)
    complete               True once every sample is written

Any field that differs from what a stage expects is an error naming it (`check_matches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

__all__ = [
    "CacheError",
    "FINGERPRINT_FIELDS",
    "Manifest",
    "dataset_fingerprint",
    "file_digest",
    "fingerprint",
    "load_manifest",
    "save_manifest",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
]

FORMAT = "kdengine-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
MODES = ("hidden", "topk")
ROWS = ("response+visual", "response")
# Compared between a cache and the stage that reads it, in this order (the first difference is named).
FINGERPRINT_FIELDS = ("teacher", "dataset", "template", "max_length", "tokenizer", "num_image_tokens")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 22


class CacheError(ValueError):
    """A teacher cache is missing, incomplete, corrupted or written for another stage."""


@dataclass
class Manifest:
    mode: str
    dtype: str
    fingerprint: dict
    teacher: dict
    num_samples: int
    k: int | None = None
    temperature: float | None = None
    rows: str = "response+visual"
    has_gram: bool = False
    head: dict | None = None
    shards: list[dict] = field(default_factory=list)
    skipped: list[list] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self):
        if self.mode not in MODES:
            raise CacheError(f"mode = {self.mode!r}: expected one of {list(MODES)}")
        if self.rows not in ROWS:
            raise CacheError(f"rows = {self.rows!r}: expected one of {list(ROWS)}")
        if self.mode == "topk" and (not isinstance(self.k, int) or self.k < 1):
            raise CacheError(f"k = {self.k!r}: a topk cache needs an integer k >= 1")
        if self.mode == "topk" and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise CacheError(f"temperature = {self.temperature!r}: a topk cache needs a temperature > 0")

    def written(self) -> dict[int, str]:
        """Dataset index -> record id of every sample in a complete shard."""
        return {int(i): sid for sh in self.shards for i, sid in sh["samples"]}

    def pending(self) -> list[int]:
        """Dataset indices neither written nor skipped."""
        done = self.written()
        done.update({int(i): sid for i, sid in self.skipped})
        return [i for i in range(self.num_samples) if i not in done]


def save_manifest(directory: str, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temp name, fsync, rename)."""
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(manifest), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(directory: str) -> Manifest:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"teacher cache {directory!r}: no {MANIFEST}; expected a directory written by "
                         f"'kdengine teacher-cache' or 'kdengine teacher-cache import'")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: invalid JSON ({e}); the manifest is corrupted") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CacheError(f"{path}: format {raw.get('format') if isinstance(raw, dict) else raw!r}; expected {FORMAT!r}")
    if raw.get("version") != VERSION:
        raise CacheError(f"{path}: version {raw.get('version')!r}; this kdengine reads version {VERSION}")
    names = {f.name for f in dataclasses.fields(Manifest)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CacheError(f"{path}: unknown fields {unknown}; expected fields from {sorted(names)}")
    return Manifest(**raw)


def check_matches(manifest: Manifest, expected: dict, where: str) -> None:
    """Raise CacheError naming the first field whose cached value differs from ``expected``.

    expected: any of FINGERPRINT_FIELDS (compared with manifest.fingerprint) and mode, k,
    temperature, dtype (compared with the manifest's own fields); absent keys are not checked."""
    for name in FINGERPRINT_FIELDS + ("mode", "k", "temperature", "dtype"):
        if name not in expected:
            continue
        have = manifest.fingerprint.get(name) if name in FINGERPRINT_FIELDS else getattr(manifest, name)
        want = expected[name]
        if name == "temperature" and have is not None and want is not None:
            same = abs(float(have) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
        else:
            same = _canonical(have) == _canonical(want)
        if not same:
            raise CacheError(f"teacher cache {where!r} does not match the stage: {name} differs "
                             f"({_diff(have, want)}); expected a cache written for this stage "
                             f"(run 'kdengine teacher-cache' again, or point teacher_cache at the right one)")


def _canonical(x):
    return json.loads(json.dumps(x, sort_keys=True))


def _diff(have, want) -> str:
    """The first differing sub-key of two fingerprints, else both values."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want), key=str):
            if _canonical(have.get(key)) != _canonical(want.get(key)):
                return f"at {key!r}: cache {_short(have.get(key))}, stage {_short(want.get(key))}"
    return f"cache {_short(have)}, stage {_short(want)}"


def _short(x) -> str:
    text = json.dumps(x, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(teacher, data_paths, template: str, max_length: int | None, tokenizer) -> dict:
    """The manifest fingerprint of a cache (num_image_tokens is added by the writer).

    teacher: see `teacher_fingerprint`; data_paths: the dataset file(s); tokenizer: a tokenizer
    or processor."""
    return {"teacher": teacher_fingerprint(teacher), "dataset": dataset_fingerprint(data_paths),
            "template": template, "max_length": max_length, "tokenizer": tokenizer_fingerprint(tokenizer)}


def file_digest(path: str) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_entry(paths: list[str]) -> dict:
    """{basename: [bytes, sha256]} (basenames: a moved checkpoint or dataset keeps its fingerprint)."""
    return {os.path.basename(p): [os.path.getsize(p), file_digest(p)] for p in paths}


def teacher_fingerprint(source) -> dict:
    """What identifies a teacher's weights.

    source: a checkpoint directory (config.json and every weight file by size and sha256), a
    ``kdengine.model.ModelSpec`` (its directories the same way; a ``tiny`` spec by its fields,
    its weights being a function of them), or a dict (e.g. {"external": "server model name"}).
    """
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        return _dir_fingerprint(os.fspath(source))
    if dataclasses.is_dataclass(source):  # a ModelSpec
        if source.source == "llava":
            return _dir_fingerprint(source.path)
        if source.source == "composed":
            return {"vision_tower": _dir_fingerprint(source.vision_tower),
                    "language_model": _dir_fingerprint(source.language_model)}
        spec = {k: v for k, v in dataclasses.asdict(source).items()
                if k not in ("device", "attn_implementation", "tokenizer")}
        return {"tiny_spec": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}
    raise CacheError(f"teacher source {source!r}: expected a checkpoint directory, a ModelSpec or a dict")


def _dir_fingerprint(path: str) -> dict:
    if not os.path.isdir(path):
        raise CacheError(f"teacher checkpoint {path!r}: directory not found")
    names = sorted(os.listdir(path))
    weights = [os.path.join(path, n) for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise CacheError(f"teacher checkpoint {path!r} has no weight files (expected {list(WEIGHT_SUFFIXES)})")
    config = os.path.join(path, "config.json")
    return {"config": file_digest(config) if os.path.isfile(config) else None, "weights": _files_entry(weights)}


def dataset_fingerprint(paths) -> dict:
    """Every dataset file (JSON/JSONL) by name, size and sha256."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for p in paths:
        if not os.path.isfile(p):
            raise CacheError(f"dataset file {p!r} not found")
    return {"files": _files_entry([os.fspath(p) for p in paths])}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (added tokens included), special tokens and chat template."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    state = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": [getattr(tok, n, None) for n in ("pad_token", "eos_token", "bos_token", "unk_token")],
        "chat_template": getattr(tok, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
