"""Boxes are clipped to each image's own shape before NMS (issue 20): a box reaching into a smaller image's batch
padding no longer survives NMS beside its clipped twin, so no image ever has two identical boxes of one class —
in DenseDetector.predict, `crosskd predict`, and exported graphs with and without NMS inside."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_export import export_args, tiny_detector, write_checkpoint

from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.runtimes.torchscript import TorchScriptDetector
from crosskd.engine.prediction.predictor import Predictor
from crosskd.models.postprocess import Detections, postprocess, reclip_detections, unpad

CONF, IOU = 0.001, 0.6


def clipped_duplicates(detections: list[Detections], img_sizes: torch.Tensor) -> int:
    """Rows that repeat an earlier (box, class) of the same image once its boxes are clipped to the image."""
    count = 0
    for det, (height, width) in zip(detections, img_sizes.tolist(), strict=True):
        boxes = det.boxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        rows = torch.cat([boxes, det.labels[:, None].float()], dim=1)  # [K, 5]
        count += len(rows) - len(torch.unique(rows, dim=0))
    return count


def test_boxes_reaching_into_the_padding_are_clipped_before_nms():
    """Three boxes of one class that overlap < IoU 0.6 only through the padding of a 50×50 image in a 128×128
    input: clipped before NMS one survives; clipped after (the old order) three identical boxes came out."""
    boxes = torch.tensor([[[0.0, 0, 50, 50], [0, 0, 128, 50], [0, 0, 50, 128]]])  # [1, 3, 4]
    scores = torch.tensor([[[0.9], [0.8], [0.7]]])  # [1, 3, 1]
    sizes = torch.tensor([[50, 50]])
    before = postprocess(boxes, scores, [3], conf=0.05, iou=IOU)
    assert len(before[0].boxes) == 3 and clipped_duplicates(before, sizes) == 2  # the reported symptom
    after = postprocess(boxes, scores, [3], conf=0.05, iou=IOU, img_sizes=sizes)
    assert after[0].boxes.tolist() == [[0.0, 0, 50, 50]] and after[0].scores.tolist() == [pytest.approx(0.9)]


def test_min_bbox_size_drops_boxes_without_area_unless_none_as_torchvision():
    """Two boxes wholly in the padding clip to the same line x = 50: MMDetection's min_bbox_size=0 drops both,
    torchvision's detectors (None) keep both, as torchvision does; 10 also drops the 8-pixel-wide box."""
    boxes = torch.tensor([[[0.0, 0, 40, 40], [60, 0, 90, 40], [70, 0, 100, 40], [0, 0, 8, 40]]])  # [1, 4, 4]
    scores = torch.tensor([[[0.9], [0.8], [0.7], [0.6]]])  # [1, 4, 1]
    sizes = torch.tensor([[50, 50]])
    kept = {size: postprocess(boxes, scores, [4], conf=0.05, iou=IOU, img_sizes=sizes, min_bbox_size=size)[0]
            for size in (0.0, None, 10.0)}
    assert kept[0.0].scores.tolist() == pytest.approx([0.9, 0.6])
    assert kept[None].scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert kept[None].boxes[1].tolist() == kept[None].boxes[2].tolist() == [50.0, 0, 50, 40]
    assert kept[10.0].scores.tolist() == pytest.approx([0.9])


def test_torchvision_detectors_keep_boxes_without_area_and_crosskd_models_drop_them():
    from crosskd.models import build_detector

    assert build_detector("fcos_r50_tv.yaml", 80).head.min_bbox_size is None
    assert build_detector("retinanet_r50_tv.yaml", 80).head.min_bbox_size is None
    assert build_detector("gfl_r18t.yaml", 3).head.min_bbox_size == 0.0


def test_embedded_nms_rows_are_clipped_and_suppressed_again_on_the_host():
    rows = torch.zeros(2, 4, 6)
    rows[0, :3] = torch.tensor([[0.0, 0, 128, 50, 0.9, 1], [0, 0, 50, 128, 0.8, 1], [0, 0, 50, 128, 0.7, 2]])
    rows[1, :1] = torch.tensor([[10.0, 10, 200, 90, 0.5, 0]])
    out, counts = reclip_detections(rows, torch.tensor([3, 1]), torch.tensor([[50, 50], [100, 100]]), 3, IOU)
    kept = unpad(out, counts)
    assert counts.tolist() == [2, 1]
    assert kept[0].boxes.tolist() == [[0.0, 0, 50, 50]] * 2 and kept[0].labels.tolist() == [1, 2]  # one per class
    assert kept[1].boxes.tolist() == [[10.0, 10, 100, 90]]


def letterboxed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images in one 128×128 input: a 96×128 one and a 40×72 one, random pixels, zero padding."""
    gen = torch.Generator().manual_seed(3)
    images = torch.zeros(2, 3, 128, 128)
    sizes = torch.tensor([[96, 128], [40, 72]])
    for image, (height, width) in zip(images, sizes.tolist(), strict=True):
        image[:, :height, :width] = torch.rand(3, height, width, generator=gen)
    return images, sizes


@pytest.mark.parametrize("head_type", ["gfl", "retinanet", "atss", "fcos"])
def test_no_image_has_two_identical_boxes_of_one_class_in_eager_predict(head_type):
    """A random detector's boxes span far into the padding; at conf 0.001 the old order gave duplicates."""
    model = tiny_detector(head_type).eval()
    images, sizes = letterboxed_batch()
    assert clipped_duplicates(model.predict(images, CONF, IOU, 100, 1000), sizes) > 0  # without the sizes
    detections = model.predict(images, CONF, IOU, 100, 1000, img_sizes=sizes)
    assert all(len(d.boxes) > 0 for d in detections) and clipped_duplicates(detections, sizes) == 0
    for det, (height, width) in zip(detections, sizes.tolist(), strict=True):
        assert det.boxes[:, 2].max() <= width and det.boxes[:, 3].max() <= height


@pytest.mark.parametrize("nms", [False, True])
def test_no_image_has_two_identical_boxes_of_one_class_in_exported_graphs(tmp_path, nms):
    """TorchScript with raw output (host NMS after the per-image clip) and with NMS in the graph (rows clipped and
    suppressed again on the host)."""
    weights = write_checkpoint(tmp_path / "gfl.pt", "gfl")
    backend = TorchScriptDetector(exporter.run(export_args(weights, format="torchscript", nms=nms, batch=2,
                                                           conf=CONF, iou=IOU, dynamic=True)))
    images, sizes = letterboxed_batch()
    assert clipped_duplicates(backend.predict(images, CONF, IOU, 100, 1000), sizes) > 0  # without the sizes
    detections = backend.predict(images, CONF, IOU, 100, 1000, img_sizes=sizes)
    assert all(len(d.boxes) > 0 for d in detections) and clipped_duplicates(detections, sizes) == 0


def test_crosskd_predict_saves_no_repeated_box_of_one_class(tmp_path):
    """`crosskd predict conf=0.001 save_txt=True` on a non-square image: every label line is unique."""
    weights = write_checkpoint(tmp_path / "best.pt", "gfl")
    image = tmp_path / "img" / "wide.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (60, 128, 3), dtype=np.uint8))
    args = get_args({"model": str(weights), "source": str(image), "device": "cpu", "project": str(tmp_path),
                     "name": "predict", "conf": CONF, "save_txt": True}, "predict")
    save_dir = Path(Predictor(args).run())
    lines = (save_dir / "labels" / "wide.txt").read_text().splitlines()
    assert len(lines) > 10 and len(set(lines)) == len(lines)
