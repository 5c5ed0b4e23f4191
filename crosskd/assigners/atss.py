"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020), MMDet ATSSAssigner semantics, batched.

Only the centre distances cover every (prior, GT) pair; IoUs and every later step touch the K = Σ topk candidates
of each GT only. Candidate tensors are laid out `[B, M, K]`.
"""

import torch
from torch import Tensor

from crosskd.assigners.base import Assigner, Predictions
from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult
from crosskd.ops.boxes import Priors, aligned_box_iou, box_centers

INSIDE_EPS = 0.01


def _squared_centre_distances(centres: Tensor, gt_boxes: Tensor) -> Tensor:
    """`[B, M, N]` squared distance from each GT centre to the prior centres `[N, 2]` (same order as L2)."""
    gt_centres = box_centers(gt_boxes)  # [B, M, 2]
    dx = gt_centres[..., 0, None] - centres[:, 0]  # [B, M, N]
    dy = gt_centres[..., 1, None] - centres[:, 1]  # [B, M, N]
    return torch.addcmul(dx * dx, dy, dy)


def _topk_closest(distances: Tensor, num_per_level: list[int], topk: int) -> Tensor:
    """Indices `[B, M, K]` of the `topk` priors closest to each GT on every level (K = Σ min(topk, n_level))."""
    candidates, start = [], 0
    for count in num_per_level:
        nearest = distances[..., start : start + count].topk(min(topk, count), dim=-1, largest=False).indices
        candidates.append(nearest + start)
        start += count
    return torch.cat(candidates, dim=-1)


def _mean_plus_std(values: Tensor, mask: Tensor) -> Tensor:
    """Masked mean + unbiased std over the last dim of `[B, M, K]` -> `[B, M, 1]` (std 0, not NaN, for one value)."""
    weight = mask.to(values.dtype)
    count = weight.sum(-1, keepdim=True)
    mean = (values * weight).sum(-1, keepdim=True) / count.clamp(min=1)
    var = ((values - mean).pow(2) * weight).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    return mean + var.sqrt()


def _centres_inside(centres: Tensor, gt_boxes: Tensor) -> Tensor:
    """`[B, M, K]` True where a candidate's centre `[B, M, K, 2]` lies inside its GT by more than INSIDE_EPS."""
    top_left = centres - gt_boxes[:, :, None, :2]  # [B, M, K, 2]
    bottom_right = gt_boxes[:, :, None, 2:] - centres  # [B, M, K, 2]
    return torch.minimum(top_left, bottom_right).amin(-1) > INSIDE_EPS


def _resolve(candidates: Tensor, candidate_iou: Tensor, positive: Tensor, num_priors: int) -> tuple[Tensor, Tensor]:
    """Per prior, the positive GT with the highest IoU (lowest index on ties), else −1, and that IoU (else 0).

    Returns `assigned_gt [B, N]` and `assigned_iou [B, N]` from `[B, M, K]` candidates.
    """
    batch, num_gt = candidates.shape[:2]
    index = candidates.flatten(1)  # [B, M*K]
    pos_iou = candidate_iou.masked_fill(~positive, -1).flatten(1)  # [B, M*K]
    best_iou = candidate_iou.new_full((batch, num_priors), -1).scatter_reduce(1, index, pos_iou, "amax")
    winner = positive.flatten(1) & (pos_iou == best_iou.gather(1, index))  # [B, M*K]
    gt_index = torch.arange(num_gt, device=candidates.device)[None, :, None].expand_as(candidates).flatten(1)
    first = torch.full_like(best_iou, num_gt, dtype=torch.long)
    first = first.scatter_reduce(1, index, gt_index.masked_fill(~winner, num_gt), "amin")  # [B, N]
    assigned = torch.where(first < num_gt, first, BACKGROUND)
    return assigned, best_iou.clamp(min=0)


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
    `max_overlaps` is the IoU with the assigned GT for positives and 0 otherwise (MMDet: −inf).
    """
    batch, num_gt = gt_labels.shape
    num_priors = anchors.shape[0]
    if num_gt == 0:
        return AssignResult.all_background(batch, num_priors, anchors.device)
    centres = box_centers(anchors)  # [N, 2]
    distances = _squared_centre_distances(centres, gt_boxes)  # [B, M, N]
    if valid is not None:
        distances = distances.masked_fill(~valid[:, None], float("inf"))
    candidates = _topk_closest(distances, num_per_level, topk)  # [B, M, K]
    candidate_ok = (gt_labels >= 0)[..., None].expand_as(candidates)
    if valid is not None:
        candidate_ok = candidate_ok & valid.gather(1, candidates.flatten(1)).view_as(candidates)
    candidate_iou = aligned_box_iou(anchors[candidates], gt_boxes[:, :, None])  # [B, M, K]
    threshold = _mean_plus_std(candidate_iou, candidate_ok)  # [B, M, 1]
    positive = candidate_ok & (candidate_iou >= threshold) & _centres_inside(centres[candidates], gt_boxes)
    assigned, assigned_iou = _resolve(candidates, candidate_iou, positive, num_priors)
    if valid is not None:
        assigned = torch.where(valid, assigned, IGNORED)
    return AssignResult.build(assigned, gt_labels, assigned_iou)


class ATSSAssigner(Assigner):
    """`atss_assign` with `topk` candidates per level (GFL and ATSS heads' default)."""

    name = "atss"
    uses_boxes = True

    def __init__(self, topk: int = 9) -> None:
        self.topk = topk

    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        """ATSS on the anchor boxes; the predictions are not used."""
        return atss_assign(priors.boxes, priors.num_per_level, gt_boxes, gt_labels, topk=self.topk, valid=valid)
