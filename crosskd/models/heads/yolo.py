"""The YOLOv8 / YOLO11 decoupled head (Ultralytics' Detect) behind the dense-head contract.

Per level a box branch (two 3×3 Conv-BN-SiLU, then a 1×1 conv to 4 × `reg_max` DFL bin logits) and a class branch
(YOLOv8: two 3×3 convs; YOLO11: two depthwise 3×3 + pointwise 1×1 pairs) ending in a 1×1 conv to the class logits;
unlike GFL the branches are not shared across levels and have their own widths (box: max(16, C_P3 / 4, 4·reg_max),
class: max(C_P3, min(nc, 100))). Points at cell centres, sigmoid scores, the task-aligned assigner and the
BCE + CIoU + DFL losses with Ultralytics' gains, each normalised by the sum of the soft class targets.

The CrossKD seam is the same as the shared-tower heads', with the level passed on: `forward_tower(x, stop, level)`
stops inside that level's branches (a branch step is one Conv, or YOLO11's depthwise + pointwise pair, whose
pointwise conv's BatchNorm output is the pre-activation), `forward_from(cls, reg, level, start)` finishes them.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crosskd.assigners import Assigner, TaskAlignedAssigner
from crosskd.errors import ConfigError
from crosskd.losses.detection import bce_with_logits, distribution_focal_loss
from crosskd.models.yolo.blocks import Conv, DWConv
from crosskd.ops.boxes import aligned_box_ciou, distance_decode, distance_encode

from .base import DenseHead, HeadLayout, HeadOutputs, LevelOutput, Priors, Targets

CLS_BRANCHES = ("conv", "dwconv")  # YOLOv8 (Ultralytics' legacy Detect) / YOLO11
BRANCH_DEPTH = 2
DFL_TARGET_EPS = 0.01  # target distances stay this far below the last bin (Ultralytics' reg_max − 1 − 0.01)
BOX_BIAS = 2.0  # Ultralytics 8.4's Detect.bias_init
NOMINAL_IMAGE = 640  # the class bias assumes ~5 objects in a 640 px image


def branch_steps(in_channels: int, channels: int, kind: str) -> nn.ModuleList:
    """Two steps from `in_channels` to `channels`: 3×3 Convs ('conv') or depthwise 3×3 + pointwise 1×1 ('dwconv')."""
    if kind == "conv":
        return nn.ModuleList([Conv(in_channels, channels, 3), Conv(channels, channels, 3)])
    return nn.ModuleList([
        nn.Sequential(DWConv(in_channels, in_channels, 3), Conv(in_channels, channels, 1)),
        nn.Sequential(DWConv(channels, channels, 3), Conv(channels, channels, 1)),
    ])


def last_conv(step: nn.Module) -> Conv:
    """The Conv whose activation ends a branch step."""
    return step[-1] if isinstance(step, nn.Sequential) else step


def run_step(step: nn.Module, x: Tensor, activate: bool) -> Tensor:
    """One branch step on `x` [B, C, H, W]; `activate=False` stops at its last BatchNorm (the pre-activation)."""
    if isinstance(step, nn.Sequential):
        for module in step[:-1]:
            x = module(x)
    conv = last_conv(step)
    x = conv.bn(conv.conv(x))
    return conv.act(x) if activate else x


def run_branch(steps: nn.ModuleList, x: Tensor, stop: int) -> Tensor:
    """Steps 0..stop−1, the last without its activation; `x` itself at stop 0."""
    for i in range(stop):
        x = run_step(steps[i], x, activate=i < stop - 1)
    return x


def activate_branch(steps: nn.ModuleList, x: Tensor, step: int) -> Tensor:
    """The activation of step step−1 on its pre-activation `x`; `x` itself at step 0."""
    return last_conv(steps[step - 1]).act(x) if step > 0 else x


def finish_branch(steps: nn.ModuleList, x: Tensor, start: int, activated: bool) -> Tensor:
    """Step start−1's activation (unless `activated`), then the steps from `start` on."""
    x = x if activated else activate_branch(steps, x, start)
    for step in steps[start:]:
        x = step(x)
    return x


class YOLOHead(DenseHead):
    """Ultralytics' Detect head: per-level box (DFL) and class branches, task-aligned BCE/CIoU/DFL training.

    Per level: cls_score [B, C, H, W] logits, bbox_pred [B, 4·reg_max, H, W] DFL logits (side-major: left, top,
    right, bottom, `reg_max` bins each, distances in stride units), no centerness.

    Args:
        num_classes, in_channels: classes and the neck's widths per level (the model builder fills both).
        strides: one per level (8, 16, 32).
        reg_max: DFL bins per box side (16: distances 0..15 strides).
        cls_branch: 'conv' (YOLOv8) or 'dwconv' (YOLO11).
        assigner: None takes the task-aligned assigner with `topk`, `alpha`, `beta`.
        loss_box_weight, loss_cls_weight, loss_dfl_weight: Ultralytics' box, cls and dfl gains.
    """

    head_type = "yolo"
    assigner_keys = ("topk", "alpha", "beta")
    mmdet_valid_flags = False  # every prior of the padded input counts, as in Ultralytics
    min_one_pos_per_image = False
    batch_scaled_loss = True  # Ultralytics back-propagates the loss times the batch size (the trainer applies it)

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        *,
        strides: Sequence[int] = (8, 16, 32),
        reg_max: int = 16,
        cls_branch: str = "dwconv",
        assigner: Assigner | None = None,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        loss_box_weight: float = 7.5,
        loss_cls_weight: float = 0.5,
        loss_dfl_weight: float = 1.5,
    ) -> None:
        in_channels = _check_widths(in_channels, strides, cls_branch, reg_max)
        layout = HeadLayout(TaskAlignedAssigner(topk=topk, alpha=alpha, beta=beta), use_scale=False)
        super().__init__(num_classes, in_channels[0], stacked_convs=0, norm="bn", strides=strides, act="silu",
                         assigner=assigner, min_bbox_size=None, layout=layout)
        del self.cls_convs, self.reg_convs  # the shared towers' places: this head's branches are per level
        self.level_channels, self.reg_max, self.cls_branch = list(in_channels), reg_max, cls_branch
        self.reg_channels = max(16, in_channels[0] // 4, 4 * reg_max)
        self.cls_channels = max(in_channels[0], min(num_classes, 100))
        self.cls_depth = self.reg_depth = self.stacked_convs = BRANCH_DEPTH
        self.loss_weights = {"loss_box": loss_box_weight, "loss_cls": loss_cls_weight, "loss_dfl": loss_dfl_weight}
        self.reg_branches = nn.ModuleList(branch_steps(c, self.reg_channels, "conv") for c in in_channels)
        self.cls_branches = nn.ModuleList(branch_steps(c, self.cls_channels, cls_branch) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(self.reg_channels, 4 * reg_max, 1) for _ in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(self.cls_channels, num_classes, 1) for _ in in_channels)
        self.dfl_bins = nn.Parameter(torch.arange(reg_max, dtype=torch.float32), requires_grad=False)
        self.init_biases()

    def init_biases(self) -> None:
        """Ultralytics' bias start: box logits 2.0; class logits for ~5 objects per 640 px image at each stride."""
        for reg_pred, cls_pred, stride in zip(self.reg_preds, self.cls_preds, self.strides):
            nn.init.constant_(reg_pred.bias, BOX_BIAS)
            nn.init.constant_(cls_pred.bias, math.log(5 / self.num_classes / (NOMINAL_IMAGE / stride) ** 2))

    # ----- the CrossKD seam, per level ------------------------------------------------------------------
    def musgd_boosted_parameters(self) -> list[nn.Parameter]:
        """The class branches and predictors, which Ultralytics' MuSGD trains at 3x the learning rate (its Detect
        head's `cv3`)."""
        return [*self.cls_branches.parameters(), *self.cls_preds.parameters()]

    def hold_channels(self, step: int, level: int = 0) -> tuple[int, int]:
        """Widths (cls, reg) of `forward_tower(x, step, level)`: the level's input width at step 0."""
        if step == 0:
            return self.level_channels[level], self.level_channels[level]
        return self.cls_channels, self.reg_channels

    def forward_tower(self, x: Tensor, stop: int, level: int = 0) -> tuple[Tensor, Tensor]:
        """Cls and box branch features of `level` after step `stop`, before its activation; (x, x) at stop 0."""
        if not 0 <= stop <= self.stacked_convs:
            raise ValueError(f"branch step {stop} outside 0..{self.stacked_convs}")
        return run_branch(self.cls_branches[level], x, stop), run_branch(self.reg_branches[level], x, stop)

    def activate_hold(self, cls_feat: Tensor, reg_feat: Tensor, step: int, level: int = 0) -> tuple[Tensor, Tensor]:
        return (activate_branch(self.cls_branches[level], cls_feat, step),
                activate_branch(self.reg_branches[level], reg_feat, step))

    def forward_from(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int, start: int, *, activated: bool = False
    ) -> LevelOutput:
        cls_feat = finish_branch(self.cls_branches[level], cls_feat, start, activated)
        reg_feat = finish_branch(self.reg_branches[level], reg_feat, start, activated)
        return self.predict_level(cls_feat, reg_feat, level)

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        return LevelOutput(self.cls_preds[level](cls_feat), self.reg_preds[level](reg_feat), None)

    # ----- decoding and losses --------------------------------------------------------------------------
    def integral(self, reg: Tensor) -> Tensor:
        """Expected ltrb distances [..., 4] in stride units from DFL logits [..., 4·reg_max]."""
        probs = reg.unflatten(-1, (4, self.reg_max)).softmax(dim=-1)
        return probs @ self.dfl_bins.to(probs.dtype)

    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """DFL logits [B, N, 4·reg_max] → expected ltrb × stride from the cell centres → [B, N, 4] xyxy."""
        return distance_decode(priors.points, self.integral(reg) * priors.strides[:, None])

    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        """Ultralytics' detection loss: BCE on soft task-aligned class targets over every prior, CIoU and DFL on
        positives weighted by their target score, each divided by the sum of the target scores (at least 1)."""
        flat = self.flatten_outputs(outputs)
        pos = targets.pos_mask
        target_scores = targets.label_scores if targets.label_scores is not None else pos.float()  # [B, N]
        score_sum = target_scores.sum().clamp(min=1.0)
        images, prior_index = pos.nonzero(as_tuple=True)
        cls_targets = torch.zeros_like(flat.cls)  # [B, N, C]
        cls_targets[images, prior_index, targets.labels[pos]] = target_scores[pos]
        loss_cls = (bce_with_logits(flat.cls, cls_targets) * targets.label_weights[..., None]).sum() / score_sum

        stride = priors.strides[prior_index, None]  # [P, 1]
        points = priors.points[prior_index] / stride  # [P, 2] stride units
        pos_reg = flat.reg[pos]  # [P, 4·reg_max]
        pred_boxes = distance_decode(points, self.integral(pos_reg))
        target_boxes = targets.box_targets[pos] / stride
        weight = target_scores[pos]  # [P]
        loss_box = ((1.0 - aligned_box_ciou(pred_boxes, target_boxes)) * weight).sum() / score_sum
        target_ltrb = distance_encode(points, target_boxes, max_dis=self.reg_max - 1, eps=DFL_TARGET_EPS)
        dfl = distribution_focal_loss(pos_reg.unflatten(-1, (4, self.reg_max)), target_ltrb).mean(-1)  # [P]
        loss_dfl = (dfl * weight).sum() / score_sum
        losses = {"loss_box": loss_box, "loss_cls": loss_cls, "loss_dfl": loss_dfl}
        return {k: v * self.loss_weights[k] for k, v in losses.items()}


def _check_widths(in_channels: Sequence[int], strides: Sequence[int], cls_branch: str, reg_max: int) -> list[int]:
    """The per-level input widths, checked against the strides and the other head settings (one line each)."""
    if cls_branch not in CLS_BRANCHES:
        raise ConfigError(f"head.cls_branch '{cls_branch}' is not one of {', '.join(CLS_BRANCHES)}")
    if reg_max < 2:
        raise ConfigError(f"head.reg_max {reg_max} must be >= 2 (DFL bins per box side)")
    widths = [in_channels] * len(strides) if isinstance(in_channels, int) else list(in_channels)
    if len(widths) != len(strides):
        raise ConfigError(f"head.strides {list(strides)} must give one stride per neck output ({len(widths)})")
    return widths
