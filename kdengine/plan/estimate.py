"""Per-stage peak memory of a training config: the step measured on ``meta``, the rest from arithmetic.

Measured on meta (`kdengine.plan.step.run_step`, the trainer's step under the live-bytes tracker): the
activations, the losses' buffers and everything else the forward and backward allocate, at their real
point in the step, for the stage's micro-batch at ``max_length`` (every sample full, one image, every
text token supervised: the worst case), with and without activation checkpointing.

Computed (ZeRO sharding arithmetic over ``world_size`` ranks, as DeepSpeed's own estimators
``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` count them):
per trainable parameter on CUDA (bf16): weights 2 B, gradients 2 B, and the optimizer's 16 B
(fp32 master weights 4, fp32 gradients 4, AdamW m and v 8); on CPU (fp32): weights 4, gradients 4,
AdamW m and v 8. ZeRO-1 shards the 16 B, ZeRO-2 also the 2 B gradients, ZeRO-3 also the weights
(frozen ones included; the teacher only with engine.shard_teacher).

Two points of the step can hold the peak: forward + backward (activations, the gradients as they are
produced, DeepSpeed's reduce buckets) and the optimizer step (every gradient, the all-gather bucket);
the plan takes the larger. DeepSpeed buffers modelled from the JSON (its defaults when absent):
reduce_bucket_size (ZeRO-1/2, two buckets with overlap_comm), allgather_bucket_size (ZeRO-1/2),
stage3_prefetch_bucket_size and the largest layer gathered (ZeRO-3). A stated allowance on CUDA:
1 GiB for the CUDA context, cuBLAS workspaces and NCCL, plus 5% of the peak for allocator
fragmentation. Not modelled: Liger's kernels (the meta step runs the unpatched layers: an upper bound
on their activation savings), the Triton loss kernels (the meta step runs the torch path of the same
losses), CPU offload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kdengine.plan.models import PlanError, build_meta_model
from kdengine.train.kinds import CACHE_KIND

__all__ = ["ALLOWANCE_BYTES", "FRAGMENTATION", "Setup", "StagePlan", "plan_stage", "plan_stages", "peak_of"]

ALLOWANCE_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces, NCCL (a stated allowance)
FRAGMENTATION = 0.05  # allocator fragmentation, a fraction of the peak (a stated allowance)
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "overlap_comm": False}


@dataclass
class Setup:
    """What the plan is for: the device kind (cuda: bf16 + DeepSpeed; cpu: fp32), ranks, ZeRO stage."""

    device: str = "cuda"
    world_size: int = 1
    zero: int = 0
    ds: dict = field(default_factory=dict)  # the zero_optimization section of the DeepSpeed JSON
    checkpointing: bool = False
    shard_teacher: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def ds_value(self, key: str):
        return self.ds.get(key, DS_DEFAULTS.get(key))


@dataclass
class StagePlan:
    """One stage's parts (bytes) and its predicted peak; see the module docstring for each part."""

    name: str
    kind: str
    micro_batch: int
    length: int
    trainable_params: int = 0
    frozen_params: int = 0
    parts: dict = field(default_factory=dict)  # name -> bytes, what the peak is made of
    step_peak: dict = field(default_factory=dict)  # {"checkpointing": bytes, "no checkpointing": bytes}
    loss_working: int = 0
    peak: int = 0  # allocated bytes at the larger of the two points
    peak_point: str = ""
    needed: int = 0  # peak + allowances (CUDA)
    per_sample: float = 0.0  # bytes of step peak per extra sample (two meta runs)
    notes: list = field(default_factory=list)
    error: str | None = None


class _Stage:
    """Builds the meta models of one stage once and runs its step for the variants the plan asks about."""

    def __init__(self, cfg, stage, setup: Setup):
        self.cfg, self.stage, self.setup = cfg, stage, setup
        synth = cfg.synth.vocab_size if cfg.synth is not None else None
        self.synth = synth
        self.student = build_meta_model(cfg.models[stage.model], f"models.{stage.model}", synth, setup.dtype)
        self.teacher_name = stage.teacher
        self.cache = None
        if stage.teacher_cache is not None:
            source = [st for st in cfg.stages if st.name == stage.teacher_cache]
            if not source:
                raise PlanError(f"teacher_cache = {stage.teacher_cache!r} is a directory; expected the name of a "
                                f"teacher_cache stage of this config to plan it")
            self.teacher_name, self.cache = source[0].model, source[0].cache
        self.teacher = None
        if self.teacher_name is not None and stage.kind != CACHE_KIND:
            self.teacher = build_meta_model(cfg.models[self.teacher_name], f"models.{self.teacher_name}", synth,
                                            setup.dtype)
        ds = cfg.datasets[stage.data]
        context = self.student.model.config.text_config.max_position_embeddings
        self.length = ds.max_length or context
        self.notes = self.student.notes + (self.teacher.notes if self.teacher else [])
        if ds.max_length is None:
            self.notes.append(f"datasets.{stage.data}.max_length is null: the model's context, {context} tokens")
        self._runs: dict = {}

    def run(self, micro_batch: int, checkpointing: bool, teacher_mode: str, drop_grads: bool):
        """The step's peak (bytes beyond the weights) for one variant; memoised."""
        key = (micro_batch, checkpointing, teacher_mode, drop_grads)
        if key not in self._runs:
            self._runs[key] = self._run(*key)
        return self._runs[key]

    def _run(self, micro_batch, checkpointing, teacher_mode, drop_grads):
        from kdengine.model import set_trainable
        from kdengine.plan.step import run_step, synthetic_batch
        from kdengine.train.stage_models import Teacher
        from kdengine.train.student_module import StudentObjective

        stage, s = self.stage, self.student
        batch = synthetic_batch(micro_batch, self.length, s.num_image_tokens, s.image_size, s.image_token_id)
        if stage.kind == CACHE_KIND:
            s.model.eval().requires_grad_(False)
            teacher = Teacher(s.model, None, s.model.get_output_embeddings().weight.detach())
            return run_step(None, batch, teacher, target=self.setup.device)
        model = s.model
        set_trainable(model, stage.trainable)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        teacher, share = None, False
        if stage.distills and teacher_mode == "live":
            t = self.teacher.model.eval().requires_grad_(False)
            teacher = Teacher(t, None, t.get_output_embeddings().weight.detach())
            share = ("vision_tower" not in stage.trainable
                     and t.config.vision_config.to_dict() == model.config.vision_config.to_dict())
        elif stage.distills:
            teacher = _cache_teacher(self.teacher.model, teacher_mode, self.cache, s.num_image_tokens)
        objective = StudentObjective(model, stage.weights, stage.distill, s.num_image_tokens)
        return run_step(objective, batch, teacher, share, drop_grads=drop_grads, target=self.setup.device)

    def teacher_mode(self) -> str:
        if not self.stage.distills:
            return "none"
        return "live" if self.cache is None else self.cache.mode


def _cache_teacher(teacher_model, mode: str, cache, p: int):
    """A cache's teacher side as `CachedTeacher.outputs` hands it to the loss, built on meta per batch."""
    from kdengine.cache.reader import TopKTargets
    from kdengine.model import DistillOutputs

    head = teacher_model.get_output_embeddings().weight.detach()
    dt = teacher_model.config.text_config.hidden_size
    k = cache.k if cache is not None and mode == "topk" else 64
    lp_dtype = getattr(torch, cache.dtype) if cache is not None and cache.dtype and mode == "topk" else torch.float16

    def outputs(batch, mode_):
        labels, visual = batch["labels"], batch["visual_mask"]
        next_labels = torch.full_like(labels, -100)
        next_labels[:, :-1] = labels[:, 1:]
        resp = next_labels != -100
        if mode == "hidden":
            hidden = torch.zeros(*labels.shape, dt, dtype=head.dtype, device=labels.device)
            return DistillOutputs(hidden=hidden, lm_head_weight=head, visual_mask=visual, response_mask=resp,
                                  next_labels=next_labels)
        rows = resp | visual
        r, n_img = int(rows.sum()), int(visual.sum()) // p
        return TopKTargets(mask=rows, ids=torch.zeros(r, k, dtype=torch.int32, device=labels.device),
                           logprobs=torch.zeros(r, k, dtype=lp_dtype, device=labels.device),
                           gram=torch.zeros(n_img, p, p, device=labels.device), vocab_rows=head.shape[0],
                           temperature=cache.temperature if cache is not None else 1.0, rows="response+visual")

    return outputs


def _params(model) -> tuple[int, int, int]:
    """(trainable, frozen, largest module's own parameters), shared Parameters counted once."""
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        trainable += p.numel() if p.requires_grad else 0
        frozen += 0 if p.requires_grad else p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return trainable, frozen, largest


def peak_of(st: _Stage, micro_batch: int, checkpointing: bool, zero: int, teacher_mode: str) -> StagePlan:
    """The plan of ``st``'s stage for one choice of micro-batch, checkpointing, ZeRO stage, teacher."""
    setup, stage = st.setup, st.stage
    w, b = setup.world_size, (2 if setup.dtype == torch.bfloat16 else 4)
    cuda = setup.device == "cuda"
    plan = StagePlan(stage.name, stage.kind, micro_batch, st.length, notes=list(st.notes))
    if stage.kind == CACHE_KIND:
        plan.frozen_params = _params(st.student.model)[1]
        run = st.run(micro_batch, False, "none", False)
        plan.parts = {"frozen teacher weights": plan.frozen_params * b, "teacher forward (no grad)": run.peak}
        plan.step_peak = {"no checkpointing": run.peak}
        plan.peak, plan.peak_point = sum(plan.parts.values()), "teacher forward"
        return _allow(plan, cuda)
    drop = zero >= 2
    run = st.run(micro_batch, checkpointing, teacher_mode, drop)  # builds and freezes the model first
    n_t, n_f, largest = _params(st.student.model)
    plan.trainable_params, plan.frozen_params = n_t, n_f
    shard = lambda x, on: x / w if on else x  # noqa: E731
    weights = shard((n_t + n_f) * b, zero >= 3)
    grads_full = n_t * b
    grads = shard(grads_full, zero >= 2)
    optim = shard(n_t * (16 if b == 2 else 8), zero >= 1)
    teacher = 0
    if teacher_mode == "live":
        teacher = shard(sum(p.numel() for p in st.teacher.model.parameters()) * b, zero >= 3 and setup.shard_teacher)
    elif teacher_mode == "hidden":
        teacher = st.teacher.model.get_output_embeddings().weight.numel() * b
    parts = {"model weights": weights, "optimizer states": optim}
    if teacher_mode != "none":
        parts[f"teacher ({teacher_mode})"] = teacher
    buffers_fb = buffers_step = 0
    if cuda and zero in (1, 2):
        buffers_fb = setup.ds_value("reduce_bucket_size") * b * (2 if setup.ds_value("overlap_comm") else 1)
        buffers_step = setup.ds_value("allgather_bucket_size") * b
    elif cuda and zero == 3:
        buffers_fb = (setup.ds_value("stage3_prefetch_bucket_size") + largest) * b \
            + setup.ds_value("reduce_bucket_size") * b
    fixed = sum(parts.values())
    fb = fixed + (grads if drop else 0) + run.peak + buffers_fb
    step_point = fixed + grads_full if not drop else fixed + grads
    step_point += buffers_step
    plan.parts = {**parts, "gradients": grads_full if not drop else grads,
                  "step: activations, losses, gradients as produced" if not drop
                  else "step: activations, losses": run.peak,
                  "DeepSpeed buckets": max(buffers_fb, buffers_step)}
    plan.peak, plan.peak_point = (fb, "forward+backward") if fb >= step_point else (step_point, "optimizer step")
    plan.peak = int(plan.peak)
    return _allow(plan, cuda)


def _allow(plan: StagePlan, cuda: bool) -> StagePlan:
    plan.parts = {k: int(v) for k, v in plan.parts.items()}
    plan.needed = int(plan.peak * (1 + FRAGMENTATION) + ALLOWANCE_BYTES) if cuda else plan.peak
    return plan


def plan_stage(cfg, stage, setup: Setup, loss_budget: bool = True) -> tuple[StagePlan, _Stage]:
    """The configured plan of one stage, its step with and without checkpointing, and its per-sample slope."""
    st = _Stage(cfg, stage, setup)
    mode = st.teacher_mode()
    mb = stage.cache.batch_size if stage.kind == CACHE_KIND else stage.micro_batch_size
    plan = peak_of(st, mb, setup.checkpointing, setup.zero, mode)
    if stage.kind != CACHE_KIND:
        drop = setup.zero >= 2
        plan.step_peak = {"checkpointing": st.run(mb, True, mode, drop).peak,
                          "no checkpointing": st.run(mb, False, mode, drop).peak}
        if mb > 1:
            one = st.run(1, setup.checkpointing, mode, drop).peak
            plan.per_sample = (st.run(mb, setup.checkpointing, mode, drop).peak - one) / (mb - 1)
    return plan, st


def plan_stages(cfg, setup: Setup) -> list[StagePlan]:
    """Every stage's plan; a stage that cannot be planned carries its one-line error, the others go on."""
    out = []
    for stage in cfg.stages:
        try:
            out.append(plan_stage(cfg, stage, setup)[0])
        except (PlanError, ValueError, OSError) as err:
            out.append(StagePlan(stage.name, stage.kind, stage.micro_batch_size, 0, error=str(err)))
    return out


def replace(plan: StagePlan, **kw) -> StagePlan:
    return dataclasses.replace(plan, **kw)
