"""Generalized Focal Loss head (GFLv1): joint cls-quality scores and DFL box distributions, ATSS assignment."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from crosskd.assigners import ATSSAssigner
from crosskd.dist import reduce_mean
from crosskd.losses.detection import giou_loss, quality_focal_loss, weight_reduce
from crosskd.losses.dfl import DFL
from crosskd.ops.boxes import aligned_box_iou, distance_decode

from .base import DenseHead, HeadLayout, HeadOutputs, LevelOutput, Priors, Targets, anchor_scales


class GFLHead(DenseHead):
    """GFL head: QFL on the classifier, GIoU + DFL on `4*(reg_max+1)` distance-distribution logits.

    Per level: cls_score [B, A*C, H, W] joint class-quality logits, bbox_pred [B, A*4*(reg_max+1), H, W]
    DFL logits after the level's Scale (ltrb distances in stride units), no centerness. Takes the `DenseHead`
    arguments (towers, norm, act, strides, assigner) plus its own below; `topk` sets the default ATSS assigner.
    """

    head_type = "gfl"
    assigner_keys = ("topk",)

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *args: Any,
        octave_base_scale: float = 8.0,
        scales_per_octave: int = 1,
        ratios: Sequence[float] = (1.0,),
        reg_max: int = 16,
        topk: int = 9,
        qfl_beta: float = 2.0,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 2.0,
        loss_dfl_weight: float = 0.25,
        **kwargs: Any,
    ) -> None:
        scales = anchor_scales(octave_base_scale, scales_per_octave)
        layout = HeadLayout(ATSSAssigner(topk), scales, ratios)
        super().__init__(num_classes, in_channels, *args, layout=layout, **kwargs)
        self.reg_max, self.topk, self.qfl_beta, self.dfl = reg_max, topk, qfl_beta, DFL(reg_max)
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight, "loss_dfl": loss_dfl_weight}
        self.gfl_cls = nn.Conv2d(self.cls_out_channels, self.num_anchors * num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(self.reg_out_channels, self.num_anchors * self.dfl.channels, 3, padding=1)
        self.init_weights(self.gfl_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        return LevelOutput(self.gfl_cls(cls_feat), self.scales[level](self.gfl_reg(reg_feat)), None)

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """DFL logits [B, N, 4*(reg_max+1)] → expected ltrb × stride from the anchor centres → [B, N, 4] xyxy."""
        ltrb = self.dfl.integral(reg) * priors.strides[:, None]  # [B, N, 4] pixels
        return distance_decode(priors.points, ltrb)

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        stride = priors.strides[idx, None]  # [P, 1]
        points = priors.points[idx] / stride  # [P, 2] in stride units, as MMDet
        pos_reg = flat.reg[pos]  # [P, 4*(reg_max+1)]
        pred_boxes = self.dfl.decode(points, pos_reg)  # [P, 4] in stride units
        target_boxes = targets.box_targets[pos] / stride  # [P, 4]
        weight = flat.cls.detach().sigmoid().amax(-1)[pos]  # [P] the positive's top class score
        avg_factor = reduce_mean(weight.sum()).clamp(min=1.0)

        quality = torch.zeros_like(targets.label_weights)  # [B, N] IoU targets of the joint score
        quality[pos] = aligned_box_iou(pred_boxes.detach(), target_boxes)
        loss_cls = quality_focal_loss(flat.cls, targets.labels, quality, beta=self.qfl_beta)  # [B, N]
        loss_box = giou_loss(pred_boxes, target_boxes)  # [P]
        loss_dfl = self.dfl.loss(pos_reg, points, target_boxes)  # [P, 4]
        losses = {
            "loss_cls": weight_reduce(loss_cls, targets.label_weights, avg_factor=targets.num_pos),
            "loss_box": weight_reduce(loss_box, weight, avg_factor=avg_factor),
            "loss_dfl": weight_reduce(loss_dfl, weight[:, None].expand(-1, 4), avg_factor=4 * avg_factor),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
