"""Process group setup and the few collectives the loop needs.

One process per device. Under the ``deepspeed`` launcher (or torchrun) RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment; a plain ``kdengine train``
is a world of one on a free local port. Backend: nccl on CUDA, gloo on CPU (DeepSpeed's cpu
accelerator), unless ``engine.dist_backend`` says otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "all_reduce", "auto_threads", "barrier", "cpu_op_build_note", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auto_threads(local_world: int = 1) -> int:
    """CPU threads for one of ``local_world`` ranks: its share of the usable cores, less the cores
    other processes keep busy (the 1-minute load average), at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable // local_world, usable - round(os.getloadavg()[0])))


def init_distributed(backend: str | None = None, cpu_threads: int | str | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device.
    On CPU, ``cpu_threads`` intra-op threads ("auto": `auto_threads`; None: the cores split over
    the local ranks)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        if cpu_threads == "auto":
            torch.set_num_threads(auto_threads(local_world))
        elif cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        elif local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # no oversubscription
    import deepspeed

    if device.type == "cpu" and local_rank == 0:
        note = cpu_op_build_note()
        if note:
            print(note, flush=True)
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cpu_op_build_note() -> str | None:
    """The line to print when DeepSpeed's CPU communication op is not built yet (its first start
    compiles it, silently, for 2.5-3.5 minutes on 2 cores; later starts load the cached build)."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        build_dir = _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # a DeepSpeed without this op or layout: nothing to say
        return None
    if os.path.isfile(os.path.join(build_dir, f"{builder.NAME}.so")):
        return None
    return (f"compiling DeepSpeed's CPU op {builder.NAME}, once, ~1-3 min on 2 cores "
            f"(cached in {build_dir}; later starts take seconds)")


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a small tensor over ranks, in place; a no-op for a world of one."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=red)
    return t
