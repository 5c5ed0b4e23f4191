"""Inference post-processing: decode and clamp, top-k per level, score threshold, class-aware NMS, max_det.

Boxes are clipped to each image's own (h, w) before NMS when the caller knows it (`img_sizes`, as MMDetection's
`max_shape` and torchvision do): a box reaching into a smaller image's batch padding would otherwise survive NMS
beside its clipped twin and come out identical to it after the final clip. A traced graph has only the padded
input's size, so an NMS-embedded graph's rows are clipped and suppressed again on the host (`reclip_detections`).
Boxes whose clipped width or height is not above `min_bbox_size` are dropped (MMDetection's test_cfg check; 0, its
default, drops boxes without area, e.g. lying wholly in the padding: two of them never overlap, so NMS could not
merge them); `min_bbox_size=None` keeps every box, as torchvision's detectors do.

One path serves `DenseDetector.predict`, the exported graphs (`ExportModel`) and the exported-model backends. Every
step is trace-safe: under torch.jit.trace and the ONNX exporter the batch, H and W stay graph inputs (sizes read from
tensor shapes are traced 0-dim tensors there, plain ints in eager mode). `select_detections` is the core: it returns
the zero-padded [B, max_det, 6] tensor an NMS-embedded graph outputs plus the count per image, and `postprocess`
splits it into per-image `Detections`.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from crosskd.ops.boxes import clip_boxes

from .heads import DenseHead, HeadOutputs, Priors


class Detections(NamedTuple):
    """Detections of one image, score-descending."""

    boxes: Tensor  # [K, 4] xyxy
    scores: Tensor  # [K]
    labels: Tensor  # [K] int64


class Decoded(NamedTuple):
    """Dense predictions of a batch, priors ordered level-major."""

    boxes: Tensor  # [B, N, 4] xyxy input pixels, clamped to the input
    scores: Tensor  # [B, N, C] final class probabilities
    num_per_level: list  # priors per level: ints, or 0-dim tensors while tracing


def traceable_priors(head: DenseHead, feat_sizes: Sequence, device: torch.device | str) -> Priors:
    """`head.priors` for feature-map sizes [(H, W), ...] that may be traced: each level's cell-(0, 0) priors shifted
    over the grid.

    Anchors and points are translation invariant (the cell at (x, y) adds (x*s, y*s)), so a traced graph keeps H and
    W as inputs instead of baking the export size into constants. Boxes and strides equal `head.priors` bit for bit
    (anchor centres up to float rounding); training and target assignment keep `head.priors`.
    """
    cell = head.priors([(1, 1)] * len(feat_sizes), device)  # the A priors of cell (0, 0) on every level
    num_anchors = cell.num_per_level[0]
    boxes, points, strides, counts = [], [], [], []
    for level, ((height, width), stride) in enumerate(zip(feat_sizes, head.strides, strict=True)):
        ys = torch.arange(height, device=device, dtype=torch.float32) * stride
        xs = torch.arange(width, device=device, dtype=torch.float32) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
        shifts = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # [H*W, 2]
        part = slice(level * num_anchors, (level + 1) * num_anchors)
        level_points = (shifts[:, None] + cell.points[part][None]).reshape(-1, 2)  # [H*W*A, 2]
        boxes.append((shifts.repeat(1, 2)[:, None] + cell.boxes[part][None]).reshape(-1, 4))  # [H*W*A, 4]
        points.append(level_points)
        strides.append(torch.full_like(level_points[:, 0], float(stride)))
        counts.append(height * width * num_anchors)
    return Priors(torch.cat(boxes), torch.cat(points), torch.cat(strides), counts)


def decode_outputs(head: DenseHead, outputs: HeadOutputs, image_hw: Sequence) -> Decoded:
    """Boxes [B, N, 4] xyxy clamped to an input of `image_hw` (H, W), scores [B, N, C] and priors per level.

    `outputs` are the head's raw outputs for images [B, 3, H, W]; pass `images.shape[-2:]` so that a trace keeps
    the sizes dynamic.
    """
    feat_sizes = [score.shape[-2:] for score in outputs.cls_scores]
    priors = traceable_priors(head, feat_sizes, outputs.cls_scores[0].device)
    flat = head.flatten_outputs(outputs)
    boxes = clip_boxes(head.decode_boxes(flat.reg, priors), tuple(image_hw))  # [B, N, 4]
    return Decoded(boxes, head.scores(flat), priors.num_per_level)


def topk_per_level(scores: Tensor, num_per_level: Sequence, nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `nms_pre` best (prior, class) pairs of every level (all of them when `nms_pre` <= 0).

    Args:
        scores: [B, N, C] class probabilities, priors ordered level-major.
        num_per_level: priors per level, summing to N.
    Returns:
        scores [B, K], prior index [B, K] into N, class [B, K]; K = Σ min(nms_pre, n·C) over levels.
    """
    batch, _, num_classes = scores.shape
    values, indices, start = [], [], 0
    for count in num_per_level:
        level = scores[:, start : start + count].reshape(batch, -1)  # [B, n*C], index = prior * C + class
        k = count * num_classes  # an int, or a traced 0-dim tensor that keeps the graph's k dynamic
        if nms_pre > 0:
            k = k.clamp(max=nms_pre) if isinstance(k, Tensor) else min(k, nms_pre)
        top, index = level.topk(k, dim=1)  # [B, k]
        values.append(top)
        indices.append(index + start * num_classes)
        start = start + count
    index = torch.cat(indices, dim=1)  # [B, K]
    return torch.cat(values, dim=1), index // num_classes, index % num_classes


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou: float) -> Tensor:
    """NMS within groups: boxes [M, 4] xyxy, scores [M], groups [M] -> kept indices [K], score-descending.

    Eager: torchvision's `batched_nms`, which for many boxes runs one `nms` per group (the RPN's 5 levels x 2000
    boxes per image cost the sum of the groups' squares, not the square of the sum). Traced (ONNX, TorchScript): each
    group is moved by its own coordinate offset (batched_nms' trick) so that one `nms` op never suppresses across
    groups; a zero joins the min/max so that empty input traces and runs.
    """
    if not torch.jit.is_tracing():
        return batched_nms(boxes, scores, groups, iou)
    coords = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)])
    span = coords.max() - coords.min() + 1
    return nms(boxes + (groups.to(boxes.dtype) * span)[:, None], scores, iou)


def rank_in_image(image_index: Tensor, batch: int | Tensor) -> tuple[Tensor, Tensor]:
    """Place of each row among its image's rows, keeping their order: image_index [M] -> rank [M], counts [B]."""
    same_image = image_index[:, None] == torch.arange(batch, device=image_index.device)[None]  # [M, B]
    rank = (same_image.long().cumsum(0) - 1).gather(1, image_index[:, None]).squeeze(1)  # [M]
    return rank, same_image.sum(0)


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    num_per_level: Sequence,
    conf: float = 0.05,
    iou: float = 0.6,
    max_det: int = 100,
    nms_pre: int = 1000,
    multi_label: bool = True,
    min_bbox_size: float | None = 0.0,
) -> tuple[Tensor, Tensor]:
    """The batch's detections as one zero-padded tensor: the core of eager and exported post-processing.

    Per level keep the `nms_pre` best (prior, class) pairs (MMDet), drop those scoring <= `conf`, run one
    class-aware NMS over the whole batch (groups = image · C + class) and keep the `max_det` best per image.
    With `multi_label` a prior may give one detection per class above `conf` (COCO evaluation); without, only its
    best class (Ultralytics predict: one class per box).

    Args:
        boxes: [B, N, 4] xyxy.
        scores: [B, N, C] class probabilities; priors ordered level-major, `num_per_level` of them per level.
    Returns:
        rows [B, max_det, 6] (x1, y1, x2, y2, score, class), score-descending, zero rows after the detections;
        counts [B] int64, the number of detections per image.
    """
    batch, _, num_classes = scores.shape
    if min_bbox_size is not None:  # a box too small scores 0, below any conf
        scores = scores * large_enough(boxes, min_bbox_size)[..., None]  # [B, N, C]
    if multi_label:
        cand_scores, prior_index, labels = topk_per_level(scores, num_per_level, nms_pre)  # [B, K] each
    else:
        best, best_class = scores.max(dim=-1, keepdim=True)  # [B, N, 1] each: the best class of every prior
        cand_scores, prior_index, _ = topk_per_level(best, num_per_level, nms_pre)  # [B, K] each
        labels = best_class[..., 0].gather(1, prior_index)  # [B, K]
    cand_boxes = boxes.gather(1, prior_index[..., None].expand(-1, -1, 4))  # [B, K, 4]
    image_index = torch.arange(batch, device=boxes.device)[:, None].expand_as(labels)  # [B, K]
    valid = cand_scores.reshape(-1) > conf  # [B*K]
    cand_boxes, cand_scores = cand_boxes.reshape(-1, 4)[valid], cand_scores.reshape(-1)[valid]  # [P, 4], [P]
    labels, image_index = labels.reshape(-1)[valid], image_index.reshape(-1)[valid]  # [P] each
    return nms_rows(Candidates(cand_boxes, cand_scores, labels, image_index), batch, num_classes, iou, max_det)


class Candidates(NamedTuple):
    """Detection candidates of a batch, one row each."""

    boxes: Tensor  # [P, 4] xyxy
    scores: Tensor  # [P]
    labels: Tensor  # [P] int64
    image_index: Tensor  # [P] int64, the image of each row


def nms_rows(
    cand: Candidates, batch: int | Tensor, num_classes: int, iou: float, max_det: int
) -> tuple[Tensor, Tensor]:
    """Class-aware NMS per image over `cand`, then the `max_det` best per image as rows [B, max_det, 6] (x1, y1, x2,
    y2, score, class; zero rows after the detections) and counts [B]."""
    keep = grouped_nms(cand.boxes, cand.scores, cand.image_index * num_classes + cand.labels, iou)  # [M] by score
    image_index = cand.image_index[keep]
    rank, counts = rank_in_image(image_index, batch)  # [M], [B]
    kept = rank < max_det
    found = torch.cat([cand.boxes[keep], cand.scores[keep, None], cand.labels[keep, None].to(cand.boxes.dtype)], 1)
    rows = cand.boxes.new_zeros(batch, max_det, 6)
    rows[image_index[kept], rank[kept]] = found[kept]
    return rows, counts.clamp(max=max_det)


def reclip_detections(
    rows: Tensor, counts: Tensor, img_sizes: Tensor, num_classes: int, iou: float, min_bbox_size: float | None = 0.0
) -> tuple[Tensor, Tensor]:
    """Detection rows [B, K, 6] (`counts` [B] per image) clipped to each image's (h, w) `img_sizes` [B, 2] and
    suppressed again per image and class: for an NMS-embedded graph, which clipped only to its padded input."""
    batch, max_det = rows.shape[:2]
    boxes = clip_boxes(rows[..., :4], img_sizes)  # [B, K, 4]
    present = torch.arange(max_det, device=rows.device)[None] < counts[:, None]  # [B, K]
    if min_bbox_size is not None:
        present = present & large_enough(boxes, min_bbox_size)
    image_index = torch.arange(batch, device=rows.device)[:, None].expand(-1, max_det)[present]  # [P]
    boxes = boxes[present]  # [P, 4]
    cand = Candidates(boxes, rows[..., 4][present], rows[..., 5][present].long(), image_index)
    return nms_rows(cand, batch, num_classes, iou, max_det)


def large_enough(boxes: Tensor, min_bbox_size: float) -> Tensor:
    """[...] True where xyxy boxes [..., 4] are wider and higher than `min_bbox_size`."""
    return (boxes[..., 2] - boxes[..., 0] > min_bbox_size) & (boxes[..., 3] - boxes[..., 1] > min_bbox_size)


def unpad(rows: Tensor, counts: Tensor) -> list[Detections]:
    """Per-image `Detections` (views) from padded rows [B, max_det, 6] and counts [B]."""
    return [Detections(r[:n, :4], r[:n, 4], r[:n, 5].long()) for r, n in zip(rows, counts.tolist(), strict=True)]


def postprocess(
    boxes: Tensor,
    scores: Tensor,
    num_per_level: Sequence[int],
    conf: float = 0.05,
    iou: float = 0.6,
    max_det: int = 100,
    nms_pre: int = 1000,
    multi_label: bool = True,
    img_sizes: Tensor | None = None,
    min_bbox_size: float | None = 0.0,
) -> list[Detections]:
    """Detections per image from boxes [B, N, 4] xyxy and scores [B, N, C]: `select_detections`, split per image.

    `img_sizes` [B, 2] (h, w): each image's own region of the padded input; its boxes are clipped to it before NMS.
    """
    boxes = boxes if img_sizes is None else clip_boxes(boxes, img_sizes)
    return unpad(*select_detections(boxes, scores, num_per_level, conf, iou, max_det, nms_pre, multi_label,
                                    min_bbox_size))


def scale_boxes(boxes: Tensor, ratio: float | Tensor) -> Tensor:
    """Boxes in input pixels → original-image pixels (input = original × ratio)."""
    return boxes / ratio


def to_original_pixels(dets: list[Detections], ratios: Tensor) -> list[Detections]:
    """Each image's detections with their boxes in original-image pixels (`ratios` [B]: input = original × ratio)."""
    return [d._replace(boxes=scale_boxes(d.boxes, r)) for d, r in zip(dets, ratios, strict=True)]
