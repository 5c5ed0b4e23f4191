"""Prediction mimicking (PM): the student's own predictions matched to the teacher's with the teacher type's recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from crosskd.distill.adapters import check_same_head
from crosskd.distill.kd_losses import KDInputs, keep_branch, prediction_kd
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup

if TYPE_CHECKING:
    from crosskd.models import DenseDetector


class PredictionMimicking(KDMethod):
    """kd_cls, kd_reg (, kd_ctr) on the student's own outputs (pm_* beside CrossKD); both heads of one layout."""

    needs = frozenset({"teacher_outputs"})
    combined_prefix = "pm"

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        check_same_head(student.head, teacher.head, "kd=pm")

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """The teacher type's prediction-KD terms on the student's own predictions, kept per kd_branch."""
        inputs, setup = ctx.predictions, self.setup
        kd_inputs = KDInputs(inputs.own, inputs.teacher, inputs.priors, inputs.targets)
        return keep_branch(prediction_kd(kd_inputs, ctx.teacher_head, setup.weights, setup.options), setup.kd_branch)
