"""Box sides as discrete distributions (GFL's Distribution Focal Loss): the integral and its loss in one piece.

Any head whose regression output is `4 * (reg_max + 1)` bin logits per prior (left, top, right, bottom) uses one
`DFL`: `integral` turns the logits into expected distances in bin units (a stride each) and `loss` is the
distribution focal loss against the target box.
"""

from torch import Tensor

from crosskd.losses.detection import distribution_focal_loss
from crosskd.ops.boxes import distance_decode, distance_encode, integral_distribution

TARGET_EPS = 0.1  # targets stay this far below the last bin (MMDet's max_dis - eps; Ultralytics' YOLO: 0.01)


class DFL:
    """Distances 0..reg_max (bin units) per box side as a softmax over `reg_max + 1` bins; holds no parameters."""

    def __init__(self, reg_max: int, target_eps: float = TARGET_EPS) -> None:
        self.reg_max = reg_max
        self.target_eps = target_eps

    @property
    def channels(self) -> int:
        """Regression channels per prior: 4 · (reg_max + 1)."""
        return 4 * (self.reg_max + 1)

    def integral(self, logits: Tensor) -> Tensor:
        """Expected ltrb distances `[..., 4]` in bin units from logits `[..., 4*(reg_max+1)]`."""
        return integral_distribution(logits, self.reg_max)

    def decode(self, points: Tensor, logits: Tensor) -> Tensor:
        """Boxes `[..., 4]` xyxy around `points [..., 2]`, both in bin units, from logits `[..., 4*(reg_max+1)]`."""
        return distance_decode(points, self.integral(logits))

    def loss(self, logits: Tensor, points: Tensor, target_boxes: Tensor) -> Tensor:
        """Distribution focal loss `[P, 4]` of logits `[P, 4*(reg_max+1)]` against xyxy `target_boxes [P, 4]`
        around `points [P, 2]`, both in bin units (target distances clamped to [0, reg_max − target_eps])."""
        target_ltrb = distance_encode(points, target_boxes, max_dis=self.reg_max, eps=self.target_eps)  # [P, 4]
        return distribution_focal_loss(logits.reshape(-1, 4, self.reg_max + 1), target_ltrb)
