"""RetinaNet head: 9 anchors per location, plain conv towers, sigmoid focal loss and L1 on box deltas."""

from collections.abc import Sequence

from torch import Tensor, nn

from crosskd.assigners import AssignResult, max_iou_assign
from crosskd.losses.detection import l1_loss, weight_reduce
from crosskd.ops.boxes import delta_xywh_decode, delta_xywh_encode

from .base import DEFAULT_STRIDES, DenseHead, HeadOutputs, LevelOutput, Priors, Targets, anchor_scales


class RetinaHead(DenseHead):
    """RetinaNet head (MMDet defaults): MaxIoU assignment 0.5/0.4, focal γ2 α0.25, L1 on deltas, no Scale.

    Per level: cls_score [B, A*C, H, W] logits (A = 9 anchors), bbox_pred [B, A*4, H, W] (dx, dy, dw, dh)
    deltas normalised by `box_stds`, no centerness. torchvision's RetinaNet: `anchor_sizes` (its per-level
    pixel sizes, e.g. [32, 40, 50] at stride 8), `round_anchors` (whole-pixel base anchors) and `clamp_below=False`
    (its BoxCoder clamps dw, dh from above only).
    """

    head_type = "retinanet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: str = "none",
        num_groups: int = 32,
        strides: Sequence[int] = DEFAULT_STRIDES,
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
    ) -> None:
        scales = anchor_scales(octave_base_scale, scales_per_octave)
        super().__init__(
            num_classes, in_channels, feat_channels, stacked_convs, norm, num_groups, strides, scales, ratios, False,
            anchor_sizes=anchor_sizes, round_anchors=round_anchors,
        )
        self.clamp_below = clamp_below
        self.assign_cfg = {
            "pos_iou_thr": pos_iou_thr,
            "neg_iou_thr": neg_iou_thr,
            "min_pos_iou": min_pos_iou,
            "match_low_quality": match_low_quality,
        }
        self.box_stds, self.focal_gamma, self.focal_alpha = tuple(box_stds), focal_gamma, focal_alpha
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight}
        self.retina_cls = nn.Conv2d(self.out_channels, self.num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(self.out_channels, self.num_anchors * 4, 3, padding=1)
        self.init_weights(self.retina_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        return LevelOutput(self.retina_cls(cls_feat), self.retina_reg(reg_feat), None)

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """Deltas [B, N, 4] applied to the anchors → [B, N, 4] xyxy."""
        return delta_xywh_decode(priors.boxes, reg, stds=self.box_stds, clamp_below=self.clamp_below)

    def assign(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None = None) -> AssignResult:
        return max_iou_assign(priors.boxes, gt_boxes, gt_labels, valid=valid, **self.assign_cfg)

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        target_deltas = delta_xywh_encode(priors.boxes[idx], targets.box_targets[pos], stds=self.box_stds)  # [P, 4]
        losses = {
            "loss_cls": self.focal_cls_loss(flat.cls, targets, self.focal_gamma, self.focal_alpha),
            "loss_box": weight_reduce(l1_loss(flat.reg[pos], target_deltas), avg_factor=targets.num_pos),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
