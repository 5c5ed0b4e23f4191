"""FCOS head: anchor-free points, per-level regress ranges, focal loss, IoU loss and centerness."""

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.assigners import FCOSAssigner
from crosskd.assigners.fcos import REGRESS_RANGES
from crosskd.errors import ConfigError
from crosskd.losses.detection import giou_loss, iou_loss, weight_reduce
from crosskd.ops.boxes import distance_decode

from .base import DenseHead, FlatOutputs, HeadLayout, HeadOutputs, LevelOutput, Priors, Targets

BOX_LOSSES = ("iou", "giou")


class FCOSHead(DenseHead):
    """FCOS head (MMDet defaults): GN towers, exp(Scale(reg)) distances (relu and stride units with norm_on_bbox).

    Per level: cls_score [B, C, H, W] logits, bbox_pred [B, 4, H, W] ltrb distances (pixels, or stride units
    with `norm_on_bbox`), centerness [B, 1, H, W] logits. Takes the `DenseHead` arguments plus its own below;
    `regress_ranges`, `center_sampling`, `center_sample_radius` set the default FCOS assigner. `conv_bias=True`
    keeps a bias on the GN tower convs (MMDet `conv_bias=True` configs); None gives a bias only without a norm.
    torchvision's FCOS is `norm_on_bbox`, `centerness_on_reg`, `conv_bias=True`, plus `use_scale=False` (no
    learnable Scale), `point_offset=0` (points at index × stride) and `sqrt_scores` (score = sqrt(cls · ctr)).
    """

    head_type = "fcos"
    mstrain = ((640, 800), "choice")  # fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco
    kd_offset = 2
    with_centerness = True
    centerness_denorm_min = 1e-6
    min_one_pos_per_image = False  # MMDet FCOS: num_pos = max(reduce_mean(total positives), 1)
    mmdet_valid_flags = False  # MMDet FCOS assigns every point, padding included (its KD terms too)
    assigner_keys = ("regress_ranges", "center_sampling", "center_sample_radius")

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *args: Any,
        regress_ranges: Sequence[Sequence[float]] = REGRESS_RANGES,
        center_sampling: bool = False,
        center_sample_radius: float = 1.5,
        norm_on_bbox: bool = False,
        centerness_on_reg: bool = False,
        use_scale: bool = True,
        point_offset: float = 0.5,
        sqrt_scores: bool = False,
        box_loss: str = "iou",
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 1.0,
        loss_ctr_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        assigner = FCOSAssigner(regress_ranges, center_sampling, center_sample_radius)
        layout = HeadLayout(assigner, point_offset=point_offset, use_scale=use_scale)
        super().__init__(num_classes, in_channels, *args, layout=layout, **kwargs)
        if len(regress_ranges) != len(self.strides):
            raise ConfigError(f"head.regress_ranges has {len(regress_ranges)} ranges for {len(self.strides)} strides")
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"head.box_loss '{box_loss}' is not one of {', '.join(BOX_LOSSES)}")
        self.regress_ranges = assigner.regress_ranges
        self.center_sampling, self.center_sample_radius = center_sampling, center_sample_radius
        self.norm_on_bbox, self.centerness_on_reg, self.box_loss = norm_on_bbox, centerness_on_reg, box_loss
        self.sqrt_scores = sqrt_scores
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        self.loss_weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight, "loss_ctr": loss_ctr_weight}
        ctr_channels = self.reg_out_channels if centerness_on_reg else self.cls_out_channels
        self.conv_cls = nn.Conv2d(self.cls_out_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(self.reg_out_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(ctr_channels, 1, 3, padding=1)
        self.init_weights(self.conv_cls)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        bbox_pred = self.conv_reg(reg_feat)
        bbox_pred = (bbox_pred if self.scales is None else self.scales[level](bbox_pred)).float()
        bbox_pred = F.relu(bbox_pred) if self.norm_on_bbox else bbox_pred.exp()
        centerness = self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
        return LevelOutput(self.conv_cls(cls_feat), bbox_pred, centerness)

    def scores(self, flat: FlatOutputs) -> Tensor:
        """Per-class scores [B, N, C]: sigmoid(cls) · sigmoid(ctr), or its square root with `sqrt_scores`."""
        scores = super().scores(flat)
        return scores.sqrt() if self.sqrt_scores else scores

    def _pixels(self, ltrb: Tensor, strides: Tensor) -> Tensor:
        """Distances in pixels: stride units × stride with `norm_on_bbox`."""
        return ltrb * strides[..., None] if self.norm_on_bbox else ltrb

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """ltrb distances [B, N, 4] from the points → [B, N, 4] xyxy."""
        return distance_decode(priors.points, self._pixels(reg, priors.strides))

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        flat = self.flatten_outputs(outputs)
        pos, idx = targets.pos_mask, self.pos_prior_index(targets)
        pred_boxes = distance_decode(priors.points[idx], self._pixels(flat.reg[pos], priors.strides[idx]))  # [P, 4]
        target_boxes = targets.box_targets[pos]  # [P, 4]
        loss_box = (
            giou_loss(pred_boxes, target_boxes) if self.box_loss == "giou" else iou_loss(pred_boxes, target_boxes)
        )
        losses = {
            "loss_cls": self.focal_cls_loss(flat.cls, targets, self.focal_gamma, self.focal_alpha),
            "loss_box": weight_reduce(loss_box, targets.centerness_targets[pos], avg_factor=targets.centerness_denorm),
            "loss_ctr": self.centerness_loss(flat.ctr, targets),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
