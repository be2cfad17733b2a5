"""``kdengine teacher-cache``: write a stage's teacher cache alone, or import one from a server.

The argparse part (and the usage) is `kdengine.cli`; these run functions load the config first
(a config error comes before torch) and import the rest after.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from kdengine.cache.manifest import CacheError
from kdengine.cache.settings import CacheSettings
from kdengine.train.config import CACHE_KIND, ConfigError, load_config
from kdengine.train.kinds import KINDS

__all__ = ["run_teacher_cache"]


def run_teacher_cache(args: argparse.Namespace) -> int:
    """Write (``args.target``: a config) or import (``args.target == "import"``) a cache; 2 on bad input."""
    try:
        if args.target == "import":
            return _import(args)
        return _write(args)
    except (ConfigError, CacheError, FileNotFoundError) as err:
        print(f"kdengine teacher-cache: error: {err}", file=sys.stderr)
        return 2


def _find_stage(cfg, name: str):
    for i, st in enumerate(cfg.stages):
        if st.name == name:
            return i, st
    raise ConfigError(f"--stage {name!r}: no such stage; expected one of {[st.name for st in cfg.stages]}")


def _write(args) -> int:
    cfg = load_config(args.target, args.set)  # a config error comes before torch
    index, stage = _find_stage(cfg, args.stage)
    if stage.kind != CACHE_KIND:
        raise ConfigError(f"--stage {args.stage!r} is a {stage.kind!r} stage; expected a {CACHE_KIND} stage")
    from kdengine.train.cache_stage import run_cache_stage
    from kdengine.train.checkpoint import finished_stage, model_dir
    from kdengine.train.session import close_session, open_session

    session = open_session(cfg, resume=True)
    try:
        for st in cfg.stages[:index]:  # the weights the earlier, finished stages left
            if finished_stage(session.stage_dir(st.name)) is not None:
                session.latest[st.model] = model_dir(session.stage_dir(st.name))
        missing = [st.name for st in cfg.stages[:index]
                   if st.model == stage.model and KINDS[st.kind].trains
                   and finished_stage(session.stage_dir(st.name)) is None]
        if missing:
            raise ConfigError(f"stage {stage.name!r} caches model {stage.model!r} after stages {missing}, which are "
                              f"not finished in {os.path.abspath(cfg.run.output_dir)}; expected them trained first "
                              f"(kdengine train)")
        run_cache_stage(session, index, stage)
    finally:
        close_session(session)
    return 0


def _import(args) -> int:
    if args.file is None or args.config is None or args.teacher_name is None:
        raise ConfigError("teacher-cache import needs FILE.jsonl, --config CONFIG, --stage NAME and --teacher-name")
    cfg = load_config(args.config, args.set)  # a config error comes before torch
    _, stage = _find_stage(cfg, args.stage)
    if not getattr(stage, "teacher_cache", None):
        raise ConfigError(f"--stage {args.stage!r} reads no teacher cache; expected a dpt/dft stage with teacher_cache")
    from kdengine.cache.importer import import_topk_jsonl
    from kdengine.train.cache_stage import cache_dir, stage_fingerprint
    from kdengine.model import num_image_tokens
    from kdengine.train.batches import build_stage_dataset
    from kdengine.train.stage_models import load_model

    source = next((st for st in cfg.stages if st.kind == CACHE_KIND and st.name == stage.teacher_cache), None)
    settings = source.cache if source is not None else CacheSettings(mode="topk")
    k = args.k or settings.k
    temperature = args.temperature if args.temperature is not None else settings.temperature
    dtype = args.dtype or settings.dtype or "float32"

    _check_synth_written(cfg, stage)
    model, processor = load_model(cfg.models[stage.model], None, "cpu")  # for the tokenizer and the shapes
    n_img = num_image_tokens(model)
    context = model.config.text_config.max_position_embeddings
    dataset = build_stage_dataset(cfg.datasets[stage.data], processor, n_img, False, context, stage.data)
    fp = {**stage_fingerprint(cfg, stage, processor, n_img), "teacher": {"external": args.teacher_name}}
    import_topk_jsonl(args.file, dataset, cache_dir(cfg, stage.teacher_cache), k=k, temperature=temperature,
                      fingerprint=fp, vocab_rows=model.get_output_embeddings().weight.shape[0], dtype=dtype,
                      shard_samples=settings.shard_samples)
    return 0


def _check_synth_written(cfg, stage) -> None:
    """Raise ConfigError if a path of the stage's model or data lies under ``synth.out`` and is not
    written yet: ``kdengine train`` and ``kdengine teacher-cache CONFIG`` write the synthetic data
    (tokenizer included) when they start; import does not, so its line gives the command that does."""
    synth = cfg.synth
    if synth is None or os.path.isfile(os.path.join(synth.out, "meta.json")):
        return
    spec, ds = cfg.models[stage.model], cfg.datasets[stage.data]
    paths = [(f"models.{stage.model}.{attr}", getattr(spec, attr))
             for attr in ("tokenizer", "path", "vision_tower", "language_model")]
    paths += [(f"datasets.{stage.data}.path", p) for p in (ds.path if isinstance(ds.path, list) else [ds.path])]
    paths.append((f"datasets.{stage.data}.image_folder", ds.image_folder))
    root = os.path.abspath(synth.out) + os.sep
    for key, path in paths:
        if path and os.path.abspath(path).startswith(root) and not os.path.exists(path):
            command = (f"kdengine data synth --out {shlex.quote(synth.out)} --seed {synth.seed} "
                       f"--n-caption {synth.n_caption} --n-instruct {synth.n_instruct} --n-eval {synth.n_eval} "
                       f"--image-size {synth.image_size} --vocab-size {synth.vocab_size} "
                       f"--questions {synth.questions}")
            raise ConfigError(f"{key} = {path!r} not found: it is part of the synthetic data (synth.out), which "
                              f"kdengine train writes when it starts and teacher-cache import does not; "
                              f"write it first with: {command}")
