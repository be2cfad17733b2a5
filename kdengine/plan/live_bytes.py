"""Live bytes and torch ops of a run on any device (``meta`` included), from a TorchDispatchMode.

``TorchOps`` sees every aten op. For each it records (op, FLOPs, bytes moved, dtype) and keeps the
storages allocated under the mode alive in its books for as long as some tensor or view uses them;
``peak`` is the high-water mark of their bytes. Storages are keyed by their StorageImpl address, and an
address can be reused once a storage is freed: an entry whose tensors have all expired is dropped before
a new storage at the same address is keyed, so the new tensor never inherits the old byte count.

Used by ``benchmarks.roofline`` (working memory and HBM bytes of the losses) and ``kdengine plan``.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty"}  # no bytes written
FILLS = {"zeros", "zeros_like", "full", "full_like", "ones_like", "fill", "zero", "new_zeros"}  # nothing read


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def tensors(x):
    """Every tensor in a (nested) list, tuple or dict."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from tensors(y)


class TorchOps(TorchDispatchMode):
    """Records (op, flops, bytes moved, dtype) of every non-view aten op and the live-bytes peak."""

    def __init__(self):
        super().__init__()
        self.ops, self.peak = [], 0
        self._storages = {}  # StorageImpl address -> [bytes, C++ weak refs of the tensors (views too) using it]

    def _alive(self, key) -> bool:
        """Prune the expired refs of one storage entry; drop the entry when none is left."""
        refs = self._storages[key][1]
        refs[:] = [r for r in refs if not r.expired()]
        if not refs:
            del self._storages[key]
            return False
        return True

    @property
    def live(self) -> int:
        """Bytes of the storages allocated under the mode that some tensor or view still uses."""
        for key in list(self._storages):
            self._alive(key)
        return sum(n for n, _ in self._storages.values())

    def _track(self, t, new: bool):
        key = t.untyped_storage()._cdata
        if key in self._storages and new:
            self._alive(key)  # a freed storage's address may be reused by this new one
        if new and key not in self._storages:
            self._storages[key] = [t.untyped_storage().nbytes(), []]
        if key in self._storages:
            self._storages[key][1].append(torch._C._WeakTensorRef(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        returns = func._schema.returns
        in_place = name.endswith("_") or any(r.alias_info is not None and r.alias_info.is_write for r in returns)
        if returns and all(r.alias_info is not None for r in returns) and not in_place:
            for t in tensors(out):  # a view: no traffic, no new memory, but it keeps its base alive
                self._track(t, new=False)
            return out
        ins = list(tensors(args)) + list(tensors(kwargs or {}))
        outs = list(tensors(out))
        flops, dtype = 0, outs[0].dtype if outs else None
        if name.rstrip("_") in MM_OPS and outs:
            mats = [t for t in tensors(args) if t.dim() >= 2]  # (bias/acc,) mat1, mat2; not out=
            flops = 2 * outs[0].numel() * (mats[-2].shape[-1] if len(mats) >= 2 else 0)
            dtype = mats[-1].dtype if mats else dtype  # the operands' dtype picks the peak (out_dtype may be fp32)
        writes = 0 if name in ALLOC_ONLY else sum(map(nbytes, outs))
        reads = 0 if name in FILLS else sum(map(nbytes, ins))
        self.ops.append((name, flops, reads + writes, str(dtype).replace("torch.", "")))
        for t in outs:
            self._track(t, new=not in_place)
        if not in_place:
            self.peak = max(self.peak, self.live)
        return out
