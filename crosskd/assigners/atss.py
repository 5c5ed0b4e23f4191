"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020), MMDet ATSSAssigner semantics, batched."""

import torch
from torch import Tensor

from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult
from crosskd.ops.boxes import batched_box_iou, box_centers

INSIDE_EPS = 0.01


def _topk_closest(distances: Tensor, num_per_level: list[int], topk: int) -> Tensor:
    """Indices `[B, K, M]` of the `topk` priors closest to each GT on every level (K = Σ min(topk, n_level))."""
    candidates, start = [], 0
    for count in num_per_level:
        k = min(topk, count)
        nearest = distances[:, start : start + count].topk(k, dim=1, largest=False).indices  # [B, k, M]
        candidates.append(nearest + start)
        start += count
    return torch.cat(candidates, dim=1)


def _mean_plus_std(values: Tensor, mask: Tensor) -> Tensor:
    """Masked mean + unbiased std over dim 1 of `[B, K, M]` -> `[B, M]` (std 0, not NaN, for a single candidate)."""
    weight = mask.to(values.dtype)
    count = weight.sum(1)
    mean = (values * weight).sum(1) / count.clamp(min=1)
    var = ((values - mean[:, None]).pow(2) * weight).sum(1) / (count - 1).clamp(min=1)
    return mean + var.sqrt()


def _centres_inside(centres: Tensor, candidates: Tensor, gt_boxes: Tensor) -> Tensor:
    """`[B, K, M]` True where the candidate prior's centre lies inside its GT by more than INSIDE_EPS."""
    cx, cy = centres[:, 0][candidates], centres[:, 1][candidates]  # [B, K, M] each
    x1, y1, x2, y2 = gt_boxes[:, None].unbind(-1)  # [B, 1, M] each
    margin = torch.minimum(torch.minimum(cx - x1, cy - y1), torch.minimum(x2 - cx, y2 - cy))
    return margin > INSIDE_EPS


def _squared_centre_distances(centres: Tensor, gt_boxes: Tensor) -> Tensor:
    """`[B, N, M]` squared distance from prior centres `[N, 2]` to GT centres (same order as L2)."""
    gt_centres = box_centers(gt_boxes)  # [B, M, 2]
    dx = centres[None, :, None, 0] - gt_centres[:, None, :, 0]  # [B, N, M]
    dy = centres[None, :, None, 1] - gt_centres[:, None, :, 1]  # [B, N, M]
    return torch.addcmul(dx * dx, dy, dy)


def _highest_iou_positive(overlaps: Tensor, candidates: Tensor, positive_iou: Tensor) -> Tensor:
    """`[B, N]` the GT for which a prior is positive with the highest IoU, else −1.

    `positive_iou [B, K, M]` holds the candidates' IoUs, −inf where not positive. Candidates of one GT are distinct
    priors, so scattering them back per GT column never collides.
    """
    scattered = torch.full_like(overlaps, float("-inf")).scatter(1, candidates, positive_iou)  # [B, N, M]
    best_iou, best_gt = scattered.max(dim=2)
    return torch.where(best_iou > float("-inf"), best_gt, BACKGROUND)


@torch.no_grad()
def atss_assign(
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    topk: int = 9,
    valid: Tensor | None = None,
) -> AssignResult:
    """Assign anchors `[N, 4]` to padded GT `gt_boxes [B, M, 4]`, `gt_labels [B, M]` (−1 = padding).

    Per level, the `topk` anchors whose centres are closest to a GT's centre are its candidates; those with
    IoU ≥ mean + std of the candidates' IoUs and with the centre strictly inside the GT are positive. An anchor
    positive for several GTs takes the one with the highest IoU; all others are background. Anchors where
    `valid [B, N]` is False (outside the image) are never candidates and come back ignored (−2).
    """
    batch, num_gt = gt_labels.shape
    if num_gt == 0:
        return AssignResult.all_background(batch, anchors.shape[0], anchors.device)
    gt_valid = gt_labels >= 0  # [B, M]
    overlaps = batched_box_iou(anchors, gt_boxes).masked_fill(~gt_valid[:, None], 0)  # [B, N, M]
    centres = box_centers(anchors)  # [N, 2]
    distances = _squared_centre_distances(centres, gt_boxes)  # [B, N, M]
    if valid is not None:
        distances = distances.masked_fill(~valid[..., None], float("inf"))
    candidates = _topk_closest(distances, num_per_level, topk)  # [B, K, M]
    candidate_ok = gt_valid[:, None].expand_as(candidates)
    if valid is not None:
        candidate_ok = candidate_ok & valid.gather(1, candidates.flatten(1)).view_as(candidates)
    candidate_iou = overlaps.gather(1, candidates)  # [B, K, M]
    threshold = _mean_plus_std(candidate_iou, candidate_ok)  # [B, M]
    positive = candidate_ok & (candidate_iou >= threshold[:, None]) & _centres_inside(centres, candidates, gt_boxes)
    assigned = _highest_iou_positive(overlaps, candidates, candidate_iou.masked_fill(~positive, float("-inf")))
    if valid is not None:
        assigned = torch.where(valid, assigned, IGNORED)
    return AssignResult.build(assigned, gt_labels, overlaps)
