"""How a teacher cache is written (`CacheSettings`, a ``teacher_cache`` stage's ``cache`` section).

Plain Python, no torch: a training config builds and checks these while it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdengine.cache.manifest import MODES, CacheError
from kdengine.model.spec import DTYPES

__all__ = ["CacheSettings", "LOGPROB_DTYPES"]

LOGPROB_DTYPES = ("float16", "float32")


@dataclass
class CacheSettings:
    """How a cache is written.

    mode: "hidden" (exact) or "topk" (compact). k, temperature: topk only (temperature must
    equal the distilling stage's). dtype: topk log-probabilities' dtype (float16 | float32); in
    hidden mode None or the teacher's own dtype (states are never cast). vocab_rows: vocabulary
    rows of the teacher softmax and of RDist's Gram, min(V_student, V_teacher) (None: the
    teacher's lm_head rows). shard_samples: samples per shard. batch_size: teacher batch.
    """

    mode: str = "hidden"
    k: int = 64
    temperature: float = 1.0
    dtype: str | None = None
    vocab_rows: int | None = None
    shard_samples: int = 256
    batch_size: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise CacheError(f"mode = {self.mode!r}: expected one of {list(MODES)}")
        for name in ("k", "shard_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CacheError(f"{name} = {value!r}: expected an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise CacheError(f"temperature = {self.temperature!r}: expected > 0")
        if self.mode == "topk" and self.dtype not in LOGPROB_DTYPES + (None,):
            raise CacheError(f"dtype = {self.dtype!r}: top-k log-probabilities are stored as one of {LOGPROB_DTYPES}")
        if self.mode == "hidden" and self.dtype not in DTYPES + (None,):
            raise CacheError(f"dtype = {self.dtype!r}: expected one of {list(DTYPES)} or null")
        if self.vocab_rows is not None and self.vocab_rows < 1:
            raise CacheError(f"vocab_rows = {self.vocab_rows!r}: expected null or >= 1")
