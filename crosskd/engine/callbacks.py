"""Trainer events and the callbacks run at them, the results.csv writer (the trainer calls it before saving last.pt)
and the default results.png callback."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosskd.dist import is_main_process
from crosskd.engine.metrics import METRIC_KEYS
from crosskd.engine.plotting import plot_results
from crosskd.utils import temp_path

EVENTS = (
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
)
Callback = Callable[[Any], None]
RESULT_METRICS = METRIC_KEYS[:6]  # AP .. APl go into results.csv


class Callbacks:
    """Lists of functions per event; each is called with the trainer."""

    def __init__(self, defaults: dict[str, list[Callback]] | None = None):
        self._handlers: dict[str, list[Callback]] = {event: [] for event in EVENTS}
        for event, fns in (defaults or {}).items():
            for fn in fns:
                self.add(event, fn)

    def add(self, event: str, fn: Callback) -> None:
        """Call `fn(trainer)` at `event` (one of EVENTS), after the functions already added there."""
        if event not in self._handlers:
            raise ValueError(f"unknown callback event '{event}'; valid events: {', '.join(EVENTS)}")
        self._handlers[event].append(fn)

    def run(self, event: str, trainer: Any) -> None:
        """Call every function added at `event` with the trainer, in the order they were added."""
        for fn in self._handlers[event]:
            fn(trainer)


def results_header(loss_names: list[str]) -> list[str]:
    """results.csv columns: epoch, time, the mean training losses, COCO AP metrics, learning rate and the number of
    steps skipped for a non-finite loss."""
    return ["epoch", "time", *loss_names, *RESULT_METRICS, "lr", "nonfinite_steps"]


def results_row(trainer: Any) -> list[str]:
    """One results.csv row from the trainer's state after an epoch (blank metrics when not validated)."""
    metrics = trainer.metrics or {}
    values = [str(trainer.epoch + 1), f"{trainer.elapsed:.1f}"]
    values += [f"{trainer.epoch_losses[name]:.5g}" for name in trainer.loss_names]
    values += [f"{metrics[k]:.5g}" if k in metrics else "" for k in RESULT_METRICS]
    return [*values, f"{trainer.lr:.6g}", str(trainer.nonfinite.epoch_skips)]


def write_results_csv(trainer: Any) -> None:
    """Append this epoch's row to save_dir/results.csv (header only when the file is new)."""
    if not is_main_process():
        return
    path = Path(trainer.save_dir) / "results.csv"
    is_new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if is_new:
            writer.writerow(results_header(trainer.loss_names))
        writer.writerow(results_row(trainer))


def trim_results_csv(path: Path, epochs: int) -> None:
    """Keep one row for each of epochs 1..`epochs` in results.csv (rewritten atomically), for a resume from a
    checkpoint that finished `epochs` epochs: rows of later epochs, duplicates and a torn last line go."""
    lines = list(csv.reader(path.read_text().splitlines())) if path.exists() else []
    if not lines:
        path.unlink(missing_ok=True)  # an empty file would get no header
        return
    header, *rows = lines
    kept: dict[int, list[str]] = {}
    for row in rows:
        if len(row) == len(header) and row[0].isdigit() and 1 <= int(row[0]) <= epochs:
            kept.setdefault(int(row[0]), row)
    tmp = temp_path(path)
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *(kept[epoch] for epoch in sorted(kept))])
    os.replace(tmp, path)


def plot_results_png(trainer: Any) -> None:
    """Draw results.png from results.csv at the end of training."""
    path = Path(trainer.save_dir) / "results.csv"
    if is_main_process() and trainer.args.plots and path.exists():
        plot_results(path)


def default_callbacks() -> dict[str, list[Callback]]:
    """The callbacks every trainer starts with: results.png at the end."""
    return {"on_train_end": [plot_results_png]}
