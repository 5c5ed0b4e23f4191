"""Distillation loss recipes, chosen by the teacher's head type (weights and normalisers of the reference configs).

Every recipe compares predictions in the teacher head's layout (`pred`: cross-head outputs for CrossKD or the
student's own outputs for prediction mimicking) with the teacher's outputs (`target`), and returns already
weighted scalar terms keyed `kd_cls`, `kd_reg` and `kd_ctr`. Flat outputs are cls [B, N, C] logits, reg [B, N, R]
and ctr [B, N] logits over the N priors of the teacher head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from crosskd.dist import reduce_mean
from crosskd.errors import ConfigError
from crosskd.losses.detection import bce_with_logits, giou_loss, iou_loss
from crosskd.losses.distill import kd_quality_focal_loss, kl_div_loss, pkd_loss

if TYPE_CHECKING:
    from crosskd.models.heads.base import DenseHead, FlatOutputs, Priors, Targets

KD_METHODS = {  # kd= method -> components; the same names as crosskd.settings.KD_METHOD_NAMES (tested)
    "crosskd": frozenset({"crosskd"}),
    "pm": frozenset({"pm"}),
    "ld": frozenset({"ld"}),
    "pkd": frozenset({"pkd"}),
    "crosskd+pkd": frozenset({"crosskd", "pkd"}),
    "none": frozenset(),
}
LD_TEMPERATURE = 10.0
EPS = 1e-6


@dataclass(frozen=True)
class KDWeights:
    """Loss weights of the KD terms (before the global `kd_weight`); 0 disables a term."""

    cls: float = 0.0
    reg: float = 0.0
    ctr: float = 0.0
    feat: float = 0.0

    def scaled(self, factor: float) -> KDWeights:
        """Every weight times `factor` (the global kd_weight)."""
        return KDWeights(self.cls * factor, self.reg * factor, self.ctr * factor, self.feat * factor)


DEFAULT_WEIGHTS = {
    "gfl": KDWeights(cls=1.0, reg=4.0, feat=6.0),
    "retinanet": KDWeights(cls=1.0, reg=1.0, feat=2.0),
    "atss": KDWeights(cls=1.0, reg=1.0, ctr=1.0, feat=1.0),
    "fcos": KDWeights(cls=0.4, reg=0.75, feat=2.0),
}
LD_WEIGHTS = KDWeights(reg=0.25)


class KDInputs(NamedTuple):
    """What a prediction-KD recipe needs; every tensor is in the teacher head's prior layout."""

    pred: FlatOutputs  # cross-head (crosskd) or the student's own (pm) predictions: cls [B,N,C], reg [B,N,R]
    target: FlatOutputs  # the teacher's predictions (no graph)
    priors: Priors  # the teacher head's priors (anchors or points)
    targets: Targets  # assigner output of the teacher's head type (regions and normalisers)


def parse_kd(kd: str) -> frozenset[str]:
    """The set of KD components of a `kd=` value, e.g. 'crosskd+pkd' -> {'crosskd', 'pkd'}."""
    key = str(kd).strip().lower()
    if key not in KD_METHODS:
        raise ConfigError(f"kd={kd!r} is not a distillation method; use one of {', '.join(KD_METHODS)}")
    return KD_METHODS[key]


def resolve_kd_weights(
    head_type: str,
    kd: str = "crosskd",
    cls: float | None = None,
    reg: float | None = None,
    ctr: float | None = None,
    feat: float | None = None,
    kd_weight: float = 1.0,
) -> KDWeights:
    """Per-term weights: the teacher head type's defaults (LD's for kd=ld), overridden where given, × kd_weight."""
    base = LD_WEIGHTS if kd == "ld" else DEFAULT_WEIGHTS[head_type]
    picked = KDWeights(
        cls=base.cls if cls is None else float(cls),
        reg=base.reg if reg is None else float(reg),
        ctr=base.ctr if ctr is None else float(ctr),
        feat=DEFAULT_WEIGHTS[head_type].feat if feat is None else float(feat),
    )
    return picked.scaled(float(kd_weight))


def teacher_box_weight(teacher_cls: Tensor, label_weights: Tensor | None = None) -> Tensor:
    """w = sigmoid(max_c teacher logit) per prior, 0 where label_weights == 0 (when given). [B,N,C] -> [B,N]."""
    weight = teacher_cls.detach().float().amax(dim=-1).sigmoid()
    return weight if label_weights is None else weight * (label_weights > 0)


def kd_cls_sum(pred_cls: Tensor, teacher_cls: Tensor, weight: Tensor | None = None) -> Tensor:
    """KD quality focal loss (beta 1) summed over priors and classes, each prior weighted by `weight` [B,N]."""
    loss = kd_quality_focal_loss(pred_cls.float(), teacher_cls.detach().float(), beta=1.0)  # [B,N,C]
    if weight is not None:
        loss = loss * weight[..., None]
    return loss.sum()


def dfl_kl_sum(pred_reg: Tensor, teacher_reg: Tensor, weight: Tensor, temperature: float, reduction: str) -> Tensor:
    """KL between the 4 per-side distributions of [B,N,4*bins] logits, each side weighted by `weight` [B,N], summed."""
    bins = pred_reg.shape[-1] // 4
    pred = pred_reg.float().unflatten(-1, (4, bins))  # [B,N,4,bins]
    target = teacher_reg.detach().float().unflatten(-1, (4, bins))  # [B,N,4,bins]
    kl = kl_div_loss(pred, target, T=temperature, class_reduction=reduction)  # [B,N,4]
    return (kl * weight[..., None]).sum()


def decoded_pair(head: DenseHead, inputs: KDInputs) -> tuple[Tensor, Tensor]:
    """Boxes decoded from the predicted and the teacher's regression outputs with the same priors, [B,N,4] each."""
    pred_boxes = head.decode_boxes(inputs.pred.reg.float(), inputs.priors)
    teacher_boxes = head.decode_boxes(inputs.target.reg.detach().float(), inputs.priors)
    return pred_boxes, teacher_boxes


def gfl_kd(inputs: KDInputs, head: DenseHead, weights: KDWeights) -> dict[str, Tensor]:
    """GFL: KD-QFL on valid anchors / num_pos; DFL-KL (T 1, summed bins) w-weighted, / 4 / Σw."""
    targets = inputs.targets
    label_weights = targets.label_weights.float()
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, label_weights) / targets.num_pos
    w = teacher_box_weight(inputs.target.cls, label_weights)  # [B,N]
    kl = dfl_kl_sum(inputs.pred.reg, inputs.target.reg, w, temperature=1.0, reduction="sum")
    kd_reg = kl / 4.0 / w.sum().clamp(min=EPS)
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


def retina_kd(inputs: KDInputs, head: DenseHead, weights: KDWeights) -> dict[str, Tensor]:
    """RetinaNet: KD-QFL on valid anchors and w-weighted GIoU of decoded boxes, both / Σ_img max(num_pos_img, 1)."""
    targets = inputs.targets
    label_weights = targets.label_weights.float()
    num_pos = targets.pos_mask.sum(dim=1).clamp(min=1).sum().float()  # per GPU, not averaged over ranks
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, label_weights) / num_pos
    w = teacher_box_weight(inputs.target.cls, label_weights)  # [B,N]
    kd_reg = (giou_loss(*decoded_pair(head, inputs)) * w).sum() / num_pos
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


def atss_kd(inputs: KDInputs, head: DenseHead, weights: KDWeights) -> dict[str, Tensor]:
    """ATSS: KD-QFL, w-weighted GIoU and soft centerness BCE on positives, all / num_pos (averaged over ranks)."""
    targets = inputs.targets
    label_weights = targets.label_weights.float()
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, label_weights) / targets.num_pos
    w = teacher_box_weight(inputs.target.cls, label_weights)  # [B,N]
    kd_reg = (giou_loss(*decoded_pair(head, inputs)) * w).sum() / targets.num_pos
    pos = targets.pos_mask  # [B,N]
    soft_ctr = inputs.target.ctr.detach().float().sigmoid()
    kd_ctr = (bce_with_logits(inputs.pred.ctr.float(), soft_ctr) * pos).sum() / targets.num_pos
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg, "kd_ctr": kd_ctr * weights.ctr}


def fcos_kd(inputs: KDInputs, head: DenseHead, weights: KDWeights) -> dict[str, Tensor]:
    """FCOS: KD-QFL and w-weighted −log IoU of decoded boxes over all points, both / centerness_denorm."""
    denorm = inputs.targets.centerness_denorm
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls) / denorm
    w = teacher_box_weight(inputs.target.cls)  # [B,N], no mask: every point, padding included
    kd_reg = (iou_loss(*decoded_pair(head, inputs), mode="log", eps=EPS) * w).sum() / denorm
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


RECIPES: dict[str, Callable[[KDInputs, DenseHead, KDWeights], dict[str, Tensor]]] = {
    "gfl": gfl_kd,
    "retinanet": retina_kd,
    "atss": atss_kd,
    "fcos": fcos_kd,
}


def prediction_kd(inputs: KDInputs, head: DenseHead, weights: KDWeights) -> dict[str, Tensor]:
    """The KD terms of the teacher head's type (`head` is the teacher's head): scalar kd_cls, kd_reg (, kd_ctr)."""
    return RECIPES[head.head_type](inputs, head, weights)


def ld_loss(student: FlatOutputs, teacher: FlatOutputs, targets: Targets, weight: float) -> Tensor:
    """LD: KL (T 10, mean over bins × T²) on positive anchors' box distributions, weighted by the student's
    detached max score, / (4 · Σ weights averaged over ranks). reg [B, N, 4*(reg_max+1)] on both sides; a scalar."""
    pos = targets.pos_mask  # [B,N]
    w = student.cls.detach().float().amax(dim=-1).sigmoid() * pos  # [B,N]
    kl = dfl_kl_sum(student.reg, teacher.reg, w, temperature=LD_TEMPERATURE, reduction="mean")
    return kl / (4.0 * reduce_mean(w.sum()).clamp(min=EPS)) * weight


def feature_kd(student_feats: list[Tensor], teacher_feats: list[Tensor], weight: float) -> Tensor:
    """PKD over every FPN level (per-level losses summed) × weight: lists of [B, C, H_l, W_l] → a scalar."""
    return sum(pkd_loss(s.float(), t.detach().float()) for s, t in zip(student_feats, teacher_feats)) * weight
