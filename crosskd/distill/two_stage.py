"""CrossKD for Faster R-CNN, as the authors' `faster-rcnn` branch computes it (paper Table 11).

The cross-head is the teacher's whole R-CNN stage (RoIAlign, shared FCs, classifier and box predictor) run on the
student's FPN maps at the student's sampled training RoIs (512 per image); the teacher's own outputs come from its
FPN maps at the same RoIs. No RPN KD, no align_scale. Losses:
- `kd_cls`: KL(softmax(teacher/T) ‖ softmax(cross/T)) over the C+1 classes (background included), summed over the
  classes, × T², T = 3, over all sampled RoIs / their number; weight 0.5.
- `kd_reg`: L1 between the cross-head's and the teacher's deltas of the teacher's best foreground class, weighted by
  the teacher's probability of that class, / (4 · Σ weights); weight 1.0.
The student's own detection losses are unchanged (`FasterRCNN.loss_and_rois` returns them with the RoIs).
`kd=crosskd` with a Faster R-CNN teacher runs these functions (`methods/crosskd_rcnn.RoICrossKD`, which also owns the
1x1 width adapter for a narrower student FPN).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from crosskd.losses.detection import l1_loss, weight_reduce
from crosskd.losses.distill import kl_div_loss
from crosskd.models.two_stage import RoIHead, RoIOutputs

KD_T = 3.0  # KnowledgeDistillationKLDivLoss T
KD_CLS_WEIGHT = 0.5
KD_REG_WEIGHT = 1.0


class CrossHeadOutputs(NamedTuple):
    """The teacher's R-CNN stage on the student's features (`cross`) and on its own (`teacher`, no grad)."""

    cross: RoIOutputs  # cls_score [K, C+1], bbox_pred [K, R*4]
    teacher: RoIOutputs


def frcnn_cross_head(roi_head: RoIHead, student_feats: list[Tensor], teacher_feats: list[Tensor],
                     rois: Tensor, student_pooled: Tensor | None = None) -> CrossHeadOutputs:
    """The cross-head pass at RoIs [K, 5]: the teacher's RoI head `roi_head` on student FPN maps (gradient to the
    student; already as wide as the teacher's) and on the teacher's own maps (detached). `student_pooled`: the
    student maps already pooled at `rois` as `roi_head.pool` would pool them (the student's own R-CNN input, when
    the two heads pool alike and no adapter stands between), so RoIAlign is not run twice on the same maps."""
    cross = roi_head(roi_head.pool(student_feats, rois) if student_pooled is None else student_pooled)
    with torch.no_grad():
        taught = roi_head(roi_head.pool(teacher_feats, rois))
    return CrossHeadOutputs(cross, RoIOutputs(taught.cls_score.detach(), taught.bbox_pred.detach()))


def frcnn_crosskd_losses(roi_head: RoIHead, outputs: CrossHeadOutputs, temperature: float = KD_T,
                         cls_weight: float = KD_CLS_WEIGHT, reg_weight: float = KD_REG_WEIGHT) -> dict[str, Tensor]:
    """`kd_cls` and `kd_reg` of the cross-head pass (module docstring)."""
    cross, taught = outputs
    num_rois = max(cross.cls_score.shape[0], 1)
    kd_cls = weight_reduce(kl_div_loss(cross.cls_score, taught.cls_score, temperature, "sum"), None, num_rois)
    num_classes = roi_head.num_classes
    probs = taught.cls_score.float().softmax(dim=1)[:, :num_classes]  # [K, C]
    weight, best = probs.max(dim=1)  # [K] each: the teacher's best foreground class and its probability
    cross_deltas = roi_head.class_deltas(cross.bbox_pred.float(), best)  # [K, 4]
    teacher_deltas = roi_head.class_deltas(taught.bbox_pred.float(), best)  # [K, 4]
    kd_reg = weight_reduce(l1_loss(cross_deltas, teacher_deltas), weight[:, None], 4 * weight.sum())
    return {"kd_cls": kd_cls * cls_weight, "kd_reg": kd_reg * reg_weight}
