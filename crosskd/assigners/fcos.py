"""FCOS point assignment (Tian et al. 2019), MMDet FCOSHead target semantics, batched."""

import torch
from torch import Tensor

from crosskd.assigners.result import BACKGROUND, AssignResult
from crosskd.ops.boxes import box_centers, box_sizes


def _near_centre(px: Tensor, py: Tensor, gt_boxes: Tensor, point_strides: Tensor, radius: float) -> Tensor:
    """`[B, N, M]` True where a point (`[1, N, 1]` each) is within radius·stride of a GT centre along both axes.

    Together with lying inside the box this is MMDet's test against the centre region clipped to the box.
    """
    centres = box_centers(gt_boxes)[:, None]  # [B, 1, M, 2]
    reach = (point_strides * radius)[None, :, None]  # [1, N, 1]
    return ((px - centres[..., 0]).abs() < reach) & ((py - centres[..., 1]).abs() < reach)


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

    A point is a candidate for a GT when it lies inside the box (and, with center sampling, inside the box's centre
    region of radius `center_sample_radius · stride`) and its largest distance to the box sides is within its
    level's regress range. Of several candidates it takes the GT with the smallest area.
    """
    batch, num_gt = gt_labels.shape
    if num_gt == 0:
        return AssignResult.all_background(batch, points.shape[0], points.device)
    counts = torch.tensor(num_per_level, device=points.device)
    ranges = torch.tensor(regress_ranges, dtype=points.dtype, device=points.device).repeat_interleave(counts, dim=0)
    px, py = points[None, :, None, 0], points[None, :, None, 1]  # [1, N, 1] each
    x1, y1, x2, y2 = gt_boxes[:, None].unbind(-1)  # [B, 1, M] each
    left, top, right, bottom = px - x1, py - y1, x2 - px, y2 - py  # [B, N, M] each
    inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
    reach = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    in_range = (reach >= ranges[None, :, None, 0]) & (reach <= ranges[None, :, None, 1])
    candidate = inside & in_range & (gt_labels >= 0)[:, None]  # [B, N, M]
    if center_sampling:
        point_strides = torch.tensor(strides, dtype=points.dtype, device=points.device).repeat_interleave(counts)
        candidate &= _near_centre(px, py, gt_boxes, point_strides, center_sample_radius)
    areas = box_sizes(gt_boxes).prod(-1)[:, None].expand_as(candidate)  # [B, N, M]
    smallest_area, smallest_gt = areas.masked_fill(~candidate, float("inf")).min(dim=2)  # [B, N]
    assigned = torch.where(torch.isfinite(smallest_area), smallest_gt, BACKGROUND)
    return AssignResult.build(assigned, gt_labels)
