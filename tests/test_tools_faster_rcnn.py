"""The rest of the engine on a Faster R-CNN: `crosskd info`, OpenVINO export (parity with eager on a new input) and
`crosskd benchmark` (every row of the format table). `crosskd analyze` is in test_analyze.py."""

import math
from pathlib import Path

import pytest
import torch
from test_export_faster_rcnn import CONF, IOU, MAX_DET, NC, confident_detector

from crosskd import cli
from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.exporter import ExportModel
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.tools import benchmark
from crosskd.engine.tools.info import gflops, rcnn_rois

NAMES = {i: str(i) for i in range(NC)}


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml) -> Path:
    """best.pt of the confident R18s Faster R-CNN (10 digit classes) and a digits set with 3 val images of 96 px."""
    root = tmp_path_factory.mktemp("tools_frcnn")
    save_checkpoint(make_checkpoint(confident_detector(), epoch=-1, best_fitness=None, names=NAMES,
                                    train_args={"imgsz": 128}), root / "best.pt")
    write_digits_yaml(root, num_train=2, num_val=3, imgsz=96)
    return root


def test_info_lists_both_stages_and_counts_parameters(work, capsys):
    cli.main(["info", f"model={work / 'best.pt'}", "imgsz=64"])
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "head.rpn" in out and "RPNHead" in out and "head.roi_head" in out and "RoIHead" in out
    count = sum(p.numel() for p in confident_detector().parameters())
    assert count == 3_897_442  # R18 half width, FPN 64, 2 x 256 FCs, 10 classes
    assert f"faster_rcnn_r18s summary: 66 layers, {count:,} parameters" in out
    assert "GFLOPs at 64x64 (R-CNN stage at 1000 RoIs)" in out  # not the proposals a blank image happens to give
    detector = confident_detector()
    fc_flops = 2 * 1000 * (64 * 7 * 7 * 256 + 256 * 256 + 256 * (NC + 1) + 256 * 4 * NC) / 1e9  # [1000, ...] linears
    assert rcnn_rois(detector) == 1000 and gflops(detector, 64) > fc_flops
    convs_64, convs_128 = gflops(detector, 64) - fc_flops, gflops(detector, 128) - fc_flops
    assert convs_128 == pytest.approx(4 * convs_64, rel=0.02)  # only the convs grow with the image; R-CNN is fixed


def test_openvino_export_equals_eager_on_a_new_input(work):
    from crosskd.engine.deployment.runtimes.openvino import OpenVinoDetector

    args = get_args({"model": str(work / "best.pt"), "format": "openvino", "imgsz": 128, "batch": 2, "conf": CONF,
                     "iou": IOU, "max_det": MAX_DET, "device": "cpu"}, mode="export")
    path = exporter.run(args)  # includes the parity check on the traced input
    runtime = load_runtime(path)
    assert runtime.kind == "openvino" and isinstance(runtime.model, OpenVinoDetector) and runtime.model.nms
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = ExportModel(confident_detector(), nms=True, conf=CONF, iou=IOU, max_det=MAX_DET).eval()(images)
    output = runtime.model.run(images)
    assert output.shape == (2, MAX_DET, 6) and ((eager[..., 4] > 0).sum(1) > 10).all()
    torch.testing.assert_close(output, eager, atol=1e-3, rtol=0)


def test_benchmark_gives_every_format_a_row(work):
    args = get_args({"model": str(work / "best.pt"), "data": str(work / "data.yaml"), "imgsz": 128, "batch": 2,
                     "workers": 0, "device": "cpu", "project": str(work / "runs"), "name": "bench", "conf": 0.001},
                    mode="benchmark")
    rows = {row.format: row for row in benchmark.run(args)}
    assert list(rows) == ["PyTorch", "TorchScript", "ONNX", "ONNX INT8", "OpenVINO", "OpenVINO FP16", "OpenVINO INT8"]
    full_precision = [rows[name] for name in ("PyTorch", "TorchScript", "ONNX", "OpenVINO")]
    for row in full_precision:
        assert row.status == "ok", row
        assert row.size_mb > 1 and row.ms_per_image > 0 and math.isfinite(row.ap) and math.isfinite(row.ap50)
    assert max(row.ap50 for row in full_precision) - min(row.ap50 for row in full_precision) < 1e-3  # same detections
    for name in ("ONNX INT8", "OpenVINO FP16", "OpenVINO INT8"):  # ok, or one line saying why in the row
        assert rows[name].status == "ok" or "\n" not in rows[name].status
    exports = work / "runs" / "bench"
    assert (exports / "best.onnx").is_file() and (exports / "best.torchscript").is_file()
    assert (exports / "best_openvino_model" / "best.xml").is_file()
