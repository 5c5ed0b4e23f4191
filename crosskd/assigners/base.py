"""The assigner contract: an object a model YAML picks (`head.assigner`), called with the priors, the padded ground
truth, the valid mask and the head's decoded predictions, so an assigner may score priors by what the head predicts
(task-aligned assignment) as well as by geometry."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from crosskd.assigners.result import AssignResult
from crosskd.ops.boxes import Priors


class Predictions:
    """A batch's decoded head predictions, detached: `boxes [B, N, 4]` xyxy input pixels, `scores [B, N, C]` in 0..1.

    Decoded on first access, so an assigner that matches on geometry alone costs nothing extra.
    """

    def __init__(self, decode: Callable[[], tuple[Tensor, Tensor]]) -> None:
        self._decode = decode

    @cached_property
    def _decoded(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            boxes, scores = self._decode()
        return boxes.detach(), scores.detach()

    @property
    def boxes(self) -> Tensor:
        """Predicted boxes `[B, N, 4]` xyxy input pixels."""
        return self._decoded[0]

    @property
    def scores(self) -> Tensor:
        """Predicted class probabilities `[B, N, C]`."""
        return self._decoded[1]


class Assigner(ABC):
    """Matches N priors to the padded ground truth of B images (no grad); one instance per head.

    Subclasses take their settings as constructor keyword arguments (the YAML's `head.assigner` keys).
    """

    name = ""  # the `head.assigner.type` that selects it
    uses_boxes = False  # matches anchor boxes by IoU, so it needs a head with anchors (not points)

    def check_levels(self, num_levels: int) -> None:
        """Raise a ConfigError when per-level settings do not fit the head's `num_levels` FPN levels (none here)."""
        return None

    @abstractmethod
    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        """Assign the priors of the padded batch.

        Args:
            priors (Priors): boxes [N, 4] xyxy, points [N, 2], strides [N], num_per_level.
            gt_boxes (Tensor[B, M, 4]): xyxy input pixels, zero rows for padding.
            gt_labels (Tensor[B, M]): class ids, −1 for padding.
            valid (Tensor[B, N] | None): False for priors outside their image.
            predictions (Predictions): the head's decoded boxes [B, N, 4] and scores [B, N, C], detached.

        Returns:
            AssignResult: assigned_gt, labels and max_overlaps, each [B, N].
        """
