"""The R-CNN stage of Faster R-CNN: RoIAlign over P2–P5, optional shared 3×3 convs (torchvision v2's
FastRCNNConvFCHead), shared fully connected layers (two in MMDetection and torchvision v1), a softmax classifier
(background last, MMDetection's order) and class-specific box deltas; MMDetection's 1× targets (max-IoU 0.5, ground
truth added as proposals, 512 random RoIs per image with 25 % positives) and losses (CE + L1 on deltas).

RoIs are flat `[K, 5]` rows (image index, x1, y1, x2, y2): the images of a batch hold different numbers of them.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.assigners.max_iou import max_iou_assign
from crosskd.assigners.sampler import random_sample
from crosskd.errors import ConfigError
from crosskd.losses.detection import l1_loss, weight_reduce
from crosskd.ops.boxes import clip_boxes, delta_xywh_decode, delta_xywh_encode
from crosskd.ops.roi import multilevel_roi_align

from ..heads.towers import NORMS, ConvBlock
from ..postprocess import Candidates, large_enough, nms_rows
from .rpn import Proposals


class RoIOutputs(NamedTuple):
    """Raw R-CNN outputs for K RoIs."""

    cls_score: Tensor  # [K, C+1] logits, background last
    bbox_pred: Tensor  # [K, R*4] deltas per class, R = C (MMDetection) or C+1 (torchvision: a background slot last)


class SampledRoIs(NamedTuple):
    """The RoIs a training step classifies, with their targets (no grad)."""

    rois: Tensor  # [K, 5] (image index, x1, y1, x2, y2)
    labels: Tensor  # [K] class id, C for background
    box_targets: Tensor  # [K, 4] normalised deltas to the matched GT (zeros for background)


def rois_from_proposals(proposals: Proposals) -> Tensor:
    """Flat RoIs [K, 5] (image index, box) of the real proposals of a padded batch, image by image."""
    image_index, slot = torch.nonzero(proposals.valid, as_tuple=True)  # [K] each
    return torch.cat([image_index[:, None].to(proposals.boxes.dtype), proposals.boxes[image_index, slot]], dim=1)


class RoIHead(nn.Module):
    """Shared2FCBBoxHead with its RoI extractor (MMDetection StandardRoIHead; torchvision TwoMLPHead + predictor), or
    with `num_convs` shared convs first (torchvision FastRCNNConvFCHead: 4 conv-BN-ReLU of 256, then one FC of 1024).

    Args:
        num_classes (int): C foreground classes.
        in_channels (int): FPN width.
        fc_channels, num_fcs: the shared fully connected layers (1024, 2).
        num_convs, conv_channels, conv_norm: shared 3×3 conv + norm + ReLU steps on the pooled [K, C, roi, roi]
            features before the FCs (0: none; torchvision v2: 4, 256, 'bn' with bias-free convs; 'none': with bias).
        roi_size, sampling_ratio, aligned, finest_scale: RoIAlign (MMDetection 7, 0, True, 56; torchvision 7, 2,
            False, 56) over `strides` (P2–P5).
        box_stds: delta normalisation (0.1, 0.1, 0.2, 0.2 = torchvision's weights 10, 10, 5, 5).
        box_background: the box predictor has a slot for the background class too (torchvision).
        clamp_below: the decoder clamps dw, dh from below too (MMDetection) or only from above (torchvision).
        pos_iou_thr, neg_iou_thr, min_pos_iou: the max-IoU assigner (no low-quality matches).
        num_samples, pos_fraction, add_gt_as_proposals: the random RoI sampler.
        min_bbox_size: inference drops boxes not wider and higher than it (None: keep all, MMDetection;
            torchvision 0.01).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        fc_channels: int = 1024,
        num_fcs: int = 2,
        roi_size: int = 7,
        strides: Sequence[int] = (4, 8, 16, 32),
        sampling_ratio: int = 0,
        aligned: bool = True,
        finest_scale: float = 56.0,
        box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        box_background: bool = False,
        clamp_below: bool = True,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.5,
        min_pos_iou: float = 0.5,
        num_samples: int = 512,
        pos_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 1.0,
        min_bbox_size: float | None = None,
        num_convs: int = 0,
        conv_channels: int = 256,
        conv_norm: str = "none",
    ) -> None:
        super().__init__()
        if conv_norm not in NORMS:
            raise ConfigError(f"head.conv_norm '{conv_norm}' is not one of {', '.join(NORMS)}")
        if num_convs < 0 or (num_convs and conv_channels < 1):
            raise ConfigError(f"head.num_convs {num_convs} / conv_channels {conv_channels} must be >= 0 / >= 1")
        self.num_classes, self.strides, self.roi_size = num_classes, list(strides), roi_size
        self.sampling_ratio, self.aligned, self.finest_scale = sampling_ratio, aligned, finest_scale
        self.box_stds, self.clamp_below = tuple(box_stds), clamp_below
        self.assign_args = (pos_iou_thr, neg_iou_thr, min_pos_iou)
        self.num_samples, self.pos_fraction, self.add_gt_as_proposals = num_samples, pos_fraction, add_gt_as_proposals
        self.loss_cls_weight, self.loss_box_weight, self.min_bbox_size = loss_cls_weight, loss_box_weight, min_bbox_size
        self.convs = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else conv_channels, conv_channels, conv_norm, act="relu")
            for i in range(num_convs)
        )
        flat = (conv_channels if num_convs else in_channels) * roi_size * roi_size
        widths = [flat] + [fc_channels] * num_fcs
        self.fcs = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(num_fcs))
        self.cls = nn.Linear(widths[-1], num_classes + 1)
        self.reg = nn.Linear(widths[-1], 4 * (num_classes + int(box_background)))
        for block in self.convs:  # torchvision FastRCNNConvFCHead: Kaiming-normal (fan out) convs
            nn.init.kaiming_normal_(block.conv.weight, mode="fan_out", nonlinearity="relu")
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)
        for fc in self.fcs:  # MMDetection's init: Xavier-uniform shared FCs, normal(0.01) classifier, normal(0.001) box
            nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        for layer in (*self.fcs, self.cls, self.reg):
            nn.init.zeros_(layer.bias)

    @property
    def num_fcs(self) -> int:
        """Number of shared fully connected layers."""
        return len(self.fcs)

    def pool(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """RoI features [K, C, roi_size, roi_size] for RoIs [K, 5] from the FPN maps at `strides` (the first ones)."""
        levels = feats[: len(self.strides)]
        return multilevel_roi_align(levels, rois, self.strides, self.roi_size, self.sampling_ratio, self.aligned,
                                    self.finest_scale)

    def pools_like(self, other: "RoIHead") -> bool:
        """True when `pool` of the two heads is one function (the same levels and RoIAlign settings)."""
        settings = ("strides", "roi_size", "sampling_ratio", "aligned", "finest_scale")
        return all(getattr(self, name) == getattr(other, name) for name in settings)

    @property
    def num_steps(self) -> int:
        """Shared steps of the R-CNN tower: the convs, then the FCs."""
        return len(self.convs) + len(self.fcs)

    def forward_tower(self, roi_feats: Tensor, stop: int) -> Tensor:
        """The shared features after the first `stop` tower steps (convs, then FCs; each with its ReLU): [K, C', roi,
        roi] while convs remain, then flattened [K, C'·roi²] (0 FCs done) or [K, fc_channels]. The R-CNN analogue of a
        dense head's tower (the CrossKD hold point)."""
        x = roi_feats  # [K, C, roi, roi]
        for block in self.convs[:stop]:
            x = block(x)
        if stop < len(self.convs):
            return x
        x = x.flatten(1)  # [K, C'*roi*roi]
        for fc in self.fcs[: stop - len(self.convs)]:
            x = F.relu(fc(x))
        return x

    def forward_from(self, feat: Tensor, start: int) -> RoIOutputs:
        """The rest of the head from the features of `forward_tower(·, start)`: class logits and box deltas."""
        for block in self.convs[start:]:
            feat = block(feat)
        feat = feat.flatten(1) if feat.dim() == 4 else feat  # [K, C'*roi*roi]
        for fc in self.fcs[max(start - len(self.convs), 0) :]:
            feat = F.relu(fc(feat))
        return RoIOutputs(self.cls(feat), self.reg(feat))

    def forward(self, roi_feats: Tensor) -> RoIOutputs:
        """Class logits [K, C+1] and deltas [K, R*4] from pooled RoI features [K, C, roi, roi]."""
        return self.forward_from(self.forward_tower(roi_feats, 0), 0)

    @torch.no_grad()
    def sample(self, proposals: Proposals, gt_boxes: Tensor, gt_labels: Tensor) -> SampledRoIs:
        """Assign the proposals (with the ground truth prepended) and sample the training RoIs of every image.

        Args:
            proposals: boxes [B, P, 4] with counts [B].
            gt_boxes: [B, M, 4] xyxy; gt_labels: [B, M] (−1 padding).
        """
        boxes, usable = proposals.boxes, proposals.valid  # [B, P, 4], [B, P]
        if self.add_gt_as_proposals:
            boxes, usable = torch.cat([gt_boxes, boxes], dim=1), torch.cat([gt_labels >= 0, usable], dim=1)
        pos_thr, neg_thr, min_pos = self.assign_args
        result = max_iou_assign(boxes, gt_boxes, gt_labels, pos_thr, neg_thr, min_pos, False, usable)
        pos, neg = random_sample(result.assigned_gt, self.num_samples, self.pos_fraction)
        image_index, slot = torch.nonzero(pos | neg, as_tuple=True)  # [K] each
        chosen = boxes[image_index, slot]  # [K, 4]
        is_pos = pos[image_index, slot]  # [K]
        labels = torch.where(is_pos, result.labels[image_index, slot], self.num_classes)
        matched = torch.where(is_pos[:, None], result.gather_boxes(gt_boxes)[image_index, slot], chosen)
        targets = delta_xywh_encode(chosen, matched, stds=self.box_stds)  # [K, 4], zeros for background
        return SampledRoIs(torch.cat([image_index[:, None].to(chosen.dtype), chosen], dim=1), labels, targets)

    def class_deltas(self, bbox_pred: Tensor, labels: Tensor) -> Tensor:
        """Deltas [K, 4] of each RoI's class `labels` [K] (background rows read class 0; mask them out)."""
        per_class = bbox_pred.unflatten(1, (-1, 4))  # [K, R, 4]
        index = labels.clamp(max=self.num_classes - 1)[:, None, None].expand(-1, 1, 4)  # [K, 1, 4]
        return per_class.gather(1, index).squeeze(1)

    def loss(self, outputs: RoIOutputs, sampled: SampledRoIs) -> dict[str, Tensor]:
        """`loss_cls` (softmax CE) and `loss_box` (L1 on the positives' class deltas), both over the K sampled RoIs
        of the batch (MMDetection's avg_factor for both)."""
        num_rois = max(sampled.labels.shape[0], 1)
        loss_cls = F.cross_entropy(outputs.cls_score.float(), sampled.labels, reduction="sum") / num_rois
        pos = (sampled.labels < self.num_classes)[:, None].float()  # [K, 1]
        deltas = self.class_deltas(outputs.bbox_pred.float(), sampled.labels)  # [K, 4]
        loss_box = weight_reduce(l1_loss(deltas, sampled.box_targets), pos, num_rois)
        return {"loss_cls": loss_cls * self.loss_cls_weight, "loss_box": loss_box * self.loss_box_weight}

    def decode(self, outputs: RoIOutputs, rois: Tensor, image_sizes: Tensor | tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Boxes [K, C, 4] xyxy clipped to each RoI's image (`image_sizes` [B, 2] (h, w) or one (h, w)) and class
        probabilities [K, C] (softmax without the background)."""
        scores = outputs.cls_score.float().softmax(dim=1)[:, : self.num_classes]  # [K, C]
        deltas = outputs.bbox_pred.float().unflatten(1, (-1, 4))[:, : self.num_classes]  # [K, C, 4]
        boxes = delta_xywh_decode(rois[:, None, 1:], deltas, stds=self.box_stds, clamp_below=self.clamp_below)
        if isinstance(image_sizes, Tensor):
            return clip_boxes(boxes, image_sizes[rois[:, 0].long()]), scores  # per-RoI (h, w): [K, 2]
        return clip_boxes(boxes, image_sizes), scores

    def detections(
        self, boxes: Tensor, scores: Tensor, image_index: Tensor, batch: int, conf: float, iou: float, max_det: int,
        multi_label: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Rows [B, max_det, 6] (x1, y1, x2, y2, score, class) and counts [B] from per-class boxes [K, C, 4] and
        scores [K, C] of RoIs in images `image_index` [K]: score > conf, NMS per image and class, max_det best."""
        if self.min_bbox_size is not None:
            scores = scores * large_enough(boxes, self.min_bbox_size)
        if not multi_label:  # only each RoI's best class
            scores = scores * F.one_hot(scores.argmax(dim=1), self.num_classes)
        roi, label = torch.nonzero(scores > conf, as_tuple=True)  # [P] each
        cand = Candidates(boxes[roi, label], scores[roi, label], label, image_index[roi])
        return nms_rows(cand, batch, self.num_classes, iou, max_det)
