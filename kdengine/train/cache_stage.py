"""The teacher cache inside a training pipeline: the ``teacher_cache`` stage kind and the dpt/dft
stages that read a cache (``teacher_cache: <stage name or path>``) instead of loading a teacher.

    - {name: t_cache, kind: teacher_cache, model: teacher, data: instruct,
       cache: {mode: hidden}}                        # or {mode: topk, k: 64, temperature: 1.0}
    - {name: s_dft, kind: dft, model: student, data: instruct, teacher_cache: t_cache}

A cache stage runs ``model`` as the frozen teacher (its weights as of that point of the pipeline)
over ``data`` and writes ``{run_dir}/<name>/cache`` (resuming an interrupted write). A reading
stage opens the cache before any step: every shard verified, the fingerprint compared with its
own dataset, template, max_length, tokenizer (and, when the cache is a stage of this pipeline,
the teacher's current weights; in topk mode the temperature), every sample present.
"""

from __future__ import annotations

import os
import time

from kdengine.cache.manifest import CacheError, fingerprint, teacher_fingerprint
from kdengine.cache.reader import CachedCollator, CachedTeacher, IndexedDataset, TeacherCacheReader
from kdengine.cache.writer import write_teacher_cache
from kdengine.data import LlavaCollator
from kdengine.model import num_image_tokens
from kdengine.train.batches import build_stage_dataset
from kdengine.train.config import CACHE_KIND, cache_mismatch
from kdengine.train.dist import barrier
from kdengine.train.stage_models import load_model

__all__ = ["cache_dir", "check_stage_terms", "open_stage_cache", "run_cache_stage", "stage_fingerprint"]


def cache_dir(cfg, name_or_path: str) -> str:
    """A cache stage of this pipeline -> its ``{run_dir}/<name>/cache``; anything else is a path."""
    names = {st.name for st in cfg.stages if st.kind == CACHE_KIND}
    if name_or_path in names:
        return os.path.join(cfg.run.output_dir, name_or_path, "cache")
    return name_or_path


def _teacher_source(session, model_name: str):
    """The teacher's weights as the pipeline holds them now: the last stage output, else its spec."""
    return session.latest.get(model_name) or session.cfg.models[model_name]


def stage_fingerprint(cfg, stage, processor, n_img: int) -> dict:
    """The fingerprint fields a stage's data gives (all but the teacher)."""
    ds = cfg.datasets[stage.data]
    fp = fingerprint({}, ds.path, ds.template, ds.max_length, processor)
    del fp["teacher"]
    return {**fp, "num_image_tokens": n_img}


def run_cache_stage(session, index: int, stage) -> dict:
    """Write (or finish) the cache of a ``teacher_cache`` stage on the main rank; returns its summary row
    (the runner of the kind, `kdengine.train.kinds.KINDS`)."""
    cfg, dist = session.cfg, session.dist
    out = cache_dir(cfg, stage.name)
    t0 = time.time()
    if dist.is_main:
        print(f"\n== stage {stage.name} ({stage.kind}): teacher {stage.model} -> {out}", flush=True)
        model, processor = load_model(cfg.models[stage.model], session.latest.get(stage.model), dist.device)
        model.eval().requires_grad_(False)
        n_img = num_image_tokens(model)
        context = model.config.text_config.max_position_embeddings
        dataset = build_stage_dataset(cfg.datasets[stage.data], processor, n_img, False, context, stage.data)
        collator = LlavaCollator(processor.tokenizer.pad_token_id, model.config.image_token_id, n_img)
        fp = stage_fingerprint(cfg, stage, processor, n_img)
        fp["teacher"] = teacher_fingerprint(_teacher_source(session, stage.model))
        write_teacher_cache(model, dataset, collator, out, stage.cache, fp)
        del model
    barrier()
    return {"stage": stage.name, "kind": stage.kind, "model": stage.model, "path": out, "steps": 0,
            "seconds": time.time() - t0, "loss": None}


def open_stage_cache(session, stage, model, processor, dataset, collator):
    """(CachedTeacher, dataset, collator) of a dpt/dft stage reading ``stage.teacher_cache``: the cache
    verified and matched against the stage, the dataset and collator wrapped to carry its rows."""
    where = cache_dir(session.cfg, stage.teacher_cache)
    reader = TeacherCacheReader(where, verify="sha256")
    expected = stage_fingerprint(session.cfg, stage, processor, num_image_tokens(model))
    source = next((st for st in session.cfg.stages if st.kind == CACHE_KIND and st.name == stage.teacher_cache), None)
    if source is not None:  # a stage of this run: the teacher must still be the one it cached
        expected["teacher"] = teacher_fingerprint(_teacher_source(session, source.model))
    if reader.manifest.mode == "topk":
        expected["temperature"] = stage.distill.temperature
    reader.check(expected)
    teacher = CachedTeacher(reader, session.dist.device)
    teacher.check_student(model.get_output_embeddings().weight.shape[0])
    check_stage_terms(reader, stage)
    for i, rec in enumerate(dataset.records):  # every sample, before any step
        reader.locate(i, rec.id)
    return teacher, IndexedDataset(dataset), CachedCollator(collator, reader)


def check_stage_terms(reader: TeacherCacheReader, stage) -> None:
    """The stage's loss terms and divergence are ones the cache can give (`cache_mismatch`, also checked
    at config load for a cache stage of the run or a cache directory already written)."""
    m = reader.manifest
    problem = cache_mismatch(stage, repr(reader.directory), m.mode, m.temperature, m.rows, m.has_gram)
    if problem:
        raise CacheError(f"stage {stage.name!r}: {problem}")
