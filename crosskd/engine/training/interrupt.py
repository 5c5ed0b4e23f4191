"""Stopping a run cleanly: SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag that the trainer reads at a safe point.

The trainer installs `StopSignals` around its epoch loop and calls `requested()` after every iteration and epoch; under
DDP that is one all_reduce, so every rank stops at the same iteration. It then saves a resumable last.pt (rank 0) and
raises `crosskd.errors.RunStopped`, which the CLI turns into the resume command and exit code 128 + signal number.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from crosskd.dist import is_dist
from crosskd.utils import LOGGER

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM and SIGINT only record the first signal's number; the run goes on to a safe point.

    Repeats are ignored: torchrun forwards the signal its children already got from the shell or the scheduler.
    Handlers are installed only in the main thread (Python allows no other); elsewhere nothing changes.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            return
        self.signum = signum
        LOGGER.warning(f"{signal.Signals(signum).name} received: saving last.pt and stopping at the next safe point "
                       "(end of this iteration); kill -9 quits at once")

    def requested(self, device: torch.device) -> int:
        """The stop signal's number if any rank got one, else 0; under DDP a collective that every rank must call."""
        if not is_dist():
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def resume_command(mode: str, checkpoint: Path) -> str:
    """The command continuing a run from `checkpoint`, e.g. `crosskd train resume=/runs/train/exp/weights/last.pt`."""
    return f"crosskd {mode} {shlex.quote(f'resume={checkpoint.resolve()}')}"
