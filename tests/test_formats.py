"""The export format table: one row per format, from which settings, exporter, loader and benchmark all read."""

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_benchmark import benchmark_args
from test_export import export_args, write_checkpoint

from crosskd.config import Args
from crosskd.engine.deployment import exporter, formats
from crosskd.engine.deployment.loader import exported_kind, load_runtime
from crosskd.engine.deployment.runtimes.torchscript import TorchScriptDetector
from crosskd.engine.tools import benchmark
from crosskd.errors import ConfigError
from crosskd.settings import SETTINGS

FAKE_RUNTIME = '''
"""A runtime module of a format known only to the test's table row: TorchScript under another suffix."""
from crosskd.engine.deployment.runtimes import torchscript

WRITTEN = []


def export(model, images, path, settings, metadata):
    WRITTEN.append(path)
    torchscript.export(model, images, path, settings, metadata)


def load(path, device="cpu"):
    return torchscript.TorchScriptDetector(path, device)
'''


@pytest.fixture
def fake_format(tmp_path, monkeypatch):
    """A format 'fakets' added through the table alone: its row and a runtime module named by it."""
    (tmp_path / "fake_runtime.py").write_text(FAKE_RUNTIME)
    monkeypatch.syspath_prepend(str(tmp_path))
    row = formats.ExportFormat("fakets", "FakeTS", ".fakets", "fake_runtime")
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, row))
    return row


def test_settings_choices_and_help_come_from_the_table():
    names = tuple(fmt.name for fmt in formats.export_formats())
    assert SETTINGS["format"].choices == names == ("torchscript", "onnx", "openvino")
    assert "pip install 'crosskd[openvino]'" in SETTINGS["format"].help


def test_the_loader_sniffs_paths_through_the_table():
    assert [exported_kind(p) for p in ("a/m.onnx", "m.TORCHSCRIPT", "m_openvino_model/", "m_openvino_model/m.xml")] == [
        "onnx", "torchscript", "openvino", "openvino"]
    assert exported_kind("best.pt") is None and exported_kind("gfl_r18t.yaml") is None
    assert formats.export_format("openvino").path_for(Path("w/best.pt")) == Path("w/best_openvino_model")


def test_an_unknown_format_and_a_missing_runtime_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="format=tflite is not an export format; use one of torchscript, onnx"):
        formats.export_format("tflite")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"openvino package; install it with: pip install 'crosskd\[openvino\]'"):
        formats.export_format("openvino").runtime_module()


def test_a_format_added_to_the_table_alone_is_exported_loaded_and_benchmarked(tmp_path, fake_format, trained_digits,
                                                                              monkeypatch):
    weights = Path(shutil.copy(trained_digits.weights, tmp_path / "best.pt"))  # a model that scores (AP ~0.68)
    runtime = load_runtime(weights)
    args = Args(**{**vars(export_args(weights, imgsz=128)), "format": "fakets"})
    path = exporter.export(runtime.detector("export"), args, runtime.train_args)
    assert path == tmp_path / "best.fakets" and path.is_file()
    assert __import__("fake_runtime").WRITTEN == [path]

    loaded = load_runtime(path)
    assert loaded.kind == "fakets" and isinstance(loaded.model, TorchScriptDetector)
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))  # the export size (stride 128)
    with torch.inference_mode():
        ours, eager = loaded.model.run(images), exporter.ExportModel(runtime.detector("x")).eval()(images)
    assert torch.allclose(ours, eager, atol=1e-4)

    keep = ("pytorch", "fakets")  # the benchmark of every shipped format is test_benchmark's
    monkeypatch.setattr(formats, "FORMATS", tuple(fmt for fmt in formats.FORMATS if fmt.name in keep))
    pytorch, fake = benchmark.run(benchmark_args(tmp_path, trained_digits.data, weights, imgsz=128))
    assert (pytorch.format, fake.format) == ("PyTorch", "FakeTS")
    assert fake.status == "ok" and fake.file.endswith("best.fakets")
    assert 0.3 < fake.ap < 1 and fake.ap == pytest.approx(pytorch.ap)  # the traced graph: the checkpoint's detections


def test_a_row_marked_gpu_refuses_the_cpu(tmp_path, monkeypatch):
    row = replace(formats.export_format("torchscript"), name="gpuonly", gpu=True)
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, row))
    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    with pytest.raises(ConfigError, match="format=gpuonly needs a CUDA device"):
        exporter.export(load_runtime(weights).detector("export"), Args(**{**vars(export_args(weights)),
                                                                          "format": "gpuonly"}))
