"""Augmentation in training runs: close_mosaic turns the mixing steps off by epoch (once logged, exact across a
resume at the boundary), the teacher sees the student's augmented batch, and train_batch*.jpg shows it."""

import csv
import logging
from pathlib import Path

import pytest
import torch

from crosskd.config import get_args
from crosskd.data.dataset import MIXING_STEPS, DetectionDataset
from crosskd.engine.deployment.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.trainer import Trainer
from crosskd.models import build_detector

STRONG = {"mosaic": 1.0, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "translate": 0.1, "scale": 0.5, "degrees": 5.0,
          "fliplr": 0.5, "mixup": 0.5}


class Interrupt(Exception):
    pass


def run_args(data: Path, project: Path, mode: str = "train", **overrides):
    settings = {"model": "gfl_r18t.yaml", "data": str(data), "epochs": 3, "batch": 4, "imgsz": 64, "workers": 0,
                "device": "cpu", "warmup_iters": 2, "lr0": 0.004, "project": str(project), "seed": 0, "val": False,
                "plots": False, "pretrained": False, **STRONG, "close_mosaic": 1}
    return get_args({**settings, **overrides}, mode)


def losses(save_dir: Path) -> list[list[str]]:
    with open(save_dir / "results.csv", newline="") as f:
        return [[row[k] for k in ("train/cls_loss", "train/box_loss", "train/dfl_loss")] for row in csv.DictReader(f)]


def record_skips(monkeypatch) -> list[tuple[str, ...]]:
    """The steps each training sample skipped (DetectionDataset._resolve), in loading order."""
    skips, resolve = [], DetectionDataset._resolve

    def recording(key):
        index, rng, skip = resolve(key)
        skips.append(skip)
        return index, rng, skip

    monkeypatch.setattr(DetectionDataset, "_resolve", staticmethod(recording))
    return skips


def test_close_mosaic_turns_mixing_off_for_the_last_epochs_and_resumes_across_the_boundary(
        tmp_path, write_digits_yaml, monkeypatch, caplog) -> None:
    data = write_digits_yaml(tmp_path, 8, 2)
    skips = record_skips(monkeypatch)
    with caplog.at_level(logging.INFO, logger="crosskd"):
        Trainer(run_args(data, tmp_path, name="straight")).train()
    assert [set(skips[i:i + 8]) for i in (0, 8, 16)] == [{()}, {()}, {MIXING_STEPS}]  # 8 train images per epoch
    assert caplog.text.count("Closing dataloader mosaic") == 1

    def interrupt(trainer):
        if trainer.epoch == 1:
            raise Interrupt

    broken = Trainer(run_args(data, tmp_path, name="broken"))
    broken.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(Interrupt):
        broken.train()
    last = tmp_path / "broken" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crosskd"):
        Trainer(run_args(data, tmp_path, resume=str(last))).train()
    assert caplog.text.count("Closing dataloader mosaic") == 1
    assert losses(tmp_path / "broken") == losses(tmp_path / "straight")  # the mosaic epochs and the closed one


def test_the_teacher_sees_the_students_augmented_batch(tmp_path, write_digits_yaml) -> None:
    data = write_digits_yaml(tmp_path, 8, 2)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(make_checkpoint(build_detector("gfl_r18t.yaml", nc=10), epoch=-1, best_fitness=None,
                                    names={i: str(i) for i in range(10)}, train_args={}), teacher)
    trainer = DistillTrainer(run_args(data, tmp_path, "distill", teacher=str(teacher), epochs=1, multi_scale=0.5,
                                      close_mosaic=0, plots=True, imgsz=128, batch=2))
    long_sides = []
    trainer.add_callback("on_train_batch_end", lambda t: long_sides.append(int(t.batch.img_sizes.max())))
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    training = []  # non-empty during the epoch (validation after it also runs the student)

    def hook(role):
        def record(module, inputs) -> None:
            if training:
                seen[role].append(inputs[0].detach().clone())

        return record

    trainer.add_callback("on_train_epoch_start", lambda t: training.append(True))
    trainer.add_callback("on_train_epoch_end", lambda t: training.clear())

    trainer.add_callback("on_train_start", lambda t: (
        t.model.backbone.register_forward_pre_hook(hook("student")),
        t.teacher.backbone.register_forward_pre_hook(hook("teacher"))))
    trainer.train()
    assert len(seen["student"]) == len(seen["teacher"]) == 4  # 8 images, batch 2
    assert all(torch.equal(s, t) for s, t in zip(seen["student"], seen["teacher"], strict=True))
    assert all(side % 32 == 0 and 64 <= side <= 192 for side in long_sides) and len(set(long_sides)) > 1, long_sides
    assert (trainer.save_dir / "train_batch0.jpg").is_file()
