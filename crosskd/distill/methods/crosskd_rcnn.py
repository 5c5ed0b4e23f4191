"""CrossKD with a Faster R-CNN teacher (`kd=crosskd`, the registry's variant for head type faster_rcnn): the
student's FPN maps through the teacher's whole R-CNN stage at the student's sampled RoIs (distill/two_stage.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from crosskd.distill.adapters import build_connector, feature_channels
from crosskd.distill.kd_losses import keep_branch
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup
from crosskd.distill.two_stage import KD_T, frcnn_cross_head, frcnn_crosskd_losses

if TYPE_CHECKING:
    from crosskd.models import DenseDetector


class RoICrossKD(KDMethod):
    """kd_cls (KL, T = 3, C+1 classes) and kd_reg (L1 on the teacher's best class deltas) of the teacher's R-CNN
    stage on the student's FPN maps; owns a 1x1 width adapter (student -> teacher FPN width, shared by the pooled
    levels) when the widths differ. No align_scale and no RPN term, as the reference."""

    needs = frozenset({"neck"})  # the teacher's FPN maps; the student's RoIs come with every two-stage student pass
    cross_head_pass = True
    two_stage = True

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        self.adapter = build_connector(feature_channels(student), feature_channels(teacher), "CrossKD (R-CNN)")

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """The cross-head terms at the student's sampled RoIs, kept per kd_branch."""
        roi_head = ctx.teacher_head.roi_head
        s_maps = ctx.student.feats[: len(roi_head.strides)]  # the levels RoIAlign reads (P2–P5)
        if self.adapter is not None:
            s_maps = [self.adapter(x) for x in s_maps]  # [B, C_s, H, W] -> [B, C_t, H, W]
        same_pool = self.adapter is None and roi_head.pools_like(ctx.student_head.roi_head)
        pooled = ctx.student.roi_feats if same_pool else None  # the student's own RoIAlign of the same maps
        cross = frcnn_cross_head(roi_head, s_maps, ctx.teacher.feats, ctx.student.rois, pooled)
        weights = self.setup.weights
        terms = frcnn_crosskd_losses(roi_head, cross, KD_T, weights.cls, weights.reg)
        return keep_branch(terms, self.setup.kd_branch)
