"""COCO box metrics: summary numbers, per-class AP and the results-file format.

Evaluated by pycocotools, or by faster-coco-eval (same numbers, C++ evaluate/accumulate) when installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crosskd.errors import ConfigError
from crosskd.user_settings import user_setting

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}  # into COCOeval.stats


@dataclass
class ClassStats:
    """One row of the per-class table."""

    name: str
    images: int
    instances: int
    ap50: float
    ap: float


@dataclass
class COCOResult:
    """COCO metrics by METRIC_KEYS name (AP, AP50, ...) and the per-class rows."""

    metrics: dict[str, float]
    classes: list[ClassStats] = field(default_factory=list)


def fitness(metrics: dict[str, float]) -> float:
    """The number best.pt is chosen by: COCO AP (mAP@[.5:.95])."""
    return float(metrics.get("AP", 0.0))


def detections_to_coco(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image_id: int, category_ids: list[int]
) -> list[dict]:
    """COCO results records for one image; boxes are xyxy original pixels, written as xywh (rounded).

    Args:
        boxes (Tensor[K, 4]): xyxy in original-image pixels.
        scores (Tensor[K]): confidences.
        labels (Tensor[K]): contiguous class ids, mapped through `category_ids` to COCO category ids.
    """
    xywh = boxes.detach().double().cpu().clone()  # [K, 4]
    xywh[:, 2:] -= xywh[:, :2]
    xywh = xywh.numpy().round(3).tolist()
    scores_list = scores.detach().double().cpu().numpy().round(5).tolist()
    labels_list = labels.detach().cpu().tolist()
    return [
        {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box, "score": score}
        for box, score, label in zip(xywh, scores_list, labels_list, strict=True)
    ]


def _class_counts(coco_gt: COCO, cat_id: int) -> tuple[int, int]:
    """(images containing the class, instances of the class)."""
    ann_ids = coco_gt.getAnnIds(catIds=[cat_id], iscrowd=False)
    image_ids = {coco_gt.anns[a]["image_id"] for a in ann_ids}
    return len(image_ids), len(ann_ids)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else 0.0


def per_class_stats(evaluator: COCOeval | None, coco_gt: COCO, names: dict[int, str], category_ids: list[int]):
    """Per-class AP50 and AP from COCOeval's precision array [T, R, K, A, M] (area all, maxDets last)."""
    cat_index = {c: k for k, c in enumerate(evaluator.params.catIds)} if evaluator is not None else {}
    precision = evaluator.eval["precision"] if evaluator is not None else None
    rows = []
    for label, cat_id in enumerate(category_ids):
        images, instances = _class_counts(coco_gt, cat_id)
        ap50 = ap = 0.0
        if precision is not None and cat_id in cat_index:
            k = cat_index[cat_id]
            ap50 = _mean_valid(precision[0, :, k, 0, -1])
            ap = _mean_valid(precision[:, :, k, 0, -1])
        rows.append(ClassStats(names.get(label, str(label)), images, instances, ap50, ap))
    return rows


def coco_evaluator_name(choice: str | None = None) -> str:
    """'faster-coco-eval' or 'pycocotools': `choice`, else the user setting coco_eval; auto = faster when installed."""
    choice = choice or user_setting("coco_eval")
    if choice == "auto":
        return "faster-coco-eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    if choice == "faster-coco-eval" and not importlib.util.find_spec("faster_coco_eval"):
        raise ConfigError("coco_eval=faster-coco-eval but it is not installed; pip install 'crosskd[cocoeval]' "
                          "or run 'crosskd settings coco_eval=auto'")
    return choice


def make_cocoeval(coco_gt: COCO, results: list[dict], evaluator: str) -> COCOeval:
    """A bbox COCOeval of `results` against `coco_gt` from pycocotools or faster-coco-eval (same API and numbers)."""
    if evaluator == "faster-coco-eval":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        faster_gt = FasterCOCO(coco_gt.dataset)
        return COCOeval_faster(faster_gt, faster_gt.loadRes(results), "bbox")
    return COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")


def coco_evaluate(
    coco_gt: COCO, results: list[dict], names: dict[int, str], category_ids: list[int], evaluator: str | None = None
) -> COCOResult:
    """Run COCOeval (bbox) on `results` (the library's own prints are suppressed); zero results give zeros.

    `evaluator`: 'pycocotools', 'faster-coco-eval' or 'auto'; None = the user setting coco_eval (`crosskd settings`).
    """
    if not results:
        zeros = dict.fromkeys(METRIC_KEYS, 0.0)
        return COCOResult(zeros, per_class_stats(None, coco_gt, names, category_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = make_cocoeval(coco_gt, results, coco_evaluator_name(evaluator))
        coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {key: max(float(coco_eval.stats[i]), 0.0) for key, i in STATS_INDEX.items()}
    return COCOResult(metrics, per_class_stats(coco_eval, coco_gt, names, category_ids))


def format_class_table(result: COCOResult, num_images: int, per_class: bool = True) -> list[str]:
    """Fixed-width lines: header, the 'all' row, then one row per class."""
    header = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'AP50':>11}{'AP':>11}"
    instances = sum(c.instances for c in result.classes)
    m = result.metrics
    lines = [header, f"{'all':>22}{num_images:>11}{instances:>11}{m['AP50']:>11.3g}{m['AP']:>11.3g}"]
    if per_class:
        lines += [f"{c.name:>22}{c.images:>11}{c.instances:>11}{c.ap50:>11.3g}{c.ap:>11.3g}" for c in result.classes]
    return lines


def format_summary(metrics: dict[str, float]) -> str:
    """One line 'AP 0.1234  AP50 ...' of every METRIC_KEYS value."""
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS)
