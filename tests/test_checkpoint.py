"""Checkpoints: atomic writes, weights_only loading, clear errors, stripping and nc changes."""

import copy

import pytest
import torch

from crosskd.engine.deployment.checkpoint import (
    is_resumable,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    strip_checkpoint,
)
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.training.optim import ModelEMA
from crosskd.errors import CheckpointError
from crosskd.models import build_detector

NAMES = {0: "zero", 1: "one", 2: "two"}


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_detector("gfl_r18t.yaml", nc=3)


def training_checkpoint(detector, epoch: int = 0) -> dict:
    """A checkpoint after one SGD step on a copy of `detector`, with an EMA that differs from the weights."""
    detector = copy.deepcopy(detector)
    ema = ModelEMA(detector, 0.9)
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    detector(torch.rand(1, 3, 64, 64))[0][0].sum().backward()
    optimizer.step()
    return make_checkpoint(
        detector, epoch=epoch, best_fitness=0.25, names=NAMES, train_args={"epochs": 2, "imgsz": [64, 64]},
        optimizer=optimizer, ema=ema.module, ema_updates=5, scheduler={"iteration": 3},
    )


def test_checkpoint_roundtrip_with_weights_only(detector, tmp_path):
    original = training_checkpoint(detector)
    path = save_checkpoint(original, tmp_path / "last.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain values only, no pickled classes
    assert raw["format_version"] == 1 and raw["nc"] == 3 and raw["names"] == NAMES and raw["ema_updates"] == 5
    assert set(raw) >= {"epoch", "best_fitness", "model", "model_yaml", "optimizer", "scaler", "ema", "scheduler",
                        "train_args", "train_metrics", "date", "version"}
    runtime = load_runtime(path)
    loaded = runtime.model
    assert loaded.names == NAMES and is_resumable(runtime.checkpoint)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, original["model"][name])


def test_crash_mid_save_keeps_the_previous_file(detector, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(training_checkpoint(detector, epoch=0), path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(training_checkpoint(detector, epoch=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_missing_corrupt_and_foreign_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a zip archive at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a crosskd checkpoint"):
        load_checkpoint(foreign)
    pickled_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    with pytest.raises(CheckpointError, match="holds Python objects, not only tensors, and was refused"):
        load_checkpoint(pickled_module)


def test_strip_drops_training_state_and_stays_loadable(detector, tmp_path):
    original = training_checkpoint(detector, epoch=3)
    path = save_checkpoint(original, tmp_path / "best.pt")
    size_before = path.stat().st_size
    strip_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == -1 and not is_resumable(ckpt)
    assert all(ckpt[key] is None for key in ("optimizer", "scaler", "ema", "scheduler"))
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert path.stat().st_size < size_before / 2
    loaded = load_runtime(path).model
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values() if v.is_floating_point())
    ema_weight = original["ema"]["head.gfl_cls.weight"]  # the stripped model holds the EMA weights
    assert not torch.equal(ema_weight, original["model"]["head.gfl_cls.weight"])
    torch.testing.assert_close(loaded.state_dict()["head.gfl_cls.weight"], ema_weight.half().float())
