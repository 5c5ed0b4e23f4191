"""Trainer events and the callbacks run at them, the results.csv writer (the trainer calls it before saving last.pt)
and the default callbacks: the run's plots (labels.jpg, train_batch0..2.jpg, results.png) and TensorBoard logging.

results.csv follows Ultralytics' column scheme, so its tools and habits read it: epoch, time, train/<loss>,
metrics/precision(B), metrics/recall(B), metrics/mAP50(B), metrics/mAP50-95(B), val/<loss>, lr/pg<i>, then the
other COCO numbers (metrics/mAP75(B), APs, APm, APl, AR100), nonfinite_steps and unreadable_images (train images
that could not be read in the epoch's pass and were skipped).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from crosskd.dist import is_main_process
from crosskd.engine.evaluation.plotting import plot_images, plot_labels, plot_results
from crosskd.user_settings import user_setting
from crosskd.utils import LOGGER, colorstr, temp_path

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
METRIC_COLUMNS = {  # validator metric key -> results.csv column, in Ultralytics' order
    "precision": "metrics/precision(B)", "recall": "metrics/recall(B)", "AP50": "metrics/mAP50(B)",
    "AP": "metrics/mAP50-95(B)",
}
COCO_COLUMNS = {  # the other COCO numbers, after the learning rates
    "AP75": "metrics/mAP75(B)", "APs": "metrics/APs(B)", "APm": "metrics/APm(B)", "APl": "metrics/APl(B)",
    "AR100": "metrics/AR100(B)",
}
TRAIN_BATCH_PLOTS = 3  # train_batch0..2.jpg from the run's first iterations


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


def loss_column(name: str) -> str:
    """A loss key as Ultralytics names it: loss_cls -> cls_loss, kd_reg -> kd_reg_loss."""
    return f"{name.removeprefix('loss_')}_loss"


def format_number(value: float | None) -> str:
    return "" if value is None else f"{value:.5g}"


def results_row(trainer: Any) -> dict[str, str]:
    """This epoch's results.csv row by column: validation columns blank when the epoch was not validated; val/<loss>
    for the detector's own losses (loss_*; the distillation terms need the teacher and are not validated)."""
    metrics = trainer.metrics or {}
    val_losses = trainer.validator.losses if metrics else {}
    row = {"epoch": str(trainer.epoch + 1), "time": f"{trainer.state.elapsed:.1f}"}
    row |= {f"train/{loss_column(name)}": format_number(trainer.epoch_losses[name]) for name in trainer.loss_names}
    row |= {column: format_number(metrics.get(key)) for key, column in METRIC_COLUMNS.items()}
    row |= {f"val/{loss_column(name)}": format_number(val_losses.get(name))
            for name in trainer.loss_names if name.startswith("loss_")}
    row |= {f"lr/pg{i}": f"{group['lr']:.6g}" for i, group in enumerate(trainer.optimizer.param_groups)}
    row |= {column: format_number(metrics.get(key)) for key, column in COCO_COLUMNS.items()}
    unreadable = getattr(trainer.train_loader, "num_unreadable", 0)  # images that vanished after indexing
    return {**row, "nonfinite_steps": str(trainer.nonfinite.epoch_skips), "unreadable_images": str(unreadable)}


def write_results_csv(trainer: Any) -> None:
    """Append this epoch's row to save_dir/results.csv (header only when the file is new)."""
    if not is_main_process():
        return
    path = Path(trainer.save_dir) / "results.csv"
    is_new = not path.exists()
    row = results_row(trainer)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if is_new:
            writer.writerow(list(row))
        writer.writerow(list(row.values()))


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


def plot_train_labels(trainer: Any) -> None:
    """labels.jpg: the class histogram and box centre/size distributions of the training labels (rank 0, plots)."""
    if not (is_main_process() and trainer.args.plots):
        return
    records = trainer.train_loader.dataset.records
    boxes = np.concatenate([r.boxes / np.array([r.width, r.height] * 2, dtype=np.float32) for r in records])  # [N, 4]
    labels = np.concatenate([r.labels for r in records])  # [N]
    plot_labels(boxes, labels, trainer.names, trainer.save_dir / "labels.jpg")


def plot_train_batch(trainer: Any) -> None:
    """train_batch0..2.jpg: the run's first augmented batches (`trainer.batch`) with their boxes (rank 0, plots)."""
    if not (is_main_process() and trainer.args.plots and trainer.iteration < TRAIN_BATCH_PLOTS):
        return
    batch = trainer.batch
    keep = [labels >= 0 for labels in batch.gt_labels]
    plot_images(batch.images, [b[k] for b, k in zip(batch.gt_boxes, keep, strict=True)],
                [lab[k] for lab, k in zip(batch.gt_labels, keep, strict=True)], trainer.names,
                trainer.save_dir / f"train_batch{trainer.iteration}.jpg")


def tensorboard_enabled(args: Any) -> bool:
    """tensorboard= of the run, else the user setting (`crosskd settings tensorboard=true`)."""
    return bool(user_setting("tensorboard") if args.tensorboard is None else args.tensorboard)


class TensorBoardLogger:
    """Logs every results.csv column per epoch (same tags: train/cls_loss, metrics/mAP50-95(B), lr/pg0 ...) and
    at the end the val_batch images, into the run folder; rank 0 with tensorboard enabled and installed."""

    def __init__(self):
        self.writer = None

    def start(self, trainer: Any) -> None:
        if not (is_main_process() and tensorboard_enabled(trainer.args)):
            return
        if importlib.util.find_spec("tensorboard") is None:
            LOGGER.warning("tensorboard=true but the tensorboard package is not installed: pip install "
                           "'crosskd[tensorboard]' (training goes on without it)")
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.save_dir))
        LOGGER.info(f"{colorstr('TensorBoard:')} tensorboard --logdir {trainer.save_dir}")

    def log_epoch(self, trainer: Any) -> None:
        if self.writer is None:
            return
        row = results_row(trainer)
        step = int(row.pop("epoch"))
        for tag, value in row.items():
            if value:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def finish(self, trainer: Any) -> None:
        if self.writer is None:
            return
        for path in sorted(Path(trainer.save_dir).glob("val_batch*.jpg")):
            image = cv2.imread(str(path))
            if image is not None:
                self.writer.add_image(path.stem, image[:, :, ::-1].copy(), trainer.epoch + 1, dataformats="HWC")
        self.writer.close()
        self.writer = None


def default_callbacks() -> dict[str, list[Callback]]:
    """The callbacks every trainer starts with: labels.jpg, train_batch0..2.jpg, results.png, TensorBoard."""
    tensorboard = TensorBoardLogger()
    return {
        "on_train_start": [plot_train_labels, tensorboard.start],
        "on_train_batch_end": [plot_train_batch],
        "on_fit_epoch_end": [tensorboard.log_epoch],
        "on_train_end": [plot_results_png, tensorboard.finish],
    }
