"""RoI pooling over a feature pyramid: which level each RoI reads (FPN paper eq. 1) and RoIAlign on that level.

RoIs are flat `[K, 5]` rows (image index, x1, y1, x2, y2) in input pixels, as torchvision's `roi_align` takes them.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from crosskd.ops.roi_align import roi_align

LEVEL_EPS = 1e-6  # absorbs float error at exact powers of two (torchvision's LevelMapper eps)


def roi_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Pyramid level `[K]` (0 = finest) of xyxy boxes `[K, 4]`: ⌊log2(√area / finest_scale)⌋ clamped to the levels.

    MMDetection's SingleRoIExtractor and torchvision's LevelMapper (k0 = 4, s0 = 224 over P2–P5) are this formula;
    they differ only in where the 1e-6 goes (MMDetection adds it inside the log), which moves no real box.
    """
    scale = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).clamp(min=0).sqrt()  # [K]
    levels = torch.floor(torch.log2(scale / finest_scale) + LEVEL_EPS)
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    feats: Sequence[Tensor],
    rois: Tensor,
    strides: Sequence[int],
    output_size: int = 7,
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
) -> Tensor:
    """RoIAlign of each RoI on its own level: `[K, C, output_size, output_size]`.

    Args:
        feats: one map [B, C, H/s, W/s] per stride s of `strides` (P2–P5: 4, 8, 16, 32).
        rois: [K, 5] (image index, x1, y1, x2, y2) input pixels.
        sampling_ratio: sample points per bin side (0: adaptive, MMDetection; torchvision's Faster R-CNN uses 2).
        aligned: shift by half a pixel (MMCV's RoIAlign default, True; torchvision's MultiScaleRoIAlign, False).
    """
    levels = roi_levels(rois[:, 1:], len(feats), finest_scale)  # [K]
    indices, pooled = [], []
    for level, (feat, stride) in enumerate(zip(feats, strides, strict=True)):
        index = torch.nonzero(levels == level).squeeze(1)  # [K_l]
        indices.append(index)
        pooled.append(roi_align(feat, rois[index].to(feat.dtype), output_size, 1.0 / stride, sampling_ratio, aligned))
    dtype = feats[0].dtype
    by_level = torch.cat([p.to(dtype) for p in pooled])  # [K, C, S, S], level-major
    return by_level[torch.cat(indices).argsort()]  # back in the RoIs' order: one gather, not a full copy per level
