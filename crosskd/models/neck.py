"""FPN neck: torchvision's FeaturePyramidNetwork plus MMDet-style extra stride-2 convs (P6, P7)."""

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from crosskd.errors import ConfigError

EXTRA_SOURCES = ("on_input", "on_output", "max_pool")  # max_pool: no convs, P6 = P5 subsampled (Faster R-CNN)
NECK_NORMS = ("none", "bn")  # bn: every lateral and output conv without bias, then BatchNorm (torchvision's v2 FPN)


class ExtraConvs(ExtraFPNBlock):
    """Stride-2 3×3 convs appended after the last level, fed from the last input (C5) or output (P5).

    With `relu_before_extra_convs` a ReLU precedes every extra conv except the first (MMDet, torchvision P6P7).
    """

    def __init__(self, in_channels: int, out_channels: int, num_extra: int, source: str, relu_before: bool) -> None:
        super().__init__()
        first_in = in_channels if source == "on_input" else out_channels
        self.convs = nn.ModuleList(
            nn.Conv2d(first_in if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(num_extra)
        )
        self.source, self.relu_before = source, relu_before

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append one [B, out_channels, ⌈H/2⌉, ⌈W/2⌉] map per extra conv to the FPN `results` (inputs `x`: C3..C5)."""
        feat = x[-1] if self.source == "on_input" else results[-1]
        for i, conv in enumerate(self.convs):
            feat = conv(F.relu(feat) if self.relu_before and i > 0 else feat)
            results.append(feat)
            names.append(f"p{len(names)}")
        return results, names


class ExtraPools(ExtraFPNBlock):
    """Extra levels without parameters: each a 1×1 max-pool of stride 2 of the previous output (MMDetection's FPN
    without extra convs, torchvision's LastLevelMaxPool)."""

    def __init__(self, num_extra: int) -> None:
        super().__init__()
        self.num_extra = num_extra

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append `num_extra` maps [B, C, ⌈H/2⌉, ⌈W/2⌉], each from the last output."""
        for _ in range(self.num_extra):
            results.append(F.max_pool2d(results[-1], 1, stride=2))
            names.append(f"p{len(names)}")
        return results, names


class FPN(nn.Module):
    """Feature pyramid over backbone levels (C3–C5) with `num_outs` outputs (P3–P7 by default).

    Args:
        in_channels (Sequence[int]): channels of the backbone outputs, e.g. (512, 1024, 2048) for C3–C5.
        out_channels (int): channels of every output level.
        num_outs (int): output levels; those beyond the inputs come from stride-2 convs fed as `add_extra_convs` says
            (on_input: C5, on_output: P5) or, with `max_pool`, from 1×1 max-pools of stride 2 (no parameters).
        norm (str): 'none' (convs with bias) or 'bn' (lateral and output convs without bias, each followed by
            BatchNorm: torchvision's FPN with norm_layer=BatchNorm2d, as in fasterrcnn_resnet50_fpn_v2).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 5,
        add_extra_convs: str = "on_input",
        relu_before_extra_convs: bool = False,
        norm: str = "none",
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if num_outs < len(in_channels):
            raise ConfigError(
                f"neck.num_outs {num_outs} must be >= the number of backbone outputs ({len(in_channels)})"
            )
        if add_extra_convs not in EXTRA_SOURCES:
            raise ConfigError(f"neck.add_extra_convs '{add_extra_convs}' is not one of {', '.join(EXTRA_SOURCES)}")
        if norm not in NECK_NORMS:
            raise ConfigError(f"neck.norm '{norm}' is not one of {', '.join(NECK_NORMS)}")
        num_extra = num_outs - len(in_channels)
        extra = (
            ExtraPools(num_extra)
            if add_extra_convs == "max_pool"
            else ExtraConvs(in_channels[-1], out_channels, num_extra, add_extra_convs, relu_before_extra_convs)
        )
        norm_layer = nn.BatchNorm2d if norm == "bn" else None
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=extra if num_extra else None, norm_layer=norm_layer
        )
        self.out_channels, self.num_outs = out_channels, num_outs
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """`num_outs` maps [B, out_channels, H/s, W/s] (s = 8..128) from backbone maps [B, in_channels[i], H_i, W_i]."""
        outs = self.fpn(OrderedDict((f"c{i}", f) for i, f in enumerate(feats)))
        return list(outs.values())
