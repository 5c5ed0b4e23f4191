"""Knowledge-distillation losses (CrossKD, LD, PKD) as element-wise pure functions; teacher inputs are detached."""

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_REDUCTIONS = ("sum", "mean")


def kd_quality_focal_loss(pred_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """CrossKD classification KD `[..., C]`: BCE(pred, σ(teacher)) · |σ(pred) − σ(teacher)|^β (β=0: soft BCE).

    The distance is clamped to the smallest normal float before the power, so equal logits give a finite gradient
    for any β (0 < β < 1 would otherwise give 0 · ∞).
    """
    pred_logits = pred_logits.float()
    soft_targets = teacher_logits.detach().float().sigmoid()
    bce = F.binary_cross_entropy_with_logits(pred_logits, soft_targets, reduction="none")
    distance = (pred_logits.sigmoid() - soft_targets).abs().clamp(min=torch.finfo(torch.float32).tiny)
    return bce * (distance if beta == 1 else distance.pow(beta))  # pow(·, 1) would keep a copy for backward


def kl_div_loss(pred_logits: Tensor, teacher_logits: Tensor, T: float = 1.0, class_reduction: str = "sum") -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(pred/T)) `[...]` over the last dim `[..., K]`, summed or averaged, × T²."""
    if class_reduction not in CLASS_REDUCTIONS:
        raise ValueError(f"class_reduction must be one of {CLASS_REDUCTIONS}, got {class_reduction!r}")
    targets = (teacher_logits.detach().float() / T).softmax(dim=-1)
    log_probs = (pred_logits.float() / T).log_softmax(dim=-1)
    kl = F.kl_div(log_probs, targets, reduction="none")  # [..., K]
    kl = kl.sum(dim=-1) if class_reduction == "sum" else kl.mean(dim=-1)
    return kl * (T * T)


def channel_standardize(feat: Tensor, mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Standardise `[B, C, H, W]` per channel over (B, H, W): (x − mean) / (unbiased std + eps).

    With `mask` ([B, H, W] bool) the mean and std are taken over the True positions only. A constant channel maps to
    0 with a finite gradient (torch.std's backward is 0 there; the masked variance is clamped before its sqrt).
    """
    if mask is None:
        mean = feat.mean(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        std = feat.std(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        return (feat - mean) / (std + eps)
    weight = mask[:, None].to(feat.dtype)  # [B, 1, H, W]
    count = weight.sum()
    mean = (feat * weight).sum(dim=(0, 2, 3), keepdim=True) / count.clamp(min=1)  # [1, C, 1, 1]
    centred = feat - mean  # one copy for the variance and the result, so backward keeps one
    var = (centred.pow(2) * weight).sum(dim=(0, 2, 3), keepdim=True) / (count - 1).clamp(min=1)
    return centred / (var.clamp(min=torch.finfo(var.dtype).tiny).sqrt() + eps)


def pkd_loss(student_feat: Tensor, teacher_feat: Tensor, mask: Tensor | None = None) -> Tensor:
    """PKD feature imitation (scalar): MSE / 2 of per-channel standardised maps `[B, C, H, W]`, mean over elements.

    With `mask` ([B, H, W] bool, e.g. True inside each image's valid region) only the True positions count, in the
    statistics and in the mean; without it every position counts (the reference).
    """
    student = channel_standardize(student_feat.float(), mask)
    teacher = channel_standardize(teacher_feat.detach().float(), mask)
    if mask is None:
        return F.mse_loss(student, teacher) / 2
    weight = mask[:, None].float()  # [B, 1, H, W]
    squared = (student - teacher).pow(2) * weight
    return squared.sum() / (weight.sum() * student.shape[1]).clamp(min=1) / 2
