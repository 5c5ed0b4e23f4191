"""Distiller: a student, a frozen teacher and the configured KD methods (`kd=`), which it runs on shared passes."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from crosskd.distill.adapters import check_ablation, check_compatible, check_two_stage, resolve_kd_idx
from crosskd.distill.kd_losses import ABLATION_DEFAULTS, DEFAULT_WEIGHTS, KDOptions, KDWeights, check_choice
from crosskd.distill.methods.base import KDContext, KDSetup, PredictionInputs
from crosskd.distill.passes import KD_HOLDS, StudentPass, TeacherPass, feat_sizes, head_pass
from crosskd.distill.registry import components, method_class
from crosskd.utils import LOGGER

if TYPE_CHECKING:
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import HeadOutputs, Priors, Targets


def resolve_kd_weights(
    head_type: str,
    kd: str = "crosskd",
    cls: float | None = None,
    reg: float | None = None,
    ctr: float | None = None,
    feat: float | None = None,
    kd_weight: float = 1.0,
) -> KDWeights:
    """Per-term weights: the teacher head type's defaults as the `kd` methods change them, overridden where given,
    as the methods tie them, × kd_weight (e.g. PKD alone weighs 10, LD alone takes kd_reg_weight as its weight)."""
    classes = [method_class(name, head_type) for name in components(kd)]
    alone = len(classes) == 1
    weights = DEFAULT_WEIGHTS[head_type]
    for method in classes:
        weights = method.default_weights(weights, alone)
    given = {"cls": cls, "reg": reg, "ctr": ctr, "feat": feat}
    weights = replace(weights, **{key: float(value) for key, value in given.items() if value is not None})
    for method in classes:
        weights = method.given_weights(weights, alone)
    return weights.scaled(float(kd_weight))


class Distiller(nn.Module):
    """Student + frozen teacher; `forward(batch)` returns the student's detection losses plus weighted KD terms.

    The teacher is a plain attribute (not a submodule), so it is absent from parameters(), state_dict(), the
    optimizer, EMA and DDP; it is frozen, always in eval mode and follows `.to()`. `kd` names registered methods
    (crosskd.distill.registry) or a combination of them; they are submodules in `methods` (name -> KDMethod), so
    their learnable state trains with the student. KD recipes follow the teacher's head type.

    Args:
        student, teacher (DenseDetector): detectors with the same classes; their FPN outputs must have equal
            sizes (same strides), while widths may differ (1x1 adapters and connectors). Both dense, or both
            two-stage (FasterRCNN: the student pass is its `loss_and_rois`, and crosskd the registry's R-CNN variant).
        kd_idx (int | None): CrossKD hold point, a tower step; None takes the teacher head's default.
        kd_align (bool): standardise the hold features fed to the other head to its own per-channel statistics.
        kd_hold: the hold features of both heads, 'post' (after step kd_idx's activation, as the reference
            computes them) or 'pre' (before it); every method reading hold features (strategies, PKD on towers) and
            `analyze` use them.
        valid_region: the priors (and PKD positions) that count, set on both heads: 'mmdet' or 'image'
            (`DenseHead.use_valid_region`).
        kd_branch: 'both', or only the 'cls' / 'reg' (+ctr) prediction-KD terms (paper Table 3).
        kd_cls_loss, kd_region: the classification KD loss ('qfl' | 'bce') and the KD region ('all' | 'pos' |
            'neg') of the prediction-KD recipes (paper Table 9).
        pkd_on: PKD on the FPN outputs ('neck') or on the cls / reg tower features at the hold point (Table 2).
        kd_strategy: the cross-head strategy of paper Fig. 7 / Table 12 ('a' is CrossKD; see CrossKD.strategy_pair).
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
        kd_hold: str = "post",
        valid_region: str = "mmdet",
    ) -> None:
        super().__init__()
        check_compatible(student, teacher)
        names = components(kd)
        classes = [method_class(name, teacher.head.head_type) for name in names]
        self.kd = str(kd).strip().lower()
        options = KDOptions(cls_loss=kd_cls_loss, region=kd_region)
        check_ablation(kd_branch, pkd_on, kd_strategy, any(c.cross_head_pass for c in classes))
        check_choice("kd_hold", kd_hold, KD_HOLDS)
        if student.two_stage:
            check_two_stage(self.kd, all(c.two_stage for c in classes), kd_idx, kd_strategy, pkd_on, kd_cls_loss,
                            kd_region)
        student.head.use_valid_region(valid_region)
        teacher.head.use_valid_region(valid_region)
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        teacher.requires_grad_(False).train(False)
        teacher.to(next(student.parameters()).device)
        self.needs = frozenset().union(*(c.needs_for(pkd_on) for c in classes))
        self.weights = weights if weights is not None else resolve_kd_weights(teacher.head.head_type, self.kd)
        idx = resolve_kd_idx(kd_idx, student.head, teacher.head) if "holds" in self.needs else 0
        self.setup = KDSetup(kd_idx=idx, kd_align=bool(kd_align), weights=self.weights, options=options,
                             kd_branch=kd_branch, pkd_on=pkd_on, kd_strategy=kd_strategy, alone=len(names) == 1,
                             kd_hold=kd_hold, valid_region=valid_region)
        self.methods = nn.ModuleDict({name: c(student, teacher, self.setup) for name, c in zip(names, classes)})
        self.log_setup()

    @property
    def kd_idx(self) -> int:
        """The resolved hold point (0 when no method needs hold features)."""
        return self.setup.kd_idx

    @property
    def kd_align(self) -> bool:
        """Whether hold features fed to the other head are aligned to its per-channel statistics."""
        return self.setup.kd_align

    @property
    def kd_hold(self) -> str:
        """The hold features: 'post' (after step kd_idx's activation, the reference's) or 'pre'."""
        return self.setup.kd_hold

    @classmethod
    def from_args(cls, student: DenseDetector, teacher: DenseDetector, args: Any) -> Distiller:
        """Build from run settings (kd, kd_idx, kd_align, kd_hold, the weights, kd_branch, kd_cls_loss, kd_region,
        pkd_on, kd_strategy)."""
        kd = str(args.kd).strip().lower()
        weights = resolve_kd_weights(
            teacher.head.head_type, kd, cls=args.kd_cls_weight, reg=args.kd_reg_weight, ctr=args.kd_ctr_weight,
            feat=args.kd_feat_weight, kd_weight=args.kd_weight,
        )
        return cls(
            student, teacher, kd=kd, kd_idx=args.kd_idx, kd_align=args.kd_align, weights=weights,
            kd_branch=args.kd_branch, kd_cls_loss=args.kd_cls_loss, kd_region=args.kd_region, pkd_on=args.pkd_on,
            kd_strategy=args.kd_strategy, kd_hold=args.kd_hold, valid_region=args.valid_region,
        )

    def settings(self) -> dict[str, Any]:
        """The resolved KD settings (kept in checkpoints' kd_args)."""
        w, setup = self.weights, self.setup
        return {
            "kd": self.kd, "kd_idx": setup.kd_idx, "kd_align": setup.kd_align, "kd_hold": setup.kd_hold,
            "kd_weights": {"cls": w.cls, "reg": w.reg, "ctr": w.ctr, "feat": w.feat, "ld": w.ld},
            "kd_branch": setup.kd_branch, "kd_cls_loss": setup.options.cls_loss, "kd_region": setup.options.region,
            "pkd_on": setup.pkd_on, "kd_strategy": setup.kd_strategy, "valid_region": setup.valid_region,
        }

    def log_setup(self) -> None:
        """Log the KD method, the head types, the hold point, the ablation settings and the loss weights (one line)."""
        if not self.methods:
            LOGGER.info("kd=none: training the student without distillation (the teacher is loaded but unused)")
            return
        t_type, s_type = self.teacher.head.head_type, self.student.head.head_type
        w = self.weights
        cross_head = any(method.cross_head_pass for method in self.methods.values())
        cross = f", kd_idx={self.kd_idx}, hold={self.kd_hold}, align={self.kd_align}" if cross_head else ""
        if cross_head and self.student.two_stage:
            cross = ", cross-head: the teacher's R-CNN stage at the student's RoIs (no align)"
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
        """The student's detection losses (own predictions only) plus every method's KD terms, in method order.

        Keys: kd_cls, kd_reg, kd_ctr (CrossKD, or the single prediction method), kd_feat (PKD), and with a second
        prediction method pm_cls, pm_reg, pm_ctr (crosskd+pm) or ld_reg (crosskd+ld).

        Args:
            batch (Batch): images [B, 3, H, W] 0..1 RGB, gt_boxes [B, M, 4] xyxy input pixels, gt_labels [B, M],
                img_sizes [B, 2] (h, w) of each image's unpadded region (optional: without it, all is image).

        Returns:
            dict[str, Tensor]: scalar losses, already weighted.
        """
        losses, student = self.student_pass(batch)
        if not self.methods:
            return losses
        passes = student, self.teacher_pass(batch)
        ctx = KDContext(batch, (self.student.head, self.teacher.head), list(self.student.strides), passes,
                        self.prediction_inputs)
        for method in self.methods.values():
            terms = method.named_losses(ctx)
            assert not terms.keys() & losses.keys(), f"KD terms {sorted(terms)} overwrite {sorted(losses)}"
            losses.update(terms)
        return losses

    def student_pass(self, batch: Any) -> tuple[dict[str, Tensor], StudentPass]:
        """The student's detection losses (exactly its own `loss(batch)`) and what the KD methods read of its pass:
        a dense head split at kd_idx with its priors and targets, or a two-stage detector's FPN maps, sampled
        training RoIs [K, 5] and their pooled features."""
        if self.student.two_stage:
            run = self.student.loss_and_rois(batch)
            return dict(run.losses), StudentPass(run.feats, None, None, None, None, run.rois, run.roi_feats)
        s_head = self.student.head
        s_feats = self.student.extract_features(batch.images)
        holds, outputs = head_pass(s_head, s_feats, self.kd_idx, self.kd_hold)
        priors = s_head.priors(feat_sizes(s_feats), s_feats[0].device)
        targets = s_head.get_targets(priors, batch, outputs)
        return dict(s_head.loss(outputs, priors, targets)), StudentPass(s_feats, holds, outputs, priors, targets)

    @torch.no_grad()
    def teacher_pass(self, batch: Any) -> TeacherPass:
        """The teacher's FPN outputs, plus its head split at kd_idx when a method needs hold features or outputs.

        The backbone and FPN run under inference_mode; the head under no_grad, so the hold features and outputs are
        plain tensors that the cross-head and KD losses may save for backward."""
        with torch.inference_mode():
            t_feats = self.teacher.extract_features(batch.images)
        if self.kd_idx == 0:  # the hold features are the FPN outputs, which strategy d feeds to the student with grad
            t_feats = [f.clone() for f in t_feats]
        if not self.needs & {"holds", "teacher_outputs"}:
            return TeacherPass(t_feats, None, None)
        t_holds, t_out = head_pass(self.teacher.head, t_feats, self.kd_idx, self.kd_hold)
        return TeacherPass(t_feats, t_holds, t_out)

    def prediction_inputs(self, ctx: KDContext) -> PredictionInputs:
        """Both heads' flat predictions and the KD priors and targets, built once a step when a method asks."""
        t_flat = ctx.teacher_head.flatten_outputs(ctx.teacher.outputs)
        own = ctx.student_head.flatten_outputs(ctx.student.outputs)
        t_priors, kd_targets = self.kd_targets(ctx.teacher.feats, ctx.batch, ctx.student.priors, ctx.student.targets,
                                               ctx.teacher.outputs)
        return PredictionInputs(own, t_flat, t_priors, kd_targets)

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

    def kd_state(self) -> dict[str, dict[str, Tensor]]:
        """CPU copies of the methods' learnable state (adapters, connectors) by method name, for last.pt; methods
        without any are left out."""
        states = {name: {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}
                  for name, method in self.methods.items()}
        return {name: state for name, state in states.items() if state}

    def load_kd_state(self, states: dict[str, dict[str, Tensor]]) -> None:
        """Restore `kd_state()`: every configured method that has learnable state and a saved entry loads it."""
        for name, method in self.methods.items():
            if name in states and method.state_dict():
                method.load_state_dict(states[name])
