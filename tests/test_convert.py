"""`crosskd convert`: an MMDetection checkpoint and a torchvision detector become crosskd .pt files every mode takes."""

import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from crosskd.config import get_args
from crosskd.engine.deployment import converter, exporter
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.training.trainer import load_pretrained
from crosskd.errors import ConfigError
from crosskd.models import build_detector
from crosskd.models.foreign.mmdet import mmdet_key_map
from crosskd.models.foreign.torchvision_detection import COCO80_NAMES, weights_file_name

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture
def mmdet_checkpoint(tmp_path):
    """A seeded gfl_r18s saved the way MMDetection 2.x saves a GFL: its key names, `meta` with the classes."""
    torch.manual_seed(0)
    source = build_detector("gfl_r18s.yaml", nc=10).eval()
    ours_to_mmdet = {ours: theirs for theirs, ours in mmdet_key_map(source).items()}
    state = {ours_to_mmdet[key]: value for key, value in source.state_dict().items()}
    path = tmp_path / "gfl_r18s_mmdet.pth"
    torch.save({"state_dict": state, "meta": {"mmdet_version": "2.28.2", "CLASSES": CLASSES}}, path)
    return source, path


def convert(**overrides):
    return converter.run(get_args({"model_cfg": "gfl_r18s.yaml", **overrides}, "convert"))


def test_mmdetection_checkpoint_converts_and_every_mode_takes_it(mmdet_checkpoint, tmp_path):
    source, path = mmdet_checkpoint
    converted = convert(model=str(path))
    assert converted == tmp_path / "gfl_r18s_mmdet.pt"
    ckpt = load_checkpoint(converted)
    assert ckpt["names"] == dict(enumerate(CLASSES)) and ckpt["converted_from"] == str(path.resolve())
    loaded = load_runtime(converted).model
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ours, theirs in zip(loaded(images).cls_scores, source(images).cls_scores, strict=True):
            torch.testing.assert_close(ours, theirs)
    exported = exporter.run(get_args({"model": str(converted), "format": "onnx", "imgsz": 128}, "export"))
    assert exported.is_file()
    assert load_runtime(converted, role="teacher").detector("the distillation teacher") is not None
    student = build_detector("gfl_r18s.yaml", nc=10)
    load_pretrained(student, str(converted))
    torch.testing.assert_close(student.state_dict()["head.gfl_cls.weight"], source.state_dict()["head.gfl_cls.weight"])


def test_save_dir_name_and_data_names(mmdet_checkpoint, tmp_path):
    _, path = mmdet_checkpoint
    data = tmp_path / "ten.yaml"
    data.write_text(yaml.safe_dump({"path": ".", "train": "t", "val": "v", "names": [f"n{i}" for i in range(10)]}))
    converted = convert(model=str(path), save_dir=str(tmp_path / "out"), name="teacher", data=str(data))
    assert converted == tmp_path / "out" / "teacher.pt"
    assert load_checkpoint(converted)["names"][3] == "n3"
    data.write_text(yaml.safe_dump({"path": ".", "train": "t", "val": "v", "names": ["a", "b"]}))
    with pytest.raises(ConfigError, match="names 2 classes but .* predicts 10"):
        convert(model=str(path), data=str(data))


@pytest.mark.slow  # two CLI subprocesses; test_mmdetection_checkpoint_converts_... covers the Python path fast
def test_cli_prints_the_path_and_bad_sources_are_one_line(mmdet_checkpoint, tmp_path):
    _, path = mmdet_checkpoint
    command = [sys.executable, "-m", "crosskd", "convert", f"model={path}", "model_cfg=gfl_r18s.yaml"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and str((tmp_path / "gfl_r18s_mmdet.pt").resolve()) in result.stdout
    wrong = subprocess.run([*command[:-1], "model_cfg=retinanet_r18s.yaml"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "not a retinanet checkpoint" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_torchvision_detector_converts_from_the_hub_cache(tmp_path, monkeypatch):
    """torchvision:NAME from a file in TORCH_HOME with the real name; downloads fail, so nothing is fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / weights_file_name("retinanet_resnet50_fpn"))
    monkeypatch.chdir(tmp_path)
    converted = converter.run(get_args({"model": "torchvision:retinanet_resnet50_fpn"}, "convert"))
    assert converted == tmp_path / "retinanet_resnet50_fpn.pt"
    runtime = load_runtime(converted)
    assert runtime.names == dict(COCO80_NAMES) and runtime.model.head_type == "retinanet"
