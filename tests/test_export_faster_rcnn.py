"""Faster R-CNN export: the student alone to ONNX and TorchScript with proposals, RoIAlign, the R-CNN stage and NMS
in the graph; parity with eager on inputs other than the traced one; predict and val through the exported file; a
warning when the export's parity check compared empty outputs."""

import logging
from types import SimpleNamespace

import pytest
import torch

from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.exporter import ExportModel
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.prediction.predictor import Predictor
from crosskd.models import build_detector

SMALL = "faster_rcnn_r18s.yaml"
NC = 10
CONF, IOU, MAX_DET = 0.05, 0.5, 100


def confident_detector():
    """A random R18s Faster R-CNN whose R-CNN classifier scores some RoIs above CONF (detections to compare)."""
    torch.manual_seed(0)
    detector = build_detector(SMALL, NC).eval()
    with torch.no_grad():
        detector.head.roi_head.cls.weight.normal_(0, 0.03)
        detector.head.roi_head.reg.weight.normal_(0, 0.01)
        detector.head.rpn.cls.weight.normal_(0, 0.3)
    return detector


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(detector, exported .onnx path, .torchscript path) at a static 2x3x128x128 input."""
    root = tmp_path_factory.mktemp("export_frcnn")
    detector = confident_detector()
    weights = root / "best.pt"
    save_checkpoint(make_checkpoint(detector, epoch=-1, best_fitness=None, names={i: str(i) for i in range(NC)},
                                    train_args={"imgsz": 128}), weights)
    paths = {}
    for fmt in ("onnx", "torchscript"):
        args = get_args({"model": str(weights), "format": fmt, "imgsz": 128, "batch": 2, "conf": CONF, "iou": IOU,
                         "max_det": MAX_DET, "device": "cpu"}, mode="export")
        paths[fmt] = exporter.run(args)  # includes the parity check on the traced input
    return detector, paths


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graph_equals_eager_on_new_inputs(exported, fmt):
    detector, paths = exported
    runtime = load_runtime(paths[fmt])
    graph = runtime.model
    assert graph.nms and graph.head_type == "faster_rcnn"
    torch.manual_seed(5)  # not the traced input
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        eager = ExportModel(detector, nms=True, conf=CONF, iou=IOU, max_det=MAX_DET).eval()(images)  # [2, 100, 6]
    output = graph.run(images)
    assert output.shape == (2, MAX_DET, 6)
    counts = (eager[..., 4] > 0).sum(1)
    assert (counts > 10).all()  # real detections, not empty rows compared
    torch.testing.assert_close(output, eager, atol=1e-3, rtol=0)

    ours = graph.predict(images, CONF, IOU, MAX_DET, 1000)
    theirs = detector.predict(images, CONF, IOU, MAX_DET)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=0)
        assert torch.equal(a.labels, b.labels)


def test_val_and_predict_run_the_exported_file(exported, tmp_path, write_digits_yaml):
    _, paths = exported
    data = write_digits_yaml(tmp_path, num_train=2, num_val=3, imgsz=96)
    args = get_args({"model": str(paths["onnx"]), "data": str(data), "imgsz": 128, "batch": 2, "workers": 0,
                     "device": "cpu", "plots": False, "project": str(tmp_path / "val")}, mode="val")
    metrics = Validator(args, model=str(paths["onnx"])).run()
    assert "AP" in metrics
    images = sorted((tmp_path / "digits").rglob("*.jpg")) + sorted((tmp_path / "digits").rglob("*.png"))
    predict_args = get_args({"model": str(paths["onnx"]), "source": str(images[0]), "imgsz": 128, "conf": CONF,
                             "device": "cpu", "save": False, "project": str(tmp_path / "predict")}, mode="predict")
    results = list(Predictor(predict_args).stream())
    assert len(results) == 1 and len(results[0].boxes) > 0


@pytest.mark.parametrize(("score", "warned"), [(0.0, True), (0.9, False)])
def test_parity_on_no_detection_warns(monkeypatch, caplog, score, warned):
    """A trained model finds nothing on the random check images: equal empty outputs (diff 0) prove nothing."""
    monkeypatch.setattr(exporter, "latency_ms", lambda functions, images: {name: 1.0 for name in functions})
    model = ExportModel(confident_detector(), nms=True, conf=CONF, max_det=MAX_DET)
    images, rows = torch.rand(1, 3, 64, 64), torch.zeros(1, MAX_DET, 6)
    rows[0, 0] = torch.tensor([1.0, 2.0, 30.0, 40.0, score, 3.0])
    with caplog.at_level(logging.WARNING, logger="crosskd"):
        diff = exporter.check_parity("ONNX:", model, SimpleNamespace(run=lambda images: rows), images, rows, "fp32")
    assert diff == 0.0
    assert ("parity compared empty outputs" in caplog.text) == warned
