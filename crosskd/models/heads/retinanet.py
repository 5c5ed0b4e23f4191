"""RetinaNet head: 9 anchors per location, plain conv towers, sigmoid focal loss and L1 on box deltas."""

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from crosskd.assigners import MaxIoUAssigner
from crosskd.losses.detection import l1_loss, weight_reduce
from crosskd.ops.boxes import delta_xywh_decode, delta_xywh_encode

from .base import DenseHead, HeadLayout, HeadOutputs, LevelOutput, Priors, Targets, anchor_scales


class RetinaHead(DenseHead):
    """RetinaNet head (MMDet defaults): MaxIoU assignment 0.5/0.4, focal γ2 α0.25, L1 on deltas, no Scale.

    Per level: cls_score [B, A*C, H, W] logits (A = 9 anchors), bbox_pred [B, A*4, H, W] (dx, dy, dw, dh)
    deltas normalised by `box_stds`, no centerness. Takes the `DenseHead` arguments (norm 'none' by default) plus
    its own below; `pos_iou_thr`, `neg_iou_thr`, `min_pos_iou`, `match_low_quality` set the default max-IoU
    assigner. torchvision's RetinaNet: `anchor_sizes` (its per-level pixel sizes, e.g. [32, 40, 50] at stride 8),
    `round_anchors` (whole-pixel base anchors) and `clamp_below=False` (its BoxCoder clamps dw, dh from above only).
    """

    head_type = "retinanet"
    mstrain = ((640, 800), "range")  # retinanet_r50_fpn_mstrain_640-800_3x_coco
    assigner_keys = ("pos_iou_thr", "neg_iou_thr", "min_pos_iou", "match_low_quality")

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *args: Any,
        norm: str = "none",
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_sizes: Sequence[Sequence[float]] | None = None,
        round_anchors: bool = False,
        clamp_below: bool = True,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        box_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality)
        scales = anchor_scales(octave_base_scale, scales_per_octave)
        layout = HeadLayout(assigner, scales, ratios, anchor_sizes, round_anchors, use_scale=False)
        super().__init__(num_classes, in_channels, *args, norm=norm, layout=layout, **kwargs)
        self.clamp_below = clamp_below
        self.box_stds, self.focal_gamma, self.focal_alpha = tuple(box_stds), focal_gamma, focal_alpha
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight}
        self.retina_cls = nn.Conv2d(self.cls_out_channels, self.num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(self.reg_out_channels, self.num_anchors * 4, 3, padding=1)
        self.init_weights(self.retina_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        return LevelOutput(self.retina_cls(cls_feat), self.retina_reg(reg_feat), None)

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """Deltas [B, N, 4] applied to the anchors → [B, N, 4] xyxy."""
        return delta_xywh_decode(priors.boxes, reg, stds=self.box_stds, clamp_below=self.clamp_below)

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        target_deltas = delta_xywh_encode(priors.boxes[idx], targets.box_targets[pos], stds=self.box_stds)  # [P, 4]
        losses = {
            "loss_cls": self.focal_cls_loss(flat.cls, targets, self.focal_gamma, self.focal_alpha),
            "loss_box": weight_reduce(l1_loss(flat.reg[pos], target_deltas), avg_factor=targets.num_pos),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
