"""SL2: Ultralytics 8.4's feature distillation (`distill_model=`) as a baseline: a score-weighted L2 between each
neck output of the student, through a 1x1-ReLU-1x1 projector, and the teacher's, weighted per position by the
teacher's top class probability there."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from crosskd.distill.kd_losses import KDWeights, score_weighted_l2
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup

if TYPE_CHECKING:
    from crosskd.models import DenseDetector

ULTRALYTICS_DIS = 6.0  # Ultralytics 8.4's default `dis`


def projector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """Ultralytics' projector: 1x1 conv to the teacher's width, ReLU, 1x1 conv."""
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1), nn.ReLU(inplace=True),
        nn.Conv2d(teacher_channels, teacher_channels, 1),
    )


class ScoreWeightedL2(KDMethod):
    """kd_feat: Σ over levels of the score-weighted L2 of projected student neck maps, times the feat weight (6.0:
    Ultralytics' dis). Owns one projector per level, even where the widths agree (as Ultralytics)."""

    needs = frozenset({"neck", "teacher_outputs"})

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        pairs = zip(student.head.level_channels, teacher.head.level_channels, strict=True)
        self.projectors = nn.ModuleList(projector(s, t) for s, t in pairs)

    @classmethod
    def default_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """Ultralytics' weight (dis 6.0) whatever the teacher's head type."""
        return replace(weights, feat=ULTRALYTICS_DIS)

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """kd_feat over the neck levels; the teacher's scores are its sigmoid class logits' maximum per position."""
        scores = [m.detach().float().sigmoid().amax(dim=1, keepdim=True) for m in ctx.teacher.outputs.cls_scores]
        pairs = zip(self.projectors, ctx.student.feats, ctx.teacher.feats, scores, strict=True)
        loss = sum(score_weighted_l2(project(s), t, score) for project, s, t, score in pairs)
        return {"kd_feat": loss * self.setup.weights.feat}
