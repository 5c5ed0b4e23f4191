"""Max-IoU assignment (RetinaNet), MMDet MaxIoUAssigner semantics, batched."""

import torch
from torch import Tensor

from crosskd.assigners.base import Assigner, Predictions
from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult
from crosskd.ops.boxes import Priors, batched_box_iou, per_image_box_iou


def _low_quality_matches(overlaps: Tensor, min_pos_iou: float) -> Tensor:
    """`[B, N]` GT index whose best anchors include this one (the last such GT, as MMDet's loop), else −1.

    A GT takes all anchors tying its best IoU when that IoU is ≥ min_pos_iou and > 0 (padded GT columns hold −1).
    """
    gt_best = overlaps.max(dim=1).values  # [B, M]
    eligible = (gt_best >= min_pos_iou) & (gt_best > 0)
    ties = (overlaps == gt_best[:, None]) & eligible[:, None]  # [B, N, M]
    last = overlaps.shape[2] - 1 - ties.flip(2).to(torch.uint8).argmax(dim=2)  # argmax returns the first maximum
    return torch.where(ties.any(dim=2), last, -1)


@torch.no_grad()
def max_iou_assign(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    valid: Tensor | None = None,
) -> AssignResult:
    """Assign anchors `[N, 4]` (or per-image boxes `[B, N, 4]`, e.g. proposals) to padded GT `gt_boxes [B, M, 4]`,
    `gt_labels [B, M]` (−1 = padding).

    An anchor's best IoU < neg_iou_thr makes it background, ≥ pos_iou_thr positive for that GT, and anything in
    between ignored (−2). With `match_low_quality`, each GT then also claims every anchor tying its best IoU
    (if ≥ min_pos_iou and > 0, so a GT that overlaps nothing claims nothing). Anchors where `valid [B, N]` is
    False take part in nothing and come back ignored.
    """
    batch, num_gt = gt_labels.shape
    if num_gt == 0:
        result = AssignResult.all_background(batch, anchors.shape[-2], anchors.device)
        if valid is not None:  # candidates outside their image (or padded proposals) stay ignored
            result.assigned_gt = torch.where(valid, result.assigned_gt, IGNORED)
        return result
    gt_valid = gt_labels >= 0  # [B, M]
    usable = gt_valid[:, None] if valid is None else gt_valid[:, None] & valid[..., None]  # [B, N|1, M]
    overlaps = batched_box_iou(anchors, gt_boxes) if anchors.dim() == 2 else per_image_box_iou(anchors, gt_boxes)
    overlaps = overlaps.masked_fill(~usable, -1)  # [B, N, M]
    best_iou, best_gt = overlaps.max(dim=2)  # [B, N]
    assigned = torch.full_like(best_gt, IGNORED)
    assigned = torch.where(best_iou < neg_iou_thr, BACKGROUND, assigned)
    assigned = torch.where(best_iou >= pos_iou_thr, best_gt, assigned)
    if match_low_quality:
        low_quality = _low_quality_matches(overlaps, min_pos_iou)
        assigned = torch.where(low_quality >= 0, low_quality, assigned)
    if valid is not None:
        assigned = torch.where(valid, assigned, IGNORED)
    assigned_iou = overlaps.gather(2, assigned.clamp(min=0)[..., None]).squeeze(-1)  # [B, N]
    max_overlaps = torch.where(assigned >= 0, assigned_iou, best_iou).clamp(min=0)
    return AssignResult.build(assigned, gt_labels, max_overlaps)


class MaxIoUAssigner(Assigner):
    """`max_iou_assign` with its thresholds (RetinaNet's default)."""

    name = "max_iou"
    uses_boxes = True

    def __init__(
        self,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
    ) -> None:
        self.pos_iou_thr, self.neg_iou_thr, self.min_pos_iou = pos_iou_thr, neg_iou_thr, min_pos_iou
        self.match_low_quality = match_low_quality

    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        """Max-IoU on the anchor boxes; the predictions are not used."""
        return max_iou_assign(
            priors.boxes,
            gt_boxes,
            gt_labels,
            pos_iou_thr=self.pos_iou_thr,
            neg_iou_thr=self.neg_iou_thr,
            min_pos_iou=self.min_pos_iou,
            match_low_quality=self.match_low_quality,
            valid=valid,
        )
