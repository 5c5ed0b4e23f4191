"""Results and Boxes: box formats by hand, verbose/summary/to_json, plot/save (BGR), YOLO lines and COCO records."""

import json

import cv2
import numpy as np
import pytest
import torch

from crosskd.engine.evaluation.plotting import class_color
from crosskd.engine.prediction.results import Boxes, Results

NAMES = {0: "cat", 2: "bird"}


def two_boxes() -> Results:
    """A 200 x 100 (h x w) grey image with a bird at (10, 20)-(30, 60) and a cat at (50, 100)-(90, 180)."""
    data = torch.tensor([[10.0, 20, 30, 60, 0.9, 2], [50, 100, 90, 180, 0.5, 0]])  # [K, 6]
    image = np.full((200, 100, 3), 128, np.uint8)
    return Results(image, "images/7.jpg", NAMES, Boxes(data, (200, 100)))


def test_box_formats_by_hand():
    boxes = two_boxes().boxes
    assert len(boxes) == 2
    assert boxes.xyxy.tolist() == [[10, 20, 30, 60], [50, 100, 90, 180]]
    assert boxes.xywh.tolist() == [[20, 40, 20, 40], [70, 140, 40, 80]]
    torch.testing.assert_close(boxes.xyxyn, torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]))
    torch.testing.assert_close(boxes.xywhn, torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.4, 0.4]]))
    torch.testing.assert_close(boxes.conf, torch.tensor([0.9, 0.5]))
    assert boxes.cls.tolist() == [2, 0]


def test_verbose_summary_and_json():
    result = two_boxes()
    assert len(result) == 2 and result.verbose() == "1 cat, 1 bird"
    first = result.summary()[0]
    assert first == {"name": "bird", "class": 2, "confidence": pytest.approx(0.9),
                     "box": {"x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 60.0}}
    assert json.loads(result.to_json())[1]["name"] == "cat"
    empty = Results(result.orig_img, "a.jpg", NAMES, Boxes(torch.zeros(0, 6), (200, 100)))
    assert empty.verbose() == "(no detections)" and empty.summary() == [] and empty.yolo_lines() == []


def test_plot_draws_class_coloured_boxes_on_a_bgr_copy_and_save_writes_it(tmp_path):
    result = two_boxes()
    plotted = result.plot(line_width=3)
    assert plotted.shape == (200, 100, 3) and (result.orig_img == 128).all()  # the original is untouched
    assert tuple(plotted[40, 10]) == class_color(2)  # left edge of the bird box, BGR palette colour
    path = result.save(tmp_path / "out" / "7.png", line_width=3)
    np.testing.assert_array_equal(cv2.imread(str(path)), plotted)


def test_yolo_lines_and_coco_records():
    result = two_boxes()
    assert result.yolo_lines() == ["2 0.2 0.2 0.2 0.2", "0 0.7 0.7 0.4 0.4"]
    assert result.yolo_lines(save_conf=True)[0] == "2 0.2 0.2 0.2 0.2 0.9"
    record = result.coco_records()[1]
    assert record == {"image_id": 7, "file_name": "7.jpg", "category_id": 0, "bbox": [50.0, 100.0, 40.0, 80.0],
                      "score": 0.5}
