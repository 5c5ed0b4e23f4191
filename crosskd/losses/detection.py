"""Detection losses as element-wise pure functions plus one weight-and-reduce helper.

Every loss returns per-element values (no reduction) computed in float32, so it is safe under AMP; callers weight
and normalise with `weight_reduce`. Labels use −1 (or `num_classes`) for background.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from crosskd.ops.boxes import aligned_box_ciou, aligned_box_giou, aligned_box_iou

REDUCTIONS = ("mean", "sum", "none")
IOU_MODES = ("log", "linear", "square")


def weight_reduce(
    loss: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Multiply by `weight` (broadcast to `loss`, e.g. [B, N]), then reduce to a scalar: sum/avg_factor when given,
    else mean or sum; reduction='none' returns the weighted loss.

    The mean of an empty tensor is a zero that keeps the graph.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if avg_factor is not None:
        if reduction != "mean":
            raise ValueError("avg_factor can only be used with reduction='mean' or 'none'")
        return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(loss.numel(), 1)


def one_hot_labels(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot `[..., C]` of labels `[...]`; −1 and `num_classes` (background) give all-zero rows."""
    foreground = (labels >= 0) & (labels < num_classes)
    index = torch.where(foreground, labels, num_classes)
    return F.one_hot(index, num_classes + 1)[..., :num_classes].to(dtype)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Sigmoid focal loss `[..., C]` of logits `[..., C]` against integer labels `[...]` (RetinaNet)."""
    targets = one_hot_labels(labels, logits.shape[-1])
    return sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="none")


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """GFL quality focal loss `[...]`, summed over classes.

    Every class is pushed towards 0 with BCE · σ^β, except a positive's own class, which is pushed towards its
    `quality` target (IoU, no gradient) with BCE · |q − σ|^β.
    """
    logits = logits.float()
    probs = logits.sigmoid()
    positive = one_hot_labels(labels, logits.shape[-1], torch.bool)  # [..., C]
    quality = quality.detach().float()[..., None]  # [..., 1]
    targets = torch.where(positive, quality, torch.zeros_like(logits))
    modulator = torch.where(positive, (quality - probs).abs(), probs).pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulator).sum(-1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """GFL distribution focal loss `[...]` of bin logits `[..., K]` against distances `[...]` in bin units.

    Cross-entropy to the two bins around the target, weighted by closeness; targets are clamped to [0, K−1].
    """
    num_bins = logits.shape[-1]
    target = target.detach().float().clamp(min=0, max=num_bins - 1)
    left = target.long()
    right = (left + 1).clamp(max=num_bins - 1)
    log_probs = logits.float().log_softmax(dim=-1)
    nll_left = -log_probs.gather(-1, left[..., None]).squeeze(-1)
    nll_right = -log_probs.gather(-1, right[..., None]).squeeze(-1)
    return nll_left * (left + 1 - target) + nll_right * (target - left)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 − GIoU `[...]` of corresponding xyxy boxes `[..., 4]`; finite for degenerate (zero-size, inverted) boxes."""
    return 1 - aligned_box_giou(pred.float(), target.float(), eps=eps)


def ciou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 − CIoU `[...]` of corresponding xyxy boxes `[..., 4]` (YOLOv8's box loss, before its weighting)."""
    return 1 - aligned_box_ciou(pred.float(), target.float(), eps=eps)


def iou_loss(pred: Tensor, target: Tensor, mode: str = "log", eps: float = 1e-6) -> Tensor:
    """IoU loss `[...]` of corresponding xyxy boxes: −log IoU ('log'), 1 − IoU ('linear') or 1 − IoU² ('square')."""
    if mode not in IOU_MODES:
        raise ValueError(f"mode must be one of {IOU_MODES}, got {mode!r}")
    ious = aligned_box_iou(pred.float(), target.float(), eps=eps).clamp(min=eps)
    if mode == "log":
        return -ious.log()
    if mode == "linear":
        return 1 - ious
    return 1 - ious.pow(2)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise |pred − target| `[...]` of same-shape tensors `[...]` (e.g. box deltas [P, 4])."""
    return (pred.float() - target.float()).abs()


def bce_with_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Element-wise binary cross-entropy `[...]` on logits `[...]`; same-shape targets may be soft (0..1)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
