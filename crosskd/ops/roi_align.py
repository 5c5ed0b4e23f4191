"""RoIAlign on one feature map: torchvision's op, with a faster backward on CPU.

torchvision's CPU backward recomputes every sample's bilinear weights for every channel and adds them one float at a
time; in a Faster R-CNN training step on CPU it costs about 8x its forward and over half of the step. RoIAlign is
separable: with `Ay[k, i, r]` the mean over bin row i's sample rows of their bilinear weights on feature row r (zero
for samples outside [-1, H]) and `Ax` the same over columns,

    out[k, c, i, j] = Σ_r Σ_q Ay[k, i, r] · Ax[k, j, q] · F[b_k, c, r, q],

and every RoI reads only a window of rows and columns around itself. The backward here builds `Ay` and `Ax` on each
RoI's window once, forms the window gradients `Ayᵀ · G · Ax` with batched matrix products and adds them into the
map gradient channels-last (`index_add_` of C-vectors), RoIs of like size in one chunk. The forward stays
torchvision's; CUDA and traced graphs (ONNX, TorchScript) use torchvision's op throughout.
"""

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

CHUNK_ROIS = 256  # RoIs whose window gradients are built at once


def roi_align(feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
              aligned: bool) -> Tensor:
    """torchvision's `roi_align(feat [B, C, H, W], rois [K, 5])` -> [K, C, S, S], whose gradient on CPU comes from
    `SeparableRoIAlign`."""
    if feat.device.type != "cpu" or not feat.requires_grad or torch.jit.is_tracing():
        return torchvision_roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return SeparableRoIAlign.apply(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)


class SeparableRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign forward; the backward from its separable weights (module docstring)."""

    @staticmethod
    def forward(ctx, feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (feat.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return torchvision_roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.settings
        grad_feat = roi_align_feature_grad(grad, rois, shape, output_size, spatial_scale, sampling_ratio, aligned)
        return grad_feat, None, None, None, None, None


def roi_align_feature_grad(grad: Tensor, rois: Tensor, shape: torch.Size, output_size: int, spatial_scale: float,
                           sampling_ratio: int, aligned: bool) -> Tensor:
    """d out / d feat for out = RoIAlign(feat): grad [K, C, S, S] -> [B, C, H, W] (`shape`)."""
    batch, channels, height, width = shape
    flat = grad.new_zeros(batch * height * width, channels)  # channels-last map gradient
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].to(grad.dtype) * spatial_scale - offset  # [K, 4] in feature pixels
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)  # [K]
    for chunk in area.argsort().split(CHUNK_ROIS) if rois.shape[0] else ():  # like sizes together: little padding
        rows = axis_weights(boxes[chunk, 1], boxes[chunk, 3], height, output_size, sampling_ratio, aligned)
        cols = axis_weights(boxes[chunk, 0], boxes[chunk, 2], width, output_size, sampling_ratio, aligned)
        channels_last = grad[chunk].permute(0, 2, 3, 1)  # [k, S, S, C]
        by_column = cols.weights.transpose(1, 2)[:, None] @ channels_last  # [k, S, Q, C]: Σ_j Ax·G
        window = rows.weights.transpose(1, 2) @ by_column.flatten(2)  # [k, R, Q·C]: Σ_i Ay·(Ax·G)
        image = rois[chunk, 0].long()
        index = (image[:, None, None] * height + rows.index[:, :, None]) * width + cols.index[:, None, :]  # [k, R, Q]
        flat.index_add_(0, index.reshape(-1), window.reshape(-1, channels))
    return flat.view(batch, height, width, channels).permute(0, 3, 1, 2)


class AxisWeights(NamedTuple):
    """Per RoI, the weights [K, S, L] of its S bins on a window of L map lines starting at `index[:, 0]`, and the
    window's line indices [K, L] (clamped into the map where the window runs past it; their weights are 0)."""

    weights: Tensor
    index: Tensor


def axis_weights(start: Tensor, end: Tensor, size: int, bins: int, sampling_ratio: int, aligned: bool) -> AxisWeights:
    """Ay (or Ax) of RoIs spanning [start, end] feature pixels on an axis of `size` lines, by torchvision's rules:
    bin length (end - start) / bins (at least 1 / bins unless `aligned`), `sampling_ratio` samples per bin (0:
    ceil of the bin length), a sample outside [-1, size] weighs nothing, one below 0 reads line 0, one at or past
    the last line reads the last line."""
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)
    bin_length = length / bins  # [K]
    counts = torch.full_like(start, sampling_ratio) if sampling_ratio > 0 else torch.ceil(bin_length)  # [K]
    per_bin = counts.clamp(min=1)[:, None, None]  # [K, 1, 1] samples per bin, at least 1 to divide by
    most = max(int(counts.max().item()), 1)
    grid = torch.arange(most, dtype=start.dtype, device=start.device)  # [G]
    bin_start = start[:, None] + torch.arange(bins, dtype=start.dtype, device=start.device) * bin_length[:, None]
    samples = bin_start[:, :, None] + (grid + 0.5) * bin_length[:, None, None] / per_bin
    used = (grid[None, None] < counts[:, None, None]) & (samples >= -1.0) & (samples <= size)  # [K, S, G]
    position = samples.clamp(min=0.0)
    low = position.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(position), position - low.to(position.dtype))
    scale = used.to(position.dtype) / per_bin  # 1 / count per used sample
    first = torch.where(used, low, torch.full_like(low, size)).amin(dim=(1, 2)).clamp(max=size - 1)  # [K]
    last = torch.where(used, high, torch.full_like(high, -1)).amax(dim=(1, 2))  # [K]
    span = max(int((last - first).max().item()) + 1, 1)
    weights = start.new_zeros(start.shape[0], bins, span)
    weights.scatter_add_(2, (low - first[:, None, None]).clamp(0, span - 1), (1 - frac) * scale)
    weights.scatter_add_(2, (high - first[:, None, None]).clamp(0, span - 1), frac * scale)
    index = (first[:, None] + torch.arange(span, device=start.device)).clamp(max=size - 1)  # [K, L]
    return AxisWeights(weights, index)

