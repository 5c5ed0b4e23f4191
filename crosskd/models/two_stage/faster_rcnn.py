"""Faster R-CNN (FPN): the YAML's `head: {type: faster_rcnn}` section (RPN + R-CNN stage) and the detector.

Where the two-stage case widens the dense head contract (docs/architecture.md, "The CrossKD seam"):
- the "head" is two modules, `head.rpn` (an `RPNHead`, dense: anchors, max-IoU targets, per-level outputs) and
  `head.roi_head` (an `RoIHead` on pooled RoI features), and the second stage's input depends on the first's
  output, so `FasterRCNN.forward` returns `TwoStageOutputs` (RPN outputs, proposals, their RoIs and the R-CNN
  outputs) instead of `HeadOutputs`; proposals are chosen with the test settings there, and with the training
  settings (then sampled against the ground truth) inside `loss`, so `loss` is not `forward` followed by targets;
- R-CNN outputs are per RoI, flat `[K, ...]` over the batch (images hold different numbers of RoIs), where dense
  outputs are per prior `[B, N, ...]`;
- the hold point of CrossKD is in the R-CNN stage's fully connected "tower" (`RoIHead.forward_tower/forward_from`),
  not in a conv tower with per-level scales;
- inference has no dense `decode` step: eager `predict` and the exported graph (`ExportModel`) share
  `detection_rows` instead (anchors from `traceable_priors`, proposals, RoIAlign, R-CNN, per-class NMS), which
  returns the NMS-embedded layout [B, max_det, 6] directly, so a Faster R-CNN always exports with NMS in the graph.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crosskd.ops.boxes import Priors

from ..dense_detector import DenseDetector
from ..postprocess import Detections, to_original_pixels, traceable_priors, unpad
from .roi_head import RoIHead, RoIOutputs, SampledRoIs, rois_from_proposals
from .rpn import Proposals, ProposalSettings, RPNHead, RPNOutputs


class TwoStageOutputs(NamedTuple):
    """Everything inference computes for a batch (eval-mode proposals)."""

    rpn: RPNOutputs
    proposals: Proposals  # boxes [B, P, 4], scores [B, P], counts [B]
    rois: Tensor  # [K, 5] (image index, x1, y1, x2, y2): the real proposals, image by image
    rcnn: RoIOutputs  # cls_score [K, C+1], bbox_pred [K, R*4]


class TwoStageLoss(NamedTuple):
    """A training pass: the losses and what the distiller reuses from it."""

    losses: dict[str, Tensor]  # loss_rpn_cls, loss_rpn_box, loss_cls, loss_box
    feats: list[Tensor]  # FPN maps P2–P6, each [B, C, H/s, W/s]
    rois: Tensor  # [K, 5] the sampled training RoIs (image index, x1, y1, x2, y2)
    roi_feats: Tensor  # [K, C, roi, roi] the R-CNN stage's pooled features at `rois`


class FasterRCNNHead(nn.Module):
    """The two stages of Faster R-CNN, built from the flat keys of the YAML's head section (`rpn_*`: the RPN,
    `rcnn_*` and `roi_*`: the R-CNN stage; defaults are MMDetection's faster-rcnn_r50_fpn_1x).

    `strides` are the FPN levels of the RPN (P2–P6; levels may share a stride, as torchvision's MobileNetV3 FPN's
    32, 32, 64); RoIs are pooled from the first `roi_levels` of them (P2–P5). `rpn_anchor_sizes` gives each level's
    anchor sizes (several per location: torchvision's MobileNetV3 models have 5 sizes × 3 ratios = 15), and
    `rpn_score_thr` drops proposals of lower objectness (torchvision's rpn_score_thresh). `rpn_num_convs` 3×3 convs
    precede the RPN predictors (torchvision v2: 2); the box head runs `num_convs` shared 3×3 convs of
    `conv_channels` with `conv_norm` (torchvision v2: 4, 256, 'bn') before its `num_fcs` FCs.
    """

    head_type = "faster_rcnn"
    mstrain: tuple[tuple[int, ...], str] = ((640, 800), "range")  # faster-rcnn_r50_fpn_mstrain_3x_coco

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        rpn_feat_channels: int = 256,
        rpn_num_convs: int = 1,
        rpn_anchor_scales: Sequence[float] = (8.0,),
        rpn_anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_anchor_sizes: Sequence[Sequence[float]] | None = None,
        round_anchors: bool = False,
        clamp_below: bool = True,
        rpn_pos_iou_thr: float = 0.7,
        rpn_neg_iou_thr: float = 0.3,
        rpn_min_pos_iou: float = 0.3,
        rpn_num_samples: int = 256,
        rpn_pos_fraction: float = 0.5,
        rpn_train_pre_nms: int = 2000,
        rpn_train_post_nms: int = 1000,
        rpn_test_pre_nms: int = 1000,
        rpn_test_post_nms: int = 1000,
        rpn_nms_iou: float = 0.7,
        rpn_min_bbox_size: float | None = 0.0,
        rpn_score_thr: float = 0.0,
        rpn_loss_cls_weight: float = 1.0,
        rpn_loss_box_weight: float = 1.0,
        roi_levels: int = 4,
        roi_size: int = 7,
        roi_sampling_ratio: int = 0,
        roi_aligned: bool = True,
        roi_finest_scale: float = 56.0,
        fc_channels: int = 1024,
        num_fcs: int = 2,
        num_convs: int = 0,
        conv_channels: int = 256,
        conv_norm: str = "none",
        box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        box_background: bool = False,
        rcnn_pos_iou_thr: float = 0.5,
        rcnn_neg_iou_thr: float = 0.5,
        rcnn_min_pos_iou: float = 0.5,
        rcnn_num_samples: int = 512,
        rcnn_pos_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 1.0,
        min_bbox_size: float | None = None,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.strides = num_classes, in_channels, list(strides)
        self.level_channels = [in_channels] * len(self.strides)  # the FPN width per level, as DenseHead's
        self.rpn = RPNHead(
            in_channels, rpn_feat_channels, strides, rpn_anchor_scales, rpn_anchor_ratios, rpn_anchor_sizes,
            round_anchors, clamp_below, rpn_pos_iou_thr, rpn_neg_iou_thr, rpn_min_pos_iou, rpn_num_samples,
            rpn_pos_fraction,
            ProposalSettings(rpn_train_pre_nms, rpn_train_post_nms, rpn_nms_iou, rpn_min_bbox_size, rpn_score_thr),
            ProposalSettings(rpn_test_pre_nms, rpn_test_post_nms, rpn_nms_iou, rpn_min_bbox_size, rpn_score_thr),
            rpn_loss_cls_weight, rpn_loss_box_weight, rpn_num_convs,
        )
        self.roi_head = RoIHead(
            num_classes, in_channels, fc_channels, num_fcs, roi_size, self.strides[:roi_levels], roi_sampling_ratio,
            roi_aligned, roi_finest_scale, box_stds, box_background, clamp_below, rcnn_pos_iou_thr, rcnn_neg_iou_thr,
            rcnn_min_pos_iou, rcnn_num_samples, rcnn_pos_fraction, add_gt_as_proposals, loss_cls_weight,
            loss_box_weight, min_bbox_size, num_convs, conv_channels, conv_norm,
        )

    @property
    def num_anchors(self) -> int:
        """Anchors per RPN location."""
        return self.rpn.num_anchors

    @property
    def min_bbox_size(self) -> float | None:
        """The R-CNN stage's inference size filter."""
        return self.roi_head.min_bbox_size

    def use_valid_region(self, region: str) -> None:
        """Which RPN anchors count in the targets (the run setting valid_region)."""
        self.rpn.use_valid_region(region)


class FasterRCNN(DenseDetector):
    """Faster R-CNN taking 0..1 RGB images [B, 3, H, W]: normalise → backbone → FPN (P2–P6) → RPN → RoIAlign → R-CNN.

    The engine's calls keep their signatures: `loss(batch)`, `predict(images, conf, iou, max_det, ...)`,
    `predict_with_loss(batch, ...)`; `nms_pre` does not apply (the RPN's own proposal settings do).
    """

    head: FasterRCNNHead
    two_stage = True

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> TwoStageOutputs:
        """Inference outputs for images [B, 3, H, W]; proposals clipped to `image_sizes` [B, 2] (h, w) when given,
        else to the input."""
        return self.run_stages(self.extract_features(images), images, image_sizes)

    def run_stages(self, feats: list[Tensor], images: Tensor, image_sizes: Tensor | None) -> TwoStageOutputs:
        """RPN, test-setting proposals and R-CNN outputs from FPN maps `feats` (trace-safe: the anchors are shifted
        from one cell's, so a traced graph keeps H and W as inputs)."""
        rpn, roi_head = self.head.rpn, self.head.roi_head
        rpn_out = rpn(feats)
        priors = traceable_priors(rpn, [f.shape[-2:] for f in feats], images.device)
        sizes = tuple(images.shape[-2:]) if image_sizes is None else image_sizes
        proposals = rpn.proposals(rpn_out, priors, sizes, rpn.test_proposals)
        rois = rois_from_proposals(proposals)  # [K, 5]
        return TwoStageOutputs(rpn_out, proposals, rois, roi_head(roi_head.pool(feats, rois)))

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """RPN and R-CNN losses of a `Batch` (images [B, 3, H, W], gt_boxes [B, M, 4] xyxy, gt_labels [B, M])."""
        return self.loss_and_rois(batch).losses

    def loss_and_rois(self, batch: Any) -> "TwoStageLoss":
        """`loss(batch)` with the FPN maps, the sampled training RoIs and their pooled features (what CrossKD's
        cross-head pass feeds the teacher's R-CNN stage)."""
        feats = self.extract_features(batch.images)
        settings = self.head.rpn.train_proposals if self.training else self.head.rpn.test_proposals
        return TwoStageLoss(*self.losses_from(feats, batch, settings))

    def losses_from(
        self, feats: list[Tensor], batch: Any, settings: ProposalSettings
    ) -> tuple[dict[str, Tensor], list[Tensor], Tensor, Tensor]:
        """The four losses from FPN maps (RPN on its anchors, R-CNN on RoIs sampled from `settings`' proposals), the
        maps, those sampled RoIs [K, 5] and their pooled features [K, C, roi, roi]."""
        rpn, roi_head = self.head.rpn, self.head.roi_head
        rpn_out = rpn(feats)
        priors = rpn.priors([tuple(f.shape[-2:]) for f in feats], batch.images.device)
        losses = rpn.loss(rpn_out, priors, batch)
        sampled = self.sample_from(rpn_out, priors, batch, settings)
        pooled = roi_head.pool(feats, sampled.rois)
        losses |= roi_head.loss(roi_head(pooled), sampled)
        return losses, feats, sampled.rois, pooled

    def sampled_rois(self, feats: list[Tensor], batch: Any, settings: ProposalSettings) -> SampledRoIs:
        """The RoIs the R-CNN stage trains on for FPN maps `feats` (`settings`' proposals sampled against the
        batch's ground truth), with their labels [K] (C: background) and box targets; no losses."""
        rpn = self.head.rpn
        priors = rpn.priors([tuple(f.shape[-2:]) for f in feats], batch.images.device)
        return self.sample_from(rpn(feats), priors, batch, settings)

    def sample_from(self, rpn_out: RPNOutputs, priors: Priors, batch: Any, settings: ProposalSettings) -> SampledRoIs:
        """Proposals of `settings` from RPN outputs, clipped to each image, sampled against the ground truth."""
        sizes = getattr(batch, "img_sizes", None)
        sizes = tuple(batch.images.shape[-2:]) if sizes is None else sizes
        proposals = self.head.rpn.proposals(rpn_out, priors, sizes, settings)
        return self.head.roi_head.sample(proposals, batch.gt_boxes.float(), batch.gt_labels)

    def detect(
        self, outputs: TwoStageOutputs, images: Tensor, conf: float, iou: float, max_det: int, multi_label: bool,
        img_sizes: Tensor | None,
    ) -> list[Detections]:
        """Per-image detections (input pixels) from the inference outputs."""
        return unpad(*self.rows_from(outputs, images, conf, iou, max_det, multi_label, img_sizes))

    def rows_from(
        self, outputs: TwoStageOutputs, images: Tensor, conf: float, iou: float, max_det: int, multi_label: bool,
        img_sizes: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Rows [B, max_det, 6] (x1, y1, x2, y2, score, class; input pixels, zero rows after each image's) and
        counts [B] from the inference outputs; boxes clipped to `img_sizes` [B, 2] (h, w), else to the input."""
        roi_head = self.head.roi_head
        sizes = tuple(images.shape[-2:]) if img_sizes is None else img_sizes
        boxes, scores = roi_head.decode(outputs.rcnn, outputs.rois, sizes)  # [K, C, 4], [K, C]
        image_index = outputs.rois[:, 0].long()
        return roi_head.detections(boxes, scores, image_index, images.shape[0], conf, iou, max_det, multi_label)

    def detection_rows(
        self, images: Tensor, conf: float = 0.05, iou: float = 0.5, max_det: int = 100, multi_label: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Images [B, 3, H, W] 0..1 RGB -> rows [B, max_det, 6] and counts [B]: the whole inference, trace-safe (what
        an exported graph runs; boxes clipped to the input)."""
        return self.rows_from(self(images), images, conf, iou, max_det, multi_label, None)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        conf: float = 0.05,
        iou: float = 0.5,
        max_det: int = 100,
        nms_pre: int = 1000,
        ratios: Tensor | None = None,
        multi_label: bool = True,
        img_sizes: Tensor | None = None,
    ) -> list[Detections]:
        """Detections per image (boxes [K, 4] xyxy in input pixels, or original-image pixels with `ratios` [B]);
        proposals and boxes clipped to each image's (h, w) `img_sizes` [B, 2] when given. `nms_pre` is unused."""
        dets = self.detect(self(images, img_sizes), images, conf, iou, max_det, multi_label, img_sizes)
        if ratios is not None:
            dets = to_original_pixels(dets, ratios)
        return dets

    @torch.no_grad()
    def predict_with_loss(
        self, batch: Any, conf: float = 0.05, iou: float = 0.5, max_det: int = 100, nms_pre: int = 1000,
        multi_label: bool = True,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Detections (original-image pixels) and the losses of a batch from one backbone pass; the R-CNN losses
        sample their RoIs from the test-setting proposals."""
        feats = self.extract_features(batch.images)
        img_sizes = getattr(batch, "img_sizes", None)
        outputs = self.run_stages(feats, batch.images, img_sizes)
        losses = self.losses_from(feats, batch, self.head.rpn.test_proposals)[0]
        dets = self.detect(outputs, batch.images, conf, iou, max_det, multi_label, img_sizes)
        return to_original_pixels(dets, batch.ratios), losses

    def decode(self, images: Tensor) -> Any:
        """Not available: a two-stage detector's per-class boxes come from its RoIs (see `detection_rows`)."""
        raise NotImplementedError("Faster R-CNN has no dense decode step; use detection_rows")
