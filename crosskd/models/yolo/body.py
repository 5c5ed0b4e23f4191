"""YOLOv8 / YOLO11 backbone and PAN neck, built from their layer tables the way Ultralytics 8.4 builds its models.

Layers are numbered as Ultralytics numbers them (its `model.{i}`): the backbone holds layers 0..B-1 as
`backbone.layers.{i}`, the neck the layers after it up to Detect as `neck.layers.{i - B}`, so an Ultralytics
checkpoint maps by index. Upsample and Concat layers keep their slot (no parameters).

Scaling (a model YAML's `scales:` row [depth, width, max_channels]) follows Ultralytics' parse_model: a layer's
channels become make_divisible(min(c, max_channels) · width, 8), a block's repeats n > 1 become
max(round(n · depth), 1), and `c3k=True` (Ultralytics' rule for YOLO11 scales m, l, x) makes every C3k2 use C3k blocks.
"""

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crosskd.errors import ConfigError

from .blocks import C2PSA, SPPF, C2f, C3k2, Conv

PREVIOUS = -1  # a layer input: the layer just before


class Layer(NamedTuple):
    """One layer: its inputs (PREVIOUS or Ultralytics layer indices), block kind, channels before scaling (0: kept
    from the input), repeats before scaling and the block's other keyword arguments."""

    kind: str  # conv, c2f, c3k2, sppf, c2psa, upsample, concat
    channels: int = 0
    repeats: int = 1
    inputs: tuple[int, ...] = (PREVIOUS,)
    options: dict[str, Any] = {}


class Family(NamedTuple):
    """A model family's layer tables and which layers feed the next part (Ultralytics indices)."""

    backbone: tuple[Layer, ...]
    neck: tuple[Layer, ...]
    backbone_outputs: tuple[int, int, int]  # P3, P4, P5
    neck_outputs: tuple[int, int, int]  # N3, N4, N5: the layers Detect reads


def _downsample(channels: int) -> Layer:
    return Layer("conv", channels, options={"kernel": 3, "stride": 2})


def _merge(skip: int) -> tuple[Layer, Layer]:
    """Upsample the previous layer ×2 and concatenate layer `skip` (the top-down path)."""
    return Layer("upsample"), Layer("concat", inputs=(PREVIOUS, skip))


YOLOV8 = Family(
    backbone=(
        _downsample(64),  # 0: P1/2
        _downsample(128),  # 1: P2/4
        Layer("c2f", 128, 3, options={"shortcut": True}),
        _downsample(256),  # 3: P3/8
        Layer("c2f", 256, 6, options={"shortcut": True}),  # 4
        _downsample(512),  # 5: P4/16
        Layer("c2f", 512, 6, options={"shortcut": True}),  # 6
        _downsample(1024),  # 7: P5/32
        Layer("c2f", 1024, 3, options={"shortcut": True}),
        Layer("sppf", 1024, options={"kernel": 5}),  # 9
    ),
    neck=(
        *_merge(6),  # 10, 11
        Layer("c2f", 512, 3),  # 12
        *_merge(4),  # 13, 14
        Layer("c2f", 256, 3),  # 15: N3
        _downsample(256),
        Layer("concat", inputs=(PREVIOUS, 12)),
        Layer("c2f", 512, 3),  # 18: N4
        _downsample(512),
        Layer("concat", inputs=(PREVIOUS, 9)),
        Layer("c2f", 1024, 3),  # 21: N5
    ),
    backbone_outputs=(4, 6, 9),
    neck_outputs=(15, 18, 21),
)

YOLO11 = Family(
    backbone=(
        _downsample(64),  # 0: P1/2
        _downsample(128),  # 1: P2/4
        Layer("c3k2", 256, 2, options={"c3k": False, "e": 0.25}),
        _downsample(256),  # 3: P3/8
        Layer("c3k2", 512, 2, options={"c3k": False, "e": 0.25}),  # 4
        _downsample(512),  # 5: P4/16
        Layer("c3k2", 512, 2, options={"c3k": True}),  # 6
        _downsample(1024),  # 7: P5/32
        Layer("c3k2", 1024, 2, options={"c3k": True}),
        Layer("sppf", 1024, options={"kernel": 5}),
        Layer("c2psa", 1024, 2),  # 10
    ),
    neck=(
        *_merge(6),  # 11, 12
        Layer("c3k2", 512, 2, options={"c3k": False}),  # 13
        *_merge(4),  # 14, 15
        Layer("c3k2", 256, 2, options={"c3k": False}),  # 16: N3
        _downsample(256),
        Layer("concat", inputs=(PREVIOUS, 13)),
        Layer("c3k2", 512, 2, options={"c3k": False}),  # 19: N4
        _downsample(512),
        Layer("concat", inputs=(PREVIOUS, 10)),
        Layer("c3k2", 1024, 2, options={"c3k": True}),  # 22: N5
    ),
    backbone_outputs=(4, 6, 10),
    neck_outputs=(16, 19, 22),
)

FAMILIES = {"yolov8": YOLOV8, "yolo11": YOLO11}
BLOCKS = {"conv": Conv, "c2f": C2f, "c3k2": C3k2, "sppf": SPPF, "c2psa": C2PSA}
REPEATED = {"c2f", "c3k2", "c2psa"}  # blocks whose constructor takes the repeats n


class Concat(nn.Module):
    """Concatenate a list of maps along the channels."""

    def forward(self, maps: list[Tensor]) -> Tensor:
        return torch.cat(maps, 1)


class Scaling(NamedTuple):
    """A scale row of the model YAML and YOLO11's m/l/x C3k override."""

    depth: float
    width: float
    max_channels: int
    c3k: bool

    def channels(self, channels: int) -> int:
        """Ultralytics' make_divisible(min(c, max_channels) · width, 8)."""
        return math.ceil(min(channels, self.max_channels) * self.width / 8) * 8

    def repeats(self, repeats: int) -> int:
        return max(round(repeats * self.depth), 1) if repeats > 1 else repeats


def _family(family: str, part: str) -> Family:
    if family not in FAMILIES:
        raise ConfigError(f"{part}.family '{family}' is not one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _make_layer(layer: Layer, c_in: list[int], scaling: Scaling) -> tuple[nn.Module, int]:
    """The module of one table row and its output channels, given its inputs' channels."""
    if layer.kind == "upsample":
        return nn.Upsample(scale_factor=2, mode="nearest"), c_in[0]
    if layer.kind == "concat":
        return Concat(), sum(c_in)
    c_out, options = scaling.channels(layer.channels), dict(layer.options)
    if layer.kind in REPEATED:
        options["n"] = scaling.repeats(layer.repeats)
    if layer.kind == "c3k2" and scaling.c3k:
        options["c3k"] = True
    return BLOCKS[layer.kind](c_in[0], c_out, **options), c_out


class LayerStack(nn.Module):
    """Layers `first, first + 1, ...` of a layer table, run in order; each reads the previous layer's output or those
    of the earlier layers it names. The stack's inputs stand for the layers in `input_layers` (the backbone's image
    for layer -1, the one before layer 0)."""

    def __init__(
        self, table: tuple[Layer, ...], first: int, input_layers: tuple[int, ...], in_channels: list[int],
        output_layers: tuple[int, ...], scaling: Scaling,
    ) -> None:
        super().__init__()
        self.first, self.input_layers, self.output_layers = first, input_layers, output_layers
        channels = dict(zip(input_layers, in_channels))  # Ultralytics layer index -> output channels
        self.sources: list[tuple[int, ...]] = []
        modules = []
        for index, layer in enumerate(table, start=first):
            sources = tuple(index - 1 if i == PREVIOUS else i for i in layer.inputs)
            module, channels[index] = _make_layer(layer, [channels[i] for i in sources], scaling)
            modules.append(module)
            self.sources.append(sources)
        self.layers = nn.ModuleList(modules)
        self.out_channels = [channels[i] for i in output_layers]

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """Maps of `input_layers` → maps of `output_layers`."""
        outputs = dict(zip(self.input_layers, inputs))  # Ultralytics layer index -> map
        for index, (layer, sources) in enumerate(zip(self.layers, self.sources), start=self.first):
            outputs[index] = layer([outputs[i] for i in sources]) if len(sources) > 1 else layer(outputs[sources[0]])
        return [outputs[i] for i in self.output_layers]


class YOLOBackbone(LayerStack):
    """YOLOv8 / YOLO11 backbone (Ultralytics layers 0..9 / 0..10): normalised images [B, 3, H, W] → P3, P4, P5,
    [B, out_channels[k], H/s, W/s] for s = 8, 16, 32.

    Args:
        family: 'yolov8' or 'yolo11'.
        depth, width, max_channels: the scale row (a model YAML's `scale:` picks it from `scales:`).
        c3k: every C3k2 uses C3k blocks (Ultralytics does this for YOLO11 scales m, l, x).
    """

    strides = [8, 16, 32]
    pretrained = False  # YOLO models start from scratch or from a whole Ultralytics checkpoint

    def __init__(
        self, family: str, depth: float = 1.0, width: float = 1.0, max_channels: int = 1024, c3k: bool = False
    ) -> None:
        spec = _family(family, "backbone")
        scaling = Scaling(depth, width, max_channels, c3k)
        super().__init__(spec.backbone, 0, (PREVIOUS,), [3], spec.backbone_outputs, scaling)
        self.family = family

    def forward(self, images: Tensor) -> list[Tensor]:
        return super().forward([images])


class YOLONeck(LayerStack):
    """YOLOv8 / YOLO11 PAN neck (the layers between the backbone and Detect): P3, P4, P5 → N3, N4, N5,
    [B, out_channels[k], H/s, W/s] for s = 8, 16, 32. Arguments as YOLOBackbone's, plus the backbone's
    `in_channels`."""

    strides = [8, 16, 32]

    def __init__(
        self, in_channels: list[int], family: str, depth: float = 1.0, width: float = 1.0, max_channels: int = 1024,
        c3k: bool = False,
    ) -> None:
        spec = _family(family, "neck")
        if len(in_channels) != 3:
            raise ConfigError(f"neck: {family} takes the backbone's P3, P4, P5, not {len(in_channels)} maps")
        scaling = Scaling(depth, width, max_channels, c3k)
        first = len(spec.backbone)
        super().__init__(spec.neck, first, spec.backbone_outputs, list(in_channels), spec.neck_outputs, scaling)
        self.family = family
