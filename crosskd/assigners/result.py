"""The result every assigner returns: one encoding for the whole padded batch."""

from dataclasses import dataclass

import torch
from torch import Tensor

BACKGROUND = -1
IGNORED = -2


@dataclass
class AssignResult:
    """Matching of N priors to the padded ground truth of B images.

    assigned_gt: `[B, N]` long, the matched GT index (≥ 0) for positives, −1 background, −2 ignored.
    max_overlaps: `[B, N]` float, IoU with the assigned GT for positives; for the rest, the best IoU with any real GT
        where the assigner computes all IoUs (max-IoU), else 0 (ATSS, and FCOS, whose points have no extent).
    labels: `[B, N]` long, the class of the assigned GT for positives, else −1.
    scores: `[B, N]` float, the soft classification target of the assigned class for positives (task-aligned: the
        normalised alignment metric), 0 elsewhere; None: hard targets of 1.0 (every other assigner).
    """

    assigned_gt: Tensor
    max_overlaps: Tensor
    labels: Tensor
    scores: Tensor | None = None

    @property
    def pos_mask(self) -> Tensor:
        """`[B, N]` bool, True for positives."""
        return self.assigned_gt >= 0

    def gather_boxes(self, gt_boxes: Tensor) -> Tensor:
        """Assigned GT boxes `[B, N, 4]` from `gt_boxes [B, M, 4]`; zero rows for non-positives."""
        if gt_boxes.shape[1] == 0:
            return gt_boxes.new_zeros(*self.assigned_gt.shape, 4)
        index = self.assigned_gt.clamp(min=0)[..., None].expand(-1, -1, 4)  # [B, N, 4]
        boxes = gt_boxes.gather(1, index)
        return torch.where(self.pos_mask[..., None], boxes, torch.zeros_like(boxes))

    @classmethod
    def build(
        cls, assigned_gt: Tensor, gt_labels: Tensor, max_overlaps: Tensor | None = None, scores: Tensor | None = None
    ) -> "AssignResult":
        """Fill labels from `assigned_gt [B, N]` and `gt_labels [B, M]` (M ≥ 1); max_overlaps default to 0."""
        positive = assigned_gt >= 0
        labels = torch.where(positive, gt_labels.gather(1, assigned_gt.clamp(min=0)), BACKGROUND)
        if max_overlaps is None:
            max_overlaps = torch.zeros_like(assigned_gt, dtype=torch.float32)
        return cls(assigned_gt, max_overlaps, labels, scores)

    @classmethod
    def all_background(cls, batch: int, num_priors: int, device: torch.device) -> "AssignResult":
        """Every prior background (assigned_gt and labels −1, overlaps 0, each [B, N]): for zero padded GT."""
        assigned = torch.full((batch, num_priors), BACKGROUND, dtype=torch.long, device=device)
        return cls(assigned, torch.zeros(batch, num_priors, device=device), assigned.clone())
