"""Region proposal network: a 3×3 conv, objectness and box-delta predictors on every FPN level, MMDetection's RPN
targets and losses (max-IoU 0.7/0.3, 256 random samples, half positives; sigmoid CE + L1 on deltas) and batched
proposal selection (top-k per level, decode and clip, NMS per image and level, the best `post_nms`).

Everything runs on the padded batch at once: anchors are shared, proposals come back as a zero-padded
`[B, P, 4]` tensor with a count per image.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.assigners.max_iou import max_iou_assign
from crosskd.assigners.sampler import random_sample
from crosskd.errors import ConfigError
from crosskd.losses.detection import bce_with_logits, l1_loss, weight_reduce
from crosskd.ops.boxes import Priors, box_centers, delta_xywh_decode, delta_xywh_encode, make_anchors

from ..heads.base import flatten_levels
from ..heads.regions import VALID_REGIONS, padded_size, region_sizes, valid_prior_mask
from ..postprocess import Candidates, large_enough, nms_rows


class ProposalSettings(NamedTuple):
    """How proposals are chosen (MMDetection's rpn_proposal / test_cfg.rpn, torchvision's RPN arguments)."""

    pre_nms: int  # best anchors per level before NMS
    post_nms: int  # proposals kept per image after NMS
    iou: float  # NMS IoU threshold (within one image and level)
    min_size: float | None  # drop boxes whose clipped width or height is not above it; None keeps all
    score_thr: float = 0.0  # drop boxes whose objectness probability is below it (torchvision's rpn_score_thresh)


MMDET_TRAIN_PROPOSALS = ProposalSettings(2000, 1000, 0.7, 0.0)  # faster-rcnn_r50_fpn_1x train_cfg.rpn_proposal
MMDET_TEST_PROPOSALS = ProposalSettings(1000, 1000, 0.7, 0.0)  # test_cfg.rpn


class RPNOutputs(NamedTuple):
    """Raw per-level RPN outputs, identical in train and eval mode."""

    cls_scores: list[Tensor]  # [B, A, H, W] objectness logits
    bbox_preds: list[Tensor]  # [B, A*4, H, W] deltas (dx, dy, dw, dh), anchor-major


class Proposals(NamedTuple):
    """Proposals of a padded batch, score-descending per image."""

    boxes: Tensor  # [B, P, 4] xyxy input pixels, zero rows after each image's count
    scores: Tensor  # [B, P] objectness probabilities
    counts: Tensor  # [B] int64 proposals per image

    @property
    def valid(self) -> Tensor:
        """[B, P] True for real proposals."""
        return torch.arange(self.boxes.shape[1], device=self.boxes.device)[None] < self.counts[:, None]


class RPNHead(nn.Module):
    """RPN over FPN levels (MMDetection RPNHead / torchvision RPNHead: the same layers).

    Args:
        in_channels (int): FPN width.
        feat_channels (int): width of the 3×3 convs.
        num_convs (int): 3×3 conv + ReLU steps before the predictors: 1 (MMDetection, torchvision v1) or 2
            (torchvision's fasterrcnn_resnet50_fpn_v2, conv_depth=2); the first is `conv`, the rest `extra_convs`.
        strides: one per level (P2–P6: 4 … 64).
        anchor_scales, anchor_ratios: anchors of base size `stride · scale` per ratio (MMDetection: scale 8 → 32 on
            P2); `anchor_sizes` instead gives explicit per-level sizes, as many on every level (torchvision: one per
            level for ResNet-50, five for MobileNetV3), and `round_anchors` rounds them.
        clamp_below: the decoder clamps dw, dh from below too (MMDetection) or only from above (torchvision).
        pos_iou_thr, neg_iou_thr, min_pos_iou: the max-IoU assigner (low-quality matches allowed).
        num_samples, pos_fraction: the random sampler.
        train_proposals, test_proposals: ProposalSettings for training and inference.
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_scales: Sequence[float] = (8.0,),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_sizes: Sequence[Sequence[float]] | None = None,
        round_anchors: bool = False,
        clamp_below: bool = True,
        pos_iou_thr: float = 0.7,
        neg_iou_thr: float = 0.3,
        min_pos_iou: float = 0.3,
        num_samples: int = 256,
        pos_fraction: float = 0.5,
        train_proposals: ProposalSettings = MMDET_TRAIN_PROPOSALS,
        test_proposals: ProposalSettings = MMDET_TEST_PROPOSALS,
        loss_cls_weight: float = 1.0,
        loss_box_weight: float = 1.0,
        num_convs: int = 1,
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ConfigError(f"head.rpn_num_convs {num_convs} must be >= 1")
        self.strides, self.anchor_ratios = list(strides), list(anchor_ratios)
        self.anchor_scales, self.round_anchors, self.clamp_below = list(anchor_scales), round_anchors, clamp_below
        self.anchor_sizes = None if anchor_sizes is None else [list(s) for s in anchor_sizes]
        if self.anchor_sizes is not None and len(self.anchor_sizes) != len(self.strides):
            raise ConfigError(f"head.rpn_anchor_sizes needs one list per level ({len(self.strides)})")
        if self.anchor_sizes is not None and len({len(sizes) for sizes in self.anchor_sizes}) > 1:
            raise ConfigError("head.rpn_anchor_sizes needs as many sizes on every level (the RPN's convs share them)")
        per_location = self.anchor_scales if self.anchor_sizes is None else self.anchor_sizes[0]
        self.num_anchors = len(per_location) * len(self.anchor_ratios)
        self.assign_args = (pos_iou_thr, neg_iou_thr, min_pos_iou)
        self.num_samples, self.pos_fraction = num_samples, pos_fraction
        self.train_proposals, self.test_proposals = train_proposals, test_proposals
        self.loss_cls_weight, self.loss_box_weight = loss_cls_weight, loss_box_weight
        self.valid_region = "mmdet"
        self.conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(feat_channels, feat_channels, 3, padding=1) for _ in range(num_convs - 1)
        )
        self.cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)
        for conv in (self.conv, *self.extra_convs, self.cls, self.reg):  # MMDet, torchvision: normal(0, 0.01), bias 0
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> RPNOutputs:
        """Objectness [B, A, H, W] and deltas [B, A*4, H, W] per level from FPN maps [B, C, H, W]."""
        hidden = [self.hidden(x) for x in feats]
        return RPNOutputs([self.cls(h) for h in hidden], [self.reg(h) for h in hidden])

    def hidden(self, x: Tensor) -> Tensor:
        """The shared 3×3 conv + ReLU steps: FPN map [B, C, H, W] -> [B, feat_channels, H, W]."""
        x = F.relu(self.conv(x))
        for conv in self.extra_convs:
            x = F.relu(conv(x))
        return x

    def priors(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device | str) -> Priors:
        """Anchors of every level, ordered level, y, x, anchor (the order of `flatten`)."""
        explicit = self.anchor_sizes is not None
        base_sizes = [1.0] * len(self.strides) if explicit else [float(s) for s in self.strides]
        scales = self.anchor_sizes if explicit else self.anchor_scales
        sizes = [(int(h), int(w)) for h, w in feat_sizes]
        boxes = make_anchors(sizes, self.strides, base_sizes, scales, self.anchor_ratios, device,
                             round_corners=self.round_anchors)  # [N, 4]
        counts = [h * w * self.num_anchors for h, w in sizes]
        strides = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(counts, self.strides)])
        return Priors(boxes, box_centers(boxes), strides, counts)

    @staticmethod
    def flatten(outputs: RPNOutputs) -> tuple[Tensor, Tensor]:
        """Objectness logits [B, N] and deltas [B, N, 4] in prior order, float32."""
        cls = flatten_levels(outputs.cls_scores, 1)[..., 0].float()  # [B, N]
        return cls, flatten_levels(outputs.bbox_preds, 4).float()  # [B, N, 4]

    def use_valid_region(self, region: str) -> None:
        """Which anchors count in the targets: 'mmdet' (MMDetection's valid flags) or 'image' (the unpadded image)."""
        if region not in VALID_REGIONS:
            raise ConfigError(f"valid_region={region!r} is not valid; use one of {', '.join(VALID_REGIONS)}")
        self.valid_region = region

    def loss(self, outputs: RPNOutputs, priors: Priors, batch) -> dict[str, Tensor]:
        """`loss_rpn_cls` (sigmoid CE) and `loss_rpn_box` (L1 on deltas), both over the sampled anchors of the batch.

        `batch` has gt_boxes [B, M, 4] xyxy, gt_labels [B, M] (−1 padding) and optionally img_sizes [B, 2].
        """
        cls, reg = self.flatten(outputs)  # [B, N], [B, N, 4]
        with torch.no_grad():
            pos, neg, deltas = self.targets(priors, batch)
            num_samples = (pos | neg).sum().clamp(min=1).float()  # MMDetection: sampled positives + negatives
        loss_cls = weight_reduce(bce_with_logits(cls, pos.float()), (pos | neg).float(), num_samples)
        loss_box = weight_reduce(l1_loss(reg, deltas), pos[..., None].float(), num_samples)
        return {"loss_rpn_cls": loss_cls * self.loss_cls_weight, "loss_rpn_box": loss_box * self.loss_box_weight}

    @torch.no_grad()
    def targets(self, priors: Priors, batch) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled positives [B, N], negatives [B, N] and delta targets [B, N, 4] (zeros off the positives)."""
        gt_boxes, gt_labels = batch.gt_boxes.float(), batch.gt_labels
        valid = None
        if getattr(batch, "img_sizes", None) is not None:
            valid = valid_prior_mask(priors, region_sizes(batch.img_sizes, padded_size(batch), self.valid_region))
        objects = torch.where(gt_labels >= 0, 0, -1)  # one class: object
        pos_thr, neg_thr, min_pos = self.assign_args
        result = max_iou_assign(priors.boxes, gt_boxes, objects, pos_thr, neg_thr, min_pos, True, valid)
        pos, neg = random_sample(result.assigned_gt, self.num_samples, self.pos_fraction)
        anchors = priors.boxes.expand_as(result.gather_boxes(gt_boxes))  # [B, N, 4]
        matched = torch.where(pos[..., None], result.gather_boxes(gt_boxes), anchors)  # anchors: zero deltas
        return pos, neg, delta_xywh_encode(anchors, matched)

    @torch.no_grad()
    def proposals(
        self, outputs: RPNOutputs, priors: Priors, image_sizes: Tensor | tuple[int, int], settings: ProposalSettings
    ) -> Proposals:
        """The best `settings.pre_nms` anchors of each level, decoded and clipped to each image (`image_sizes`:
        [B, 2] (h, w), or one (h, w) for all), those large and likely enough (`min_size`, `score_thr`), NMS per
        image and level, the `settings.post_nms` best per image."""
        cls, reg = self.flatten(outputs)  # [B, N], [B, N, 4]
        batch = cls.shape[0]
        index, level = [], []
        start = 0
        for lvl, count in enumerate(priors.num_per_level):  # counts: ints, or traced 0-dim tensors (export)
            k = count.clamp(max=settings.pre_nms) if isinstance(count, Tensor) else min(settings.pre_nms, count)
            top = cls[:, start : start + count].topk(k, dim=1).indices  # [B, k]
            index.append(top + start)
            level.append(torch.full_like(top, lvl))
            start += count
        index, level = torch.cat(index, dim=1), torch.cat(level, dim=1)  # [B, K] each
        scores = cls.gather(1, index).sigmoid()  # [B, K]
        deltas = reg.gather(1, index[..., None].expand(-1, -1, 4))  # [B, K, 4]
        boxes = delta_xywh_decode(priors.boxes[index], deltas, clamp_below=self.clamp_below, max_shape=image_sizes)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if settings.min_size is not None:
            keep = large_enough(boxes, settings.min_size)  # [B, K]
        if settings.score_thr > 0:
            keep = keep & (scores >= settings.score_thr)
        image_index = torch.arange(batch, device=cls.device)[:, None].expand_as(index)  # [B, K]
        cand = Candidates(boxes[keep], scores[keep], level[keep], image_index[keep])
        rows, counts = nms_rows(cand, batch, len(priors.num_per_level), settings.iou, settings.post_nms)
        return Proposals(rows[..., :4], rows[..., 4], counts)
