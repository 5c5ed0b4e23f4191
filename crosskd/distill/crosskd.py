"""Distiller: a student, a frozen teacher and the cross-head pass of CrossKD (student hold features → teacher head)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from crosskd.distill.adapters import build_adapter, check_compatible, resolve_kd_idx
from crosskd.distill.kd_losses import (
    KDInputs,
    KDWeights,
    feature_kd,
    ld_loss,
    parse_kd,
    prediction_kd,
    resolve_kd_weights,
)
from crosskd.models.heads.base import HeadOutputs, Priors, Targets
from crosskd.utils import LOGGER

if TYPE_CHECKING:
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import DenseHead, LevelOutput

ALIGN_EPS = 1e-6
HoldFeatures = list[tuple[Tensor, Tensor]]  # per level: (cls, reg) pre-activation tower features at the hold point


class StudentPass(NamedTuple):
    """What the student's forward produced for one batch."""

    holds: HoldFeatures
    outputs: HeadOutputs
    priors: Priors
    targets: Targets


def align_scale(student_feat: Tensor, teacher_feat: Tensor, eps: float = ALIGN_EPS) -> Tensor:
    """Map the student's per-channel mean/std (over batch and space) onto the teacher's: [B,C,H,W] -> [B,C,H,W].

    (s − μs)/(σs + eps)·σt + μt with unbiased std (plain std when a channel has a single value); the teacher's
    statistics carry no gradient. Computed in float32.
    """
    dims = (0, 2, 3)
    correction = 1 if student_feat.numel() // student_feat.shape[1] > 1 else 0
    s = student_feat.float()
    t = teacher_feat.detach().float()
    s_mean, s_std = s.mean(dims, keepdim=True), s.std(dims, correction=correction, keepdim=True)
    t_mean, t_std = t.mean(dims, keepdim=True), t.std(dims, correction=correction, keepdim=True)
    return (s - s_mean) / (s_std + eps) * t_std + t_mean


def stack_levels(levels: list[LevelOutput]) -> HeadOutputs:
    """Per-level LevelOutputs -> one HeadOutputs."""
    has_ctr = levels[0].centerness is not None
    return HeadOutputs(
        cls_scores=[o.cls_score for o in levels],
        bbox_preds=[o.bbox_pred for o in levels],
        centerness=[o.centerness for o in levels] if has_ctr else None,
    )


def head_pass(head: DenseHead, feats: list[Tensor], idx: int) -> tuple[HoldFeatures, HeadOutputs]:
    """Run a head split at tower step `idx`: the hold features per level and the (identical to forward) outputs.

    Args:
        feats (list[Tensor[B, C, H_l, W_l]]): FPN outputs, one per level.

    Returns:
        holds: per level (cls, reg), each [B, feat_channels, H_l, W_l] pre-activation; outputs: HeadOutputs.
    """
    holds = [head.forward_tower(x, idx) for x in feats]
    outputs = [head.forward_from(cls_feat, reg_feat, level, idx) for level, (cls_feat, reg_feat) in enumerate(holds)]
    return holds, stack_levels(outputs)


def feat_sizes(feats: list[Tensor]) -> list[tuple[int, int]]:
    """(H, W) of every [B, C, H, W] feature map."""
    return [(int(x.shape[-2]), int(x.shape[-1])) for x in feats]


class Distiller(nn.Module):
    """Student + frozen teacher; `forward(batch)` returns the student's detection losses plus weighted KD terms.

    The teacher is a plain attribute (not a submodule), so it is absent from parameters(), state_dict(), the
    optimizer, EMA and DDP; it is frozen, always in eval mode and follows `.to()`. KD recipes follow the
    teacher's head type. `kd`: crosskd | pm | ld | pkd | crosskd+pkd | none.

    Args:
        student, teacher (DenseDetector): detectors with the same classes; their FPN outputs must have equal
            sizes (same strides), while widths may differ (1x1 adapters at the hold point).
        kd_idx (int | None): CrossKD hold point, a tower step; None takes the teacher head's default.
        kd_align (bool): standardise the student hold features to the teacher's per-channel statistics.
    """

    def __init__(
        self,
        student: DenseDetector,
        teacher: DenseDetector,
        kd: str = "crosskd",
        kd_idx: int | None = None,
        kd_align: bool = True,
        weights: KDWeights | None = None,
    ) -> None:
        super().__init__()
        self.methods = parse_kd(kd)
        self.kd = str(kd).strip().lower()
        check_compatible(student, teacher, self.methods)
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        teacher.requires_grad_(False).train(False)
        teacher.to(next(student.parameters()).device)
        self.kd_align = bool(kd_align)
        self.weights = weights if weights is not None else resolve_kd_weights(teacher.head.head_type, self.kd)
        use_cross = "crosskd" in self.methods
        self.kd_idx = resolve_kd_idx(kd_idx, student.head, teacher.head) if use_cross else 0
        self.adapter = build_adapter(student.head, teacher.head, self.kd_idx) if use_cross else None
        self.log_setup()

    @classmethod
    def from_args(cls, student: DenseDetector, teacher: DenseDetector, args: Any) -> Distiller:
        """Build from run settings (kd, kd_idx, kd_align, kd_weight, kd_cls/reg/ctr/feat_weight)."""
        kd = str(args.kd).strip().lower()
        parse_kd(kd)
        weights = resolve_kd_weights(
            teacher.head.head_type, kd, cls=args.kd_cls_weight, reg=args.kd_reg_weight, ctr=args.kd_ctr_weight,
            feat=args.kd_feat_weight, kd_weight=args.kd_weight,
        )
        return cls(student, teacher, kd=kd, kd_idx=args.kd_idx, kd_align=args.kd_align, weights=weights)

    def log_setup(self) -> None:
        """Log the KD method, the head types, the hold point and the loss weights (one line)."""
        if not self.methods:
            LOGGER.info("kd=none: training the student without distillation (the teacher is loaded but unused)")
            return
        t_type, s_type = self.teacher.head.head_type, self.student.head.head_type
        w = self.weights
        cross = f", kd_idx={self.kd_idx}, align={self.kd_align}" if "crosskd" in self.methods else ""
        LOGGER.info(
            f"Distillation: kd={self.kd}, teacher {t_type} -> student {s_type}{cross}, "
            f"weights cls={w.cls:g} reg={w.reg:g} ctr={w.ctr:g} feat={w.feat:g}"
        )

    def _apply(self, fn, recurse: bool = True):
        """Device and dtype moves (.to, .cuda, .half) also move the unregistered teacher."""
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Distiller:
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def forward(self, batch: Any) -> dict[str, Tensor]:
        """Same as `loss(batch)`, so DDP can wrap the distiller."""
        return self.loss(batch)

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """The student's detection losses (own predictions only) plus kd_cls, kd_reg, kd_ctr, kd_feat as applicable.

        Args:
            batch (Batch): images [B, 3, H, W] 0..1 RGB, gt_boxes [B, M, 4] xyxy input pixels, gt_labels [B, M].

        Returns:
            dict[str, Tensor]: scalar losses, already weighted.
        """
        s_head = self.student.head
        s_feats = self.student.extract_features(batch.images)
        holds, outputs = head_pass(s_head, s_feats, self.kd_idx)
        priors = s_head.priors(feat_sizes(s_feats), s_feats[0].device)
        targets = s_head.get_targets(priors, batch)
        losses = dict(s_head.loss(outputs, priors, targets))
        if not self.methods:
            return losses
        with torch.no_grad():
            t_feats = self.teacher.extract_features(batch.images)
        if "pkd" in self.methods:
            losses["kd_feat"] = feature_kd(s_feats, t_feats, self.weights.feat)
        if self.methods - {"pkd"}:
            losses.update(self.prediction_losses(StudentPass(holds, outputs, priors, targets), t_feats, batch))
        return losses

    def prediction_losses(self, student: StudentPass, t_feats: list[Tensor], batch: Any) -> dict[str, Tensor]:
        """KD on predictions: cross-head (crosskd), the student's own (pm) or its box distributions (ld).

        `t_feats` are the teacher's FPN outputs (list of [B, C_t, H_l, W_l]); returns scalar kd_* losses.
        """
        t_head, s_head = self.teacher.head, self.student.head
        with torch.no_grad():
            t_holds, t_out = head_pass(t_head, t_feats, self.kd_idx)
        t_flat = t_head.flatten_outputs(t_out)
        t_priors, kd_targets = self.kd_targets(t_feats, batch, student.priors, student.targets)
        losses = {}
        if "crosskd" in self.methods:
            cross = t_head.flatten_outputs(self.cross_head(student.holds, t_holds))
            losses.update(prediction_kd(KDInputs(cross, t_flat, t_priors, kd_targets), t_head, self.weights))
        if "pm" in self.methods:
            own = s_head.flatten_outputs(student.outputs)
            losses.update(prediction_kd(KDInputs(own, t_flat, t_priors, kd_targets), t_head, self.weights))
        if "ld" in self.methods:
            own = s_head.flatten_outputs(student.outputs)
            losses["kd_reg"] = ld_loss(own, t_flat, student.targets, self.weights.reg)
        return losses

    def cross_head(self, s_holds: HoldFeatures, t_holds: HoldFeatures) -> HeadOutputs:
        """Student hold features (adapted, aligned to the teacher's) through the rest of the teacher's head.

        Not under no_grad: the KD gradient flows through the frozen teacher layers into the student. Hold features
        are per level (cls, reg) pairs: the student's [B, C_s, H_l, W_l], the teacher's [B, C_t, H_l, W_l].
        """
        levels = []
        for level, ((s_cls, s_reg), (t_cls, t_reg)) in enumerate(zip(s_holds, t_holds)):
            if self.adapter is not None:
                s_cls, s_reg = self.adapter(s_cls, s_reg)
            if self.kd_align:
                s_cls, s_reg = align_scale(s_cls, t_cls), align_scale(s_reg, t_reg)
            levels.append(self.teacher.head.forward_from(s_cls, s_reg, level, self.kd_idx))
        return stack_levels(levels)

    def kd_targets(
        self, t_feats: list[Tensor], batch: Any, s_priors: Priors, s_targets: Targets
    ) -> tuple[Priors, Targets]:
        """Priors and region/normaliser targets of the teacher's head type (the student's when they coincide)."""
        t_head = self.teacher.head
        t_priors = t_head.priors(feat_sizes(t_feats), t_feats[0].device)
        same_type = t_head.head_type == self.student.head.head_type
        if same_type and t_priors.boxes.shape == s_priors.boxes.shape and torch.equal(t_priors.boxes, s_priors.boxes):
            return t_priors, s_targets
        return t_priors, t_head.get_targets(t_priors, batch)

    def adapter_state(self) -> dict[str, Tensor] | None:
        """CPU copy of the width adapter's weights (saved in last.pt for resume), or None."""
        if self.adapter is None:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()}

    def load_adapter_state(self, state: dict[str, Tensor] | None) -> None:
        """Restore the width adapter from `adapter_state()` (no-op without an adapter or a state)."""
        if self.adapter is not None and state is not None:
            self.adapter.load_state_dict(state)
