"""CrossKD: the student's hold features through the rest of the teacher's head, matched to the teacher's predictions
(and the other cross-head strategies of paper Fig. 7 / Table 12)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from crosskd.distill.adapters import build_adapter, check_strategy
from crosskd.distill.kd_losses import KDInputs, keep_branch, prediction_kd
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup, PredictionInputs
from crosskd.distill.passes import HoldFeatures, align_scale, stack_levels

if TYPE_CHECKING:
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import DenseHead, FlatOutputs, HeadOutputs


class CrossKD(KDMethod):
    """Cross-head KD; owns the 1x1 width adapters (cls, reg; shared, or per level where the widths differ by level)
    when the hold features' widths differ (strategy a)."""

    needs = frozenset({"holds", "teacher_outputs"})
    cross_head_pass = True

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        check_strategy(student.head, teacher.head, setup.kd_idx, setup.kd_strategy)
        trains_adapter = setup.kd_strategy == "a"  # only (a) sends KD gradient through student->teacher
        self.adapter = build_adapter(student.head, teacher.head, setup.kd_idx) if trains_adapter else None

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """kd_cls, kd_reg (, kd_ctr) of the head type whose layout the compared predictions have, kept per kd_branch."""
        inputs = ctx.predictions
        pred, target, head = self.strategy_pair(ctx, inputs)
        setup = self.setup
        terms = prediction_kd(KDInputs(pred, target, inputs.priors, inputs.targets), head, setup.weights,
                              setup.options)
        return keep_branch(terms, setup.kd_branch)

    def strategy_pair(self, ctx: KDContext, inputs: PredictionInputs) -> tuple[FlatOutputs, FlatOutputs, DenseHead]:
        """(prediction, target, head whose layout both have) of the cross-head strategy (paper Fig. 7).

        a: student hold features through the rest of the teacher head vs the teacher's predictions (CrossKD);
        b: the student's own predictions vs the teacher's hold features through the rest of the student head;
        c: the student's own predictions vs the (a) cross-head predictions;
        d: the (b) cross-head predictions vs the teacher's predictions.
        Targets never carry gradient (the recipes detach them), so (a) trains the student up to the hold point
        through the frozen teacher layers, (b) and (c) train the whole student through its own head, and (d) only
        the student's head layers after the hold point.
        """
        t_head, s_head = ctx.teacher_head, ctx.student_head
        s_holds, t_holds = ctx.student.holds, ctx.teacher.holds
        strategy = self.setup.kd_strategy
        if strategy in ("a", "c"):
            with torch.set_grad_enabled(torch.is_grad_enabled() and strategy == "a"):
                cross = t_head.flatten_outputs(self.cross_head(t_head, s_holds, t_holds))
            return (cross, inputs.teacher, t_head) if strategy == "a" else (inputs.own, cross, t_head)
        with torch.set_grad_enabled(torch.is_grad_enabled() and strategy == "d"):
            reverse = s_head.flatten_outputs(self.reverse_cross_head(s_head, t_holds, s_holds))
        return (inputs.own, reverse, s_head) if strategy == "b" else (reverse, inputs.teacher, s_head)

    def enters_activated(self, head: DenseHead) -> bool:
        """Post-activation holds skip the activation of step kd_idx in `head` unless it is idempotent (ReLU, which
        the reference applies again after align_scale)."""
        return self.setup.kd_hold == "post" and not head.reactivates_hold

    def cross_head(self, teacher_head: DenseHead, s_holds: HoldFeatures, t_holds: HoldFeatures) -> HeadOutputs:
        """Student hold features (adapted, aligned to the teacher's) through the rest of the teacher's head, which
        starts with step kd_idx's activation (the reference's ReLU after align_scale, also on post-activation holds;
        not a SiLU on post-activation holds: `enters_activated`).

        Not under no_grad: the KD gradient flows through the frozen teacher layers into the student. Hold features
        are per level (cls, reg) pairs: the student's [B, C_s, H_l, W_l], the teacher's [B, C_t, H_l, W_l].
        """
        levels = []
        for level, ((s_cls, s_reg), (t_cls, t_reg)) in enumerate(zip(s_holds, t_holds)):
            if self.adapter is not None:
                s_cls, s_reg = self.adapter.for_level(level)(s_cls, s_reg)
            if self.setup.kd_align:
                s_cls, s_reg = align_scale(s_cls, t_cls), align_scale(s_reg, t_reg)
            levels.append(teacher_head.forward_from(s_cls, s_reg, level, self.setup.kd_idx,
                                                    activated=self.enters_activated(teacher_head)))
        return stack_levels(levels)

    def reverse_cross_head(self, student_head: DenseHead, t_holds: HoldFeatures, s_holds: HoldFeatures) -> HeadOutputs:
        """Teacher hold features (aligned to the student's statistics) through the rest of the student's head
        (strategies b and d); per level (cls, reg) pairs of [B, C, H_l, W_l], equal widths on both sides."""
        levels = []
        for level, ((t_cls, t_reg), (s_cls, s_reg)) in enumerate(zip(t_holds, s_holds)):
            if self.setup.kd_align:
                t_cls, t_reg = align_scale(t_cls, s_cls), align_scale(t_reg, s_reg)
            levels.append(student_head.forward_from(t_cls, t_reg, level, self.setup.kd_idx,
                                                    activated=self.enters_activated(student_head)))
        return stack_levels(levels)
