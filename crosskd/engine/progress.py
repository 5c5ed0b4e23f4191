"""Per-epoch training progress: a rich bar on a terminal, periodic plain lines elsewhere (e.g. CI logs)."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_INTERVAL_S = 30.0  # without a terminal, print a progress line at most this often
REFRESH_INTERVAL_S = 0.5  # how often the running means are read back from the device


def memory_text(device: torch.device) -> str:
    """Reserved CUDA memory, e.g. '3.2G'; empty on other devices."""
    if device.type != "cuda":
        return ""
    return f"{torch.cuda.memory_reserved(device) / 2**30:.3g}G"


def epoch_header(loss_names: list[str], cuda: bool) -> str:
    """Column titles, 11 characters each, matching `EpochProgress.describe`."""
    columns = ["Epoch", *(["GPU_mem"] if cuda else []), *loss_names, "lr", "img/s"]
    return "".join(f"{c:>11}" for c in columns)


class EpochProgress:
    """Shows iteration, running loss means, lr, images/s, ETA and (CUDA) memory for one epoch; rank 0 only."""

    def __init__(self, console: Console, total: int, epoch_text: str, device: torch.device, enabled: bool = True,
                 completed: int = 0):
        self.console = console
        self.total = total
        self.completed = completed  # iterations done before this display started (a mid-epoch resume)
        self.epoch_text = epoch_text
        self.device = device
        self.enabled = enabled
        self.interactive = enabled and console.is_terminal
        self.start = self.last_refresh = self.last_plain = time.monotonic()
        self.images = 0
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> EpochProgress:
        if self.interactive:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=12),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.epoch_text, total=self.total, completed=self.completed)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def describe(self, means: dict[str, float], lr: float, skipped: int = 0) -> str:
        """One row under `epoch_header`: epoch, memory (CUDA), running loss means, lr and images/s, then
        'skip N' when N steps of the epoch were skipped for a non-finite loss."""
        mem = memory_text(self.device)
        rate = self.images / max(time.monotonic() - self.start, 1e-9)
        values = [self.epoch_text, *([mem] if self.device.type == "cuda" else [])]
        values += [f"{v:.4g}" for v in means.values()] + [f"{lr:.3g}", f"{rate:.1f}"]
        return "".join(f"{v:>11}" for v in values) + (f"  skip {skipped}" if skipped else "")

    def due(self, step: int) -> bool:
        """Whether the display wants fresh numbers now (so the caller syncs the device only then)."""
        last = step + 1 == self.total
        return self.enabled and (last or time.monotonic() - self.last_refresh >= REFRESH_INTERVAL_S)

    def advance(self, images: int) -> None:
        """Count one finished iteration of `images` images."""
        self.images += images
        if self.progress is not None:
            self.progress.advance(self.task)

    def refresh(self, step: int, means: dict[str, float], lr: float, skipped: int = 0) -> None:
        """Redraw the bar; without a terminal print a plain line every PLAIN_INTERVAL_S and at the last step."""
        self.last_refresh = time.monotonic()
        text = self.describe(means, lr, skipped)
        if self.progress is not None:
            self.progress.update(self.task, description=text)
            return
        last = step + 1 == self.total
        if last or self.last_refresh - self.last_plain >= PLAIN_INTERVAL_S:
            self.last_plain = self.last_refresh
            elapsed = self.last_refresh - self.start
            self.console.print(f"{text}  {step + 1}/{self.total} {elapsed:.1f}s", highlight=False, soft_wrap=True)
