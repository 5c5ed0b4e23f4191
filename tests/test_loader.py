"""The one model loader: every kind of model source fed to every mode, and its own contract."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data.digits import generate_digits
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.deployment.loader import Runtime, load_runtime
from crosskd.engine.deployment.runtimes.onnx import OnnxDetector
from crosskd.engine.deployment.runtimes.torchscript import TorchScriptDetector
from crosskd.engine.evaluation import validator
from crosskd.engine.prediction import predictor
from crosskd.engine.tools import info
from crosskd.engine.training import launch
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import DenseDetector, build_detector

NAMES = {i: str(i) for i in range(10)}
IMGSZ = 64
NOT_TORCH = "needs a PyTorch model"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A digits dataset and the same tiny GFL as a .pt, .onnx and .torchscript, plus its YAML."""
    root = tmp_path_factory.mktemp("loader")
    data_root = generate_digits(root / "digits", num_train=8, num_val=4, imgsz=128, seed=0)
    data = root / "digits.yaml"
    split = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    data.write_text(yaml.safe_dump({"path": str(data_root), **split, "names": NAMES}))
    torch.manual_seed(0)
    detector = build_detector("gfl_r18t.yaml", nc=10)
    train_args = {"imgsz": IMGSZ, "data": str(data)}
    pt = save_checkpoint(make_checkpoint(detector, epoch=-1, best_fitness=None, names=NAMES, train_args=train_args),
                         root / "model.pt")
    export_settings = {"model": str(pt), "device": "cpu", "imgsz": IMGSZ}
    onnx = exporter.run(get_args({**export_settings, "format": "onnx"}, "export"))
    script = exporter.run(get_args({**export_settings, "format": "torchscript"}, "export"))
    return SimpleNamespace(root=root, data=data, pt=pt, onnx=onnx, torchscript=script, yaml="gfl_r18t.yaml")


def mode_args(sources, mode: str, model: str, tag: str, **extra):
    common = {"data": str(sources.data), "imgsz": IMGSZ, "device": "cpu", "workers": 0, "batch": 4,
              "project": str(sources.root / "runs"), "name": f"{mode}-{tag}", "exist_ok": True, "plots": False}
    per_mode = {
        "train": {"model": model, "epochs": 1, "warmup_iters": 1},
        "distill": {"model": sources.yaml, "teacher": model, "epochs": 1, "warmup_iters": 1},
        "val": {"model": model},
        "predict": {"model": model, "source": str(sources.root / "digits" / "images" / "val")},
        "export": {"model": model, "format": "torchscript"},
        "info": {"model": model},
    }[mode]
    settings = {**common, **per_mode, **extra}
    if mode in ("predict", "export", "info"):
        settings.pop("data")
    return get_args(settings, mode)


RUNNERS = {"train": launch.run, "distill": launch.run, "val": validator.run, "predict": predictor.run,
           "export": exporter.run, "info": info.run}
MODES = tuple(RUNNERS)
# (source kind, mode) -> a fragment of the one-line error; cells not listed must succeed
ERRORS = {
    ("onnx", "train"): NOT_TORCH, ("onnx", "distill"): NOT_TORCH, ("onnx", "export"): NOT_TORCH,
    ("onnx", "info"): NOT_TORCH,
    ("torchscript", "train"): NOT_TORCH, ("torchscript", "distill"): NOT_TORCH, ("torchscript", "export"): NOT_TORCH,
    ("torchscript", "info"): NOT_TORCH,
    ("yaml", "distill"): "without weights", ("yaml", "predict"): "number of classes",
    ("yaml", "export"): "needs trained weights",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["pt", "onnx", "torchscript", "yaml"])
def test_every_source_in_every_mode(sources, kind, mode):
    source = str(getattr(sources, kind))
    args = mode_args(sources, mode, source, kind)
    if (kind, mode) in ERRORS:
        with pytest.raises((CheckpointError, ConfigError), match=ERRORS[kind, mode]) as error:
            RUNNERS[mode](args)
        assert "\n" not in str(error.value)
        return
    result = RUNNERS[mode](args)
    if mode in ("train", "distill", "val"):
        assert set(result) >= {"AP", "AP50"}
    elif mode == "predict":
        assert len(list(Path(result).glob("*.jpg"))) == 4
    elif mode == "export":
        assert result.suffix == ".torchscript" and result.is_file()
    else:
        assert "gfl_r18t summary" in result


def test_runtime_describes_each_kind(sources):
    for kind, model_type in (("pt", DenseDetector), ("onnx", OnnxDetector), ("torchscript", TorchScriptDetector)):
        runtime = load_runtime(getattr(sources, kind))
        assert isinstance(runtime, Runtime) and isinstance(runtime.model, model_type)
        assert runtime.names == NAMES and runtime.nc == 10 and runtime.stride == 128
        own_size = IMGSZ if kind == "pt" else 128  # exports round the size up to the largest stride
        assert runtime.imgsz == (own_size, own_size) and runtime.kind == ("checkpoint" if kind == "pt" else kind)
    fresh = load_runtime(sources.yaml, nc=3)
    assert fresh.kind == "yaml" and fresh.imgsz is None and fresh.nc == 3 and fresh.checkpoint == {}
    assert not fresh.model.training


def test_yaml_with_weights_equals_the_checkpoint(sources):
    runtime = load_runtime(sources.yaml, weights=sources.pt)
    expected = load_checkpoint(sources.pt)["model"]
    for name, value in runtime.model.state_dict().items():
        torch.testing.assert_close(value, expected[name].to(value.dtype))
    assert runtime.names == NAMES and runtime.imgsz == (IMGSZ, IMGSZ)
    with pytest.raises(ConfigError, match="only for a model YAML"):
        load_runtime(sources.pt, weights=sources.pt)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_runtime("retinanet_r18s.yaml", weights=sources.pt)


def test_adapt_nc_rebuilds_the_head_and_transfers_matching_weights(sources, caplog):
    assert load_runtime(sources.pt, nc=5).nc == 10  # without adapt_nc a checkpoint keeps its classes
    with caplog.at_level(logging.INFO, logger="crosskd"):
        runtime = load_runtime(sources.pt, nc=5, adapt_nc=True)
    assert runtime.nc == 5 and runtime.names == {i: str(i) for i in range(5)}
    assert "for nc=5 (was 10); transferred" in caplog.text
    conv1 = "backbone.conv1.weight"
    torch.testing.assert_close(runtime.model.state_dict()[conv1], load_checkpoint(sources.pt)["model"][conv1].float())


def test_bad_sources_fail_in_one_place(tmp_path):
    with pytest.raises(ConfigError, match="number of classes"):
        load_runtime("gfl_r18t.yaml")
    with pytest.raises(CheckpointError, match="expected one of"):
        load_runtime(tmp_path / "model.h5")
    with pytest.raises(CheckpointError, match="not found"):
        load_runtime(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="neither a crosskd checkpoint nor an MMDetection one; .* teacher_cfg="):
        load_runtime(foreign, role="teacher")
