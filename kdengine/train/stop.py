"""SIGTERM (what a cluster scheduler sends before it kills a job): stop at the next step boundary.

`StopRequest` catches SIGTERM while the stages run and only sets a flag; the step loop asks
`requested` after every optimizer step (all ranks agree: the flag is max-reduced), writes a
checkpoint of that step and raises `Preempted`, which the command line turns into exit code 0.
A requeued ``--resume`` starts from that checkpoint, so no step is lost.
"""

from __future__ import annotations

import signal

import torch

from kdengine.train.dist import all_reduce

__all__ = ["Preempted", "StopRequest"]


class Preempted(Exception):
    """The run stopped on SIGTERM after writing its state; the message says where."""


class StopRequest:
    """Context manager: SIGTERM sets ``signum`` instead of ending the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = None

    def __enter__(self) -> StopRequest:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, device: torch.device) -> bool:
        """Has any rank been asked to stop (a max-reduce over ranks; no collective on one rank)."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        return bool(all_reduce(flag, op="max").item())
