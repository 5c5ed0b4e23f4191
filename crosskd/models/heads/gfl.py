"""Generalized Focal Loss head (GFLv1): joint cls-quality scores and DFL box distributions, ATSS assignment."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crosskd.assigners import AssignResult, atss_assign
from crosskd.dist import reduce_mean
from crosskd.losses.detection import distribution_focal_loss, giou_loss, quality_focal_loss, weight_reduce
from crosskd.ops.boxes import aligned_box_iou, distance_decode, distance_encode, integral_distribution

from .base import DEFAULT_STRIDES, DenseHead, HeadOutputs, LevelOutput, Priors, Targets, anchor_scales


class GFLHead(DenseHead):
    """GFL head: QFL on the classifier, GIoU + DFL on `4*(reg_max+1)` distance-distribution logits.

    Per level: cls_score [B, A*C, H, W] joint class-quality logits, bbox_pred [B, A*4*(reg_max+1), H, W]
    DFL logits after the level's Scale (ltrb distances in stride units), no centerness.
    """

    head_type = "gfl"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: str = "gn",
        num_groups: int = 32,
        strides: Sequence[int] = DEFAULT_STRIDES,
        octave_base_scale: float = 8.0,
        scales_per_octave: int = 1,
        ratios: Sequence[float] = (1.0,),
        reg_max: int = 16,
        topk: int = 9,
        qfl_beta: float = 2.0,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 2.0,
        loss_dfl_weight: float = 0.25,
    ) -> None:
        scales = anchor_scales(octave_base_scale, scales_per_octave)
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs, norm, num_groups, strides, scales, ratios, True
        )
        self.reg_max, self.topk, self.qfl_beta = reg_max, topk, qfl_beta
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight, "loss_dfl": loss_dfl_weight}
        self.gfl_cls = nn.Conv2d(self.out_channels, self.num_anchors * num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(self.out_channels, self.num_anchors * 4 * (reg_max + 1), 3, padding=1)
        self.init_weights(self.gfl_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        return LevelOutput(self.gfl_cls(cls_feat), self.scales[level](self.gfl_reg(reg_feat)), None)

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """DFL logits [B, N, 4*(reg_max+1)] → expected ltrb × stride from the anchor centres → [B, N, 4] xyxy."""
        ltrb = integral_distribution(reg, self.reg_max) * priors.strides[:, None]  # [B, N, 4] pixels
        return distance_decode(priors.points, ltrb)

    def assign(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None = None) -> AssignResult:
        return atss_assign(priors.boxes, priors.num_per_level, gt_boxes, gt_labels, topk=self.topk, valid=valid)

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        stride = priors.strides[idx, None]  # [P, 1]
        points = priors.points[idx] / stride  # [P, 2] in stride units, as MMDet
        pos_reg = flat.reg[pos]  # [P, 4*(reg_max+1)]
        pred_boxes = distance_decode(points, integral_distribution(pos_reg, self.reg_max))  # [P, 4]
        target_boxes = targets.box_targets[pos] / stride  # [P, 4]
        weight = flat.cls.detach().sigmoid().amax(-1)[pos]  # [P] the positive's top class score
        avg_factor = reduce_mean(weight.sum()).clamp(min=1.0)

        quality = torch.zeros_like(targets.label_weights)  # [B, N] IoU targets of the joint score
        quality[pos] = aligned_box_iou(pred_boxes.detach(), target_boxes)
        loss_cls = quality_focal_loss(flat.cls, targets.labels, quality, beta=self.qfl_beta)  # [B, N]
        loss_box = giou_loss(pred_boxes, target_boxes)  # [P]
        target_ltrb = distance_encode(points, target_boxes, max_dis=self.reg_max, eps=0.1)  # [P, 4]
        loss_dfl = distribution_focal_loss(pos_reg.reshape(-1, 4, self.reg_max + 1), target_ltrb)  # [P, 4]
        losses = {
            "loss_cls": weight_reduce(loss_cls, targets.label_weights, avg_factor=targets.num_pos),
            "loss_box": weight_reduce(loss_box, weight, avg_factor=avg_factor),
            "loss_dfl": weight_reduce(loss_dfl, weight[:, None].expand(-1, 4), avg_factor=4 * avg_factor),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
