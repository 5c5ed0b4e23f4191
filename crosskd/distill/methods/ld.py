"""Localization distillation (LD): KL between the student's and the GFL teacher's box distributions on positives."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from crosskd.distill.adapters import check_same_head
from crosskd.distill.kd_losses import LD_WEIGHTS, KDWeights, keep_branch, ld_loss
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup
from crosskd.errors import CheckpointError, ConfigError

BOX_DISTRIBUTION_HEADS = ("gfl", "yolo")  # heads whose regression is DFL bin logits

if TYPE_CHECKING:
    from crosskd.models import DenseDetector


class LD(KDMethod):
    """kd_reg (ld_reg beside CrossKD), weighted by `weights.ld`; needs GFL or YOLO heads of one layout."""

    needs = frozenset({"teacher_outputs"})
    combined_prefix = "ld"

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        if setup.alone and setup.kd_branch == "cls":
            raise ConfigError("kd=ld has no classification term, so kd_branch=cls keeps nothing: use kd=pm "
                              "kd_branch=cls")
        if teacher.head.head_type not in BOX_DISTRIBUTION_HEADS:
            raise CheckpointError(f"kd=ld distils box distributions (GFL, YOLO), but the teacher is "
                                  f"{teacher.head.head_type}: use a GFL or YOLO teacher, or kd=crosskd")
        check_same_head(student.head, teacher.head, "kd=ld")

    @classmethod
    def default_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """Alone, LD's own weights (its term is a regression one); beside CrossKD, LD's weight added."""
        if alone:
            return replace(weights, cls=LD_WEIGHTS.cls, reg=LD_WEIGHTS.reg, ctr=LD_WEIGHTS.ctr)
        return replace(weights, ld=LD_WEIGHTS.reg)

    @classmethod
    def given_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """Alone, kd_reg_weight is LD's weight."""
        return replace(weights, ld=weights.reg) if alone else weights

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """LD's term on the student's positives (its own assigner), dropped by kd_branch=cls."""
        inputs = ctx.predictions
        terms = {"kd_reg": ld_loss(inputs.own, inputs.teacher, ctx.student.targets, self.setup.weights.ld)}
        return keep_branch(terms, self.setup.kd_branch)
