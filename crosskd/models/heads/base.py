"""The dense-head contract shared by GFL, RetinaNet, FCOS and ATSS (the CrossKD seam).

A head is a conv tower per branch (`cls_convs`, `reg_convs` of `ConvBlock`, each with its own width and depth), its
predictors and per-level `scales`. `forward_tower` stops inside the towers (pre-activation) and `forward_from`
finishes the pass, so a distiller can route a student feature through the rest of a teacher head. Every head takes
the `DenseHead` constructor arguments plus its own; the assigner is an object the model YAML may choose
(`head.assigner`), called with the head's decoded predictions. Target building and the loss terms used by several
heads live here once; each head file adds its predictors, coder and loss recipe.
"""

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crosskd.assigners import IGNORED, Assigner, AssignResult, Predictions
from crosskd.dist import reduce_mean
from crosskd.errors import ConfigError
from crosskd.losses.detection import bce_with_logits, focal_loss, weight_reduce
from crosskd.ops.boxes import Priors, centerness_target, distance_encode, make_anchors, make_points

from .outputs import FlatOutputs, HeadOutputs, LevelOutput, Targets
from .regions import VALID_REGIONS, padded_size, region_sizes, valid_prior_mask
from .towers import ConvBlock, activate_step, check_towers, finish_tower, run_tower

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
PRIOR_PROB = 0.01
PRIOR_CACHE_SIZE = 16  # feature-size sets kept by DenseHead.priors (multi-scale training meets a few)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        """`x` (any shape, e.g. [B, 4, H, W]) times the learned scalar."""
        return x * self.scale


def anchor_scales(octave_base_scale: float, scales_per_octave: int) -> list[float]:
    """MMDet octave scales: base · 2^(i / scales_per_octave)."""
    return [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """Per-level [B, A*K, H, W] maps → [B, sum(H*W*A), K] in prior order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps], dim=1)


def _check_anchor_sizes(anchor_sizes: Sequence[Sequence[float]] | None, strides: list[int]) -> list[list[float]] | None:
    """Explicit anchor sizes: one equally long list of pixel sizes per stride."""
    if anchor_sizes is None:
        return None
    sizes = [[float(v) for v in level] for level in anchor_sizes]
    if len(sizes) != len(strides) or len({len(level) for level in sizes}) != 1 or not sizes[0]:
        raise ConfigError(
            f"head.anchor_sizes {anchor_sizes} must give one equally long, non-empty list per stride ({len(strides)})"
        )
    return sizes


def _branch(key: str, value: int | None, shared_key: str, shared: int) -> tuple[str, int]:
    """A branch's setting and the key that set it: its own key when given, else the shared one."""
    return (shared_key, shared) if value is None else (key, value)


@dataclass(frozen=True)
class HeadLayout:
    """What a head type fixes for the `DenseHead` constructor: its priors, per-level Scales and default assigner.

    Anchors: `anchor_scales` (octave scales × stride) or `anchor_sizes` (pixels per level), times `anchor_ratios` per
    location, corners rounded with `round_anchors`. Points (`anchor_scales` None): one per location at
    (index + `point_offset`) × stride.
    """

    default_assigner: Assigner
    anchor_scales: Sequence[float] | None = None
    anchor_ratios: Sequence[float] = (1.0,)
    anchor_sizes: Sequence[Sequence[float]] | None = None
    round_anchors: bool = False
    point_offset: float = 0.5
    use_scale: bool = True


class DenseHead(nn.Module, metaclass=ABCMeta):
    """Base of all dense heads: towers, scales, the tower split, priors, target building and shared losses.

    `forward` takes FPN features (list of Tensor[B, in_channels, H_l, W_l], one per stride) and returns
    `HeadOutputs`; `num_anchors` (A) is 1 for point heads (FCOS) and scales × ratios for anchor heads.
    """

    head_type = ""
    kd_offset = 1  # default CrossKD hold point = stacked_convs - kd_offset (3 of 4 convs; FCOS uses 2)
    with_centerness = False  # FCOS, ATSS: centerness targets of positives from prior centres
    min_one_pos_per_image = True  # num_pos counts an image without positives as 1 (MMDet anchor heads; not FCOS)
    mmdet_valid_flags = True  # MMDet marks priors outside each image's pad_shape invalid (its anchor heads; not FCOS)
    valid_region = "mmdet"  # run setting valid_region (VALID_REGIONS), set by `use_valid_region`
    centerness_denorm_min = 1.0
    # MMDetection's multi-scale training of this head (its mstrain config): short sides in pixels at 800 and how one
    # is drawn per image, "range" (RandomResize) or "choice" (RandomChoiceResize); `ms_scales=head` scales them
    mstrain: tuple[tuple[int, ...], str] = ((480, 800), "range")  # gfl_r50_fpn_mstrain_2x_coco

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        norm: str = "gn",
        num_groups: int = 32,
        strides: Sequence[int] = DEFAULT_STRIDES,
        *,
        act: str = "relu",
        cls_channels: int | None = None,
        reg_channels: int | None = None,
        cls_depth: int | None = None,
        reg_depth: int | None = None,
        conv_bias: bool | None = None,
        assigner: Assigner | None = None,
        min_bbox_size: float | None = 0.0,
        layout: HeadLayout,
    ) -> None:
        """Towers, priors, Scales and assigner shared by every head; a head passes its own `layout`.

        Args:
            num_classes, in_channels: classes C and FPN width (the model builder fills both).
            feat_channels, stacked_convs: width and depth of both towers, unless `cls_channels` / `reg_channels`
                and `cls_depth` / `reg_depth` set a branch's own.
            norm, num_groups, act, conv_bias: every tower block: 'gn' (with `num_groups`), 'bn' or 'none';
                'relu' or 'silu'; conv bias (None: only without a norm).
            strides: one per FPN level.
            assigner: None takes the layout's default (the head's own assignment settings).
            min_bbox_size: inference drops boxes whose clipped width or height is not above it (MMDetection's
                test_cfg key; 0 drops boxes without area); None keeps every box (torchvision's detectors).
        """
        super().__init__()
        widths = dict([_branch("cls_channels", cls_channels, "feat_channels", feat_channels),
                       _branch("reg_channels", reg_channels, "feat_channels", feat_channels)])
        depths = dict([_branch("cls_depth", cls_depth, "stacked_convs", stacked_convs),
                       _branch("reg_depth", reg_depth, "stacked_convs", stacked_convs)])
        check_towers(norm, act, num_groups, widths, depths)
        self.num_classes, self.in_channels, self.feat_channels = num_classes, in_channels, feat_channels
        self.level_channels = [in_channels] * len(strides)  # input width per level (a YOLO head's differ)
        self.cls_channels = feat_channels if cls_channels is None else cls_channels
        self.reg_channels = feat_channels if reg_channels is None else reg_channels
        self.cls_depth = stacked_convs if cls_depth is None else cls_depth
        self.reg_depth = stacked_convs if reg_depth is None else reg_depth
        self.stacked_convs = max(self.cls_depth, self.reg_depth)  # tower steps a hold point may take
        self.strides = list(strides)
        self.act = act
        self._set_priors(layout)
        block = {"norm": norm, "num_groups": num_groups, "bias": conv_bias, "act": act}
        self.cls_convs = self._tower(self.cls_channels, self.cls_depth, block)
        self.reg_convs = self._tower(self.reg_channels, self.reg_depth, block)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides) if layout.use_scale else None
        self.assigner = layout.default_assigner if assigner is None else assigner
        self.min_bbox_size = min_bbox_size
        if assigner is not None:  # the head checks its own settings of the default one
            self._check_assigner()

    def _set_priors(self, layout: HeadLayout) -> None:
        self.anchor_scales = None if layout.anchor_scales is None else list(layout.anchor_scales)
        self.anchor_sizes = _check_anchor_sizes(layout.anchor_sizes, self.strides)
        self.anchor_ratios = list(layout.anchor_ratios)
        self.round_anchors, self.point_offset = layout.round_anchors, layout.point_offset
        per_location = self.anchor_sizes[0] if self.anchor_sizes else self.anchor_scales
        self.num_anchors = 1 if self.anchor_scales is None else len(per_location) * len(self.anchor_ratios)

    def _tower(self, width: int, depth: int, block: dict) -> nn.ModuleList:
        chans = [self.in_channels] + [width] * depth
        return nn.ModuleList(ConvBlock(chans[i], chans[i + 1], **block) for i in range(depth))

    def _check_assigner(self) -> None:
        if self.anchor_scales is None and self.assigner.uses_boxes:
            raise ConfigError(
                f"head.assigner {self.assigner.name} matches anchor boxes, but {self.head_type} has points: "
                "use an assigner that matches points (fcos)"
            )
        self.assigner.check_levels(len(self.strides))

    def hold_channels(self, step: int, level: int = 0) -> tuple[int, int]:
        """Channels (cls, reg) of `forward_tower(x, step)`'s features (the head input where a tower has not begun);
        the same on every level of a shared-tower head."""
        cls = self.cls_channels if min(step, self.cls_depth) else self.in_channels
        reg = self.reg_channels if min(step, self.reg_depth) else self.in_channels
        return cls, reg

    @property
    def cls_out_channels(self) -> int:
        """Channels entering the classification predictor."""
        return self.hold_channels(self.stacked_convs)[0]

    @property
    def reg_out_channels(self) -> int:
        """Channels entering the regression (and reg-side centerness) predictor."""
        return self.hold_channels(self.stacked_convs)[1]

    @property
    def default_kd_idx(self) -> int:
        """Default CrossKD hold point: 3 for a 4-conv GFL/RetinaNet/ATSS head, 2 for FCOS."""
        return max(self.stacked_convs - self.kd_offset, 0)

    def init_weights(self, cls_pred: nn.Conv2d) -> None:
        """MMDet init: every conv normal(0, 0.01) with zero bias; the classifier bias starts at prior 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(cls_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    # ----- forward: the CrossKD seam -------------------------------------------------------------------
    def forward_tower(self, x: Tensor, stop: int, level: int = 0) -> tuple[Tensor, Tensor]:
        """Cls and reg tower features after step `stop`, before its activation; `stop=0` returns (x, x).

        A tower shallower than `stop` returns its last step's pre-activation (x itself when it has no steps).

        Args:
            x (Tensor[B, in_channels, H, W]): one FPN level.
            stop (int): tower step, 0 ≤ stop ≤ stacked_convs (the deeper tower's depth).
            level (int): the level `x` is from (the towers are shared here; a head with per-level branches uses it).

        Returns:
            (cls_feat, reg_feat): Tensor[B, C_cls, H, W], Tensor[B, C_reg, H, W], widths `hold_channels(stop)`.
        """
        if not 0 <= stop <= self.stacked_convs:
            raise ValueError(f"tower step {stop} outside 0..{self.stacked_convs}")
        return run_tower(self.cls_convs, x, stop), run_tower(self.reg_convs, x, stop)

    def forward_from(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int, start: int, *, activated: bool = False
    ) -> LevelOutput:
        """Finish the head from pre-activation tower features of step `start` (raw input when `start=0`).

        Args:
            cls_feat, reg_feat (Tensor[B, C, H, W]): what `forward_tower(x, start)` returns (or a student's
                features of the same widths, `hold_channels(start)`).
            level (int): FPN level index, selects the level's Scale.
            start (int): tower step the features come from.
            activated (bool): the features are `activate_hold`'s (past step start−1's activation), which is then
                not applied again.

        Returns:
            LevelOutput: cls_score [B, A*C, H, W], bbox_pred [B, A*R, H, W], centerness [B, A, H, W] or None.
        """
        cls_feat = finish_tower(self.cls_convs, cls_feat, start, activated)
        reg_feat = finish_tower(self.reg_convs, reg_feat, start, activated)
        return self.predict_level(cls_feat, reg_feat, level)

    def activate_hold(self, cls_feat: Tensor, reg_feat: Tensor, step: int, level: int = 0) -> tuple[Tensor, Tensor]:
        """The activation of tower step `step` on `forward_tower(x, step, level)`'s features (unchanged at step 0 and
        for a tower without steps): the post-activation hold features, [B, C, H, W] each."""
        return activate_step(self.cls_convs, cls_feat, step), activate_step(self.reg_convs, reg_feat, step)

    @property
    def reactivates_hold(self) -> bool:
        """Whether a cross-head pass applies step kd_idx's activation again to post-activation hold features: only
        an idempotent one (ReLU), where it is the reference's clamp of the aligned features; a SiLU would be applied
        twice, so its post-activation holds enter the rest of the head as they are."""
        return self.act == "relu"

    @abstractmethod
    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> LevelOutput:
        """Predictors, the level's Scale and the output transform (per head): [B, C, H, W] tower outputs."""

    def forward(self, feats: Sequence[Tensor]) -> HeadOutputs:
        """Per-level outputs for FPN features `feats` (list of Tensor[B, in_channels, H_l, W_l], one per stride)."""
        assert len(feats) == len(self.strides), f"{len(feats)} feature levels for {len(self.strides)} strides"
        levels = [self.forward_from(x, x, level, 0) for level, x in enumerate(feats)]
        ctr = [o.centerness for o in levels] if levels[0].centerness is not None else None
        return HeadOutputs([o.cls_score for o in levels], [o.bbox_pred for o in levels], ctr)

    # ----- priors and flattening -----------------------------------------------------------------------
    def priors(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device | str) -> Priors:
        """Anchors (or points) of every level for feature maps of `feat_sizes` [(H, W), ...], cached per sizes and
        device (a training run meets a few input sizes; the priors depend on nothing else), except while tracing.
        Callers never write into them.

        Returns:
            Priors: boxes [N, 4] xyxy input pixels, points [N, 2] (x, y), strides [N], N = Σ H·W·A.
        """
        key = (tuple(tuple(int(v) for v in s) for s in feat_sizes), str(torch.device(device)))
        if torch.jit.is_tracing():  # the traced graph computes them (a cached tensor would be a foreign constant)
            return self.make_priors(list(key[0]), device)
        cache = self.__dict__.setdefault("_prior_cache", {})
        if key not in cache:
            if len(cache) >= PRIOR_CACHE_SIZE:
                cache.clear()
            with torch.inference_mode(False):  # plain tensors: a later training step may save them for backward
                cache[key] = self.make_priors(list(key[0]), device)
        return cache[key]

    def make_priors(self, feat_sizes: list[tuple[int, int]], device: torch.device | str) -> Priors:
        """`priors` without the cache: anchors or points of every level for `feat_sizes` [(H, W), ...]."""
        num_per_level = [h * w * self.num_anchors for h, w in feat_sizes]
        if self.anchor_scales is None:
            points, strides = make_points(feat_sizes, self.strides, device, offset=self.point_offset)
            return Priors(torch.cat([points, points], dim=1), points, strides, num_per_level)
        base_sizes, scales = (
            ([1.0] * len(self.strides), self.anchor_sizes) if self.anchor_sizes else (self.strides, self.anchor_scales)
        )
        boxes = make_anchors(
            feat_sizes, self.strides, base_sizes, scales, self.anchor_ratios, device, round_corners=self.round_anchors
        )
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        counts = torch.tensor(num_per_level, device=boxes.device)
        strides = torch.repeat_interleave(torch.tensor(self.strides, dtype=boxes.dtype, device=boxes.device), counts)
        return Priors(boxes, points, strides, num_per_level)

    def flatten_outputs(self, outputs: HeadOutputs) -> FlatOutputs:
        """Concatenate the levels in prior order: cls [B, N, C], reg [B, N, R], ctr [B, N] (float32)."""
        reg_channels = outputs.bbox_preds[0].shape[1] // self.num_anchors
        cls = flatten_levels(outputs.cls_scores, self.num_classes).float()
        reg = flatten_levels(outputs.bbox_preds, reg_channels).float()
        ctr = None if outputs.centerness is None else flatten_levels(outputs.centerness, 1).squeeze(-1).float()
        return FlatOutputs(cls, reg, ctr)

    def scores(self, flat: FlatOutputs) -> Tensor:
        """Final per-class probabilities [B, N, C]: sigmoid(cls), times sigmoid(centerness) when present."""
        scores = flat.cls.sigmoid()
        return scores if flat.ctr is None else scores * flat.ctr.sigmoid()[..., None]

    @abstractmethod
    def decode_boxes(self, reg: Tensor, priors: Priors) -> Tensor:
        """Regression outputs [B, N, R] → boxes [B, N, 4] xyxy input pixels (differentiable)."""

    # ----- targets --------------------------------------------------------------------------------------
    def predictions(self, outputs: HeadOutputs | None, priors: Priors) -> Predictions:
        """The decoded boxes [B, N, 4] and scores [B, N, C] of `outputs` for the assigner, decoded on first use."""

        def decode() -> tuple[Tensor, Tensor]:
            if outputs is None:
                raise ValueError(
                    f"assigner {self.assigner.name} scores the predictions: call get_targets(priors, batch, outputs)"
                )
            flat = self.flatten_outputs(outputs)
            return self.decode_boxes(flat.reg, priors), self.scores(flat)

        return Predictions(decode)

    def assign(
        self,
        priors: Priors,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        valid: Tensor | None = None,
        predictions: Predictions | None = None,
    ) -> AssignResult:
        """Run the head's assigner on the padded batch.

        Args:
            priors (Priors): N priors of `self.priors`.
            gt_boxes (Tensor[B, M, 4]): xyxy input pixels, zero rows for padding.
            gt_labels (Tensor[B, M]): class ids, -1 for padding.
            valid (Tensor[B, N] | None): False for priors outside their image (see `valid_prior_mask`).
            predictions (Predictions | None): the head's decoded predictions (`self.predictions`); None: none.

        Returns:
            AssignResult: assigned_gt, labels and max_overlaps, each [B, N].
        """
        predictions = self.predictions(None, priors) if predictions is None else predictions
        return self.assigner(priors, gt_boxes, gt_labels, valid, predictions)

    def use_valid_region(self, region: str) -> None:
        """Which priors count in the targets and losses: 'mmdet' (MMDetection's valid flags: each image padded up to
        a multiple of 32; every point for FCOS) or 'image' (only priors whose cell starts inside the unpadded image)."""
        if region not in VALID_REGIONS:
            raise ConfigError(f"valid_region={region!r} is not valid; use one of {', '.join(VALID_REGIONS)}")
        self.valid_region = region

    def valid_mask(self, priors: Priors, batch) -> Tensor | None:
        """[B, N] True for the priors of `batch` that may be assigned and count in the losses (`valid_region`); None
        when all do (a batch without `img_sizes`, or MMDet's FCOS, which has no valid flags)."""
        img_sizes = getattr(batch, "img_sizes", None)
        if img_sizes is None or (self.valid_region == "mmdet" and not self.mmdet_valid_flags):
            return None
        return valid_prior_mask(priors, region_sizes(img_sizes, padded_size(batch), self.valid_region))

    def count_positives(self, pos_mask: Tensor) -> Tensor:
        """num_pos of `pos_mask` [B, N]: Σ_img max(num_pos_img, 1) for anchor heads (MMDet's SamplingResult
        counts an image without positives as 1) or the plain total (FCOS), averaged over ranks, at least 1."""
        per_image = pos_mask.sum(dim=1).float()  # [B]
        if self.min_one_pos_per_image:
            per_image = per_image.clamp(min=1.0)
        return reduce_mean(per_image.sum()).clamp(min=1.0)

    @torch.no_grad()
    def get_targets(self, priors: Priors, batch, outputs: HeadOutputs | None = None) -> Targets:
        """Assign priors to the batch's `gt_boxes` [B, M, 4] / `gt_labels` [B, M] and gather their targets.

        The assigner sees the decoded predictions of `outputs` (the head's `forward` of the batch; an assigner that
        scores predictions needs them). Priors outside their image's valid region (`valid_mask`: from
        `batch.img_sizes` [B, 2] (h, w) and `valid_region`; a batch without sizes is all image) are ignored: never
        positive, label weight 0, so no detection or KD loss sees them (the reference's valid flags).
        """
        gt_boxes = batch.gt_boxes.float()
        valid = self.valid_mask(priors, batch)  # [B, N] or None
        result = self.assign(priors, gt_boxes, batch.gt_labels, valid, self.predictions(outputs, priors))
        assigned, labels = result.assigned_gt, result.labels  # [B, N]
        if valid is not None:
            assigned = torch.where(valid, assigned, IGNORED)
            labels = torch.where(valid, labels, -1)
        pos = assigned >= 0  # [B, N]
        box_targets = result.gather_boxes(gt_boxes) if gt_boxes.shape[1] else gt_boxes.new_zeros(*pos.shape, 4)
        box_targets = torch.where(pos[..., None], box_targets, 0.0)
        num_pos = self.count_positives(pos)
        targets = Targets(assigned, labels, (assigned != IGNORED).float(), box_targets, pos, num_pos)
        if result.scores is not None:
            targets.label_scores = torch.where(pos, result.scores, 0.0)
        if self.with_centerness:
            ctr = centerness_target(distance_encode(priors.points, box_targets))  # [B, N]
            targets.centerness_targets = torch.where(pos, ctr, 0.0)
            targets.centerness_denorm = reduce_mean(targets.centerness_targets.sum()).clamp(
                min=self.centerness_denorm_min
            )
        return targets

    # ----- shared loss terms ----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, outputs: HeadOutputs, priors: Priors, targets: Targets) -> dict[str, Tensor]:
        """Detection losses: `loss_cls`, `loss_box` and `loss_dfl` (GFL) / `loss_ctr` (FCOS, ATSS).

        Args:
            outputs (HeadOutputs): `forward` of the batch's features.
            priors (Priors): N priors of the outputs' feature sizes.
            targets (Targets): `get_targets(priors, batch, outputs)`, [B, N] per prior.

        Returns:
            dict[str, Tensor]: scalar losses (zero with a graph when there are no positives).
        """

    def focal_cls_loss(self, cls: Tensor, targets: Targets, gamma: float, alpha: float) -> Tensor:
        """Sigmoid focal loss of logits `cls` [B, N, C] over all non-ignored priors, summed / num_pos (scalar)."""
        loss = focal_loss(cls, targets.labels, gamma=gamma, alpha=alpha).sum(-1)  # [B, N]
        return weight_reduce(loss, targets.label_weights, avg_factor=targets.num_pos)

    @staticmethod
    def centerness_loss(ctr: Tensor, targets: Targets) -> Tensor:
        """BCE between centerness logits `ctr` [B, N] and targets on positives, summed / num_pos (scalar)."""
        pos = targets.pos_mask
        loss = bce_with_logits(ctr[pos], targets.centerness_targets[pos])  # [P]
        return weight_reduce(loss, avg_factor=targets.num_pos)

    @staticmethod
    def pos_prior_index(targets: Targets) -> Tensor:
        """Prior index [P] of every positive, in the order of boolean indexing with `pos_mask`."""
        return targets.pos_mask.nonzero(as_tuple=True)[1]
