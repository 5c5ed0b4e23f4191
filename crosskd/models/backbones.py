"""Backbones from torchvision building blocks: ResNet, MobileNetV2, MobileNetV3-Large and Swin-T.

Every backbone returns a list of feature maps (strides 8, 16, 32 by default) and exposes `out_channels` and `strides`.
At width 1.0 the parameter names equal torchvision's. A backbone only stores its `pretrained` spec: the weights
are loaded when training starts (`crosskd.models.pretrained.load_pretrained_weights`), never while building.
"""

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn
from torchvision.models import SwinTransformer, mobilenet_v2, mobilenet_v3_large
from torchvision.models.resnet import BasicBlock, Bottleneck

from crosskd.errors import ConfigError

RESNET_SPECS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
RESNET_STYLES = ("pytorch", "caffe")  # MMDet: stride on the 3x3 conv2 (pytorch) or the 1x1 conv1 (caffe)
MOBILENET_STAGE_ENDS = (4, 7, 14, 18)  # torchvision features[:end] gives strides 4, 8, 16, 32
# torchvision's _mobilenet_extractor stages of mobilenet_v3_large (the stem, the four strided blocks, the last conv):
# stage k outputs features[MOBILENET_V3_LAYERS[k]]; trainable_layers t in 1..6 freezes the layers before stage 6 - t's
MOBILENET_V3_LAYERS = (0, 2, 4, 7, 13, 16)
MOBILENET_V3_STRIDES = (2, 4, 8, 16, 32, 32)
SWIN_STAGE_ENDS = (2, 4, 6, 8)  # torchvision swin_t features[:end] gives strides 4, 8, 16, 32


def _check_out_indices(out_indices: Sequence[int], num_stages: int = 4) -> tuple[int, ...]:
    indices = tuple(out_indices)
    if not indices or any(i not in range(num_stages) for i in indices) or list(indices) != sorted(set(indices)):
        raise ConfigError(
            f"backbone.out_indices {list(indices)} must be increasing stage indices in 0..{num_stages - 1}"
        )
    return indices


def _check_frozen_stages(frozen_stages: int, last: int = 4) -> int:
    if frozen_stages not in range(-1, last + 1):
        raise ConfigError(
            f"backbone.frozen_stages {frozen_stages} must be in -1..{last} (-1 none, 0 stem, k stem+stages 1..k)"
        )
    return frozen_stages


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


class Backbone(nn.Module):
    """A backbone whose first `frozen_stages` stay frozen in eval mode (and all BatchNorm when `norm_eval`).

    `forward` takes normalised images [B, 3, H, W] and returns one map [B, out_channels[k], H/s, W/s] per entry k
    of `out_indices`, where stage i has stride s = `stage_strides[i]` (4·2^i unless the backbone says otherwise:
    stages 1, 2, 3 → strides 8, 16, 32).
    """

    norm_eval = False
    pretrained: bool | str | None = None  # weights spec loaded at training start (see models/pretrained.py)
    stage_strides: tuple[int, ...] = (4, 8, 16, 32)
    out_indices: tuple[int, ...] = ()

    @property
    def strides(self) -> list[int]:
        """The stride of every output map."""
        return [self.stage_strides[i] for i in self.out_indices]

    def _freeze_stages(self) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Backbone":
        """Train mode that keeps frozen stages (and all BatchNorm when `norm_eval`) in eval mode."""
        super().train(mode)
        if mode:
            self._freeze_stages()
            if self.norm_eval:
                _set_bn_eval(self)
        return self


class StagedFeatures(Backbone):
    """A torchvision `features` Sequential cut into stages at `stage_ends` (stage i outputs features[:stage_ends[i]]);
    `frozen_stages` k freezes features[:freeze_ends[k]]."""

    stage_ends: tuple[int, ...] = ()
    freeze_ends: tuple[int, ...] = ()

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            for layer in self.features[: self.freeze_ends[self.frozen_stages]]:
                _freeze(layer)

    def _stage_outputs(self, x: Tensor) -> list[tuple[int, Tensor]]:
        """(stage index, output) of every stage in `out_indices`."""
        outs, start = [], 0
        for i, end in enumerate(self.stage_ends):
            x = self.features[start:end](x)
            start = end
            if i in self.out_indices:
                outs.append((i, x))
        return outs


class ResNet(Backbone):
    """ResNet-18/34/50/101 (MMDet 'pytorch' or 'caffe' style) with a width multiplier; stage i has 64·width·2^i planes.

    `style='caffe'` puts each downsampling Bottleneck's stride on its 1×1 conv1 instead of its 3×3 conv2 (MMDet's
    conv1_stride/conv2_stride); BasicBlock depths (18, 34) have their stride on a 3×3 conv either way, so style
    changes nothing there. Parameter names and shapes are the same in both styles.
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        pretrained: bool | str | None = None,
        norm_eps: float = 1e-5,
        style: str = "pytorch",
    ) -> None:
        """`norm_eps` is every BatchNorm's eps (torchvision's COCO RetinaNet v1 weights expect 0)."""
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ConfigError(f"backbone.depth {depth} is not one of {', '.join(map(str, RESNET_SPECS))}")
        if style not in RESNET_STYLES:
            raise ConfigError(f"backbone.style {style!r} is not one of {', '.join(RESNET_STYLES)}")
        if width <= 0:
            raise ConfigError(f"backbone.width {width} must be > 0")
        block, layers = RESNET_SPECS[depth]
        self.depth, self.width = depth, width
        self.out_indices = _check_out_indices(out_indices)
        self.frozen_stages, self.norm_eval = _check_frozen_stages(frozen_stages), norm_eval
        self.inplanes = max(int(64 * width), 1)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        planes = [max(int(64 * width * 2**i), 1) for i in range(4)]
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.style = style
        if style == "caffe":
            self._move_strides_to_1x1()
        self.out_channels = [planes[i] * block.expansion for i in self.out_indices]
        self._init_weights()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = norm_eps
        self.pretrained = pretrained
        self._freeze_stages()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _move_strides_to_1x1(self) -> None:
        """Caffe style: every Bottleneck whose 3×3 conv2 has a stride takes it on its 1×1 conv1 instead."""
        for block in self.modules():
            if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            _freeze(self.conv1)
            _freeze(self.bn1)
        for stage in self._stages()[: max(self.frozen_stages, 0)]:
            _freeze(stage)

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] → one [B, out_channels[k], H/s, W/s] map per out index (see Backbone)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, stage in enumerate(self._stages()):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


class MobileNetV2(StagedFeatures):
    """torchvision MobileNetV2 features (up to the 320-channel block), outputs at the chosen stages."""

    stage_ends = MOBILENET_STAGE_ENDS
    freeze_ends = (1, *MOBILENET_STAGE_ENDS)

    def __init__(
        self,
        width: float = 1.0,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        pretrained: bool | str | None = None,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError(f"backbone.width {width} must be > 0")
        self.width = width
        self.out_indices = _check_out_indices(out_indices)
        self.frozen_stages, self.norm_eval = _check_frozen_stages(frozen_stages), norm_eval
        self.features = mobilenet_v2(weights=None, width_mult=width).features[: MOBILENET_STAGE_ENDS[-1]]
        channels = [self.features[end - 1].out_channels for end in MOBILENET_STAGE_ENDS]
        self.out_channels = [channels[i] for i in self.out_indices]
        self.pretrained = pretrained
        self._freeze_stages()

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] → one [B, out_channels[k], H/s, W/s] map per out index (see Backbone)."""
        return [out for _, out in self._stage_outputs(x)]


class MobileNetV3Large(StagedFeatures):
    """torchvision MobileNetV3-Large features in the six stages of torchvision's detection backbones
    (`_mobilenet_extractor`): stage k outputs layer MOBILENET_V3_LAYERS[k] (the stem, the first block of strides 4,
    8, 16 and 32, the last 960-channel conv), at strides 2, 4, 8, 16, 32, 32.

    `frozen_stages` k freezes the layers before stage k + 1's (torchvision's `trainable_layers` = 5 − k); `norm_eps`
    is every BatchNorm's eps (torchvision's detection builders use 1e-5, not the classifier's 1e-3).
    """

    stage_ends = tuple(layer + 1 for layer in MOBILENET_V3_LAYERS)
    stage_strides = MOBILENET_V3_STRIDES
    freeze_ends = (*MOBILENET_V3_LAYERS[1:], MOBILENET_V3_LAYERS[-1] + 1)

    def __init__(
        self,
        width: float = 1.0,
        out_indices: Sequence[int] = (4, 5),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        pretrained: bool | str | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError(f"backbone.width {width} must be > 0")
        self.width = width
        self.out_indices = _check_out_indices(out_indices, len(self.stage_ends))
        self.frozen_stages = _check_frozen_stages(frozen_stages, len(self.freeze_ends) - 1)
        self.norm_eval = norm_eval
        norm_layer = partial(nn.BatchNorm2d, eps=norm_eps)
        self.features = mobilenet_v3_large(weights=None, width_mult=width, norm_layer=norm_layer).features
        self.out_channels = [self.features[MOBILENET_V3_LAYERS[i]].out_channels for i in self.out_indices]
        self.pretrained = pretrained
        self._freeze_stages()

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] → one [B, out_channels[k], H/s, W/s] map per out index, s = MOBILENET_V3_STRIDES[index]."""
        return [out for _, out in self._stage_outputs(x)]


class SwinT(StagedFeatures):
    """torchvision Swin-T features (NHWC) with one LayerNorm per output stage (as MMDet), returned NCHW."""

    stage_ends = SWIN_STAGE_ENDS
    freeze_ends = (1, *SWIN_STAGE_ENDS)

    def __init__(
        self,
        out_indices: Sequence[int] = (1, 2, 3),
        drop_path_rate: float = 0.2,
        frozen_stages: int = -1,
        pretrained: bool | str | None = None,
    ) -> None:
        super().__init__()
        self.out_indices = _check_out_indices(out_indices)
        self.frozen_stages = _check_frozen_stages(frozen_stages)
        swin = SwinTransformer([4, 4], 96, [2, 2, 6, 2], [3, 6, 12, 24], [7, 7], stochastic_depth_prob=drop_path_rate)
        self.features = swin.features  # torchvision swin_t layout
        channels = [96 * 2**i for i in range(4)]
        self.out_channels = [channels[i] for i in self.out_indices]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)
        self.pretrained = pretrained
        self._freeze_stages()

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] → one normed [B, out_channels[k], H/s, W/s] map per out index (see Backbone)."""
        outs = []
        for i, out in self._stage_outputs(x):  # out: [B, H, W, C]
            norm = self.norms[self.out_indices.index(i)]
            outs.append(norm(out).permute(0, 3, 1, 2).contiguous())  # [B, C, H, W]
        return outs
