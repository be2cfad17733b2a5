"""Offline teacher cache: distil without the teacher in memory.

    hidden  the teacher's final normed hidden states at the distilled positions, its lm_head weight
            and W^T W: the fused losses run exactly as with the live teacher
    topk    per distilled position the teacher's top-k ids and log-probabilities, per image its
            visual Gram matrix: forward KL over the top-k support, RDist from the stored Gram

    from kdengine.cache import CacheSettings, write_teacher_cache, TeacherCacheReader, import_topk_jsonl

Names load on first use (PEP 562), so ``kdengine.cache.settings`` and ``kdengine.cache.manifest``
(what a training config checks) import without torch. Nothing here imports ``kdengine.train``: the
cache stage and the ``kdengine teacher-cache`` command that run these are in ``kdengine.train``
(``cache_stage``, ``cache_commands``).
"""

from kdengine.lazy import lazy_getattr

_EXPORTS = {
    "bytes_per_sample": "format", "head_bytes": "format",
    "import_topk_jsonl": "importer",
    "CacheError": "manifest", "Manifest": "manifest", "load_manifest": "manifest",
    "gram_cosine_from_teacher_gram": "objective", "topk_kd_loss": "objective",
    "CachedCollator": "reader", "CachedTeacher": "reader", "IndexedDataset": "reader",
    "TeacherCacheReader": "reader", "TopKTargets": "reader",
    "CacheSettings": "settings", "CacheWriter": "writer", "write_teacher_cache": "writer",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
