"""ONNX / TorchScript export: parity with PyTorch for every head, student-only graphs, dynamic shapes, embedded NMS,
metadata read back by the backends, and validation of an exported model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.exporter import ExportModel
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.deployment.runtimes.onnx import OnnxDetector
from crosskd.engine.deployment.runtimes.torchscript import TorchScriptDetector, traced_device
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector

HEAD_TYPES = ("gfl", "retinanet", "fcos", "atss")
NAMES = {0: "cat", 1: "dog", 2: "bird"}


def tiny_cfg(head_type: str, feat_channels: int = 16) -> dict:
    """Quarter-width ResNet-18, FPN 16, one head conv: milliseconds per 128 px forward."""
    head = {"type": head_type, "stacked_convs": 1, "feat_channels": feat_channels}
    if head_type != "retinanet":
        head["num_groups"] = 4
    return {
        "backbone": {"type": "resnet", "depth": 18, "width": 0.25},
        "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5, "add_extra_convs": "on_output"},
        "head": head,
    }


def tiny_detector(head_type: str = "gfl", seed: int = 0, feat_channels: int = 16, nc: int = len(NAMES)) -> nn.Module:
    """An untrained detector whose head biases are randomised so that many scores clear 0.25."""
    torch.manual_seed(seed)
    detector = build_detector(tiny_cfg(head_type, feat_channels), nc)
    for module in detector.head.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            nn.init.normal_(module.bias, 0.0, 1.0)
    return detector.eval()


def write_checkpoint(path: Path, head_type: str = "gfl", seed: int = 0, names: dict | None = None, **extra) -> Path:
    """A finished crosskd checkpoint of `tiny_detector`, trained (nominally) at imgsz=128 on digits.yaml."""
    names = names or NAMES
    ckpt = make_checkpoint(
        tiny_detector(head_type, seed, nc=len(names)), epoch=-1, best_fitness=None, names=names,
        train_args={"imgsz": 128, "data": "digits.yaml", "model": f"{head_type}.yaml"}, **extra,
    )
    return save_checkpoint(ckpt, path)


def export_args(model: Path | None, **overrides):
    return get_args({"model": None if model is None else str(model), "device": "cpu", **overrides}, "export")


def ort_run(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def onnx_metadata(path: Path) -> dict[str, str]:
    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_onnx_export_matches_pytorch_for_every_head(tmp_path, head_type):
    weights = write_checkpoint(tmp_path / f"{head_type}.pt", head_type)
    path = exporter.run(export_args(weights))
    assert path == tmp_path / f"{head_type}.onnx"
    detector = tiny_detector(head_type)
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = ExportModel(detector).eval()(images)
    output = ort_run(path, images)
    num_priors = sum(16 * 16 // 4**i for i in range(5)) * detector.head.num_anchors  # 128 px, strides 8..128
    assert output.shape == (1, 4 + len(NAMES), num_priors)
    assert (output - reference).abs().max().item() < 1e-3
    scores = output[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1  # probabilities, not logits


def test_onnx_metadata_is_embedded_and_read_back(tmp_path, capsys):
    weights = write_checkpoint(tmp_path / "best.pt", "retinanet")
    path = exporter.run(export_args(weights, batch=2, imgsz=[128, 256], simplify=True))
    out = capsys.readouterr().out
    assert "max abs diff" in out and "export success" in out and "ms vs PyTorch" in out and "onnxslim" in out
    meta = onnx_metadata(path)
    assert meta["task"] == "detect" and meta["head_type"] == "retinanet" and meta["stride"] == "128"
    assert eval(meta["names"]) == NAMES and eval(meta["imgsz"]) == [128, 256] and meta["batch"] == "2"
    assert eval(meta["strides"]) == [8, 16, 32, 64, 128] and meta["num_anchors"] == "9"
    assert json.loads(meta["model_yaml"])["head"]["type"] == "retinanet"
    assert json.loads(meta["train_args"])["data"] == "digits.yaml"
    model = load_runtime(path).model
    assert isinstance(model, OnnxDetector)
    assert model.names == NAMES and model.imgsz == (128, 256) and model.batch == 2 and not model.nms
    assert model.input_shape == (2, 3, 128, 256) and not model.dynamic_size


def test_graph_holds_only_student_tensors(tmp_path):
    """A distilled student's checkpoint names its teacher; neither the teacher nor the adapter reaches the graph."""
    teacher = tiny_detector("gfl", seed=7, feat_channels=32)
    teacher_path = save_checkpoint(
        make_checkpoint(teacher, epoch=-1, best_fitness=None, names=NAMES, train_args={"imgsz": 128}),
        tmp_path / "teacher.pt",
    )
    adapter = {"weight": torch.randn(32, 16, 1, 1), "bias": torch.randn(32)}
    weights = write_checkpoint(
        tmp_path / "student.pt", "gfl", teacher=str(teacher_path),
        kd_args={"kd": "crosskd", "kd_idx": 1, "head_type": "gfl"}, kd_adapter=adapter,
    )
    path = exporter.run(export_args(weights))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}
    student = {f"detector.{k}": v for k, v in tiny_detector("gfl").state_dict().items()}
    named = {name for name in initializers if name.startswith("detector.")}
    assert named and named <= set(student)
    shared = [v.numpy() for v in student.values()]  # e.g. BatchNorm ones/zeros equal in both models
    foreign = [
        v.numpy() for v in [*teacher.state_dict().values(), *adapter.values()]
        if v.numel() >= 16 and not any(v.shape == s.shape and np.array_equal(v.numpy(), s) for s in shared)
    ]
    assert len(foreign) > 20  # the teacher's convs and the adapter
    for array in initializers.values():
        assert not any(array.shape == f.shape and np.array_equal(array, f) for f in foreign)
    student_elements = sum(v.numel() for v in student.values())
    assert sum(a.size for a in initializers.values()) < student_elements + sum(f.size for f in foreign)
    with pytest.raises(TypeError, match="student DenseDetector"):
        ExportModel(nn.Conv2d(3, 3, 1))


def test_dynamic_onnx_runs_at_two_sizes(tmp_path):
    weights = write_checkpoint(tmp_path / "dyn.pt", "atss")
    path = exporter.run(export_args(weights, dynamic=True))
    detector = tiny_detector("atss")
    model = ExportModel(detector).eval()
    for shape in [(1, 3, 128, 128), (2, 3, 256, 128)]:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = model(images)
        output = ort_run(path, images)
        assert output.shape == reference.shape
        assert (output - reference).abs().max().item() < 1e-3
    onnx_model = OnnxDetector(path)
    assert onnx_model.dynamic_size and onnx_model.dynamic_batch
    images = torch.rand(2, 3, 256, 384, generator=torch.Generator().manual_seed(3))
    expected = detector.predict(images, 0.25, 0.6, 50, 1000)
    for ours, theirs in zip(onnx_model.predict(images, 0.25, 0.6, 50, 1000), expected, strict=True):
        assert len(theirs.boxes) > 0
        torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
        assert torch.equal(ours.labels, theirs.labels)


@pytest.mark.parametrize("head_type", ["gfl", pytest.param("fcos", marks=pytest.mark.slow)])
def test_nms_export_matches_pytorch_postprocess(tmp_path, head_type):
    weights = write_checkpoint(tmp_path / "nms.pt", head_type)
    conf, iou, max_det = 0.3, 0.5, 20
    path = exporter.run(export_args(weights, nms=True, conf=conf, iou=iou, max_det=max_det, batch=2, dynamic=True))
    for shape in [(3, 3, 128, 128), (2, 3, 96, 160)]:  # batch, height and width dynamic, NMS in the graph
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(4))
        output = ort_run(path, images)
        assert output.shape == (shape[0], max_det, 6)
        expected = tiny_detector(head_type).predict(images, conf, iou, max_det, 1000)
        for rows, theirs in zip(output, expected, strict=True):
            found = rows[rows[:, 4] > 0]
            assert 0 < len(found) == len(theirs.boxes) <= max_det
            assert (rows[len(found) :] == 0).all()  # zero padding after the detections
            torch.testing.assert_close(found[:, :4], theirs.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(found[:, 4], theirs.scores, atol=1e-5, rtol=0)
            assert torch.equal(found[:, 5].long(), theirs.labels)
    backend = OnnxDetector(path)
    assert backend.nms and backend.input_shape == (None, 3, None, None)
    strict = backend.predict(images, 0.5, iou, max_det, 1000)  # a higher conf only filters the baked output
    assert all((d.scores > 0.5).all() for d in strict)


def test_dynamic_nms_torchscript_runs_at_another_size(tmp_path):
    weights = write_checkpoint(tmp_path / "nms.pt", "gfl")
    backend = load_runtime(exporter.run(export_args(weights, format="torchscript", nms=True, conf=0.3,
                                                    dynamic=True))).model
    assert backend.nms and backend.input_shape == (None, 3, None, None)
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(7))  # traced at 1 x 3 x 128 x 128
    with torch.no_grad():
        expected = ExportModel(tiny_detector("gfl"), nms=True, conf=0.3).eval()(images)
    assert (expected[..., 4] > 0).sum() > 0
    torch.testing.assert_close(backend.run(images), expected, atol=1e-5, rtol=0)


def test_nms_export_without_detections_is_all_zero(tmp_path):
    weights = write_checkpoint(tmp_path / "none.pt", "gfl")
    path = exporter.run(export_args(weights, nms=True, conf=0.9999, dynamic=True))
    output = ort_run(path, torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(8)))
    assert output.shape == (2, 100, 6) and (output == 0).all()
    assert [len(d.boxes) for d in OnnxDetector(path).predict(torch.rand(1, 3, 128, 128), 0.25, 0.6, 100, 1000)] == [0]


@pytest.mark.parametrize("head_type", ["gfl", pytest.param("retinanet", marks=pytest.mark.slow)])
def test_eager_onnx_and_torchscript_give_the_same_detections(tmp_path, head_type):
    """One post-processing path: DenseDetector.predict, ONNX and TorchScript, each with raw output0 and with NMS in
    the graph, give the same detections for the same batch."""
    predict_args = {"conf": 0.01, "iou": 0.6, "max_det": 50, "nms_pre": 200}
    exported = []
    for fmt, nms in [("onnx", False), ("onnx", True), ("torchscript", False), ("torchscript", True)]:
        weights = write_checkpoint(tmp_path / f"{fmt}_{nms}.pt", head_type)
        path = exporter.run(export_args(weights, format=fmt, nms=nms, batch=2, **predict_args))
        exported.append((OnnxDetector if fmt == "onnx" else TorchScriptDetector)(path))
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(9))
    expected = tiny_detector(head_type).predict(images, **predict_args)
    for backend in exported:
        assert backend.nms == ("_True" in backend.path.stem)
        for ours, theirs in zip(backend.predict(images, **predict_args), expected, strict=True):
            assert len(ours.scores) == len(theirs.scores) > 0, backend.path.name
            assert torch.equal(ours.labels, theirs.labels), backend.path.name
            torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)


def test_static_batch_is_split_and_padded(tmp_path):
    weights = write_checkpoint(tmp_path / "static.pt", "fcos")
    backend = OnnxDetector(exporter.run(export_args(weights, batch=2)))
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(5))  # 3 images, batch-2 graph
    ratios = torch.tensor([1.0, 0.5, 2.0])
    expected = tiny_detector("fcos").predict(images, 0.25, 0.6, 100, 1000, ratios=ratios)
    for ours, theirs in zip(backend.predict(images, 0.25, 0.6, 100, 1000, ratios=ratios), expected, strict=True):
        assert len(theirs.boxes) > 0
        torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torchscript_export_parity_at_two_sizes(tmp_path):
    weights = write_checkpoint(tmp_path / "best.pt", "retinanet")
    path = exporter.run(export_args(weights, format="torchscript", dynamic=True))
    assert path == tmp_path / "best.torchscript"
    backend = load_runtime(path).model
    assert isinstance(backend, TorchScriptDetector) and backend.names == NAMES and backend.imgsz == (128, 128)
    assert backend.dynamic_size
    for shape in [(1, 3, 128, 128), (2, 3, 128, 256)]:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(6))
        expected = tiny_detector("retinanet").predict(images, 0.25, 0.6, 100, 1000)
        for ours, theirs in zip(backend.predict(images, 0.25, 0.6, 100, 1000), expected, strict=True):
            assert len(theirs.boxes) > 0
            torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
            assert torch.equal(ours.labels, theirs.labels)


def test_export_without_model_uses_newest_best(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights = write_checkpoint(tmp_path / "runs" / "train" / "weights" / "best.pt", "gfl")
    path = exporter.run(export_args(None, format="torchscript"))
    assert path.resolve() == weights.with_suffix(".torchscript").resolve()
    assert "newest best.pt" in capsys.readouterr().out


def test_user_errors(tmp_path):
    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    with pytest.raises(ConfigError, match="half=True needs a CUDA device"):
        exporter.run(export_args(weights, half=True))
    with pytest.raises(ConfigError, match="opset=9"):
        exporter.run(export_args(weights, opset=9))
    with pytest.raises(ConfigError, match="needs trained weights"):
        exporter.run(export_args("gfl_r18t.yaml"))


def test_unreadable_exports_and_trace_devices(tmp_path):
    bad_onnx, bad_script = tmp_path / "bad.onnx", tmp_path / "bad.torchscript"
    bad_onnx.write_bytes(b"not onnx")
    bad_script.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="corrupt or not ONNX"):
        load_runtime(bad_onnx)
    with pytest.raises(CheckpointError, match="as TorchScript"):
        load_runtime(bad_script)
    with pytest.raises(CheckpointError, match="expected one of"):
        load_runtime(tmp_path / "model.h5")
    on_gpu = {"args": str({"device": "cuda:0"})}
    with pytest.raises(CheckpointError, match="traced on cuda:0"):
        traced_device(bad_script, on_gpu, torch.device("cpu"))
    assert traced_device(bad_script, {"args": str({"device": "cpu"})}, torch.device("cuda", 0)).type == "cpu"


def test_cli_half_on_cpu_exits_2(tmp_path, capsys):
    from crosskd import cli

    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", f"model={weights}", "half=True", "device=cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "half=True needs a CUDA device" in err[0]


def test_val_of_onnx_equals_val_of_checkpoint(tmp_path, trained_digits):
    from crosskd.engine.evaluation.validator import Validator

    weights = tmp_path / "best.pt"
    weights.write_bytes(trained_digits.weights.read_bytes())  # the export lands beside it
    onnx_path = exporter.run(export_args(weights, batch=4))
    outcomes = []
    for model in (weights, onnx_path):
        args = get_args({"model": str(model), "data": str(trained_digits.data), "imgsz": 128, "batch": 3,
                         "device": "cpu", "workers": 0, "plots": False, "project": str(tmp_path / "val")}, "val")
        validator = Validator(args, model=str(model))
        validator.setup()
        records = validator.predict_all(validator.model_device(), plots=False)
        outcomes.append((records, validator.run()))
    (pt_records, pt_metrics), (onnx_records, onnx_metrics) = outcomes
    assert sorted(pt_records) == sorted(onnx_records) and sum(map(len, pt_records.values())) > 0
    for image_id, expected in pt_records.items():
        assert len(onnx_records[image_id]) == len(expected)
        for ours, theirs in zip(onnx_records[image_id], expected, strict=True):
            assert ours["category_id"] == theirs["category_id"]
            np.testing.assert_allclose(ours["bbox"] + [ours["score"]], theirs["bbox"] + [theirs["score"]], atol=1e-2)
    assert 0.3 < pt_metrics["AP"] < 1.0  # a trained model: an ONNX graph that drifts moves this
    for key in ("AP", "AP50", "AR100"):
        assert abs(onnx_metrics[key] - pt_metrics[key]) < 1e-3


def test_openvino_export_parity_predict_and_val(tmp_path, write_digits_yaml):
    from crosskd import cli
    from crosskd.engine.deployment.runtimes.openvino import OpenVinoDetector

    names = {i: str(i) for i in range(10)}
    data = write_digits_yaml(tmp_path, 2, 4)
    weights = write_checkpoint(tmp_path / "best.pt", "atss", names=names)
    path = exporter.run(export_args(weights, format="openvino", dynamic=True))
    assert path == tmp_path / "best_openvino_model"
    assert sorted(file.name for file in path.iterdir()) == ["best.bin", "best.xml", "metadata.yaml"]
    runtime = load_runtime(path / "best.xml")
    assert runtime.kind == "openvino" and isinstance(runtime.model, OpenVinoDetector) and runtime.names == names
    assert runtime.model.dynamic_size and runtime.model.dynamic_batch
    detector = tiny_detector("atss", nc=len(names))
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(7))
        expected = detector.predict(images, 0.25, 0.6, 100, 1000)
        for ours, theirs in zip(runtime.model.predict(images, 0.25, 0.6, 100, 1000), expected, strict=True):
            assert len(theirs.scores) > 0 and torch.equal(ours.labels, theirs.labels)
            torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=0)
    common = [f"data={data}", "imgsz=64", "batch=2", "workers=0", "device=cpu", f"project={tmp_path / 'runs'}"]
    predictions = []
    for model, name in ((weights, "pt"), (path, "openvino")):
        cli.main(["val", f"model={model}", *common, f"name={name}", "plots=False", "save_json=True", "conf=0.01"])
        predictions.append(json.loads((tmp_path / "runs" / name / "predictions.json").read_text()))
    pt_records, ov_records = predictions
    assert len(ov_records) == len(pt_records) > 0
    for ours, theirs in zip(ov_records, pt_records, strict=True):
        assert ours["image_id"] == theirs["image_id"] and ours["category_id"] == theirs["category_id"]
        np.testing.assert_allclose(ours["bbox"] + [ours["score"]], theirs["bbox"] + [theirs["score"]], atol=1e-2)
    cli.main(["predict", f"model={path}", f"source={tmp_path / 'digits' / 'images' / 'val'}", *common, "conf=0.01"])
    predicted = list((tmp_path / "runs" / "predict").glob("*.jpg"))
    assert len(predicted) == 4


def test_openvino_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    from crosskd import cli

    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", f"model={weights}", "format=openvino"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'crosskd[openvino]'" in err[0]
    assert not (tmp_path / "best_openvino_model").exists()


def test_openvino_loads_share_one_core_so_signals_survive_them(tmp_path):
    """Two OpenVINO models loaded and dropped in the order they were made, then a Python SIGCHLD handler and a
    subprocess: with a Core per load, OpenVINO left a freed alternate signal stack behind and the process died of
    SIGSEGV when the child ended (runtimes/openvino.py, `shared_core`)."""
    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    path = exporter.run(export_args(weights, format="openvino"))
    script = f"""
import gc, signal, subprocess, sys
from crosskd.engine.deployment.runtimes.openvino import OpenVinoDetector
first, second = OpenVinoDetector({str(path)!r}), OpenVinoDetector({str(path)!r})
del first
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGCHLD, lambda *args: None)
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("survived")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("survived"), (done.returncode, done.stderr[-2000:])


def test_nms_rows_are_compared_as_sets_not_by_position():
    """Two detections whose scores differ by float rounding come out in either order: that is no difference; a box
    that moved is, by how far it moved; a row missing from one side counts as far as its nearest row."""
    reference = torch.tensor([[[10.0, 10, 50, 50, 0.9, 1], [60, 60, 90, 90, 0.8, 2], [0, 0, 0, 0, 0, 0]]])
    swapped = reference.clone()
    swapped[0, 0, 4] = swapped[0, 1, 4] = 0.85
    tied = swapped[:, [1, 0, 2]].clone()
    tied[0, 0, 4] += 1e-7
    assert exporter.rows_diff(tied, swapped) < 1e-6
    assert (tied - swapped).abs().max() > 40  # what a position-by-position check saw
    moved = reference.clone()
    moved[0, 1, :4] += 2.5
    assert exporter.rows_diff(moved, reference) == pytest.approx(2.5)
    missing = reference.clone()
    missing[0, 1] = 0
    assert exporter.rows_diff(missing, reference) == pytest.approx(50.0)  # to its nearest row, the first box


class RowsBackend:
    """An exported file's stand-in whose NMS rows are `rows`."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return self.rows


class RowsModel:
    nms, conf = True, 0.25

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1)


def test_an_fp16_nms_graph_that_kept_another_box_warns_and_fp32_refuses(monkeypatch, caplog):
    """NMS inside an FP16 graph may keep another of two overlapping boxes (scores move by ~1e-3): a warning pointing
    to AP; the same difference in float32 is a defect and stops the export."""
    monkeypatch.setattr(exporter, "latency_ms", lambda functions, images: {name: 1.0 for name in functions})
    reference = torch.tensor([[[10.0, 10, 50, 50, 0.9, 1], [0, 0, 0, 0, 0, 0]]])
    other_box = torch.tensor([[[14.0, 10, 54, 50, 0.9, 1], [0, 0, 0, 0, 0, 0]]])
    images = torch.zeros(1, 3, 64, 64)
    diff = exporter.check_parity("OpenVINO FP16:", RowsModel(), RowsBackend(other_box), images, reference, "fp16")
    assert diff == pytest.approx(4.0)
    assert "compare AP instead" in caplog.text
    with pytest.raises(RuntimeError, match="differs from PyTorch by 4.00e"):
        exporter.check_parity("ONNX:", RowsModel(), RowsBackend(other_box), images, reference, "fp32")
