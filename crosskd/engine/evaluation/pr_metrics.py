"""Precision, recall and F1 at IoU 0.5 and the confusion matrix of a validation run, as Ultralytics reports them
beside COCO AP: `metrics/precision(B)` and `metrics/recall(B)` are the class-mean P and R at the confidence where
the class-mean F1 is highest; the curves behind them feed PR_curve.png, F1_curve.png, P_curve.png, R_curve.png.

Computed on rank 0 from the gathered COCO result records and the dataset's ground truth (crowd regions left out),
so DDP shards and repeated images need no extra gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

MATCH_IOU = 0.5  # a prediction is a true positive at IoU >= 0.5 with an unmatched box of its class
CONFUSION_CONF = 0.25  # Ultralytics' confusion matrix: predictions above this score,
CONFUSION_IOU = 0.45  # matched to any ground-truth box at this IoU
CURVE_POINTS = 1000  # confidence (and recall) grid of the curves


@dataclass
class ImageDetections:
    """One image's predictions and ground truth, xyxy original pixels, contiguous class ids."""

    boxes: np.ndarray  # [K, 4]
    scores: np.ndarray  # [K]
    labels: np.ndarray  # [K]
    gt_boxes: np.ndarray  # [G, 4]
    gt_labels: np.ndarray  # [G]


@dataclass
class PRCurves:
    """Per-class curves over the confidence grid `px` [P] and the P/R at the best class-mean F1.

    `classes` [C] are the class ids that have ground truth; `precision`, `recall`, `f1` are [C, P] against confidence,
    `pr` [C, P] is the interpolated precision against recall `px`, `ap50` [C] its mean over 101 recall levels.
    """

    px: np.ndarray
    classes: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    pr: np.ndarray
    ap50: np.ndarray
    best: int  # index into px of the best smoothed class-mean F1

    @property
    def mean_precision(self) -> float:
        return float(self.precision[:, self.best].mean()) if len(self.classes) else 0.0

    @property
    def mean_recall(self) -> float:
        return float(self.recall[:, self.best].mean()) if len(self.classes) else 0.0


def images_from_records(
    records: dict[int, list[dict]], gt_records: list, category_ids: list[int]
) -> list[ImageDetections]:
    """Pair each ground-truth image record (`ImageRecord`: boxes [G, 4] xyxy, labels [G]) with its COCO result
    records (bbox xywh, score, category_id) by image id."""
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    images = []
    for record in gt_records:
        dets = records.get(record.image_id, [])
        boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)  # [K, 4] xywh
        boxes[:, 2:] += boxes[:, :2]  # -> xyxy
        images.append(ImageDetections(
            boxes, np.array([d["score"] for d in dets], dtype=np.float64),
            np.array([label_of[d["category_id"]] for d in dets], dtype=np.int64),
            np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4), np.asarray(record.labels, dtype=np.int64),
        ))
    return images


def iou_matrix(gt_boxes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU [G, K] of xyxy boxes [G, 4] and [K, 4]."""
    return box_iou(torch.from_numpy(gt_boxes), torch.from_numpy(boxes)).numpy()


def unique_matches(iou: np.ndarray, threshold: float) -> np.ndarray:
    """(gt, prediction) index pairs [M, 2] with IoU >= `threshold`, highest IoU first, each gt and each prediction
    used once (Ultralytics' greedy matching)."""
    gt_idx, pred_idx = np.nonzero(iou >= threshold)
    pairs = np.stack([gt_idx, pred_idx], 1)  # [M, 2]
    pairs = pairs[np.argsort(-iou[gt_idx, pred_idx], kind="stable")]
    pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    return pairs[np.unique(pairs[:, 0], return_index=True)[1]]


def true_positives(image: ImageDetections) -> np.ndarray:
    """[K] bool: predictions matched at IoU >= MATCH_IOU to a ground-truth box of their class."""
    tp = np.zeros(len(image.labels), dtype=bool)
    if len(image.labels) and len(image.gt_labels):
        iou = iou_matrix(image.gt_boxes, image.boxes)
        iou[image.gt_labels[:, None] != image.labels[None, :]] = 0.0  # only same-class pairs match
        tp[unique_matches(iou, MATCH_IOU)[:, 1]] = True
    return tp


def smooth(values: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Box-filter smoothing over `fraction` of the points (edges padded), as Ultralytics smooths mean F1."""
    width = round(len(values) * fraction * 2) // 2 + 1  # odd
    padded = np.concatenate([np.full(width // 2, values[0]), values, np.full(width // 2, values[-1])])
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def class_curves(tp: np.ndarray, scores: np.ndarray, num_gt: int, px: np.ndarray) -> tuple[np.ndarray, ...]:
    """One class: precision and recall [P] against confidence `px`, precision [P] against recall `px` and AP50.

    `tp` [K] and `scores` [K] are the class's predictions sorted by descending score. Precision at a recall level is
    the best precision at that recall or beyond (0 past the highest recall), AP50 its mean over 101 levels: COCO's.
    """
    tpc = np.cumsum(tp)
    recall = tpc / num_gt  # [K], non-decreasing
    precision = tpc / np.arange(1, len(tp) + 1)
    r_conf = np.interp(-px, -scores, recall, left=0)
    p_conf = np.interp(-px, -scores, precision, left=1)
    envelope = np.flip(np.maximum.accumulate(np.flip(precision)))

    def at_recall(levels: np.ndarray) -> np.ndarray:
        index = np.searchsorted(recall, levels, side="left")
        return np.where(index < len(recall), envelope[np.minimum(index, len(recall) - 1)], 0.0)

    return p_conf, r_conf, at_recall(px), float(at_recall(np.linspace(0, 1, 101)).mean())


def pr_curves(images: list[ImageDetections], nc: int) -> PRCurves:
    """The per-class precision/recall/F1 curves of every image's predictions at IoU 0.5 (classes with ground truth)."""
    tp = np.concatenate([true_positives(image) for image in images] or [np.zeros(0, bool)])
    scores = np.concatenate([image.scores for image in images] or [np.zeros(0)])
    labels = np.concatenate([image.labels for image in images] or [np.zeros(0, np.int64)])
    gt_counts = np.bincount(np.concatenate([image.gt_labels for image in images] or [np.zeros(0, np.int64)]),
                            minlength=nc)
    order = np.argsort(-scores, kind="stable")
    tp, scores, labels = tp[order], scores[order], labels[order]
    px = np.linspace(0, 1, CURVE_POINTS)
    classes = np.nonzero(gt_counts)[0]
    curves = np.zeros((3, len(classes), CURVE_POINTS))  # precision, recall, pr
    ap50 = np.zeros(len(classes))
    for row, label in enumerate(classes):
        mine = labels == label
        if mine.any():
            p_conf, r_conf, pr, ap50[row] = class_curves(tp[mine], scores[mine], int(gt_counts[label]), px)
            curves[:, row] = p_conf, r_conf, pr
    precision, recall, pr = curves
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-16)
    best = int(smooth(f1.mean(0)).argmax()) if len(classes) else 0
    return PRCurves(px, classes, precision, recall, f1, pr, ap50, best)


def confusion_matrix(images: list[ImageDetections], nc: int) -> np.ndarray:
    """Counts [nc + 1, nc + 1], rows the predicted class, columns the true class, index nc the background:
    predictions above CONFUSION_CONF matched to any box at CONFUSION_IOU (Ultralytics' ConfusionMatrix)."""
    matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    for image in images:
        keep = image.scores > CONFUSION_CONF
        labels, boxes = image.labels[keep], image.boxes[keep]
        pairs = np.zeros((0, 2), dtype=np.int64)
        if len(labels) and len(image.gt_labels):
            pairs = unique_matches(iou_matrix(image.gt_boxes, boxes), CONFUSION_IOU)
        np.add.at(matrix, (labels[pairs[:, 1]], image.gt_labels[pairs[:, 0]]), 1)
        missed = np.setdiff1d(np.arange(len(image.gt_labels)), pairs[:, 0])
        np.add.at(matrix, (nc, image.gt_labels[missed]), 1)  # a box nothing found: background
        extra = np.setdiff1d(np.arange(len(labels)), pairs[:, 1])
        np.add.at(matrix, (labels[extra], nc), 1)  # a prediction of nothing: background
    return matrix
