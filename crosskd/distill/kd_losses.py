"""Distillation loss recipes, chosen by the teacher's head type (weights and normalisers of the reference configs).

Every recipe compares predictions in the teacher head's layout (`pred`: cross-head outputs for CrossKD or the
student's own outputs for prediction mimicking) with the teacher's outputs (`target`), and returns already
weighted scalar terms keyed `kd_cls`, `kd_reg` and `kd_ctr`. Flat outputs are cls [B, N, C] logits, reg [B, N, R]
and ctr [B, N] logits over the N priors of the teacher head. `KDOptions` holds the ablation settings of the paper
(Table 9: the classification KD loss and the region where KD applies); priors with label weight 0 (ignored, or outside
their image's valid region, `valid_region`) never contribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from crosskd.errors import ConfigError
from crosskd.losses.detection import bce_with_logits, giou_loss, iou_loss
from crosskd.losses.distill import kd_quality_focal_loss, kl_div_loss, pkd_loss

if TYPE_CHECKING:
    from crosskd.models.heads.base import DenseHead, FlatOutputs, Priors, Targets

KD_BRANCHES = ("both", "cls", "reg")  # paper Table 3
KD_CLS_LOSSES = {"qfl": 1.0, "bce": 0.0}  # paper Table 9: the KD quality focal loss's beta (0 is plain soft BCE)
KD_REGIONS = ("all", "pos", "neg")  # paper Table 9
PKD_POSITIONS = ("neck", "cls", "reg")  # paper Table 2
KD_STRATEGIES = ("a", "b", "c", "d")  # paper Table 12 / Fig. 7; (a) is CrossKD
ABLATION_DEFAULTS = {  # the settings that reproduce CrossKD itself
    "kd_branch": "both", "kd_cls_loss": "qfl", "kd_region": "all", "pkd_on": "neck", "kd_strategy": "a",
}
LD_TEMPERATURE = 10.0
LD_AVG_FACTOR = 4.0  # LD divides its w-weighted sum over positive anchors' sides by 4 only (ld_head.py)
PKD_ALONE_WEIGHT = 10.0  # MMRazor pkd_fpn_retina_x101_retina_r50_2x_coco.py (and its FCOS-teacher twin): loss_weight=10
PKD_ALONE_LEVELS = 4  # MMRazor records FPN outputs 0..3 (loss_pkd_fpn0..3); CrossKD+PKD uses all 5 levels
EPS = 1e-6


@dataclass(frozen=True)
class KDWeights:
    """Loss weights of the KD terms (before the global `kd_weight`); 0 disables a term."""

    cls: float = 0.0
    reg: float = 0.0
    ctr: float = 0.0
    feat: float = 0.0
    ld: float = 0.0  # LD's box-distribution term (kd=ld, crosskd+ld)

    def scaled(self, factor: float) -> KDWeights:
        """Every weight times `factor` (the global kd_weight)."""
        return KDWeights(*(value * factor for value in astuple(self)))


DEFAULT_WEIGHTS = {
    "gfl": KDWeights(cls=1.0, reg=4.0, feat=6.0),
    "retinanet": KDWeights(cls=1.0, reg=1.0, feat=2.0),
    "atss": KDWeights(cls=1.0, reg=1.0, ctr=1.0, feat=1.0),
    "fcos": KDWeights(cls=0.4, reg=0.75, feat=2.0),
    # crosskd(+pkd)_r18_faster-rcnn_r50_fpn_1x_coco: KL (T=3) 0.5, L1 1.0, PKD 6 (distill/two_stage.py)
    "faster_rcnn": KDWeights(cls=0.5, reg=1.0, feat=6.0),
    # YOLO's head is GFL's (sigmoid scores, DFL bins): GFL's recipe and weights; feat is Ultralytics' dis=6.0 (kd=sl2)
    "yolo": KDWeights(cls=1.0, reg=4.0, feat=6.0),
}
LD_WEIGHTS = KDWeights(reg=0.25)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a one-line ConfigError when a KD setting is not one of its choices."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class KDOptions:
    """Ablation settings of the prediction-KD recipes (paper Table 9).

    cls_loss: 'qfl' (KD quality focal loss, beta 1, the paper's choice) or 'bce' (plain soft-target BCE, beta 0).
    region: 'all' valid priors, 'pos' the assigner's positives only, or 'neg' its (valid) negatives only.
    """

    cls_loss: str = "qfl"
    region: str = "all"

    def __post_init__(self) -> None:
        check_choice("kd_cls_loss", self.cls_loss, tuple(KD_CLS_LOSSES))
        check_choice("kd_region", self.region, KD_REGIONS)

    @property
    def cls_beta(self) -> float:
        """The focusing exponent of the classification KD loss."""
        return KD_CLS_LOSSES[self.cls_loss]


DEFAULT_OPTIONS = KDOptions()


class KDInputs(NamedTuple):
    """What a prediction-KD recipe needs; every tensor is in the teacher head's prior layout."""

    pred: FlatOutputs  # cross-head (crosskd) or the student's own (pm) predictions: cls [B,N,C], reg [B,N,R]
    target: FlatOutputs  # the teacher's predictions (no graph)
    priors: Priors  # the teacher head's priors (anchors or points)
    targets: Targets  # assigner output of the teacher's head type (regions and normalisers)


def region_mask(targets: Targets, region: str = "all") -> Tensor:
    """[B, N] float mask of the priors KD applies to: valid (label weight > 0) and, per `region`, positive/negative."""
    valid = targets.label_weights > 0
    if region == "pos":
        valid = valid & targets.pos_mask
    elif region == "neg":
        valid = valid & ~targets.pos_mask
    return valid.float()


def teacher_box_weight(teacher_cls: Tensor, mask: Tensor) -> Tensor:
    """w = sigmoid(max_c teacher logit) per prior, times `mask` [B, N] (0 outside the KD region). [B,N,C] -> [B,N]."""
    return teacher_cls.detach().float().amax(dim=-1).sigmoid() * mask


def kd_cls_sum(pred_cls: Tensor, teacher_cls: Tensor, weight: Tensor, beta: float = 1.0) -> Tensor:
    """KD quality focal loss (`beta` 0: soft BCE) summed over priors and classes, each prior weighted by `weight`
    [B,N]."""
    loss = kd_quality_focal_loss(pred_cls.float(), teacher_cls.detach().float(), beta=beta)  # [B,N,C]
    return (loss.sum(dim=-1) * weight).sum()  # class sum first: backward keeps [B,N], not [B,N,C]


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


def gfl_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """GFL: KD-QFL on the KD region / num_pos; DFL-KL (T 1, summed bins) w-weighted, / 4 / Σw."""
    targets = inputs.targets
    mask = region_mask(targets, options.region)  # [B,N]
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, mask, options.cls_beta) / targets.num_pos
    w = teacher_box_weight(inputs.target.cls, mask)  # [B,N]
    kl = dfl_kl_sum(inputs.pred.reg, inputs.target.reg, w, temperature=1.0, reduction="sum")
    kd_reg = kl / 4.0 / w.sum().clamp(min=EPS)
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


def retina_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """RetinaNet: KD-QFL on the KD region and w-weighted GIoU of decoded boxes, both / Σ_img max(num_pos_img, 1)."""
    targets = inputs.targets
    mask = region_mask(targets, options.region)  # [B,N]
    num_pos = targets.pos_mask.sum(dim=1).clamp(min=1).sum().float()  # per GPU, not averaged over ranks
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, mask, options.cls_beta) / num_pos
    w = teacher_box_weight(inputs.target.cls, mask)  # [B,N]
    kd_reg = (giou_loss(*decoded_pair(head, inputs)) * w).sum() / num_pos
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


def atss_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """ATSS: KD-QFL, w-weighted GIoU and soft centerness BCE on positives (of the region), all / num_pos."""
    targets = inputs.targets
    mask = region_mask(targets, options.region)  # [B,N]
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, mask, options.cls_beta) / targets.num_pos
    w = teacher_box_weight(inputs.target.cls, mask)  # [B,N]
    kd_reg = (giou_loss(*decoded_pair(head, inputs)) * w).sum() / targets.num_pos
    pos = targets.pos_mask * mask  # [B,N]
    soft_ctr = inputs.target.ctr.detach().float().sigmoid()
    kd_ctr = (bce_with_logits(inputs.pred.ctr.float(), soft_ctr) * pos).sum() / targets.num_pos
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg, "kd_ctr": kd_ctr * weights.ctr}


def fcos_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """FCOS: KD-QFL and w-weighted −log IoU of decoded boxes over every valid point, both / centerness_denorm.

    With valid_region=mmdet every point counts, padding included, as in the reference; with 'image' points in
    another image's padding are left out (their label weight is 0).
    """
    denorm = inputs.targets.centerness_denorm
    mask = region_mask(inputs.targets, options.region)  # [B,N]
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, mask, options.cls_beta) / denorm
    w = teacher_box_weight(inputs.target.cls, mask)  # [B,N]
    kd_reg = (iou_loss(*decoded_pair(head, inputs), mode="log", eps=EPS) * w).sum() / denorm
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


def yolo_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """YOLO: GFL's terms, KD-QFL divided by the YOLO detection loss's normaliser (the sum of the task-aligned soft
    class targets, at least 1) and DFL-KL (T 1, summed bins) w-weighted, / 4 / Σw."""
    targets = inputs.targets
    mask = region_mask(targets, options.region)  # [B,N]
    scores = targets.label_scores if targets.label_scores is not None else targets.pos_mask.float()
    kd_cls = kd_cls_sum(inputs.pred.cls, inputs.target.cls, mask, options.cls_beta) / scores.sum().clamp(min=1.0)
    w = teacher_box_weight(inputs.target.cls, mask)  # [B,N]
    kl = dfl_kl_sum(inputs.pred.reg, inputs.target.reg, w, temperature=1.0, reduction="sum")
    kd_reg = kl / 4.0 / w.sum().clamp(min=EPS)
    return {"kd_cls": kd_cls * weights.cls, "kd_reg": kd_reg * weights.reg}


Recipe = Callable[[KDInputs, "DenseHead", KDWeights, KDOptions], dict[str, Tensor]]
RECIPES: dict[str, Recipe] = {
    "gfl": gfl_kd,
    "retinanet": retina_kd,
    "atss": atss_kd,
    "fcos": fcos_kd,
    "yolo": yolo_kd,
}


def prediction_kd(
    inputs: KDInputs, head: DenseHead, weights: KDWeights, options: KDOptions = DEFAULT_OPTIONS
) -> dict[str, Tensor]:
    """The KD terms of `head`'s type (the head whose layout the outputs have): scalar kd_cls, kd_reg (, kd_ctr)."""
    return RECIPES[head.head_type](inputs, head, weights, options)


def keep_branch(losses: dict[str, Tensor], branch: str) -> dict[str, Tensor]:
    """Keep the KD terms of one branch (paper Table 3): cls → *_cls, reg → *_reg and *_ctr, both → all."""
    if branch == "both":
        return losses
    suffixes = ("_cls",) if branch == "cls" else ("_reg", "_ctr")
    return {k: v for k, v in losses.items() if k.endswith(suffixes)}


def renamed(losses: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """kd_cls → {prefix}_cls etc., so a second method's terms do not overwrite CrossKD's."""
    return {prefix + k.removeprefix("kd"): v for k, v in losses.items()}


def ld_loss(student: FlatOutputs, teacher: FlatOutputs, targets: Targets, weight: float) -> Tensor:
    """LD: KL (T 10, mean over bins × T²) on positive anchors' box distributions, each side weighted by the student's
    detached max score, summed and divided by LD_AVG_FACTOR (4) only, as the reference's avg_factor=4.0.
    reg [B, N, 4*(reg_max+1)] on both sides; a scalar."""
    pos = targets.pos_mask & (targets.label_weights > 0)  # [B,N]
    w = student.cls.detach().float().amax(dim=-1).sigmoid() * pos  # [B,N]
    kl = dfl_kl_sum(student.reg, teacher.reg, w, temperature=LD_TEMPERATURE, reduction="mean")
    return kl / LD_AVG_FACTOR * weight


def score_weighted_l2(student: Tensor, teacher: Tensor, score: Tensor, eps: float = 1e-9) -> Tensor:
    """Ultralytics' feature KD on one level: the squared difference of [B, C, H, W] maps weighted per position by the
    teacher's score [B, 1, H, W], summed and divided by C·Σscore (a scalar)."""
    squared = (student.float() - teacher.detach().float()).square()
    return (squared * score).sum() / (score.sum() * student.shape[1] + eps)


def feature_kd(
    student_feats: list[Tensor], teacher_feats: list[Tensor], weight: float, masks: list[Tensor] | None = None
) -> Tensor:
    """PKD over the given levels (per-level losses summed) × weight: lists of [B, C, H_l, W_l] → a scalar.

    `masks` (list of [B, H_l, W_l] bool, True inside each image) leave batch padding out of the statistics and mean.
    """
    masks = masks if masks is not None else [None] * len(student_feats)
    pairs = zip(student_feats, teacher_feats, masks, strict=True)
    return sum(pkd_loss(s.float(), t.detach().float(), m) for s, t, m in pairs) * weight
