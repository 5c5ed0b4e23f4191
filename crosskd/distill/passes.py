"""What one distillation step computes once for every KD method: the student's and the teacher's passes, split at
the hold point, and the helpers they use (align_scale, per-level feature masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from crosskd.models.heads.base import HeadOutputs, Priors, Targets
from crosskd.models.heads.regions import padded_size, region_sizes

if TYPE_CHECKING:
    from crosskd.models.heads.base import DenseHead, LevelOutput

ALIGN_EPS = 1e-6
KD_HOLDS = ("post", "pre")  # the hold feature: after step kd_idx's activation (what the reference computes) or before
HoldFeatures = list[tuple[Tensor, Tensor]]  # per level: (cls, reg) tower features at the hold point (kd_hold)


class StudentPass(NamedTuple):
    """What the student's forward produced for one batch (a two-stage student: feats and rois only)."""

    feats: list[Tensor]  # FPN outputs, [B, C_s, H_l, W_l] per level
    holds: HoldFeatures | None
    outputs: HeadOutputs | None
    priors: Priors | None
    targets: Targets | None
    rois: Tensor | None = None  # [K, 5] (image index, x1, y1, x2, y2): a two-stage student's sampled training RoIs
    roi_feats: Tensor | None = None  # [K, C_s, roi, roi]: its R-CNN stage's pooled features at `rois`


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


def head_pass(
    head: DenseHead, feats: list[Tensor], idx: int, hold: str = "post"
) -> tuple[HoldFeatures, HeadOutputs]:
    """Run a head split at tower step `idx`: the hold features per level and the (identical to forward) outputs.

    `hold='post'` takes the features after step idx's activation, as the reference computes them (mmcv's in-place
    ReLU rewrites its stored pre-activation); 'pre' keeps the pre-activation. At idx 0 both are the FPN feature.

    Args:
        feats (list[Tensor[B, C, H_l, W_l]]): FPN outputs, one per level.

    Returns:
        holds: per level (cls, reg), each [B, feat_channels, H_l, W_l]; outputs: HeadOutputs.
    """
    pre = [head.forward_tower(x, idx, level) for level, x in enumerate(feats)]
    if hold == "pre":
        outputs = [head.forward_from(cls_feat, reg_feat, level, idx) for level, (cls_feat, reg_feat) in enumerate(pre)]
        return pre, stack_levels(outputs)
    holds = [head.activate_hold(cls_feat, reg_feat, idx, level) for level, (cls_feat, reg_feat) in enumerate(pre)]
    outputs = [head.forward_from(cls_feat, reg_feat, level, idx, activated=True)
               for level, (cls_feat, reg_feat) in enumerate(holds)]
    return holds, stack_levels(outputs)


def feat_sizes(feats: list[Tensor]) -> list[tuple[int, int]]:
    """(H, W) of every [B, C, H, W] feature map."""
    return [(int(x.shape[-2]), int(x.shape[-1])) for x in feats]


def batch_region_sizes(batch, region: str) -> Tensor | None:
    """(h, w) [B, 2] of each image's valid region (`region_sizes`) of a batch; None without `img_sizes`."""
    img_sizes = getattr(batch, "img_sizes", None)
    return None if img_sizes is None else region_sizes(img_sizes, padded_size(batch), region)


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
