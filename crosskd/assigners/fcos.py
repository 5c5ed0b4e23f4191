"""FCOS point assignment (Tian et al. 2019), MMDet FCOSHead target semantics, batched."""

from collections.abc import Sequence

import torch
from torch import Tensor

from crosskd.assigners.base import Assigner, Predictions
from crosskd.assigners.result import BACKGROUND, AssignResult
from crosskd.errors import ConfigError
from crosskd.ops.boxes import Priors, box_centers, box_sizes

INF = 1e8
REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))  # MMDet FCOS, strides 8..128


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
    strides: Sequence[int] | Tensor,
    regress_ranges: list[tuple[float, float]],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    center_sampling: bool = True,
    center_sample_radius: float = 1.5,
) -> AssignResult:
    """Assign points `[N, 2]` to padded GT `gt_boxes [B, M, 4]`, `gt_labels [B, M]` (−1 = padding).

    A point is a candidate for a GT when it lies inside the box (and, with center sampling, inside the box's centre
    region of radius `center_sample_radius · stride`) and its largest distance to the box sides is within its
    level's regress range. Of several candidates it takes the GT with the smallest area. `strides` are per level,
    or each point's stride `[N]`.
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
        point_strides = (
            strides
            if isinstance(strides, Tensor)
            else torch.tensor(strides, dtype=points.dtype, device=points.device).repeat_interleave(counts)
        )  # [N]
        candidate &= _near_centre(px, py, gt_boxes, point_strides, center_sample_radius)
    areas = box_sizes(gt_boxes).prod(-1)[:, None].expand_as(candidate)  # [B, N, M]
    smallest_area, smallest_gt = areas.masked_fill(~candidate, float("inf")).min(dim=2)  # [B, N]
    assigned = torch.where(torch.isfinite(smallest_area), smallest_gt, BACKGROUND)
    return AssignResult.build(assigned, gt_labels)


class FCOSAssigner(Assigner):
    """`fcos_assign` with per-level regress ranges and optional center sampling (FCOS head's default)."""

    name = "fcos"

    def __init__(
        self,
        regress_ranges: Sequence[Sequence[float]] = REGRESS_RANGES,
        center_sampling: bool = False,
        center_sample_radius: float = 1.5,
    ) -> None:
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        self.center_sampling, self.center_sample_radius = center_sampling, center_sample_radius

    def check_levels(self, num_levels: int) -> None:
        """One regress range per FPN level."""
        if len(self.regress_ranges) != num_levels:
            raise ConfigError(
                f"head.assigner.regress_ranges has {len(self.regress_ranges)} ranges for {num_levels} strides"
            )

    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        """FCOS assignment of the prior centres; `valid` and the predictions are not needed (a point outside its
        image lies inside no GT box, and `get_targets` ignores invalid points afterwards)."""
        return fcos_assign(
            priors.points,
            priors.num_per_level,
            priors.strides,
            self.regress_ranges,
            gt_boxes,
            gt_labels,
            center_sampling=self.center_sampling,
            center_sample_radius=self.center_sample_radius,
        )
