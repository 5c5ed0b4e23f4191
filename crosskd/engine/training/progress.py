"""Per-epoch training progress: a rich bar on a terminal, periodic plain lines elsewhere (e.g. CI logs).

The header and the row of running values share one column width, 11 characters as Ultralytics where the console is
wide enough and down to 8 on an 80-column terminal, so a distillation run (five loss columns, GPU memory) fits
without wrapping; on a terminal the bar, count and times go on a line of their own under the row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from crosskd.utils import console

PLAIN_INTERVAL_S = 30.0  # without a terminal, print a progress line at most this often
REFRESH_INTERVAL_S = 0.5  # how often the running means are read back from the device
MAX_COLUMN_WIDTH = 11
MIN_COLUMN_WIDTH = 8
SKIP_WIDTH = 8  # room kept at the end of the row for "  skip N"


def memory_text(device: torch.device) -> str:
    """Reserved CUDA memory, e.g. '3.2G'; empty on other devices."""
    if device.type != "cuda":
        return ""
    return f"{torch.cuda.memory_reserved(device) / 2**30:.3g}G"


def column_width(num_columns: int, console_width: int) -> int:
    """Characters per column: as many as `console_width` allows for `num_columns` and a "skip N" note, 8 to 11."""
    return max(MIN_COLUMN_WIDTH, min(MAX_COLUMN_WIDTH, (console_width - SKIP_WIDTH) // num_columns))


def fit_number(value: float, width: int, digits: int = 4) -> str:
    """`value` with up to `digits` significant digits, fewer when needed to leave a space in a `width` column."""
    text = f"{value:.{digits}g}"
    while len(text) >= width and digits > 1:
        digits -= 1
        text = f"{value:.{digits}g}"
    return text


def epoch_header(loss_names: list[str], cuda: bool, console_width: int | None = None) -> str:
    """Column titles matching `EpochProgress.describe` for the same console width (default: crosskd's console);
    losses by their short name (loss_cls -> cls, kd_reg stays kd_reg)."""
    columns = ["Epoch", *(["GPU_mem"] if cuda else []), *(n.removeprefix("loss_") for n in loss_names), "lr", "img/s"]
    width = column_width(len(columns), console_width or console.width)
    return "".join(f"{c:>{width}}" for c in columns)


class RowProgress(Progress):
    """A rich Progress that shows the task description (the row of values under the epoch header) on its own line
    and the bar, count and times on the next, so neither wraps on a narrow terminal."""

    def get_renderables(self) -> Iterable[RenderableType]:
        for task in self.tasks:
            yield Text(task.description, no_wrap=True, overflow="ellipsis")
        yield self.make_tasks_table(self.tasks)


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
            self.progress = RowProgress(
                BarColumn(bar_width=30),
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
        rate = self.images / max(time.monotonic() - self.start, 1e-9)
        values = [self.epoch_text, *([memory_text(self.device)] if self.device.type == "cuda" else [])]
        width = column_width(len(values) + len(means) + 2, self.console.width)
        values += [fit_number(v, width) for v in means.values()] + [fit_number(lr, width, 3), f"{rate:.1f}"]
        return "".join(f"{v:>{width}}" for v in values) + (f"  skip {skipped}" if skipped else "")

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
