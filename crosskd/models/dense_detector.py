"""DenseDetector: normalise → backbone → FPN → dense head, with thin loss and predict compositions."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .heads import DenseHead, HeadOutputs, Priors
from .postprocess import Decoded, Detections, decode_outputs, postprocess, to_original_pixels

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 units (MMDetection's img_norm_cfg / data_preprocessor)
IMAGENET_STD = (58.395, 57.12, 57.375)


class DenseDetector(nn.Module):
    """A single-stage dense detector taking 0..1 RGB images [B, 3, H, W].

    Args:
        backbone (nn.Module): normalised images [B, 3, H, W] → maps at strides 8, 16, 32 (`out_channels`).
        neck (nn.Module): those maps → FPN outputs [B, C, H/s, W/s] for every stride s of the head.
        head (DenseHead): FPN outputs → HeadOutputs; owns priors, targets, losses and box decoding.
        yaml (dict | None): the model YAML it was built from (saved in checkpoints).
        mean, std (3 floats): per-channel normalisation in 0..255 units, in the backbone's channel order
            (ImageNet RGB by default; MMDetection caffe-style weights: BGR means, std 1).
        bgr (bool): reverse the channels to BGR before normalising (MMDetection caffe-style weights).
    """

    two_stage = False  # FasterRCNN: proposals and an R-CNN stage after the FPN (the distiller's passes differ)

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: DenseHead,
        yaml: dict[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        bgr: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.bgr = bgr
        # (x·255 − mean) / std as (x − mean/255) / (std/255): ImageNet's is exactly (x − 0.485) / 0.229 ...
        self.register_buffer("mean", torch.tensor([m / 255 for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([s / 255 for s in std]).view(1, 3, 1, 1), persistent=False)
        self.yaml = dict(yaml or {})
        # NHWC conv weights: oneDNN then runs every conv (and its backward) channels-last, the first conv converting the
        # input once; ~6% off a CPU train step (benchmarks/profile_step.py). Outputs equal NCHW's within float error.
        self.to(memory_format=torch.channels_last)

    @property
    def strides(self) -> list[int]:
        """FPN strides in pixels, e.g. [8, 16, 32, 64, 128]."""
        return self.head.strides

    @property
    def head_type(self) -> str:
        """'gfl', 'retinanet', 'fcos' or 'atss'."""
        return self.head.head_type

    @property
    def nc(self) -> int:
        """Number of classes."""
        return self.head.num_classes

    def normalise(self, images: Tensor) -> Tensor:
        """Backbone input [B, 3, H, W] for 0..1 RGB images: (x·255 − mean) / std, channels reversed first if `bgr`."""
        if self.bgr:
            images = images.flip(1)  # RGB -> BGR
        return (images - self.mean) / self.std

    def extract_features(self, images: Tensor) -> list[Tensor]:
        """FPN outputs P3..P7, each [B, C, H/s, W/s], for 0..1 RGB images [B, 3, H, W]."""
        return self.neck(self.backbone(self.normalise(images)))

    def forward(self, images: Tensor) -> HeadOutputs:
        """Raw per-level head outputs (cls_scores [B, A*C, H/s, W/s], ...) for 0..1 RGB images [B, 3, H, W]."""
        return self.head(self.extract_features(images))

    def priors_for(self, outputs: HeadOutputs) -> Priors:
        """The priors matching the feature-map sizes of `outputs`."""
        feat_sizes = [tuple(m.shape[-2:]) for m in outputs.cls_scores]
        return self.head.priors(feat_sizes, outputs.cls_scores[0].device)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """Detection losses (scalars) of a `Batch`: images [B, 3, H, W], gt_boxes [B, M, 4] xyxy, gt_labels [B, M]."""
        outputs = self(batch.images)
        priors = self.priors_for(outputs)
        targets = self.head.get_targets(priors, batch, outputs)
        return self.head.loss(outputs, priors, targets)

    def decode(self, images: Tensor) -> Decoded:
        """Boxes [B, N, 4] xyxy clamped to the input, scores [B, N, C] and priors per level for images [B, 3, H, W].

        Trace-safe (the exported graphs start from it).
        """
        return decode_outputs(self.head, self(images), images.shape[-2:])

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        conf: float = 0.05,
        iou: float = 0.6,
        max_det: int = 100,
        nms_pre: int = 1000,
        ratios: Tensor | None = None,
        multi_label: bool = True,
        img_sizes: Tensor | None = None,
    ) -> list[Detections]:
        """Detections per image for 0..1 RGB images [B, 3, H, W] (score threshold, top-k per level, NMS, max_det).

        Boxes [K, 4] xyxy are in input pixels or, with `ratios` [B], in original-image pixels. `multi_label`: every
        class above `conf` per prior (COCO evaluation) or only the best one (one class per box). `img_sizes` [B, 2]
        (h, w) of each image inside the padded input: boxes are clipped to it before NMS (else to the input).
        """
        dets = postprocess(*self.decode(images), conf, iou, max_det, nms_pre, multi_label, img_sizes,
                           self.head.min_bbox_size)
        if ratios is not None:
            dets = to_original_pixels(dets, ratios)
        return dets

    @torch.no_grad()
    def predict_with_loss(
        self, batch: Any, conf: float = 0.05, iou: float = 0.6, max_det: int = 100, nms_pre: int = 1000,
        multi_label: bool = True,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """`predict(batch.images, ..., ratios=batch.ratios, img_sizes=batch.img_sizes)` and `loss(batch)` from one
        forward pass: the validation losses at the cost of the assigner only. Boxes [K, 4] xyxy in original-image
        pixels."""
        outputs = self(batch.images)
        priors = self.priors_for(outputs)
        losses = self.head.loss(outputs, priors, self.head.get_targets(priors, batch, outputs))
        decoded = decode_outputs(self.head, outputs, batch.images.shape[-2:])
        dets = postprocess(*decoded, conf, iou, max_det, nms_pre, multi_label, getattr(batch, "img_sizes", None),
                           self.head.min_bbox_size)
        return to_original_pixels(dets, batch.ratios), losses
