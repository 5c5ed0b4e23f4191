"""Turn decoded boxes and class scores into detections: threshold, top-k per level, batched class-aware NMS."""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms


class Detections(NamedTuple):
    """Detections of one image."""

    boxes: Tensor  # [K, 4] xyxy
    scores: Tensor  # [K]
    labels: Tensor  # [K] int64


def _topk_per_level(boxes: Tensor, scores: Tensor, num_per_level: Sequence[int], conf: float, nms_pre: int):
    """Best `nms_pre` (prior, class) pairs above `conf` per level: boxes [B, K, 4], scores [B, K], labels [B, K]."""
    batch, _, num_classes = scores.shape
    out_boxes, out_scores, out_labels = [], [], []
    for level_boxes, level_scores in zip(boxes.split(num_per_level, 1), scores.split(num_per_level, 1)):
        flat = level_scores.reshape(batch, -1)  # [B, n*C] index = prior * C + class
        flat = flat.masked_fill(flat <= conf, -1.0)
        k = flat.shape[1] if nms_pre <= 0 else min(nms_pre, flat.shape[1])
        top_scores, top_idx = flat.topk(k, dim=1)  # [B, k]
        prior_idx = top_idx // num_classes
        out_boxes.append(level_boxes.gather(1, prior_idx[..., None].expand(-1, -1, 4)))  # [B, k, 4]
        out_scores.append(top_scores)
        out_labels.append(top_idx % num_classes)
    return torch.cat(out_boxes, 1), torch.cat(out_scores, 1), torch.cat(out_labels, 1)


def postprocess(
    boxes: Tensor,
    scores: Tensor,
    num_per_level: Sequence[int],
    conf: float = 0.05,
    iou: float = 0.6,
    max_det: int = 100,
    nms_pre: int = 1000,
) -> list[Detections]:
    """Detections per image from boxes [B, N, 4] xyxy and scores [B, N, C] (priors ordered level-major).

    Per level keep the `nms_pre` best (prior, class) pairs scoring above `conf` (MMDet), then one class-aware
    `batched_nms` over the whole batch (groups = image · C + class) and the `max_det` best per image.
    """
    batch, num_classes = scores.shape[0], scores.shape[2]
    cand_boxes, cand_scores, cand_labels = _topk_per_level(boxes, scores, num_per_level, conf, nms_pre)
    keep = cand_scores > conf  # [B, K]
    image_idx = keep.nonzero(as_tuple=True)[0]  # [P]
    cand_boxes, cand_scores, cand_labels = cand_boxes[keep], cand_scores[keep], cand_labels[keep]
    kept = batched_nms(cand_boxes.float(), cand_scores.float(), image_idx * num_classes + cand_labels, iou)  # by score
    kept = kept[torch.sort(image_idx[kept], stable=True).indices]  # grouped by image, score-descending inside
    counts = torch.bincount(image_idx[kept], minlength=batch)  # [B]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=kept.device) - torch.repeat_interleave(starts, counts)
    kept = kept[rank < max_det]
    sizes = counts.clamp(max=max_det).tolist()
    return [
        Detections(b, s, lab)
        for b, s, lab in zip(
            cand_boxes[kept].split(sizes), cand_scores[kept].split(sizes), cand_labels[kept].split(sizes)
        )
    ]


def scale_boxes(boxes: Tensor, ratio: float | Tensor) -> Tensor:
    """Boxes in input pixels → original-image pixels (input = original × ratio)."""
    return boxes / ratio
