"""What a dense head returns and trains on: raw per-level outputs, their flat view, and per-prior targets."""

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class HeadOutputs(NamedTuple):
    """Raw per-level head outputs, identical in train and eval mode."""

    cls_scores: list[Tensor]  # [B, A*C, H, W] logits
    bbox_preds: list[Tensor]  # [B, A*4, H, W] deltas / ltrb, or [B, 4*(reg_max+1), H, W] DFL logits
    centerness: list[Tensor] | None  # [B, A, H, W] logits (FCOS, ATSS)


class LevelOutput(NamedTuple):
    """One level's raw head outputs (one entry of each HeadOutputs list); R = 4, or 4*(reg_max+1) for GFL."""

    cls_score: Tensor  # [B, A*C, H, W]
    bbox_pred: Tensor  # [B, A*R, H, W]
    centerness: Tensor | None  # [B, A, H, W]


class FlatOutputs(NamedTuple):
    """Head outputs of all levels flattened to the prior order, in float32."""

    cls: Tensor  # [B, N, C] logits
    reg: Tensor  # [B, N, R]
    ctr: Tensor | None  # [B, N] logits


@dataclass
class Targets:
    """Per-prior training targets of a padded batch (no grad)."""

    assigned_gt: Tensor  # [B, N] gt index >= 0, -1 background, -2 ignored
    labels: Tensor  # [B, N] class id or -1
    label_weights: Tensor  # [B, N] 0 for ignored priors, else 1
    box_targets: Tensor  # [B, N, 4] xyxy pixels of the assigned gt (zeros elsewhere)
    pos_mask: Tensor  # [B, N] bool
    num_pos: Tensor  # scalar float, averaged over ranks, >= 1
    centerness_targets: Tensor | None = None  # [B, N] (FCOS, ATSS), zeros on non-positives
    centerness_denorm: Tensor | None = None  # scalar: averaged sum of positive centerness targets
    label_scores: Tensor | None = None  # [B, N] soft target of the assigned class (task-aligned), 0 off positives
