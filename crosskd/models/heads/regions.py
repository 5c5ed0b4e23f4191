"""Which priors of a padded batch count: each image's valid region (MMDetection's valid flags or the unpadded image)
and the priors whose grid cell starts inside it."""

from collections.abc import Sequence

import torch
from torch import Tensor

from crosskd.ops.boxes import Priors

CELL_EPS = 1e-3  # absorbs float error in anchor centres (x1 + x2) / 2 that sit exactly on a cell's start
VALID_REGIONS = ("mmdet", "image")  # the valid_region setting: MMDetection's valid flags, or the unpadded image
PAD_SIZE_DIVISOR = 32  # MMDetection's pad_size_divisor: its valid flags cover each image padded to a multiple of it


def valid_prior_mask(priors: Priors, img_sizes: Tensor) -> Tensor:
    """[B, N] True where a prior's grid cell starts inside its image's valid region (MMDet's valid flags).

    A prior at grid index (i, j) of stride s is valid for an image of (h, w) when i·s < h and j·s < w, i.e. its
    level keeps ceil(h / s) rows and ceil(w / s) columns; the rest lies in the batch padding of another image.

    Args:
        priors (Priors): points [N, 2] (x, y) at (index + offset)·stride with 0 ≤ offset < 1, strides [N].
        img_sizes (Tensor[B, 2]): (h, w) of each image's unpadded region in input pixels.
    """
    strides = priors.strides[:, None]  # [N, 1]
    cell_start = torch.floor(priors.points / strides + CELL_EPS) * strides  # [N, 2] (x, y)
    sizes = img_sizes.to(cell_start)  # [B, 2] (h, w)
    inside_x = cell_start[None, :, 0] < sizes[:, None, 1]  # [B, N]
    inside_y = cell_start[None, :, 1] < sizes[:, None, 0]  # [B, N]
    return inside_x & inside_y


def region_sizes(img_sizes: Tensor, padded_hw: Sequence[int] | None, region: str = "mmdet") -> Tensor:
    """(h, w) [B, 2] of each image's valid region in a batch padded to `padded_hw` (H, W; None: no cap).

    'mmdet': the image rounded up to a multiple of 32, capped at the batch (MMDetection's per-image `pad_shape`, which
    its valid flags cover); 'image': the unpadded image itself.

    Args:
        img_sizes (Tensor[B, 2]): (h, w) of each image's unpadded region in input pixels.
    """
    if region == "image":
        return img_sizes
    rounded = torch.div(img_sizes + PAD_SIZE_DIVISOR - 1, PAD_SIZE_DIVISOR, rounding_mode="floor") * PAD_SIZE_DIVISOR
    if padded_hw is None:
        return rounded
    return torch.minimum(rounded, torch.tensor([int(v) for v in padded_hw], device=img_sizes.device))  # [B, 2]


def padded_size(batch) -> tuple[int, int] | None:
    """(H, W) of a batch's padded images [B, 3, H, W]; None for a batch without images."""
    images = getattr(batch, "images", None)
    return None if images is None else tuple(images.shape[-2:])
