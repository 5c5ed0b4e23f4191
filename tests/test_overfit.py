"""Each detector type (small CPU variant) overfits one fixed batch of the digits demo data to COCO mAP50 >= 0.9."""

import contextlib
import io

import pytest
import torch
import yaml
from pycocotools.cocoeval import COCOeval

from crosskd.data import DetectionDataset, collate, generate_digits, load_data_yaml
from crosskd.models import build_detector

IMGSZ = 128
BATCH_IMAGES = 4
MIN_BOX_SIDE = 10  # a stride-8 anchor grid has a centre strictly inside every box at least this wide (ATSS needs one)
ITERATIONS = 150


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The dataset and one padded batch of its first images whose boxes all have sides >= MIN_BOX_SIDE."""
    root = generate_digits(tmp_path_factory.mktemp("digits"), num_train=16, num_val=1, imgsz=IMGSZ, seed=0)
    names = {i: str(i) for i in range(10)}
    splits = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    (root / "digits.yaml").write_text(yaml.safe_dump({"path": str(root), **splits, "names": names}))
    dataset = DetectionDataset(load_data_yaml(root / "digits.yaml"), "train", IMGSZ, augment=False)
    samples = [s for s in map(dataset.__getitem__, range(len(dataset))) if _boxes_large_enough(s.boxes)]
    return dataset, collate(samples[:BATCH_IMAGES], pad_multiple=128).to("cpu")


def _boxes_large_enough(boxes: torch.Tensor) -> bool:
    return bool(len(boxes)) and bool(((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIDE).all())


def coco_ap50(detector, dataset, batch) -> float:
    """pycocotools AP at IoU 0.5 of the detector's predictions on the batch's images."""
    detector.eval()
    detections = detector.predict(batch.images, conf=0.05, ratios=batch.ratios)
    results = [
        {
            "image_id": image_id,
            "category_id": dataset.category_ids[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": s,
        }
        for image_id, det in zip(batch.image_ids.tolist(), detections)
        for (x1, y1, x2, y2), s, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())
    ]
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco_gt(), dataset.coco_gt().loadRes(results), "bbox")
        evaluator.params.imgIds = batch.image_ids.tolist()
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gfl_r18s", "retinanet_r18s", "fcos_r18s", "atss_r18s"])
def test_small_detector_overfits_a_digits_batch(digits, name):
    dataset, batch = digits
    assert (batch.gt_labels >= 0).sum() >= 8
    torch.manual_seed(0)
    detector = build_detector(name, nc=len(dataset.names)).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(ITERATIONS):
        total = sum(detector.loss(batch).values())
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 10.0)
        optimizer.step()
    assert total.item() < 0.5 * first
    assert coco_ap50(detector, dataset, batch) >= 0.9
