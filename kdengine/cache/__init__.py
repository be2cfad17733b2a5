"""Offline teacher cache: distil without the teacher in memory.

    hidden  the teacher's final normed hidden states at the distilled positions, its lm_head weight
            and W^T W: the fused losses run exactly as with the live teacher
    topk    per distilled position the teacher's top-k ids and log-probabilities, per image its
            visual Gram matrix: forward KL over the top-k support, RDist from the stored Gram

    from kdengine.cache import CacheSettings, write_teacher_cache, TeacherCacheReader, import_topk_jsonl
"""

from kdengine.cache.format import bytes_per_sample, head_bytes
from kdengine.cache.importer import import_topk_jsonl
from kdengine.cache.manifest import CacheError, Manifest, load_manifest
from kdengine.cache.objective import gram_cosine_from_teacher_gram, topk_kd_loss
from kdengine.cache.reader import CachedCollator, CachedTeacher, IndexedDataset, TeacherCacheReader, TopKTargets
from kdengine.cache.writer import CacheSettings, CacheWriter, write_teacher_cache

__all__ = [
    "CacheError",
    "CacheSettings",
    "CacheWriter",
    "CachedCollator",
    "CachedTeacher",
    "IndexedDataset",
    "Manifest",
    "TeacherCacheReader",
    "TopKTargets",
    "bytes_per_sample",
    "gram_cosine_from_teacher_gram",
    "head_bytes",
    "import_topk_jsonl",
    "load_manifest",
    "topk_kd_loss",
    "write_teacher_cache",
]
