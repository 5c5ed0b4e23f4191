"""ATSS head: one anchor per location, ATSS assignment, focal loss, GIoU on decoded deltas and centerness."""

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from crosskd.assigners import ATSSAssigner
from crosskd.losses.detection import giou_loss, weight_reduce
from crosskd.ops.boxes import delta_xywh_decode

from .base import DenseHead, HeadLayout, HeadOutputs, LevelOutput, Priors, Targets, anchor_scales


class ATSSHead(DenseHead):
    """ATSS head (MMDet defaults): GN towers, Scale on deltas (stds 0.1/0.2), centerness from the reg branch.

    Per level: cls_score [B, A*C, H, W] logits (A = 1 anchor), bbox_pred [B, A*4, H, W] (dx, dy, dw, dh) deltas
    after the level's Scale, centerness [B, A, H, W] logits. Takes the `DenseHead` arguments plus its own below;
    `topk` sets the default ATSS assigner.
    """

    head_type = "atss"
    mstrain = ((480, 800), "range")  # MMDetection ships no ATSS mstrain config: GFL's (the same lineage)
    with_centerness = True
    assigner_keys = ("topk",)

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *args: Any,
        octave_base_scale: float = 8.0,
        scales_per_octave: int = 1,
        ratios: Sequence[float] = (1.0,),
        topk: int = 9,
        box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 2.0,
        loss_ctr_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        scales = anchor_scales(octave_base_scale, scales_per_octave)
        layout = HeadLayout(ATSSAssigner(topk), scales, ratios)
        super().__init__(num_classes, in_channels, *args, layout=layout, **kwargs)
        self.topk, self.box_stds = topk, tuple(box_stds)
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight, "loss_ctr": loss_ctr_weight}
        self.atss_cls = nn.Conv2d(self.cls_out_channels, self.num_anchors * num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(self.reg_out_channels, self.num_anchors * 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(self.reg_out_channels, self.num_anchors, 3, padding=1)
        self.init_weights(self.atss_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        bbox_pred = self.scales[level](self.atss_reg(reg_feat))
        return LevelOutput(self.atss_cls(cls_feat), bbox_pred, self.atss_centerness(reg_feat))

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """Deltas [B, N, 4] applied to the anchors → [B, N, 4] xyxy."""
        return delta_xywh_decode(priors.boxes, reg, stds=self.box_stds)

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        pred_boxes = delta_xywh_decode(priors.boxes[idx], flat.reg[pos], stds=self.box_stds)  # [P, 4]
        loss_box = giou_loss(pred_boxes, targets.box_targets[pos])  # [P]
        losses = {
            "loss_cls": self.focal_cls_loss(flat.cls, targets, self.focal_gamma, self.focal_alpha),
            "loss_box": weight_reduce(loss_box, targets.centerness_targets[pos], avg_factor=targets.centerness_denorm),
            "loss_ctr": self.centerness_loss(flat.ctr, targets),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
