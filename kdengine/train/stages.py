"""One stage: build (student, teacher, data, DeepSpeed engine) -> restore -> steps -> save.

`run_stage` calls the runner of the stage's kind (`kdengine.train.kinds.KINDS`). Every kind that
trains (pt, sft, dpt, dft) runs the same loop, `train_stage`; the kind only sets defaults in the
config (trainable components, loss weights) and whether a teacher runs. Each optimizer step reads ``accum``
micro-batches per rank; for each one the teacher (no grad) runs first, then the student and
`llava_kd_loss` inside the engine's forward, then ``engine.backward`` and ``engine.step``
(DeepSpeed steps the optimizer and the LR schedule at the accumulation boundary).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch

from kdengine.data import LlavaCollator
from kdengine.data.records import BadSample
from kdengine.losses.checks import LOSS_TERMS
from kdengine.model import check_compatible, format_param_summary, num_image_tokens, param_summary
from kdengine.model import same_vision_tower, set_trainable
from kdengine.train.checkpoint import (
    finished_stage,
    latest_checkpoint,
    load_checkpoint,
    model_dir,
    remove_checkpoints,
    save_checkpoint,
    save_stage_model,
)
from kdengine.train.cache_stage import open_stage_cache
from kdengine.train.config import EngineConfig, StageConfig, read_deepspeed_json, stage_seed_of, zero_stage
from kdengine.train.kinds import KINDS
from kdengine.train.batches import StepPlan, TrainInputError, build_stage_dataset, micro_batches
from kdengine.train.dist import DistInfo, all_reduce
from kdengine.train.faults import fault
from kdengine.train.metrics import Progress, peak_memory_mb
from kdengine.train.stage_models import Teacher, apply_patches, load_model
from kdengine.train.student_module import StudentObjective, teacher_outputs
from kdengine.train.optim import WarmupCosine, build_optimizer
from kdengine.train.plots import plot_stage
from kdengine.train.session import Session
from kdengine.train.stop import Preempted

__all__ = ["StageParts", "build_engine", "build_stage", "deepspeed_config", "run_stage", "train_stage", "train_step"]

MAX_SKIPPED_IDS = 5  # ids of skipped samples kept per metrics record


@dataclass
class StageParts:
    """What one stage trains with, built by `build_stage`."""

    model: object
    processor: object
    teacher: Teacher | None
    share: bool  # teacher and student use the same tower features (computed once, on the teacher)
    dataset: object
    collator: LlavaCollator
    plan: StepPlan
    engine: object
    patches: list[str]


def run_stage(session: Session, index: int, stage: StageConfig) -> dict:
    """Run one stage with the runner of its kind; returns its summary row."""
    return KINDS[stage.kind].run(session, index, stage)


def train_stage(session: Session, index: int, stage: StageConfig) -> dict:
    """Run (or, when resuming, skip or continue) one training stage; returns its summary row."""
    stage_dir = session.stage_dir(stage.name)
    done = finished_stage(stage_dir)
    if done is not None:  # only with --resume (the run directory is checked when the session opens)
        return _skip(session, stage, done)
    t0 = time.time()
    parts = build_stage(session, stage)
    start, elapsed, ckpt = _restore(session, stage, parts)
    session.log.truncate(stage.name, start)
    if session.dist.is_main:
        _print_header(stage, parts, session.dist, ckpt)
    last = _train_loop(session, stage, parts, start, t0 - elapsed)
    return _finish(session, stage, parts, last, elapsed + time.time() - t0)


def build_stage(session: Session, stage: StageConfig) -> StageParts:
    """Student (from its previous stage), teacher, data and the DeepSpeed engine of a stage."""
    cfg, dist = session.cfg, session.dist
    seed = stage_seed_of(cfg, stage)  # from the stage's name (or seed_as's), not its position
    torch.manual_seed(seed)
    model, processor = load_model(cfg.models[stage.model], session.latest.get(stage.model), dist.device)
    set_trainable(model, stage.trainable)
    patches = apply_patches(model, cfg.engine, dist.device)
    model.train()
    n_img = num_image_tokens(model)
    live = stage.distills and stage.teacher_cache is None
    teacher, share = _teacher(session, stage, model, processor) if live else (None, False)
    context = model.config.text_config.max_position_embeddings
    dataset = build_stage_dataset(cfg.datasets[stage.data], processor, n_img, False, context, stage.data)
    collator = LlavaCollator(processor.tokenizer.pad_token_id, model.config.image_token_id, n_img)
    if stage.teacher_cache is not None:  # verified and matched before any step; its rows come with the batches
        teacher, dataset, collator = open_stage_cache(session, stage, model, processor, dataset, collator)
    plan = StepPlan.build(dataset, stage, dist, seed=seed)
    objective = StudentObjective(model, stage.weights, stage.distill, n_img)
    engine = build_engine(objective, stage, plan, cfg.engine, dist)
    return StageParts(model, processor, teacher, share, dataset, collator, plan, engine, patches)


def _skip(session: Session, stage: StageConfig, done: dict) -> dict:
    stage_dir = session.stage_dir(stage.name)
    remove_checkpoints(stage_dir, session.dist)  # left over if a kill came between the save and the cleanup
    session.latest[stage.model] = model_dir(stage_dir)
    _release_if_stale(session, stage)
    return {"stage": stage.name, "kind": stage.kind, "model": stage.model, "path": model_dir(stage_dir),
            "steps": done["steps"], "seconds": done["seconds"], "loss": done.get("loss"),
            "truncated": done.get("truncated"), "skipped": done.get("skipped"), "already_done": True}


def _restore(session: Session, stage: StageConfig, parts: StageParts) -> tuple[int, float, str | None]:
    """With --resume: (steps done, seconds spent, checkpoint) from the stage's last complete checkpoint."""
    ckpt = latest_checkpoint(session.stage_dir(stage.name)) if session.resume else None
    if ckpt is None:
        return 0, 0.0, None
    meta = load_checkpoint(parts.engine, ckpt, session.dist)
    if meta.get("stage") != stage.name or meta.get("total_steps") != parts.plan.total_steps:
        raise ValueError(
            f"{ckpt}: written for stage {meta.get('stage')!r} with {meta.get('total_steps')} steps, "
            f"but stage {stage.name!r} now has {parts.plan.total_steps}; expected the config the run started with"
        )
    return meta["step"], meta.get("seconds", 0.0), ckpt


def _finish(session: Session, stage: StageConfig, parts: StageParts, last: float | None, seconds: float) -> dict:
    """Save the Hugging Face directory, drop the mid-stage checkpoints, plot the loss curve."""
    stage_dir = session.stage_dir(stage.name)
    summary = parts.dataset.summary
    skipped = sum(r.get("skipped", 0) for r in session.log.records(stage.name))  # all ranks, resumed parts too
    info = {"stage": stage.name, "kind": stage.kind, "model": stage.model, "steps": parts.plan.total_steps,
            "seconds": seconds, "loss": last, "trainable": stage.trainable, "truncated": summary.truncated,
            "skipped": skipped}
    zero3 = zero_stage(session.cfg.engine) == 3
    path = save_stage_model(parts.model, parts.processor, stage_dir, info, session.dist, zero3=zero3)
    remove_checkpoints(stage_dir, session.dist)
    session.latest[stage.model] = path
    if session.dist.is_main:
        png = os.path.join(stage_dir, "loss.png")
        note = plot_stage(session.log.records(stage.name), png, f"{stage.name} ({stage.kind})")
        if note:
            print(note, flush=True)
    if session.dist.is_main and summary.skipped_during_training:
        print(summary.format(), flush=True)  # the reasons and the first ids (rank 0's)
    parts.engine = parts.model = None
    gc.collect()
    _release_if_stale(session, stage)
    return {"stage": stage.name, "kind": stage.kind, "model": stage.model, "path": path,
            "steps": parts.plan.total_steps, "seconds": seconds, "loss": last, "skipped": skipped,
            "truncated": summary.truncated}


def _teacher(session: Session, stage: StageConfig, model, processor) -> tuple[Teacher, bool]:
    """The stage's frozen teacher (checked against the student) and whether both share tower features."""
    cfg, dist = session.cfg, session.dist
    init = session.latest.get(stage.teacher)
    teacher = session.teachers.get((stage.teacher, init), cfg.models[stage.teacher], init, dist.device,
                                   cfg.engine.shard_teacher)
    check_compatible(teacher.model, teacher.processor, model, processor, teacher_lm_head_weight=teacher.lm_head_weight)
    share = (not teacher.sharded and "vision_tower" not in stage.trainable
             and same_vision_tower(teacher.model, model))
    return teacher, share


def _release_if_stale(session: Session, stage: StageConfig) -> None:
    """Drop the cached teacher once no later stage distills from it with the same weights."""
    key = session.teachers.key
    if key is None:
        return
    later = session.cfg.stages[session.cfg.stages.index(stage) + 1:]
    for st in later:
        if st.model == key[0]:
            break  # the teacher model is trained again first: its weights change
        if st.distills and st.teacher == key[0]:
            return
    session.teachers.release()


def deepspeed_config(stage: StageConfig, plan: StepPlan, engine: EngineConfig, dist: DistInfo) -> dict:
    """The optional JSON plus what the stage and the device decide (batch, accumulation, clipping, bf16)."""
    ds = read_deepspeed_json(engine.deepspeed_config) if engine.deepspeed_config else {}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": zero_stage(engine)}
    ds.update(
        train_batch_size=stage.batch_size,
        train_micro_batch_size_per_gpu=stage.micro_batch_size,
        gradient_accumulation_steps=plan.accum,
        gradient_clipping=stage.grad_clip,
        bf16={"enabled": dist.device.type == "cuda"},
        steps_per_print=2**31 - 1,
    )
    return ds


def build_engine(objective: StudentObjective, stage: StageConfig, plan: StepPlan, engine: EngineConfig,
                 dist: DistInfo):
    """deepspeed.initialize on the student objective: AdamW over the trainable parameters, warmup + cosine."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    optimizer = build_optimizer(objective, stage.lr, stage.weight_decay)
    schedule = WarmupCosine(plan.total_steps, stage.warmup_ratio)
    ds_engine, *_ = deepspeed.initialize(
        model=objective, optimizer=optimizer, config=deepspeed_config(stage, plan, engine, dist),
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    if zero_stage(engine) == 3:
        objective.register_zero3_external()
    return ds_engine


def train_step(engine, batches: list[dict], teacher: Teacher | None, share: bool):
    """One optimizer step over this rank's micro-batches: (mean detached loss terms, tokens read,
    global gradient norm before clipping, samples skipped while loading as `BadSample` errors)."""
    sums: dict[str, torch.Tensor] = {}
    tokens, gnorm = 0, None
    skipped = [err for batch in batches for err in batch.get("skipped", ())]
    for batch in batches:
        if batch.get("failed"):  # on_bad_sample: error, met in a DataLoader worker
            err = batch["failed"][0]
            err.rank_local = True
            raise err
    for i, batch in enumerate(batches):
        if "input_ids" not in batch:
            ids = ", ".join(f"{e.sample_id!r} ({e.reason})" for e in batch["skipped"][:MAX_SKIPPED_IDS])
            raise TrainInputError(f"a micro-batch lost every sample while loading (ids {ids}, first at "
                                  f"{batch['skipped'][0].where}); expected at least one loadable sample: "
                                  f"set check_images: true to drop bad images before training")
        t_out, features = teacher_outputs(teacher, batch, share) if teacher is not None else (None, None)
        loss, terms = engine(batch, t_out, features)
        engine.backward(loss)
        if i == len(batches) - 1 and _plain_fp32(engine):
            gnorm = _grad_norm(engine)  # DeepSpeed keeps none here; the grads are already all-reduced
        engine.step()
        for k, v in terms.items():
            sums[k] = sums[k] + v if k in sums else v
        tokens += int(batch["attention_mask"].sum())
    if gnorm is None:
        gnorm = engine.get_global_grad_norm()  # a tensor or a float (None if DeepSpeed computed none)
    return {k: v / len(batches) for k, v in sums.items()}, tokens, gnorm, skipped


def _plain_fp32(engine) -> bool:
    return engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled()


def _grad_norm(engine) -> torch.Tensor | None:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _train_loop(session: Session, stage: StageConfig, parts: StageParts, start: int, t0: float) -> float | None:
    """Optimizer steps ``start`` .. total: log, checkpoint every K steps (and at a SIGTERM, then
    raise `Preempted`); returns the last logged loss. Samples skipped while loading are counted
    into the dataset's summary and the next metrics record ("skipped": since the previous record)."""
    cfg, dist, plan, engine = session.cfg, session.dist, parts.plan, parts.engine
    progress = Progress(stage.name, plan.total_steps, start, dist.is_main)
    last, pending = None, []  # pending: samples skipped since the last metrics record
    try:
        for epoch, first, micro in plan.epoch_steps(start):
            batches = micro_batches(parts.dataset, parts.collator, micro, cfg.engine.num_workers)
            for k in range(len(micro) // plan.accum):
                step = first + k + 1  # optimizer steps done after this one
                lr = engine.get_lr()[0]
                t_step = time.perf_counter()
                try:
                    step_batches = [next(batches) for _ in range(plan.accum)]
                except BadSample as err:  # a lazily decoded image under on_bad_sample: error, on this rank only
                    err.rank_local = True
                    raise
                terms, tokens, gnorm, skipped = train_step(engine, step_batches, parts.teacher, parts.share)
                for err in skipped:
                    parts.dataset.summary.add_during_training(err)
                pending += skipped
                record = None
                if step % cfg.run.log_every == 0 or step == plan.total_steps:
                    seconds = time.perf_counter() - t_step
                    record = _record(stage, step, plan, epoch, terms, tokens, lr, gnorm, seconds, dist, pending)
                    session.log.write(record)
                    last, pending = record["loss"], []
                progress.update(record, 1)
                fault("after_step")
                stop = session.stop is not None and session.stop.requested(dist.device)
                due = stage.checkpoint_every and step % stage.checkpoint_every == 0
                if (due or stop) and step < plan.total_steps:
                    state = {"stage": stage.name, "step": step, "total_steps": plan.total_steps,
                             "seconds": time.time() - t0}
                    path = save_checkpoint(engine, session.stage_dir(stage.name), step, state, dist,
                                           cfg.run.keep_checkpoints)
                    if stop:
                        raise Preempted(session.stop.signum, f"after step {step}/{plan.total_steps} of stage "
                                        f"{stage.name!r} with checkpoint {path}; --resume continues from it")
    finally:
        progress.close()
    return last


def _record(stage, step, plan, epoch, terms, tokens, lr, gnorm, seconds, dist, skipped) -> dict:
    """Metrics of one step, averaged (terms) or summed (tokens, skipped samples) over ranks."""
    names = [k for k in LOSS_TERMS if k in terms]
    vec = torch.stack([terms[k].float().to(dist.device) for k in names]
                      + [torch.tensor(float(len(skipped)), device=dist.device),
                         torch.tensor(float(tokens), device=dist.device)])
    vec = all_reduce(vec).cpu()
    seconds = float(all_reduce(torch.tensor([seconds], device=dist.device), op="max").item())
    record = {"stage": stage.name, "kind": stage.kind, "step": step, "total_steps": plan.total_steps, "epoch": epoch}
    record.update({k: float(vec[i]) / dist.world_size for i, k in enumerate(names)})
    record.update(
        lr=lr,
        grad_norm=None if gnorm is None else float(gnorm),
        tokens=int(vec[-1]),
        tokens_per_s=float(vec[-1]) / max(seconds, 1e-9),
        step_time_s=seconds,
        peak_mem_mb=peak_memory_mb(dist.device),
        time=time.time(),
        skipped=int(vec[-2]),
    )
    if skipped:
        record["skipped_ids"] = [f"{e.sample_id!r} ({e.reason})" for e in skipped[:MAX_SKIPPED_IDS]]
    return record


def _print_header(stage: StageConfig, parts: StageParts, dist: DistInfo, ckpt: str | None) -> None:
    plan = parts.plan
    print(f"\n== stage {stage.name} ({stage.kind}): model {stage.model}"
          + (f", teacher {stage.teacher or 'cache ' + stage.teacher_cache}" if parts.teacher is not None else ""),
          flush=True)
    print(format_param_summary(param_summary(parts.model)))
    print(f"{parts.dataset.summary.format()}\nglobal batch {stage.batch_size} = {stage.micro_batch_size} micro x "
          f"{dist.world_size} ranks x {plan.accum} accumulation, {plan.total_steps} steps "
          f"({plan.steps_per_epoch}/epoch), lr {stage.lr:g}"
          + (f", {torch.get_num_threads()} cpu threads" if dist.device.type == "cpu" else ""))
    if stage.distills:
        w, d = stage.weights, stage.distill
        print(f"loss = {w.ce:g} ce + {w.res:g} res + {w.vis:g} vis + {w.rel:g} rel; "
              f"{d.divergence} T={d.temperature:g}, rdist {d.rdist_reduction}; "
              f"shared vision features: {parts.share}")
    if parts.patches:
        print("patches: " + ", ".join(parts.patches))
    if ckpt:
        print(f"resuming from {ckpt}")
    print(flush=True)
