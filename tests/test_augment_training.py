"""Augmentation in training runs: close_mosaic turns the mixing steps off by epoch (once logged, exact across a
resume at the boundary), the teacher sees the student's augmented batch, and train_batch*.jpg shows it."""

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data import build_dataloader, load_data_yaml, skip_batches
from crosskd.data import dataset as dataset_module
from crosskd.data.dataset import MIXING_STEPS, DetectionDataset
from crosskd.data.pipeline import AUGMENTATION_KEYS
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
        return [[value for key, value in row.items() if key.strip().startswith("train/")] for row in csv.DictReader(f)]


def record_skips(monkeypatch) -> list[tuple[str, ...]]:
    """The steps each training sample skipped (DetectionDataset._generator), in loading order."""
    skips, generator = [], DetectionDataset._generator

    def recording(key):
        rng, skip = generator(key)
        skips.append(skip)
        return rng, skip

    monkeypatch.setattr(DetectionDataset, "_generator", staticmethod(recording))
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


EVERY_KEY = {**STRONG, "shear": 2.0, "perspective": 0.0005, "flipud": 0.5, "cutmix": 0.5, "multi_scale": 0.3,
             "ms_scales": "head", "cache": "ram", "close_mosaic": 1, "epochs": 2}


@pytest.mark.parametrize("head", ["gfl", "retinanet", "fcos", "atss"])
def test_every_head_trains_and_distils_with_every_augmentation_key(tmp_path, write_digits_yaml, head) -> None:
    """Each key on at once, for each detector: a train run, then a distill run from it, both finish with finite
    losses."""
    data = write_digits_yaml(tmp_path, 8, 2)
    model = tmp_path / f"{head}.yaml"
    model.write_text(yaml.safe_dump({
        "backbone": {"type": "resnet", "depth": 18, "width": 0.25, "pretrained": False},
        "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5},
        "head": {"type": head, "stacked_convs": 1, "feat_channels": 16, "num_groups": 4,
                 "norm": "none" if head == "retinanet" else "gn"},
    }))
    trainer = Trainer(run_args(data, tmp_path, model=str(model), name="train", **EVERY_KEY))
    trainer.train()
    distiller = DistillTrainer(run_args(data, tmp_path, "distill", model=str(model), name="distill",
                                        teacher=str(trainer.save_dir / "weights" / "best.pt"), **EVERY_KEY))
    distiller.train()
    for run in (trainer, distiller):
        assert run.args.mosaic == 1.0 and run.args.cutmix == 0.5 and len(losses(run.save_dir)) == 2
        assert all(math.isfinite(float(value)) for row in losses(run.save_dir) for value in row)


@pytest.mark.parametrize("batch_size", [2, 4], ids=["dataset-pool", "batch-pool"])
def test_augmented_batches_do_not_depend_on_workers_and_resume_mid_epoch(
        tmp_path, write_digits_yaml, batch_size) -> None:
    """With every mixing and geometric step on, workers=0 and workers=2 give the same batches, and a pass that
    skips its first batch (a mid-epoch resume) gives the rest of them; with mosaic partners from the whole dataset
    (batch 2) and from the batch itself (batch 4)."""
    info = load_data_yaml(write_digits_yaml(tmp_path, 8, 2))
    keys = {k: v for k, v in EVERY_KEY.items() if k in AUGMENTATION_KEYS}
    dataset = DetectionDataset(info, "train", 64, augment=True, pad_multiple=32, **keys)

    def batches(workers: int, skip: int = 0) -> list[torch.Tensor]:
        loader = build_dataloader(dataset, batch_size, workers=workers, shuffle=True, seed=5, pin_memory=False)
        loader.sampler.set_epoch(1)
        skip_batches(loader, skip)
        return [tensor for batch in loader for tensor in (batch.images, batch.gt_boxes, batch.gt_labels)]

    straight = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(straight, batches(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], batches(2, skip=1), strict=True))
    other_seed = DetectionDataset(info, "train", 64, augment=True, pad_multiple=32, **keys)
    loader = build_dataloader(other_seed, 2, workers=0, shuffle=True, seed=6, pin_memory=False)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader)).images, straight[0])  # the seed matters


@pytest.mark.parametrize(("batch_size", "decodes"), [(4, 12), (2, 12 * 4)])
def test_mosaic_decodes_each_image_once_per_batch_of_four_or_more(
        tmp_path, write_digits_yaml, monkeypatch, batch_size, decodes) -> None:
    """A batch of 4+ is its own mosaic pool: an epoch decodes each image once; a batch of 2 mixes in 3 images of the
    whole dataset per sample, each decoded."""
    info = load_data_yaml(write_digits_yaml(tmp_path, 12, 2))
    dataset = DetectionDataset(info, "train", 64, augment=True, pad_multiple=32, mosaic=1.0)
    decoded = []
    read = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: decoded.append(path) or read(path))
    loader = build_dataloader(dataset, batch_size, workers=0, shuffle=True, seed=0, pin_memory=False)
    assert sum(len(batch) for batch in loader) == 12
    assert len(decoded) == decodes
