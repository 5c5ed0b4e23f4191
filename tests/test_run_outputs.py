"""Run outputs as Ultralytics users expect them: results.csv columns, the plots, TensorBoard, an 80-column progress."""

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console, Group

from crosskd.config import get_args
from crosskd.engine.evaluation.pr_metrics import ImageDetections, confusion_matrix, pr_curves
from crosskd.engine.training.callbacks import loss_column, results_row
from crosskd.engine.training.progress import EpochProgress, epoch_header
from crosskd.engine.training.trainer import Trainer

PLOTS = ("results.png", "labels.jpg", "train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg",
         "val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_labels.jpg", "val_batch1_pred.jpg",
         "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
         "confusion_matrix_normalized.png")
HEADER = ["epoch", "time", "train/cls_loss", "train/box_loss", "train/dfl_loss", "metrics/precision(B)",
          "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "val/cls_loss", "val/box_loss",
          "val/dfl_loss", "lr/pg0", "metrics/mAP75(B)", "metrics/APs(B)", "metrics/APm(B)", "metrics/APl(B)",
          "metrics/AR100(B)", "nonfinite_steps", "unreadable_images"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, write_digits_yaml):
    """The tiny GFL trained 2 epochs at 64 px with plots and TensorBoard on (batch 4: 3+ train and val batches)."""
    root = tmp_path_factory.mktemp("outputs")
    data = write_digits_yaml(root, num_train=16, num_val=12)
    args = get_args({"model": "gfl_r18t.yaml", "data": str(data), "epochs": 2, "batch": 4, "imgsz": 64,
                     "workers": 0, "device": "cpu", "optimizer": "AdamW", "lr0": 0.004, "warmup_iters": 2,
                     "project": str(root / "runs"), "name": "exp", "seed": 0, "plots": True,
                     "tensorboard": True}, "train")
    trainer = Trainer(args)
    metrics = trainer.train()
    return SimpleNamespace(trainer=trainer, save_dir=trainer.save_dir, metrics=metrics)


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_run_writes_every_plot(run):
    missing = [name for name in PLOTS if not (run.save_dir / name).is_file()]
    assert not missing


def test_results_csv_has_ultralytics_columns(run):
    header, rows = read_rows(run.save_dir / "results.csv")
    assert header == HEADER
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        assert 0.0 <= float(row["metrics/precision(B)"]) <= 1.0 and 0.0 <= float(row["metrics/recall(B)"]) <= 1.0
        assert all(float(row[f"val/{name}"]) > 0 for name in ("cls_loss", "box_loss", "dfl_loss"))
    last = rows[-1]
    assert float(last["lr/pg0"]) == pytest.approx(run.trainer.lr, rel=1e-5)
    assert float(last["metrics/mAP50-95(B)"]) == pytest.approx(run.trainer.metrics["AP"], abs=1e-4)
    assert 0.0 <= run.metrics["precision"] <= 1.0 and 0.0 <= run.metrics["recall"] <= 1.0


def test_each_metric_lands_in_its_results_csv_column():
    """The 2-epoch run above scores AP 0, so its mAP50-95 == AP check is 0 == 0: here every metric differs."""
    metrics = {"precision": 0.11, "recall": 0.22, "AP50": 0.33, "AP": 0.44, "AP75": 0.55, "APs": 0.66, "APm": 0.77,
               "APl": 0.88, "AR100": 0.99}
    losses = {"loss_cls": 1.5, "loss_box": 2.5, "loss_dfl": 3.5}
    trainer = SimpleNamespace(
        metrics=metrics, validator=SimpleNamespace(losses={k: v / 10 for k, v in losses.items()}), epoch=1,
        state=SimpleNamespace(elapsed=12.34), epoch_losses=losses, loss_names=list(losses),
        optimizer=SimpleNamespace(param_groups=[{"lr": 0.004}]), train_loader=None,
        nonfinite=SimpleNamespace(epoch_skips=0),
    )
    row = results_row(trainer)
    assert list(row) == HEADER
    expected = {"epoch": "2", "time": "12.3", "train/cls_loss": "1.5", "train/box_loss": "2.5", "train/dfl_loss": "3.5",
                "metrics/precision(B)": "0.11", "metrics/recall(B)": "0.22", "metrics/mAP50(B)": "0.33",
                "metrics/mAP50-95(B)": "0.44", "val/cls_loss": "0.15", "val/box_loss": "0.25", "val/dfl_loss": "0.35",
                "lr/pg0": "0.004", "metrics/mAP75(B)": "0.55", "metrics/APs(B)": "0.66", "metrics/APm(B)": "0.77",
                "metrics/APl(B)": "0.88", "metrics/AR100(B)": "0.99", "nonfinite_steps": "0", "unreadable_images": "0"}
    assert row == expected


def test_tensorboard_event_file_has_the_csv_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(run.save_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/cls_loss", "metrics/mAP50-95(B)", "metrics/precision(B)", "val/box_loss", "lr/pg0"} <= scalars
    assert [e.step for e in accumulator.Scalars("train/cls_loss")] == [1, 2]
    assert "val_batch0_pred" in accumulator.Tags()["images"]


def test_tensorboard_missing_gives_one_hint(tmp_path, monkeypatch, caplog):
    from crosskd.engine.training import callbacks

    monkeypatch.setattr(callbacks.importlib.util, "find_spec", lambda name: None)
    logger = callbacks.TensorBoardLogger()
    args = SimpleNamespace(tensorboard=True)
    with caplog.at_level("WARNING", logger="crosskd"):
        logger.start(SimpleNamespace(args=args, save_dir=tmp_path))
    assert logger.writer is None
    assert "pip install 'crosskd[tensorboard]'" in caplog.text


def test_tensorboard_default_is_the_user_setting(tmp_path, monkeypatch):
    from crosskd.engine.training.callbacks import tensorboard_enabled

    monkeypatch.setenv("CROSSKD_CONFIG_DIR", str(tmp_path))
    assert not tensorboard_enabled(SimpleNamespace(tensorboard=None))
    (tmp_path / "settings.yaml").write_text("tensorboard: true\n")
    assert tensorboard_enabled(SimpleNamespace(tensorboard=None))
    assert not tensorboard_enabled(SimpleNamespace(tensorboard=False))  # explicit wins


def test_loss_columns_follow_ultralytics_names():
    assert [loss_column(n) for n in ("loss_cls", "loss_box", "loss_dfl", "kd_cls", "kd_reg")] == [
        "cls_loss", "box_loss", "dfl_loss", "kd_cls_loss", "kd_reg_loss"]


def test_precision_recall_and_confusion_on_known_matches():
    """Two images, class 0 and 1: one exact hit, one box of the wrong class, one miss and one false positive."""
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    images = [
        ImageDetections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0.9, 0.8]),
                        np.array([0, 0]), gt, np.array([0, 1])),
        ImageDetections(np.array([[50, 50, 60, 60]], float), np.array([0.7]), np.array([1]), gt[:1], np.array([0])),
    ]
    curves = pr_curves(images, nc=2)
    assert list(curves.classes) == [0, 1]
    # class 0: 2 gt, predictions 0.9 (hit) and 0.8 (wrong place for class 0: it sits on the class-1 box)
    assert curves.recall[0, 0] == pytest.approx(0.5) and curves.precision[0, 0] == pytest.approx(0.5)
    assert curves.recall[1].max() == 0.0  # class 1 is never found
    matrix = confusion_matrix(images, nc=2)
    expected = np.array([[1, 1, 0],  # predicted 0: one true 0, one true 1
                         [0, 0, 1],  # predicted 1: background
                         [1, 0, 0]])  # missed: one true 0
    np.testing.assert_array_equal(matrix, expected)


def test_progress_fits_80_columns_with_two_kd_losses():
    """A distillation row (3 detector + 2 KD losses) under its header: no line past 80 columns, img/s shown."""
    names = ["loss_cls", "loss_box", "loss_dfl", "kd_cls", "kd_reg"]
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    header = epoch_header(names, cuda=False, console_width=80)
    assert len(header) <= 80 and header.rstrip().endswith("img/s")
    assert len(epoch_header(names, cuda=True, console_width=80)) <= 80
    with EpochProgress(console, 200, "12/300", torch.device("cpu")) as bar:
        bar.advance(16)
        bar.refresh(0, dict(zip(names, (0.5123, 1.23456, 0.000123456, 12.3456, 0.98765), strict=True)), 1.25e-05,
                    skipped=3)
        lines = console.render_lines(Group(*bar.progress.get_renderables()), pad=False)
    texts = ["".join(segment.text for segment in line).rstrip() for line in lines]
    assert len(texts) == 2 and all(len(text) <= 80 for text in texts)
    row = texts[0].split()
    assert row[0] == "12/300" and len(row) == len(header.split()) + 2  # + "skip 3"
    assert float(row[len(names) + 2]) > 0  # img/s
    assert "1/200" in texts[1]
