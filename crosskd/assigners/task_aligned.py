"""Task-aligned assignment (TOOD, Feng et al. 2021) with the semantics of Ultralytics 8.4's TaskAlignedAssigner,
batched, as YOLOv8 and YOLO11 train with it.

A prior is a candidate of a GT when its point lies strictly inside the GT box, the box's sides first raised to at
least the second level's stride (16 px for strides 8/16/32). Each candidate is scored by the alignment metric
s^α · CIoU^β (s: the predicted probability of the GT's class, CIoU with the predicted box, clamped at 0); the `topk`
priors of highest metric per GT that are also candidates are its positives. A prior positive for several GTs goes
to the GT whose box it overlaps most. Its soft class target is its metric, rescaled so that the GT's best prior
gets the GT's best CIoU. Tensors are laid out `[B, M, N]` (image, GT, prior).
"""

import torch
from torch import Tensor

from crosskd.assigners.base import Assigner, Predictions
from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult
from crosskd.ops.boxes import Priors, aligned_box_ciou

INSIDE_EPS = 1e-9  # a point must lie this far inside every side of a GT box


def candidate_min_side(priors: Priors) -> Tensor:
    """The smallest GT side used for candidate selection: the second level's stride (the only level's for one)."""
    first_of_second_level = priors.num_per_level[0] if len(priors.num_per_level) > 1 else 0
    return priors.strides[first_of_second_level]


def _points_inside(points: Tensor, gt_boxes: Tensor, min_side: Tensor) -> Tensor:
    """`[B, M, N]` True where a point `[N, 2]` lies inside a GT box `[B, M, 4]` whose sides are raised to `min_side`
    about its centre."""
    centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
    sizes = gt_boxes[..., 2:] - gt_boxes[..., :2]  # [B, M, 2]
    half_sizes = torch.where(sizes < min_side, min_side.to(sizes.dtype), sizes) / 2
    top_left = (centres - half_sizes)[:, :, None]  # [B, M, 1, 2]
    bottom_right = (centres + half_sizes)[:, :, None]  # [B, M, 1, 2]
    inside = torch.cat([points - top_left, bottom_right - points], dim=-1)  # [B, M, N, 4]
    return (inside > INSIDE_EPS).all(-1)


def _gt_class_scores(pred_scores: Tensor, gt_labels: Tensor) -> Tensor:
    """`[B, M, N]` predicted probability `[B, N, C]` of each GT's class `[B, M]` (class 0 for padding)."""
    class_index = gt_labels.clamp(min=0)[:, None, :].expand(-1, pred_scores.shape[1], -1)  # [B, N, M]
    return pred_scores.gather(2, class_index).transpose(1, 2)


def _alignment(
    class_scores: Tensor, ciou: Tensor, candidate: Tensor, alpha: float, beta: float
) -> tuple[Tensor, Tensor]:
    """Alignment metric s^α · CIoU^β and the CIoU clamped at 0, each `[B, M, N]`, 0 for non-candidates."""
    ciou = ciou.clamp(min=0)
    metric = class_scores.pow(alpha) * ciou.pow(beta)
    return torch.where(candidate, metric, 0.0), torch.where(candidate, ciou, 0.0)


def _top_k(metric: Tensor, k: int) -> Tensor:
    """`[B, M, N]` True for the `k` priors of highest `metric [B, M, N]` per GT (ties: torch.topk's order)."""
    index = metric.topk(min(k, metric.shape[-1]), dim=-1).indices  # [B, M, k]
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(-1, index, True)


def _one_gt_per_prior(positive: Tensor, overlaps: Tensor) -> Tensor:
    """`positive [B, M, N]` where a prior positive for several GTs keeps only the GT of highest CIoU among all its
    candidate GTs (`overlaps [B, M, N]`; the first on ties), as Ultralytics does."""
    claimed_often = positive.sum(1, keepdim=True) > 1  # [B, 1, N]
    best_gt = overlaps.max(dim=1, keepdim=True).indices  # [B, 1, N]
    best_only = torch.zeros_like(positive).scatter_(1, best_gt, True)
    return torch.where(claimed_often, best_only, positive)


def _soft_scores(metric: Tensor, overlaps: Tensor, positive: Tensor, eps: float) -> Tensor:
    """`[B, N]` metric of each positive rescaled per GT: metric · (GT's best CIoU) / (GT's best metric), over the
    GT's positives `positive [B, M, N]`; 0 for the rest."""
    metric = metric * positive
    best_metric = metric.amax(-1, keepdim=True)  # [B, M, 1]
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)  # [B, M, 1]
    return (metric * best_overlap / (best_metric + eps)).amax(1)  # [B, N]


@torch.no_grad()
def task_aligned_assign(
    points: Tensor,
    min_side: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pred_boxes: Tensor,
    pred_scores: Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    topk2: int | None = None,
    valid: Tensor | None = None,
) -> AssignResult:
    """Assign prior points `[N, 2]` to padded GT `gt_boxes [B, M, 4]`, `gt_labels [B, M]` (−1 = padding) by the
    predicted boxes `[B, N, 4]` (xyxy, input pixels) and class probabilities `[B, N, C]`.

    `min_side` (0-dim) is the smallest GT side for candidate selection; `topk2` (default `topk`), when smaller,
    keeps only that many positives per GT after the one-GT-per-prior resolution. Priors where `valid [B, N]` is
    False are never candidates and come back ignored (−2). `max_overlaps` is the CIoU (clamped at 0) with the
    assigned GT for positives, `scores` their normalised alignment metric; both 0 otherwise.
    """
    batch, num_gt = gt_labels.shape
    if num_gt == 0:
        return AssignResult.all_background(batch, points.shape[0], points.device)
    real = gt_labels >= 0  # [B, M]
    candidate = _points_inside(points, gt_boxes, min_side) & real[..., None]  # [B, M, N]
    if valid is not None:
        candidate = candidate & valid[:, None]
    ciou = aligned_box_ciou(gt_boxes[:, :, None], pred_boxes[:, None])  # [B, M, N]
    metric, overlaps = _alignment(_gt_class_scores(pred_scores, gt_labels), ciou, candidate, alpha, beta)
    positive = _one_gt_per_prior(_top_k(metric, topk) & candidate, overlaps)
    if topk2 is not None and topk2 != topk:
        positive = positive & _top_k(metric * positive, topk2)
    gt_index = positive.to(torch.uint8).argmax(1)  # [B, N], the only positive GT of a positive prior
    foreground = positive.any(1) & real.gather(1, gt_index)  # [B, N]
    assigned = torch.where(foreground, gt_index, BACKGROUND)
    if valid is not None:
        assigned = torch.where(valid, assigned, IGNORED)
    assigned_overlaps = torch.where(foreground, overlaps.gather(1, gt_index[:, None]).squeeze(1), 0.0)
    scores = torch.where(foreground, _soft_scores(metric, overlaps, positive, eps), 0.0)
    return AssignResult.build(assigned, gt_labels, assigned_overlaps, scores)


class TaskAlignedAssigner(Assigner):
    """`task_aligned_assign` on the prior points with the head's decoded predictions; the defaults are those
    Ultralytics' v8DetectionLoss trains YOLOv8 and YOLO11 with (topk 10, α 0.5, β 6, candidates' smallest side the
    second level's stride)."""

    name = "task_aligned"

    def __init__(
        self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9, topk2: int | None = None
    ) -> None:
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.topk2 = topk2

    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        """Task-aligned assignment of `priors.points` scored by `predictions` (boxes and class probabilities)."""
        return task_aligned_assign(
            priors.points, candidate_min_side(priors), gt_boxes, gt_labels, predictions.boxes, predictions.scores,
            topk=self.topk, alpha=self.alpha, beta=self.beta, eps=self.eps, topk2=self.topk2, valid=valid,
        )
