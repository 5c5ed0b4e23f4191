"""Box utilities, priors (anchors and points) and box coders.

Boxes are xyxy pixels unless named otherwise; `*_ltrb` are (left, top, right, bottom) distances from a point.
Prior ordering everywhere: level-major, then y, x, then anchor within a location.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

Device = torch.device | str


# Box geometry ------------------------------------------------------------------------------------------------------


def box_centers(boxes: Tensor) -> Tensor:
    """Centres `[..., 2]` (x, y) of xyxy boxes `[..., 4]`."""
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def box_sizes(boxes: Tensor) -> Tensor:
    """Widths and heights `[..., 2]` of xyxy boxes `[..., 4]`."""
    return boxes[..., 2:] - boxes[..., :2]


def box_areas(boxes: Tensor) -> Tensor:
    """Areas `[...]` of xyxy boxes `[..., 4]`; a zero-size or inverted box (x2 < x1 or y2 < y1) has area 0."""
    return box_sizes(boxes).clamp(min=0).prod(-1)


def aligned_intersection_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas `[...]`, `[...]` of corresponding xyxy boxes `[..., 4]` × `[..., 4]` (both >= 0)."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter, box_areas(boxes1) + box_areas(boxes2) - inter


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding boxes: `[..., 4]` × `[..., 4]` -> `[...]` (union clamped to `eps`, as MMDet).

    Degenerate boxes (zero-size, inverted) count as empty, so the result and its gradient stay finite.
    """
    inter, union = aligned_intersection_union(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def aligned_box_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of corresponding boxes: `[..., 4]` × `[..., 4]` -> `[...]` in [-1, 1].

    IoU − (enclosing − union) / enclosing with `eps` added to both denominators, as torchvision's
    generalized_box_iou_loss; degenerate boxes (zero-size, inverted) count as empty, so it stays finite.
    """
    inter, union = aligned_intersection_union(boxes1, boxes2)
    enclose_top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    enclose_bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclose = (enclose_bottom_right - enclose_top_left).clamp(min=0).prod(-1)
    return inter / (union + eps) - (enclose - union) / (enclose + eps)


def aligned_box_ciou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU (Zheng et al. 2020) of corresponding xyxy boxes: `[..., 4]` × `[..., 4]` -> `[...]`, broadcast.

    IoU − centre distance² / enclosing diagonal² − α·v, with v = 4/π² (atan(w2/h2) − atan(w1/h1))² and the trade-off
    α = v / (1 − IoU + v + eps) held constant (no gradient). Ultralytics' formula: `eps` is added to both heights,
    the union and the diagonal, and widths are not clamped (boxes are expected well-formed).
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    u1, v1, u2, v2 = boxes2.unbind(-1)
    width1, height1 = x2 - x1, y2 - y1 + eps
    width2, height2 = u2 - u1, v2 - v1 + eps
    inter = (x2.minimum(u2) - x1.maximum(u1)).clamp(min=0) * (y2.minimum(v2) - y1.maximum(v1)).clamp(min=0)
    iou = inter / (width1 * height1 + width2 * height2 - inter + eps)
    enclose_width = x2.maximum(u2) - x1.minimum(u1)
    enclose_height = y2.maximum(v2) - y1.minimum(v1)
    diagonal_sq = enclose_width.pow(2) + enclose_height.pow(2) + eps
    centre_dist_sq = ((u1 + u2 - x1 - x2).pow(2) + (v1 + v2 - y1 - y2).pow(2)) / 4
    aspect = (4 / math.pi**2) * ((width2 / height2).atan() - (width1 / height1).atan()).pow(2)
    with torch.no_grad():
        trade_off = aspect / (1 - iou + aspect + eps)
    return iou - (centre_dist_sq / diagonal_sq + aspect * trade_off)


def batched_box_iou(priors: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of priors shared over a batch with each image's boxes: `[N, 4]`, `[B, M, 4]` -> `[B, N, M]`."""
    batch, num_gt = gt_boxes.shape[:2]
    ious = box_iou(priors, gt_boxes.reshape(-1, 4))  # [N, B*M]
    return ious.view(-1, batch, num_gt).permute(1, 0, 2)  # [B, N, M]


def per_image_box_iou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of each image's own boxes with its ground truth: `[B, N, 4]`, `[B, M, 4]` -> `[B, N, M]`.

    For candidates that differ per image (a two-stage detector's proposals), where `batched_box_iou` shares priors.
    """
    top_left = torch.maximum(boxes[:, :, None, :2], gt_boxes[:, None, :, :2])  # [B, N, M, 2]
    bottom_right = torch.minimum(boxes[:, :, None, 2:], gt_boxes[:, None, :, 2:])  # [B, N, M, 2]
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # [B, N, M]
    union = box_areas(boxes)[:, :, None] + box_areas(gt_boxes)[:, None, :] - inter
    return inter / union.clamp(min=torch.finfo(boxes.dtype).eps)


def clip_boxes(boxes: Tensor, max_shape: tuple[int, int] | Tensor) -> Tensor:
    """Clip xyxy boxes to an image of `max_shape` (h, w), or per image with a `[B, 2]` tensor for `[B, N, 4]` boxes.

    The model's own clip, traced into exported graphs: an (h, w) pair may hold traced or symbolic sizes and is used
    through `clamp`, which keeps them dynamic (torchvision's clip_boxes_to_image copies traced sizes with
    `torch.tensor`, which warns on every export, and has no per-image sizes). Eager code uses torchvision's.
    """
    if isinstance(max_shape, Tensor):
        wh = max_shape.to(boxes.dtype).flip(-1)[..., None, :]  # [B, 1, 2] (w, h)
        return torch.minimum(boxes.clamp(min=0), torch.cat([wh, wh], dim=-1))
    height, width = max_shape
    xs = boxes[..., 0::2].clamp(min=0, max=width)  # [..., 2] (x1, x2)
    ys = boxes[..., 1::2].clamp(min=0, max=height)  # [..., 2] (y1, y2)
    return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)


# Priors ------------------------------------------------------------------------------------------------------------


class Priors(NamedTuple):
    """Anchors or points of all levels, ordered level-major, then y, x, then anchor."""

    boxes: Tensor  # [N, 4] xyxy anchors (zero-size boxes at points for point heads)
    points: Tensor  # [N, 2] centres
    strides: Tensor  # [N]
    num_per_level: list[int]


def _grid_centres(height: int, width: int, stride: int, offset: float, device: Device) -> Tensor:
    """Cell centres `[H*W, 2]` (x, y), y-major, at `(index + offset) * stride`."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + offset) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + offset) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def base_anchors(base_size: float, scales: list[float], ratios: list[float], round_corners: bool = False) -> Tensor:
    """Anchors `[len(ratios)*len(scales), 4]` centred on 0 (MMDet order: ratios outer, scales inner).

    `round_corners` rounds the corners to whole pixels, as torchvision's AnchorGenerator does.
    """
    h_ratios = torch.tensor(ratios, dtype=torch.float32).sqrt()
    w_ratios = 1.0 / h_ratios
    scales_t = torch.tensor(scales, dtype=torch.float32)
    widths = (base_size * w_ratios[:, None] * scales_t[None, :]).reshape(-1)  # [R*S]
    heights = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)  # [R*S]
    anchors = torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=-1)
    return anchors.round() if round_corners else anchors


def make_anchors(
    feat_sizes: list[tuple[int, int]],
    strides: list[int],
    base_sizes: list[float],
    scales: list[float] | list[list[float]],
    ratios: list[float],
    device: Device,
    dtype: torch.dtype = torch.float32,
    round_corners: bool = False,
) -> Tensor:
    """Anchors `[N, 4]` xyxy for all levels, MMDet AnchorGenerator semantics (centre offset 0).

    A level of size (H, W) with stride s has anchor centres at (x*s, y*s); each location holds
    `len(ratios) * len(scales)` anchors of width `base_size * scale / sqrt(ratio)` and height
    `base_size * scale * sqrt(ratio)`. N = Σ H*W*A, ordered level, y, x, anchor. `scales` is one list shared
    by every level or one list per level (torchvision's explicit sizes, with base size 1); `round_corners` rounds
    the base anchors to whole pixels (torchvision).
    """
    level_scales = scales if isinstance(scales[0], (list, tuple)) else [scales] * len(strides)
    per_level = []
    for (height, width), stride, base_size, scales_l in zip(feat_sizes, strides, base_sizes, level_scales, strict=True):
        centres = _grid_centres(height, width, stride, 0.0, device).repeat(1, 2)  # [H*W, 4]
        base = base_anchors(base_size, list(scales_l), ratios, round_corners).to(device)  # [A, 4]
        per_level.append((centres[:, None, :] + base[None, :, :]).reshape(-1, 4))  # [H*W*A, 4]
    return torch.cat(per_level).to(dtype)


def anchors_per_level(feat_sizes: list[tuple[int, int]], num_base_anchors: int = 1) -> list[int]:
    """Number of priors on each level: H*W*A."""
    return [height * width * num_base_anchors for height, width in feat_sizes]


def make_points(
    feat_sizes: list[tuple[int, int]],
    strides: list[int],
    device: Device,
    dtype: torch.dtype = torch.float32,
    offset: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Grid points `[N, 2]` (x, y) at `(index + offset) * stride` and each point's stride `[N]` (MMDet points)."""
    points, point_strides = [], []
    for (height, width), stride in zip(feat_sizes, strides, strict=True):
        centres = _grid_centres(height, width, stride, offset, device)  # [H*W, 2]
        points.append(centres)
        point_strides.append(torch.full_like(centres[:, 0], float(stride)))
    return torch.cat(points).to(dtype), torch.cat(point_strides).to(dtype)


# Coders ------------------------------------------------------------------------------------------------------------


def delta_xywh_encode(
    anchors: Tensor,
    gt: Tensor,
    means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Deltas `[..., 4]` (dx, dy, dw, dh), normalised by means/stds, that move `anchors` onto `gt` (both xyxy)."""
    anchor_xy, anchor_wh = box_centers(anchors), box_sizes(anchors)
    gt_xy, gt_wh = box_centers(gt), box_sizes(gt)
    deltas = torch.cat([(gt_xy - anchor_xy) / anchor_wh, torch.log(gt_wh / anchor_wh)], dim=-1)
    return (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)


def delta_xywh_decode(
    anchors: Tensor,
    deltas: Tensor,
    means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
    max_shape: tuple[int, int] | Tensor | None = None,
    wh_ratio_clip: float = 16 / 1000,
    clamp_below: bool = True,
) -> Tensor:
    """Boxes `[..., 4]` xyxy from anchors `[..., 4]` and deltas; dw, dh clamped to ±|log(wh_ratio_clip)| (MMDet).

    With `clamp_below=False` dw, dh are clamped from above only (torchvision's BoxCoder, clip log(1000/16)).
    """
    deltas = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    max_ratio = abs(math.log(wh_ratio_clip))
    anchor_xy, anchor_wh = box_centers(anchors), box_sizes(anchors)
    centre = anchor_xy + anchor_wh * deltas[..., :2]
    size = anchor_wh * deltas[..., 2:].clamp(min=-max_ratio if clamp_below else None, max=max_ratio).exp()
    boxes = torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
    return boxes if max_shape is None else clip_boxes(boxes, max_shape)


def distance_encode(points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
    """Distances `[..., 4]` (l, t, r, b) from points `[..., 2]` to box sides; clamped to [0, max_dis - eps] if given."""
    ltrb = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return ltrb if max_dis is None else ltrb.clamp(min=0, max=max_dis - eps)


def distance_decode(points: Tensor, ltrb: Tensor, max_shape: tuple[int, int] | Tensor | None = None) -> Tensor:
    """Boxes `[..., 4]` xyxy from points `[..., 2]` and (l, t, r, b) distances, optionally clipped to `max_shape`."""
    boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)
    return boxes if max_shape is None else clip_boxes(boxes, max_shape)


def integral_distribution(logits: Tensor, reg_max: int) -> Tensor:
    """Expected distance per side `[..., 4]` from DFL logits `[..., 4*(reg_max+1)]` (softmax over bins · bin index)."""
    probs = logits.unflatten(-1, (4, reg_max + 1)).softmax(dim=-1)  # [..., 4, reg_max+1]
    bins = torch.arange(reg_max + 1, device=logits.device, dtype=probs.dtype)
    return probs @ bins


def centerness_target(ltrb: Tensor, eps: float = 1e-6) -> Tensor:
    """FCOS centerness `[...]` = sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)); 0 (never NaN) for points outside."""
    left_right, top_bottom = ltrb[..., 0::2], ltrb[..., 1::2]  # [..., 2] each
    ratio_lr = left_right.min(-1).values.clamp(min=0) / left_right.max(-1).values.clamp(min=eps)
    ratio_tb = top_bottom.min(-1).values.clamp(min=0) / top_bottom.max(-1).values.clamp(min=eps)
    return (ratio_lr * ratio_tb).sqrt()
