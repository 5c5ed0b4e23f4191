"""Distiller: a student, a frozen teacher and the cross-head pass of CrossKD (student hold features → teacher head)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crosskd.distill.adapters import (
    build_adapter,
    check_ablation,
    check_compatible,
    check_hold_widths,
    check_strategy,
    resolve_kd_idx,
)
from crosskd.distill.kd_losses import (
    ABLATION_DEFAULTS,
    PKD_ALONE_LEVELS,
    KDInputs,
    KDOptions,
    KDWeights,
    feature_kd,
    keep_branch,
    ld_loss,
    parse_kd,
    prediction_kd,
    renamed,
    resolve_kd_weights,
)
from crosskd.models.heads.base import FlatOutputs, HeadOutputs, Priors, Targets
from crosskd.utils import LOGGER

if TYPE_CHECKING:
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import DenseHead, LevelOutput

ALIGN_EPS = 1e-6
HoldFeatures = list[tuple[Tensor, Tensor]]  # per level: (cls, reg) pre-activation tower features at the hold point


class StudentPass(NamedTuple):
    """What the student's forward produced for one batch."""

    feats: list[Tensor]  # FPN outputs, [B, C_s, H_l, W_l] per level
    holds: HoldFeatures
    outputs: HeadOutputs
    priors: Priors
    targets: Targets


class TeacherPass(NamedTuple):
    """The teacher's forward (no graph): FPN outputs, and the hold features and outputs when a KD term needs them."""

    feats: list[Tensor]  # [B, C_t, H_l, W_l] per level
    holds: HoldFeatures | None
    outputs: HeadOutputs | None


def align_scale(student_feat: Tensor, teacher_feat: Tensor, eps: float = ALIGN_EPS) -> Tensor:
    """Map the student's per-channel mean/std (over batch and space) onto the teacher's: [B,C,H,W] -> [B,C,H,W].

    (s − μs)/(σs + eps)·σt + μt with unbiased std (plain std when a channel has a single value); the teacher's
    statistics carry no gradient. Computed in float32. Backward recomputes the map from s (which std_mean saves
    anyway) instead of keeping its centred full-size copy.
    """
    dims = (0, 2, 3)
    correction = 1 if student_feat.numel() // student_feat.shape[1] > 1 else 0
    with torch.no_grad():
        t_std, t_mean = torch.std_mean(teacher_feat.float(), dims, correction=correction, keepdim=True)
    if not torch.is_grad_enabled() or not student_feat.requires_grad:
        return standardise_onto(student_feat.float(), t_std, t_mean, correction, eps)
    return checkpoint(standardise_onto, student_feat.float(), t_std, t_mean, correction, eps, use_reentrant=False)


def standardise_onto(s: Tensor, t_std: Tensor, t_mean: Tensor, correction: int, eps: float) -> Tensor:
    """(s − μs)/(σs + eps)·σt + μt per channel of s [B,C,H,W]; σt, μt [1,C,1,1]."""
    s_std, s_mean = torch.std_mean(s, (0, 2, 3), correction=correction, keepdim=True)  # one pass over s
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


def feature_masks(img_sizes: Tensor | None, maps: list[Tensor], strides: list[int]) -> list[Tensor] | None:
    """Per level [B, H_l, W_l] bool: True where the map's cell (row·s, col·s) starts inside the image's (h, w).

    `img_sizes` [B, 2] (h, w); None (a batch without sizes) gives None, i.e. every position counts.
    """
    if img_sizes is None:
        return None
    masks = []
    for fmap, stride in zip(maps, strides):
        height, width = fmap.shape[-2:]
        rows = torch.arange(height, device=fmap.device) * stride < img_sizes[:, 0, None].to(fmap.device)  # [B, H]
        cols = torch.arange(width, device=fmap.device) * stride < img_sizes[:, 1, None].to(fmap.device)  # [B, W]
        masks.append(rows[:, :, None] & cols[:, None, :])
    return masks


class Distiller(nn.Module):
    """Student + frozen teacher; `forward(batch)` returns the student's detection losses plus weighted KD terms.

    The teacher is a plain attribute (not a submodule), so it is absent from parameters(), state_dict(), the
    optimizer, EMA and DDP; it is frozen, always in eval mode and follows `.to()`. KD recipes follow the
    teacher's head type. `kd`: crosskd | pm | ld | pkd | crosskd+pkd | crosskd+pm | crosskd+ld | none.

    Args:
        student, teacher (DenseDetector): detectors with the same classes; their FPN outputs must have equal
            sizes (same strides), while widths may differ (1x1 adapters at the hold point).
        kd_idx (int | None): CrossKD hold point, a tower step; None takes the teacher head's default.
        kd_align (bool): standardise the hold features fed to the other head to its own per-channel statistics.
        kd_branch: 'both', or only the 'cls' / 'reg' (+ctr) prediction-KD terms (paper Table 3).
        kd_cls_loss, kd_region: the classification KD loss ('qfl' | 'bce') and the KD region ('all' | 'pos' |
            'neg') of the prediction-KD recipes (paper Table 9).
        pkd_on: PKD on the FPN outputs ('neck') or on the cls / reg tower features at the hold point (Table 2).
        kd_strategy: the cross-head strategy of paper Fig. 7 / Table 12 ('a' is CrossKD; see `strategy_pair`).
    """

    def __init__(
        self,
        student: DenseDetector,
        teacher: DenseDetector,
        kd: str = "crosskd",
        kd_idx: int | None = None,
        kd_align: bool = True,
        weights: KDWeights | None = None,
        *,
        kd_branch: str = "both",
        kd_cls_loss: str = "qfl",
        kd_region: str = "all",
        pkd_on: str = "neck",
        kd_strategy: str = "a",
    ) -> None:
        super().__init__()
        self.methods = parse_kd(kd)
        self.kd = str(kd).strip().lower()
        self.options = KDOptions(cls_loss=kd_cls_loss, region=kd_region)
        self.kd_branch, self.pkd_on, self.kd_strategy = kd_branch, pkd_on, kd_strategy
        check_ablation(self.methods, kd_branch, pkd_on, kd_strategy)
        check_compatible(student, teacher, self.methods, pkd_on)
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        teacher.requires_grad_(False).train(False)
        teacher.to(next(student.parameters()).device)
        self.kd_align = bool(kd_align)
        self.weights = weights if weights is not None else resolve_kd_weights(teacher.head.head_type, self.kd)
        use_cross = "crosskd" in self.methods
        use_holds = use_cross or ("pkd" in self.methods and pkd_on != "neck")
        self.kd_idx = resolve_kd_idx(kd_idx, student.head, teacher.head) if use_holds else 0
        check_strategy(student.head, teacher.head, self.kd_idx, kd_strategy)
        if "pkd" in self.methods and pkd_on != "neck":
            check_hold_widths(student.head, teacher.head, self.kd_idx, f"pkd_on={pkd_on}")
        self.pkd_levels = PKD_ALONE_LEVELS if self.kd == "pkd" else None
        trains_adapter = use_cross and kd_strategy == "a"  # only (a) sends KD gradient through student->teacher
        self.adapter = build_adapter(student.head, teacher.head, self.kd_idx) if trains_adapter else None
        self.log_setup()

    @classmethod
    def from_args(cls, student: DenseDetector, teacher: DenseDetector, args: Any) -> Distiller:
        """Build from run settings (kd, kd_idx, kd_align, the weights, kd_branch, kd_cls_loss, kd_region, pkd_on,
        kd_strategy)."""
        kd = str(args.kd).strip().lower()
        parse_kd(kd)
        weights = resolve_kd_weights(
            teacher.head.head_type, kd, cls=args.kd_cls_weight, reg=args.kd_reg_weight, ctr=args.kd_ctr_weight,
            feat=args.kd_feat_weight, kd_weight=args.kd_weight,
        )
        return cls(
            student, teacher, kd=kd, kd_idx=args.kd_idx, kd_align=args.kd_align, weights=weights,
            kd_branch=args.kd_branch, kd_cls_loss=args.kd_cls_loss, kd_region=args.kd_region, pkd_on=args.pkd_on,
            kd_strategy=args.kd_strategy,
        )

    def settings(self) -> dict[str, Any]:
        """The resolved KD settings (kept in checkpoints' kd_args)."""
        w = self.weights
        return {
            "kd": self.kd, "kd_idx": self.kd_idx, "kd_align": self.kd_align,
            "kd_weights": {"cls": w.cls, "reg": w.reg, "ctr": w.ctr, "feat": w.feat, "ld": w.ld},
            "kd_branch": self.kd_branch, "kd_cls_loss": self.options.cls_loss, "kd_region": self.options.region,
            "pkd_on": self.pkd_on, "kd_strategy": self.kd_strategy,
        }

    def log_setup(self) -> None:
        """Log the KD method, the head types, the hold point, the ablation settings and the loss weights (one line)."""
        if not self.methods:
            LOGGER.info("kd=none: training the student without distillation (the teacher is loaded but unused)")
            return
        t_type, s_type = self.teacher.head.head_type, self.student.head.head_type
        w = self.weights
        cross = f", kd_idx={self.kd_idx}, align={self.kd_align}" if "crosskd" in self.methods else ""
        changed = {k: v for k, v in self.settings().items() if k in ABLATION_DEFAULTS and v != ABLATION_DEFAULTS[k]}
        ablation = "".join(f", {k}={v}" for k, v in changed.items())
        LOGGER.info(
            f"Distillation: kd={self.kd}, teacher {t_type} -> student {s_type}{cross}{ablation}, "
            f"weights cls={w.cls:g} reg={w.reg:g} ctr={w.ctr:g} feat={w.feat:g} ld={w.ld:g}"
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
        """The student's detection losses (own predictions only) plus the KD terms of `kd`.

        Keys: kd_cls, kd_reg, kd_ctr (CrossKD, or the single prediction method), kd_feat (PKD), and with a second
        prediction method pm_cls, pm_reg, pm_ctr (crosskd+pm) or ld_reg (crosskd+ld).

        Args:
            batch (Batch): images [B, 3, H, W] 0..1 RGB, gt_boxes [B, M, 4] xyxy input pixels, gt_labels [B, M],
                img_sizes [B, 2] (h, w) of each image's unpadded region (optional: without it, all is image).

        Returns:
            dict[str, Tensor]: scalar losses, already weighted.
        """
        s_head = self.student.head
        s_feats = self.student.extract_features(batch.images)
        holds, outputs = head_pass(s_head, s_feats, self.kd_idx)
        priors = s_head.priors(feat_sizes(s_feats), s_feats[0].device)
        targets = s_head.get_targets(priors, batch, outputs)
        losses = dict(s_head.loss(outputs, priors, targets))
        if not self.methods:
            return losses
        student, teacher = StudentPass(s_feats, holds, outputs, priors, targets), self.teacher_pass(batch)
        if "pkd" in self.methods:
            losses["kd_feat"] = self.feature_loss(student, teacher, getattr(batch, "img_sizes", None))
        if self.methods - {"pkd"}:
            losses.update(self.prediction_losses(student, teacher, batch))
        return losses

    @torch.no_grad()
    def teacher_pass(self, batch: Any) -> TeacherPass:
        """The teacher's FPN outputs, plus its head split at kd_idx when a prediction or tower-PKD term needs it.

        The backbone and FPN run under inference_mode; the head under no_grad, so the hold features and outputs are
        plain tensors that the cross-head and KD losses may save for backward."""
        with torch.inference_mode():
            t_feats = self.teacher.extract_features(batch.images)
        if self.kd_idx == 0:  # the hold features are the FPN outputs, which strategy d feeds to the student with grad
            t_feats = [f.clone() for f in t_feats]
        if not (self.methods - {"pkd"}) and self.pkd_on == "neck":
            return TeacherPass(t_feats, None, None)
        t_holds, t_out = head_pass(self.teacher.head, t_feats, self.kd_idx)
        return TeacherPass(t_feats, t_holds, t_out)

    def feature_loss(self, student: StudentPass, teacher: TeacherPass, img_sizes: Tensor | None) -> Tensor:
        """PKD on the FPN outputs (pkd_on=neck) or on the cls / reg hold features, padding masked out; kd=pkd alone
        uses MMRazor's first PKD_ALONE_LEVELS levels, CrossKD+PKD every level. Returns a weighted scalar."""
        if self.pkd_on == "neck":
            s_maps, t_maps = student.feats, teacher.feats
        else:
            branch = 0 if self.pkd_on == "cls" else 1
            s_maps, t_maps = [h[branch] for h in student.holds], [h[branch] for h in teacher.holds]
        s_maps, t_maps = s_maps[: self.pkd_levels], t_maps[: self.pkd_levels]
        masks = feature_masks(img_sizes, s_maps, list(self.student.strides))
        return feature_kd(s_maps, t_maps, self.weights.feat, masks)

    def prediction_losses(self, student: StudentPass, teacher: TeacherPass, batch: Any) -> dict[str, Tensor]:
        """KD on predictions: cross-head (crosskd, by kd_strategy), the student's own (pm) or its box distributions
        (ld), restricted to kd_branch. Returns scalar kd_* (and pm_* / ld_reg beside CrossKD) losses."""
        t_head, s_head = self.teacher.head, self.student.head
        t_flat = t_head.flatten_outputs(teacher.outputs)
        own = s_head.flatten_outputs(student.outputs)
        t_priors, kd_targets = self.kd_targets(teacher.feats, batch, student.priors, student.targets, teacher.outputs)
        with_cross = "crosskd" in self.methods
        losses = {}
        if with_cross:
            pred, target, head = self.strategy_pair(student, teacher, own, t_flat)
            losses.update(prediction_kd(KDInputs(pred, target, t_priors, kd_targets), head, self.weights, self.options))
        if "pm" in self.methods:
            pm = prediction_kd(KDInputs(own, t_flat, t_priors, kd_targets), t_head, self.weights, self.options)
            losses.update(renamed(pm, "pm") if with_cross else pm)
        if "ld" in self.methods:
            losses["ld_reg" if with_cross else "kd_reg"] = ld_loss(own, t_flat, student.targets, self.weights.ld)
        return keep_branch(losses, self.kd_branch)

    def strategy_pair(
        self, student: StudentPass, teacher: TeacherPass, own: FlatOutputs, t_flat: FlatOutputs
    ) -> tuple[FlatOutputs, FlatOutputs, DenseHead]:
        """(prediction, target, head whose layout both have) of the cross-head strategy (paper Fig. 7).

        a: student hold features through the rest of the teacher head vs the teacher's predictions (CrossKD);
        b: the student's own predictions vs the teacher's hold features through the rest of the student head;
        c: the student's own predictions vs the (a) cross-head predictions;
        d: the (b) cross-head predictions vs the teacher's predictions.
        Targets never carry gradient (the recipes detach them), so (a) trains the student up to the hold point
        through the frozen teacher layers, (b) and (c) train the whole student through its own head, and (d) only
        the student's head layers after the hold point.
        """
        t_head, s_head = self.teacher.head, self.student.head
        strategy = self.kd_strategy
        if strategy in ("a", "c"):
            with torch.set_grad_enabled(torch.is_grad_enabled() and strategy == "a"):
                cross = t_head.flatten_outputs(self.cross_head(student.holds, teacher.holds))
            return (cross, t_flat, t_head) if strategy == "a" else (own, cross, t_head)
        with torch.set_grad_enabled(torch.is_grad_enabled() and strategy == "d"):
            reverse = s_head.flatten_outputs(self.reverse_cross_head(teacher.holds, student.holds))
        return (own, reverse, s_head) if strategy == "b" else (reverse, t_flat, s_head)

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

    def reverse_cross_head(self, t_holds: HoldFeatures, s_holds: HoldFeatures) -> HeadOutputs:
        """Teacher hold features (aligned to the student's statistics) through the rest of the student's head
        (strategies b and d); per level (cls, reg) pairs of [B, C, H_l, W_l], equal widths on both sides."""
        levels = []
        for level, ((t_cls, t_reg), (s_cls, s_reg)) in enumerate(zip(t_holds, s_holds)):
            if self.kd_align:
                t_cls, t_reg = align_scale(t_cls, s_cls), align_scale(t_reg, s_reg)
            levels.append(self.student.head.forward_from(t_cls, t_reg, level, self.kd_idx))
        return stack_levels(levels)

    def kd_targets(
        self, t_feats: list[Tensor], batch: Any, s_priors: Priors, s_targets: Targets, t_outputs: HeadOutputs
    ) -> tuple[Priors, Targets]:
        """Priors and region/normaliser targets of the teacher's head type (the student's when they coincide)."""
        t_head = self.teacher.head
        t_priors = t_head.priors(feat_sizes(t_feats), t_feats[0].device)
        same_type = t_head.head_type == self.student.head.head_type
        if same_type and self.same_priors(t_priors, s_priors):
            return t_priors, s_targets
        return t_priors, t_head.get_targets(t_priors, batch, t_outputs)

    def same_priors(self, t_priors: Priors, s_priors: Priors) -> bool:
        """Whether the two heads' priors (boxes [N, 4]) are equal; remembered for the last pair, since the heads
        cache their priors per feature size and hand back the same tensors every step (no compare, no host sync)."""
        last = self.__dict__.get("_last_prior_pair")
        if last is not None and last[0] is t_priors and last[1] is s_priors:
            return last[2]
        same = t_priors.boxes.shape == s_priors.boxes.shape and torch.equal(t_priors.boxes, s_priors.boxes)
        self.__dict__["_last_prior_pair"] = (t_priors, s_priors, same)
        return same

    def adapter_state(self) -> dict[str, Tensor] | None:
        """CPU copy of the width adapter's weights (saved in last.pt for resume), or None."""
        if self.adapter is None:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()}

    def load_adapter_state(self, state: dict[str, Tensor] | None) -> None:
        """Restore the width adapter from `adapter_state()` (no-op without an adapter or a state)."""
        if self.adapter is not None and state is not None:
            self.adapter.load_state_dict(state)
