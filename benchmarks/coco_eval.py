"""Time crosskd's COCO evaluation with pycocotools and with faster-coco-eval on generated data; check equal AP.

    .venv/bin/python benchmarks/coco_eval.py [--images 5000] [--seed 0]

Ground truth: `--images` 640x480 images, 1-12 boxes each over 80 classes (small, medium and large), 2 % crowd.
Predictions: every ground-truth box jittered, with a score, some given the wrong class, plus background false
positives, ~20 per image. Each evaluator runs crosskd.engine.evaluation.metrics.coco_evaluate (results loading,
evaluate,
accumulate, summarize and the per-class table) once; the script prints both times and fails if any metric differs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pycocotools.coco import COCO

from crosskd.engine.evaluation.metrics import METRIC_KEYS, coco_evaluate

NUM_CLASSES = 80
WIDTH, HEIGHT = 640, 480


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """`[count, 4]` xywh boxes inside the image with log-uniform sides of 8..400 px."""
    wh = np.exp(rng.uniform(np.log(8), np.log(400), size=(count, 2)))
    wh = np.minimum(wh, [WIDTH - 1, HEIGHT - 1])
    xy = rng.uniform(0, 1, size=(count, 2)) * ([WIDTH, HEIGHT] - wh)
    return np.concatenate([xy, wh], 1).round(2)


def make_ground_truth(rng: np.random.Generator, num_images: int) -> COCO:
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id:06d}.jpg"})
        count = int(rng.integers(1, 13))
        for box, label, crowd in zip(random_boxes(rng, count), rng.integers(1, NUM_CLASSES + 1, count),
                                     rng.random(count) < 0.02, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(crowd)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": str(c)} for c in range(1, NUM_CLASSES + 1)]}
    coco.createIndex()
    return coco


def make_predictions(rng: np.random.Generator, coco: COCO) -> list[dict]:
    """Jittered true boxes (10 % with a wrong class) and background boxes, with rounded scores as crosskd writes."""
    results = []
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * boxes[:, [2, 3, 2, 3]]
        labels = np.array([a["category_id"] for a in anns])
        wrong = rng.random(len(labels)) < 0.1
        labels[wrong] = rng.integers(1, NUM_CLASSES + 1, int(wrong.sum()))
        extra = int(rng.integers(5, 15))
        boxes = np.concatenate([boxes, random_boxes(rng, extra)])
        labels = np.concatenate([labels, rng.integers(1, NUM_CLASSES + 1, extra)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(anns)), rng.uniform(0.05, 0.6, extra)])
        results += [{"image_id": image_id, "category_id": int(label), "bbox": box.round(3).tolist(),
                     "score": round(float(score), 5)}
                    for box, label, score in zip(np.abs(boxes), labels, scores, strict=True)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rng = np.random.default_rng(options.seed)
    coco = make_ground_truth(rng, options.images)
    results = make_predictions(rng, coco)
    names = {i: str(i + 1) for i in range(NUM_CLASSES)}
    category_ids = list(range(1, NUM_CLASSES + 1))
    print(f"{options.images} images, {len(coco.anns)} ground-truth boxes, {len(results)} predictions")
    outcome = {}
    for evaluator in ("pycocotools", "faster-coco-eval"):
        start = time.perf_counter()
        result = coco_evaluate(coco, results, names, category_ids, evaluator=evaluator)
        outcome[evaluator] = (time.perf_counter() - start, result.metrics)
    print(f"{'evaluator':<18}{'seconds':>9}" + "".join(f"{key:>8}" for key in METRIC_KEYS))
    for evaluator, (seconds, metrics) in outcome.items():
        print(f"{evaluator:<18}{seconds:>9.2f}" + "".join(f"{metrics[key]:>8.4f}" for key in METRIC_KEYS))
    (slow, reference), (fast, metrics) = outcome["pycocotools"], outcome["faster-coco-eval"]
    print(f"faster-coco-eval is {slow / fast:.1f}x faster; metrics identical: {metrics == reference}")
    if metrics != reference:
        raise SystemExit("metrics differ between the evaluators")


if __name__ == "__main__":
    main()
