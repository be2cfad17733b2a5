"""Names and checks shared by every loss op: the ``impl=`` dispatch point, argument validation.

A leaf module: it imports nothing from the rest of kdengine but the torch-free names of
``settings.py``, so the API files, the torch paths and the Triton launchers can all use it
without cycles.
"""

from __future__ import annotations

import torch

from kdengine.losses.settings import GRAM_REDUCTIONS, IMPLS  # noqa: F401 (re-exported)

IGNORE_INDEX = -100
# ``reduction=`` of the per-row losses (fused_linear_divergence, topk_divergence)
ROW_REDUCTIONS = ("none", "sum", "mean")
# Terms of the LLaVA-KD objective, in display order (llava_kd_loss returns a subset of them)
LOSS_TERMS = ("loss", "ce", "res", "vis", "rel")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The one dispatch point: ``auto`` is Triton on CUDA and the torch path elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


def check_tensor(name: str, x, ndim: int) -> None:
    """A floating-point tensor with ``ndim`` dims, or ValueError naming it."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def check_vector(name: str, x, n: int, device: torch.device, dtypes: tuple | None = None) -> None:
    """An [n] tensor on ``device`` (of one of ``dtypes``), or ValueError naming it."""
    if not isinstance(x, torch.Tensor) or x.shape != (n,):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} has shape {shape}; expected [N] = ({n},)")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {dtypes}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")


def check_devices_dtypes_frozen_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    """One device and dtype for all four tensors, and no grad on the teacher's (shared by every loss)."""
    dev, dtype = student_hidden.device, student_hidden.dtype
    for name, x in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight)):
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {dev}")
        if x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but student_hidden has {dtype}; cast them to one dtype")
    for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if x.requires_grad:
            raise ValueError(f"{name} {tuple(x.shape)} requires grad; the teacher must be frozen "
                             f"(call .detach() or run the teacher under torch.no_grad())")


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Range check of labels; only on CPU tensors, where it costs no device sync."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) "
                         f"and is not ignore_index={ignore_index}")
