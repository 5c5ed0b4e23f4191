"""FCOS point assignment (Tian et al. 2019), MMDet FCOSHead target semantics, batched."""

import torch
from torch import Tensor

from crosskd.assigners.result import BACKGROUND, AssignResult
from crosskd.ops.boxes import box_centers, box_sizes


def _min_side_distance(px: Tensor, py: Tensor, boxes: Tensor) -> Tensor:
    """`[B, N, M]` smallest distance from points (`[1, N, 1]` each) to the sides of `boxes [B, 1 or N, M, 4]`."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.minimum(torch.minimum(px - x1, py - y1), torch.minimum(x2 - px, y2 - py))


def _centre_regions(gt_boxes: Tensor, point_strides: Tensor, radius: float) -> Tensor:
    """`[B, N, M, 4]` boxes of half-size radius·stride around each GT centre, clipped to the GT."""
    centres = box_centers(gt_boxes)[:, None]  # [B, 1, M, 2]
    half = (point_strides * radius)[None, :, None, None]  # [1, N, 1, 1]
    top_left = torch.maximum(centres - half, gt_boxes[:, None, :, :2])
    bottom_right = torch.minimum(centres + half, gt_boxes[:, None, :, 2:])
    return torch.cat([top_left, bottom_right], dim=-1)


@torch.no_grad()
def fcos_assign(
    points: Tensor,
    num_per_level: list[int],
    strides: list[int],
    regress_ranges: list[tuple[float, float]],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    center_sampling: bool = True,
    center_sample_radius: float = 1.5,
) -> AssignResult:
    """Assign points `[N, 2]` to padded GT `gt_boxes [B, M, 4]`, `gt_labels [B, M]` (−1 = padding).

    A point is a candidate for a GT when it lies inside the box (or, with center sampling, inside the box's centre
    region of radius `center_sample_radius · stride`, clipped to the box) and its largest distance to the box sides
    is within its level's regress range. Of several candidates it takes the GT with the smallest area.
    """
    batch, num_gt = gt_labels.shape
    if num_gt == 0:
        return AssignResult.all_background(batch, points.shape[0], points.device)
    counts = torch.tensor(num_per_level, device=points.device)
    point_strides = torch.tensor(strides, dtype=points.dtype, device=points.device).repeat_interleave(counts)  # [N]
    ranges = torch.tensor(regress_ranges, dtype=points.dtype, device=points.device).repeat_interleave(counts, dim=0)
    px, py = points[None, :, None, 0], points[None, :, None, 1]  # [1, N, 1] each
    boxes = gt_boxes[:, None]  # [B, 1, M, 4]
    x1, y1, x2, y2 = boxes.unbind(-1)
    max_distance = torch.maximum(torch.maximum(px - x1, py - y1), torch.maximum(x2 - px, y2 - py))  # [B, N, M]
    if center_sampling:
        inside = _min_side_distance(px, py, _centre_regions(gt_boxes, point_strides, center_sample_radius)) > 0
    else:
        inside = _min_side_distance(px, py, boxes) > 0
    in_range = (max_distance >= ranges[None, :, None, 0]) & (max_distance <= ranges[None, :, None, 1])
    candidate = inside & in_range & (gt_labels >= 0)[:, None]  # [B, N, M]
    areas = box_sizes(gt_boxes).prod(-1)[:, None].expand_as(candidate)  # [B, N, M]
    smallest_area, smallest_gt = areas.masked_fill(~candidate, float("inf")).min(dim=2)  # [B, N]
    assigned = torch.where(torch.isfinite(smallest_area), smallest_gt, BACKGROUND)
    return AssignResult.build(assigned, gt_labels)
