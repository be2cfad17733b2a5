"""One training step of a stage under the live-bytes tracker, on ``meta`` (no weights, no data) or for real.

The step is the trainer's own: `kdengine.train.student_module.teacher_outputs` (no grad), then the
`StudentObjective` (the student's `distill_forward` and `llava_kd_loss` / `topk_kd_loss`), backward, and,
when measuring for real, the optimizer step. Models are the real classes (`LlavaForConditionalGeneration`
with the SigLIP/CLIP tower and the Qwen2/Llama LM) built from their configs on the meta device.

Two things make the real code run on meta:
- ``MetaOps`` (a `TorchOps`) gives the small integer and boolean tensors of the batch (ids, masks, labels)
  a CPU shadow, computes every op on them on the CPU too, and answers from the shadows what meta cannot:
  ``.item()``, ``torch.equal``, boolean-mask indexing (``hidden[mask]``). Float tensors stay on meta.
- ``fused_attention`` sends ``scaled_dot_product_attention`` on meta to the fused kernel the target device
  runs (flash attention on CUDA, the CPU flash kernel on CPU): on meta torch would take the math path
  and count [B, heads, L, L] attention matrices that no real run allocates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdengine.plan.live_bytes import TorchOps, nbytes, tensors

__all__ = ["fused_attention", "MetaOps", "StepMemory", "synthetic_batch", "run_step"]


@contextlib.contextmanager
def fused_attention(target: str):
    """``F.scaled_dot_product_attention`` on meta tensors without a mask -> the fused kernel of ``target``.
    The function is swapped (not a TorchFunctionMode): checkpointed layers recompute it in backward,
    on the autograd engine's thread, where a mode is not active."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not query.is_meta or attn_mask is not None or dropout_p:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernels take equal head counts
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        if target == "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, bool(is_causal), False,
                                                                      scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, bool(is_causal),
                                                                          scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class MetaOps(TorchOps):
    """`TorchOps` whose meta integer/boolean tensors carry CPU shadows (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._shadows = {}  # id(meta tensor) -> (weak ref, CPU tensor)

    def shadow(self, cpu: torch.Tensor) -> torch.Tensor:
        """A meta copy of a CPU tensor that remembers its values."""
        meta = torch.empty_like(cpu, device="meta")
        self._remember(meta, cpu)
        return meta

    def _remember(self, meta, cpu) -> None:
        self._shadows[id(meta)] = (torch._C._WeakTensorRef(meta), cpu)

    def _cpu(self, t):
        entry = self._shadows.get(id(t)) if isinstance(t, torch.Tensor) and t.is_meta else None
        if entry is None or entry[0].expired():
            return None
        return entry[1]

    def _swap(self, x, fn):
        if isinstance(x, torch.Tensor):
            return fn(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._swap(y, fn) for y in x)
        if isinstance(x, dict):
            return {k: self._swap(v, fn) for k, v in x.items()}
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ins = list(tensors(args)) + list(tensors(kwargs))
        metas = [t for t in ins if t.is_meta]
        if metas and all(self._cpu(t) is not None for t in metas):  # every meta input has values: compute them
            on_cpu = lambda t: self._cpu(t) if t.is_meta else t  # noqa: E731
            cpu_kwargs = {k: torch.device("cpu") if isinstance(v, torch.device) and v.type == "meta" else v
                          for k, v in self._swap(kwargs, on_cpu).items()}
            cpu_out = func(*self._swap(args, on_cpu), **cpu_kwargs)
            if name in ("_local_scalar_dense", "equal", "is_nonzero"):
                return cpu_out
            out = self._swap(cpu_out, lambda t: torch.empty_like(t, device="meta"))
            for m, c in zip(tensors(out), tensors(cpu_out)):
                self._remember(m, c)
                self._track(m, new=True)
            self.peak = max(self.peak, self.live)
            return out
        if name == "index" and len(args) > 1:  # x[mask]: the mask's values give the indices
            idx = [None if i is None else self._cpu(i) for i in args[1]]
            if any(i is not None and i.dtype == torch.bool for i in idx):
                new = []
                for i, orig in zip(idx, args[1]):
                    if i is not None and i.dtype == torch.bool:
                        new.extend(self.shadow(j) for j in i.nonzero(as_tuple=True))
                    else:
                        new.append(orig)
                args = (args[0], new, *args[2:])
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if not ins and isinstance(out, torch.Tensor) and out.is_meta and not out.is_floating_point():
            cpu = func(*args, **{**kwargs, "device": torch.device("cpu")})  # arange, full, ... of integers
            self._remember(out, cpu)
        return out


@dataclass
class StepMemory:
    """Live bytes of one step beyond what existed before it (the weights): the tracker's peak, and the
    gradients that are alive at the end of backward."""

    peak: int
    grads: int
    ops: int


def synthetic_batch(batch_size: int, length: int, num_image_tokens: int, image_size: int, image_token_id: int,
                    text_token_id: int = 0) -> dict:
    """The worst case of a micro-batch on CPU: every sample ``length`` tokens with one image (its P image
    tokens after the first token) and every text token supervised."""
    p = num_image_tokens
    if length < p + 2:
        raise ValueError(f"max_length {length} leaves no text after the {p} image tokens; expected > {p + 1}")
    ids = torch.full((batch_size, length), text_token_id, dtype=torch.long)
    ids[:, 1:1 + p] = image_token_id
    labels = ids.clone()
    labels[:, :1 + p] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "visual_mask": ids == image_token_id,
            "pixel_values": torch.zeros(batch_size, 3, image_size, image_size)}


def run_step(objective, batch: dict, teacher=None, share: bool = False, optimizer=None, drop_grads: bool = False,
             target: str = "cpu", steps: int = 1) -> StepMemory:
    """``steps`` training steps of ``objective`` (a `StudentObjective`) on ``batch`` under the tracker.

    On meta (the student's parameters on meta) the batch's integer tensors get shadows and attention is
    the ``target`` device's fused kernel. teacher: a `kdengine.train.stage_models.Teacher`, a
    `DistillOutputs`-like object of a cache, or None. drop_grads: free each parameter's gradient as soon
    as it is accumulated (ZeRO-2/3 reduce it into a bucket and keep a partition, counted apart).
    optimizer: stepped after backward (a real run). Returns the peak beyond the bytes alive before."""
    from kdengine.train.student_module import teacher_outputs
    from kdengine.train.stage_models import Teacher

    meta = next((objective or teacher.model).parameters()).is_meta
    mode = MetaOps() if meta else TorchOps()
    hooks = []
    if drop_grads and objective is not None:
        for p in objective.parameters():
            if p.requires_grad:
                hooks.append(p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))
    try:
        with fused_attention(target), mode:
            if meta:
                batch = {k: mode.shadow(v) if v.dtype in (torch.long, torch.bool) else torch.empty_like(v, device="meta")
                         for k, v in batch.items()}
            for _ in range(steps):
                if objective is None:  # a teacher_cache stage: the teacher's forward only
                    del teacher_outputs(teacher, batch, share)[0]
                    grads = 0
                    continue
                if isinstance(teacher, Teacher):
                    t_out, features = teacher_outputs(teacher, batch, share)
                else:
                    t_out, features = _cached(teacher, batch, mode if meta else None), None
                loss, _ = objective(batch, t_out, features)
                del t_out, features
                loss.backward()
                del loss
                grads = sum(nbytes(p.grad) for p in objective.parameters() if p.grad is not None)
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    for p in objective.parameters():
                        p.grad = None
    finally:
        for h in hooks:
            h.remove()
    return StepMemory(peak=mode.peak, grads=grads, ops=len(mode.ops))


def _cached(teacher, batch: dict, mode):
    """A cache's teacher side on this batch: ``teacher`` is a callable (batch, mode) -> outputs, or None."""
    return None if teacher is None else teacher(batch, mode)
