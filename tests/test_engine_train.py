"""Trainer end to end on tiny digits data: run files, results.csv, callbacks, stripping, val and exact resume."""

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data.digits import generate_digits
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.evaluation import validator
from crosskd.engine.training.callbacks import EVENTS
from crosskd.engine.training.launch import trainer_class
from crosskd.engine.training.trainer import Trainer
from crosskd.errors import CheckpointError

NAMES = {i: str(i) for i in range(10)}


def write_digits_yaml(root: Path, num_train: int, num_val: int, fliplr: float) -> Path:
    data_root = generate_digits(root / "digits", num_train=num_train, num_val=num_val, imgsz=128, seed=0)
    split = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    path = root / "digits.yaml"
    path.write_text(yaml.safe_dump({"path": str(data_root), **split, "names": NAMES, "fliplr": fliplr}))
    return path


def train_args(data: Path, project: Path, **overrides):
    settings = {"model": "gfl_r18t.yaml", "data": str(data), "epochs": 2, "batch": 8, "imgsz": 128, "workers": 0,
                "device": "cpu", "warmup_iters": 4, "lr0": 0.02, "project": str(project), "seed": 0}
    return get_args({**settings, **overrides}, "train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The small GFL trained for 2 epochs on 64 digits images (validated on 16), with every event recorded."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_digits_yaml(root, num_train=64, num_val=16, fliplr=0.0)
    trainer = Trainer(train_args(data, root / "runs", name="exp"))
    events = []
    for event in EVENTS:
        trainer.add_callback(event, lambda t, event=event: events.append(event))
    metrics = trainer.train()
    return SimpleNamespace(trainer=trainer, metrics=metrics, events=events, data=data, root=root)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_run_writes_every_artifact(trained):
    save_dir = trained.trainer.save_dir
    assert save_dir == trained.root / "runs" / "exp"
    for name in ("args.yaml", "weights/last.pt", "weights/best.pt", "results.csv", "results.png",
                 "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (save_dir / name).is_file(), name
    assert yaml.safe_load((save_dir / "args.yaml").read_text())["epochs"] == 2
    assert set(trained.metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "precision", "recall"}


def test_results_csv_columns_and_rows(trained):
    path = trained.trainer.save_dir / "results.csv"
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["epoch", "time", "train/cls_loss", "train/box_loss", "train/dfl_loss", "metrics/precision(B)",
                      "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "val/cls_loss", "val/box_loss",
                      "val/dfl_loss", "lr/pg0", "metrics/mAP75(B)", "metrics/APs(B)", "metrics/APm(B)",
                      "metrics/APl(B)", "metrics/AR100(B)", "nonfinite_steps", "unreadable_images"]
    rows = read_csv(path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr/pg0"]) == pytest.approx(0.1 * float(rows[0]["lr/pg0"]))  # step decay at round(8*2/12) = 1
    assert float(rows[0]["lr/pg0"]) == pytest.approx(0.02 * 8 / 16)
    total = [sum(float(r[f"train/{k}_loss"]) for k in ("cls", "box", "dfl")) for r in rows]
    assert total[1] < total[0]
    assert float(rows[1]["time"]) > float(rows[0]["time"]) > 0


def test_callbacks_fire_in_lifecycle_order(trained):
    events = trained.events
    assert events[0] == "on_train_start" and events[-1] == "on_train_end"
    assert events.count("on_train_epoch_start") == 2 and events.count("on_model_save") == 2
    assert events.count("on_train_batch_end") == 2 * 64 // 8
    first_epoch = events[: events.index("on_fit_epoch_end") + 1]
    assert first_epoch[-4:] == ["on_train_batch_end", "on_train_epoch_end", "on_model_save", "on_fit_epoch_end"]


def test_final_checkpoints_are_stripped_and_validate(trained, tmp_path):
    best = trained.trainer.save_dir / "weights" / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None and ckpt["names"] == NAMES
    assert ckpt["train_args"]["model"] == "gfl_r18t.yaml"
    args = get_args({"model": str(best), "data": str(trained.data), "imgsz": 128, "batch": 8, "workers": 0,
                     "device": "cpu", "project": str(tmp_path)}, "val")
    assert validator.run(args) == pytest.approx(trained.metrics)
    with pytest.raises(CheckpointError, match="finished"):
        Trainer(train_args(trained.data, tmp_path, resume=str(best))).train()


class Interrupt(Exception):
    """Raised by a callback to simulate a run killed after its first epoch was saved."""


def test_resume_continues_exactly(tmp_path, caplog):
    data = write_digits_yaml(tmp_path, num_train=16, num_val=4, fliplr=0.5)  # flips use the restored torch RNG
    overrides = {"ema": True, "val": False}

    def capture(trainer):
        if trainer.epoch == 1:
            final.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
            final.append({k: v.clone() for k, v in trainer.ema.module.state_dict().items()})

    final = []
    straight = Trainer(train_args(data, tmp_path, name="straight", **overrides))
    straight.add_callback("on_train_epoch_end", capture)
    straight.train()

    def interrupt(trainer):
        raise Interrupt

    broken = Trainer(train_args(data, tmp_path, name="broken", **overrides))
    broken.add_callback("on_fit_epoch_end", interrupt)
    with pytest.raises(Interrupt):
        broken.train()
    last = tmp_path / "broken" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 0

    resumed = Trainer(train_args(data, tmp_path, resume=str(last), epochs=5, lr0=0.5, save_period=1))
    resumed.add_callback("on_train_epoch_end", capture)
    with caplog.at_level(logging.WARNING, logger="crosskd"):
        resumed.train()
    assert "Resume ignores ['epochs', 'lr0']" in caplog.text
    assert resumed.args.save_period == 1 and resumed.args.epochs == 2  # whitelisted key kept, others from the ckpt
    assert (tmp_path / "broken" / "weights" / "epoch2.pt").is_file()
    assert resumed.save_dir == tmp_path / "broken"
    model_straight, ema_straight, model_resumed, ema_resumed = final
    for name, value in model_straight.items():
        torch.testing.assert_close(model_resumed[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema_resumed[name], ema_straight[name], rtol=1e-5, atol=1e-6)
    rows = read_csv(tmp_path / "broken" / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # appended under the one header
    losses = ("train/cls_loss", "train/box_loss", "train/dfl_loss", "lr/pg0")
    expected = read_csv(tmp_path / "straight" / "results.csv")
    assert [[r[k] for k in losses] for r in rows] == [[r[k] for k in losses] for r in expected]


def test_resume_true_without_runs_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no last.pt"):
        Trainer(get_args({"resume": True}, "train")).train()


def test_trainer_class_follows_teacher_and_mode():
    from crosskd.engine.training.distill_trainer import DistillTrainer

    assert trainer_class(get_args({"model": "gfl_r18t.yaml"}, "train")) is Trainer
    assert trainer_class(get_args({"model": "gfl_r18t.yaml", "teacher": "t.pt"}, "train")) is DistillTrainer
    assert trainer_class(get_args({"model": "gfl_r18t.yaml"}, "distill")) is DistillTrainer
    assert trainer_class(get_args({"resume": "last.pt"}, "train"), {"teacher": "t.pt"}) is DistillTrainer


def test_valid_region_setting_reaches_the_trained_head(trained, tmp_path):
    """valid_region= is applied to the model's head (its detection losses); mmdet by default."""
    assert trained.trainer.model.head.valid_region == "mmdet"
    strict = Trainer(train_args(trained.data, tmp_path, name="strict", valid_region="image"))
    strict.data_info = trained.trainer.data_info
    strict.names = dict(strict.data_info.names)
    assert strict.build_model().head.valid_region == "image"
