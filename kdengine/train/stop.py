"""SIGTERM (what a cluster scheduler sends before it kills a job) and Ctrl-C: stop at the next step boundary.

`StopRequest` catches SIGTERM and the first SIGINT (Ctrl-C) while the stages run and only sets a flag;
the step loop asks `requested` after every optimizer step (all ranks agree: the flag is max-reduced),
writes a checkpoint of that step and raises `Preempted`, which the command line turns into one line
and exit code 0 (SIGTERM: a requeued job goes on) or 130 (Ctrl-C: the shell's code for an interrupt).
``--resume`` starts from that checkpoint, so no step is lost. A second Ctrl-C stops at once (exit 130):
checkpoints are written to a temporary name and renamed, so a hard stop loses at most the steps since
the last checkpoint, as a kill does.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from kdengine.train.dist import all_reduce

__all__ = ["INTERRUPT_EXIT", "Preempted", "StopRequest", "signal_label"]

INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command
_LABELS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


def signal_label(signum: int | None) -> str:
    return _LABELS.get(signum, "SIGTERM")


class Preempted(Exception):
    """The run stopped on a signal after writing its state; the message says where."""

    def __init__(self, signum: int | None, where: str):
        super().__init__(f"{signal_label(signum)}: stopped {where}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT if self.signum == signal.SIGINT else 0


class StopRequest:
    """Context manager: SIGTERM and a first Ctrl-C set ``signum`` instead of ending the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in _LABELS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        main_rank = os.environ.get("RANK", "0") == "0"
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            if main_rank:
                print("\nkdengine: second Ctrl-C: stopped at once; --resume continues from the last checkpoint",
                      file=sys.stderr, flush=True)
            os._exit(INTERRUPT_EXIT)
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT and main_rank:  # a leading newline: the progress bar holds the current line
            print("\nkdengine: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)

    def requested(self, device: torch.device) -> bool:
        """Has any rank been asked to stop (a max-reduce over ranks; no collective on one rank)."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        return bool(all_reduce(flag, op="max").item())
