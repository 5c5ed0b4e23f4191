"""COCO evaluation: faster-coco-eval gives exactly pycocotools' numbers; the user setting picks the evaluator."""

import numpy as np
import pytest
from pycocotools.coco import COCO

from crosskd.engine.evaluation import metrics
from crosskd.engine.evaluation.metrics import coco_evaluate, coco_evaluator_name
from crosskd.errors import ConfigError
from crosskd.user_settings import update_user_settings

NC = 5


@pytest.fixture(autouse=True)
def user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKD_CONFIG_DIR", str(tmp_path / "config"))


def make_gt_and_results(seed: int = 0, num_images: int = 40) -> tuple[COCO, list[dict]]:
    """Random boxes of every size, a few crowd regions, and jittered / wrong-class / background predictions."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 320, "height": 240})
        count = int(rng.integers(1, 6))
        wh = rng.uniform(6, 150, (count, 2))
        boxes = np.concatenate([rng.uniform(0, 1, (count, 2)) * ([320, 240] - wh), wh], 1)
        labels = rng.integers(1, NC + 1, count)
        for box, label in zip(boxes, labels, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label), "bbox": box.tolist(),
                         "area": float(box[2] * box[3]), "iscrowd": int(rng.random() < 0.05)})
        preds = np.concatenate([boxes + rng.normal(0, 4, boxes.shape), rng.uniform(5, 100, (3, 4))])
        pred_labels = np.concatenate([np.where(rng.random(count) < 0.2, rng.integers(1, NC + 1, count), labels),
                                      rng.integers(1, NC + 1, 3)])
        results += [{"image_id": image_id, "category_id": int(c), "bbox": np.abs(b).round(3).tolist(),
                     "score": round(float(s), 5)} for b, c, s in zip(preds, pred_labels, rng.random(len(preds)))]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in range(1, NC + 1)]}
    coco.createIndex()
    return coco, results


def test_faster_coco_eval_matches_pycocotools_exactly():
    coco, results = make_gt_and_results()
    args = (coco, results, {i: str(i) for i in range(NC)}, list(range(1, NC + 1)))
    reference = coco_evaluate(*args, evaluator="pycocotools")
    faster = coco_evaluate(*args, evaluator="faster-coco-eval")
    assert 0.1 < reference.metrics["AP"] < 0.9  # a non-trivial score, not all zeros or ones
    assert faster.metrics == reference.metrics
    assert [(c.ap50, c.ap, c.instances) for c in faster.classes] == [(c.ap50, c.ap, c.instances)
                                                                     for c in reference.classes]


def test_auto_uses_faster_coco_eval_when_installed_and_the_setting_can_force_either(monkeypatch):
    assert coco_evaluator_name() == "faster-coco-eval"  # installed in the dev extra; coco_eval=auto by default
    update_user_settings({"coco_eval": "pycocotools"})
    assert coco_evaluator_name() == "pycocotools"
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    assert coco_evaluator_name("auto") == "pycocotools"
    with pytest.raises(ConfigError, match=r"crosskd\[cocoeval\]"):
        coco_evaluator_name("faster-coco-eval")
