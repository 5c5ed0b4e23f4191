"""PKD: Pearson-correlation feature imitation of the FPN outputs or the head towers' hold features."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from crosskd.distill.adapters import build_connector, feature_channels, hold_channels
from crosskd.distill.kd_losses import PKD_ALONE_LEVELS, PKD_ALONE_WEIGHT, KDWeights, feature_kd
from crosskd.distill.methods.base import KDContext, KDMethod, KDSetup
from crosskd.distill.passes import batch_region_sizes, feature_masks

if TYPE_CHECKING:
    from crosskd.models import DenseDetector

TOWER = {"cls": 0, "reg": 1}  # pkd_on -> index of the (cls, reg) hold feature pair


class PKD(KDMethod):
    """kd_feat on the features of `pkd_on` inside the valid region (valid_region); kd=pkd alone takes MMRazor's first 4
    levels and weight 10. Owns a 1x1 width connector (student -> teacher channels, shared by the levels) when widths
    differ."""

    needs = frozenset({"neck"})
    two_stage = True  # on the FPN maps (pkd_on=neck): any detector with an FPN

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__(student, teacher, setup)
        self.levels = PKD_ALONE_LEVELS if setup.alone else None
        if setup.pkd_on == "neck":
            widths = feature_channels(student), feature_channels(teacher)
        else:
            branch = TOWER[setup.pkd_on]  # hold_channels gives the (cls, reg) widths
            widths = (hold_channels(student.head, setup.kd_idx)[branch],
                      hold_channels(teacher.head, setup.kd_idx)[branch])
        self.connector = build_connector(*widths, f"PKD ({setup.pkd_on})")

    @classmethod
    def needs_for(cls, pkd_on: str) -> frozenset[str]:
        """The FPN outputs, or the tower hold features for pkd_on=cls|reg."""
        return cls.needs if pkd_on == "neck" else frozenset({"holds"})

    @classmethod
    def default_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """Alone, MMRazor's PKD weight; beside CrossKD, the head type's."""
        return replace(weights, feat=PKD_ALONE_WEIGHT) if alone else weights

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """kd_feat: per-level PKD summed, times the feat weight."""
        if self.setup.pkd_on == "neck":
            s_maps, t_maps = ctx.student.feats, ctx.teacher.feats
        else:
            branch = TOWER[self.setup.pkd_on]
            s_maps, t_maps = [h[branch] for h in ctx.student.holds], [h[branch] for h in ctx.teacher.holds]
        s_maps, t_maps = s_maps[: self.levels], t_maps[: self.levels]
        masks = feature_masks(batch_region_sizes(ctx.batch, self.setup.valid_region), s_maps, ctx.strides)
        if self.connector is not None:
            s_maps = [self.connector(x) for x in s_maps]  # [B, C_s, H, W] -> [B, C_t, H, W]
        return {"kd_feat": feature_kd(s_maps, t_maps, self.setup.weights.feat, masks)}
