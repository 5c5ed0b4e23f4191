"""COCO metrics: summary numbers, per-class AP from the precision array, result records and tables."""

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from crosskd.engine.evaluation.metrics import coco_evaluate, detections_to_coco, fitness, format_class_table

NAMES = {0: "cat", 1: "dog"}
CATEGORY_IDS = [3, 7]  # contiguous label -> original category id


def ground_truth() -> COCO:
    """Two 100x80 images: image 1 has a cat and a dog, image 2 one dog (boxes xywh, medium/large sizes)."""
    anns = [(1, 3, [10, 10, 40, 30]), (1, 7, [50, 20, 40, 50]), (2, 7, [5, 5, 60, 60])]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 80} for i in (1, 2)],
        "annotations": [
            {"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for k, (img, cat, box) in enumerate(anns)
        ],
        "categories": [{"id": c, "name": NAMES[i]} for i, c in enumerate(CATEGORY_IDS)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def perfect_results(coco: COCO) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in coco.dataset["annotations"]]


def test_perfect_predictions_give_ap_one():
    coco = ground_truth()
    result = coco_evaluate(coco, perfect_results(coco), NAMES, CATEGORY_IDS)
    assert result.metrics["AP"] == pytest.approx(1.0)
    assert result.metrics["AP50"] == pytest.approx(1.0) and result.metrics["AR100"] == pytest.approx(1.0)
    assert result.metrics["APs"] == 0.0  # no small objects: pycocotools' -1 is reported as 0
    assert [(c.name, c.images, c.instances) for c in result.classes] == [("cat", 1, 1), ("dog", 2, 2)]
    assert all(c.ap == pytest.approx(1.0) for c in result.classes)
    assert fitness(result.metrics) == result.metrics["AP"]


def test_per_class_ap_comes_from_that_class_only():
    coco = ground_truth()
    results = [r for r in perfect_results(coco) if r["category_id"] == 7]  # no cat predictions
    result = coco_evaluate(coco, results, NAMES, CATEGORY_IDS)
    cat, dog = result.classes
    assert cat.ap == 0.0 and cat.ap50 == 0.0
    assert dog.ap == pytest.approx(1.0) and dog.ap50 == pytest.approx(1.0)
    assert result.metrics["AP"] == pytest.approx(0.5)


def test_zero_detections_give_zeros_without_crashing():
    result = coco_evaluate(ground_truth(), [], NAMES, CATEGORY_IDS)
    assert set(result.metrics.values()) == {0.0}
    assert [c.instances for c in result.classes] == [1, 2]


def test_detections_to_coco_writes_xywh_and_original_category_ids():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.5, 4.25]])
    records = detections_to_coco(boxes, torch.tensor([0.9, 0.123456789]), torch.tensor([1, 0]), 42, CATEGORY_IDS)
    assert records == [
        {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9},
        {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 5.5, 4.25], "score": 0.12346},
    ]


def test_class_table_layout():
    coco = ground_truth()
    lines = format_class_table(coco_evaluate(coco, perfect_results(coco), NAMES, CATEGORY_IDS), num_images=2)
    assert lines[0].split() == ["Class", "Images", "Instances", "AP50", "AP"]
    assert lines[1].split() == ["all", "2", "3", "1", "1"]
    assert lines[2].split() == ["cat", "1", "1", "1", "1"] and len(lines) == 4
    assert all(len(line) == 22 + 4 * 11 for line in lines)
    short = format_class_table(coco_evaluate(coco, [], NAMES, CATEGORY_IDS), num_images=2, per_class=False)
    assert len(short) == 2 and short[1].split()[-1] == "0"
