"""torchvision's COCO detectors (RetinaNet v1/v2, FCOS, Faster R-CNN v1/v2 and MobileNetV3-Large FPN) as crosskd
detectors with the 80 contiguous COCO classes.

Each supported name has a shipped YAML that rebuilds torchvision's model exactly (cfg/models/*_tv.yaml), and an
explicit key map from torchvision's state dict onto ours. torchvision's classifiers predict 91 slots (COCO category
ids: 0 background and 10 'N/A' slots are never used by a sigmoid head); the loader keeps the 80 used rows, so our
label i is torchvision's label `COCO80_TO_91[i]`. Faster R-CNN's softmax classifier and class-specific box predictor
keep those 80 rows and the background slot, moved from torchvision's first place to MMDetection's last
(`frcnn_rows`). Named weights come through torchvision's weights API and torch hub's cache
(`$TORCH_HOME/hub/checkpoints`); nothing else is ever downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torchvision.models import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    RetinaNet_ResNet50_FPN_V2_Weights,
    RetinaNet_ResNet50_FPN_Weights,
)

from crosskd.errors import CheckpointError, ConfigError
from crosskd.models.pretrained import cached_file, fetch_named_weights
from crosskd.utils import LOGGER, read_torch_file

from ..build import build_detector
from ..dense_detector import DenseDetector
from .mapping import load_mapped

TORCHVISION_PREFIX = "torchvision:"
COCO91_NAMES: tuple[str, ...] = tuple(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
COCO80_TO_91: tuple[int, ...] = tuple(i for i, n in enumerate(COCO91_NAMES) if n not in ("__background__", "N/A"))
COCO91_TO_80: tuple[int, ...] = tuple(COCO80_TO_91.index(i) if i in COCO80_TO_91 else -1 for i in range(91))
COCO80_NAMES: dict[int, str] = {i: COCO91_NAMES[slot] for i, slot in enumerate(COCO80_TO_91)}


@dataclass(frozen=True)
class TorchvisionDetector:
    """A supported torchvision detector: its crosskd YAML, its default COCO weights and its head-tower key layout."""

    yaml: str
    weights: WeightsEnum
    tower: str  # "conv_norm_act": conv.{i}.0 conv, conv.{i}.1 norm (RetinaNet); "flat": conv.{3i}, conv.{3i+1} (FCOS);
    # "none": no tower (Faster R-CNN)
    predictors: dict[str, str]  # our head module -> torchvision's (predictors; for Faster R-CNN every head module)
    body_prefix: str = ""  # what our backbone's keys start with and torchvision's `backbone.body` drops ("features.")


RETINA_PREDICTORS = {
    "retina_cls": "classification_head.cls_logits",
    "retina_reg": "regression_head.bbox_reg",
}
FCOS_PREDICTORS = {
    "conv_cls": "classification_head.cls_logits",
    "conv_reg": "regression_head.bbox_reg",
    "conv_centerness": "regression_head.bbox_ctrness",
}
FRCNN_MODULES = {
    "rpn.conv": "rpn.head.conv.0.0",
    "rpn.cls": "rpn.head.cls_logits",
    "rpn.reg": "rpn.head.bbox_pred",
    "roi_head.fcs.0": "roi_heads.box_head.fc6",
    "roi_head.fcs.1": "roi_heads.box_head.fc7",
    "roi_head.cls": "roi_heads.box_predictor.cls_score",
    "roi_head.reg": "roi_heads.box_predictor.bbox_pred",
}
FRCNN_V2_MODULES = {  # RPNHead(conv_depth=2), FastRCNNConvFCHead: box_head.{0..3} conv-BN-ReLU, .4 Flatten, .5 FC
    "rpn.conv": "rpn.head.conv.0.0",
    "rpn.extra_convs.0": "rpn.head.conv.1.0",
    **{f"roi_head.convs.{i}.{part}": f"roi_heads.box_head.{i}.{index}"
       for i in range(4) for part, index in (("conv", 0), ("norm", 1))},
    "roi_head.fcs.0": "roi_heads.box_head.5",
    "rpn.cls": "rpn.head.cls_logits",
    "rpn.reg": "rpn.head.bbox_pred",
    "roi_head.cls": "roi_heads.box_predictor.cls_score",
    "roi_head.reg": "roi_heads.box_predictor.bbox_pred",
}
TORCHVISION_DETECTORS: dict[str, TorchvisionDetector] = {
    "retinanet_resnet50_fpn": TorchvisionDetector(
        "retinanet_r50_tv.yaml", RetinaNet_ResNet50_FPN_Weights.COCO_V1, "conv_norm_act", RETINA_PREDICTORS
    ),
    "retinanet_resnet50_fpn_v2": TorchvisionDetector(
        "retinanet_r50_v2_tv.yaml", RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1, "conv_norm_act", RETINA_PREDICTORS
    ),
    "fcos_resnet50_fpn": TorchvisionDetector(
        "fcos_r50_tv.yaml", FCOS_ResNet50_FPN_Weights.COCO_V1, "flat", FCOS_PREDICTORS
    ),
    "fasterrcnn_resnet50_fpn": TorchvisionDetector(
        "faster_rcnn_r50_tv.yaml", FasterRCNN_ResNet50_FPN_Weights.COCO_V1, "none", FRCNN_MODULES
    ),
    "fasterrcnn_resnet50_fpn_v2": TorchvisionDetector(
        "faster_rcnn_r50_tv_v2.yaml", FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1, "none", FRCNN_V2_MODULES
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionDetector(
        "faster_rcnn_mnv3_tv.yaml", FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1, "none", FRCNN_MODULES,
        "features.",
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionDetector(
        "faster_rcnn_mnv3_320_tv.yaml", FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1, "none", FRCNN_MODULES,
        "features.",
    ),
}
CLASSIFIER_KEYS = ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias")
FRCNN_CLASS_KEYS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias")
FRCNN_BOX_KEYS = ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias")
BRANCHES = {"cls_convs": "classification_head", "reg_convs": "regression_head"}
TOWER_KEY = re.compile(r"head\.(cls_convs|reg_convs)\.(\d+)\.(conv|norm)\.(\w+)")


def torchvision_spec(name: str) -> TorchvisionDetector:
    """The supported detector called `name` (e.g. 'retinanet_resnet50_fpn_v2'), or one ConfigError line."""
    if name not in TORCHVISION_DETECTORS:
        raise ConfigError(f"unknown torchvision detector '{name}'; valid: {', '.join(TORCHVISION_DETECTORS)}")
    return TORCHVISION_DETECTORS[name]


def weights_file_name(name: str) -> str:
    """The file name torch hub caches `name`'s COCO weights under (the basename of the weights URL)."""
    return cached_file(torchvision_spec(name).weights).name


def torchvision_name(source: str | Path) -> str | None:
    """The detector name of 'torchvision:<name>' or of a file named like its real weights file, else None; an
    unknown name after 'torchvision:' is one ConfigError line."""
    text = str(source)
    if text.startswith(TORCHVISION_PREFIX):
        name = text[len(TORCHVISION_PREFIX) :]
        torchvision_spec(name)  # an unknown name is one ConfigError line
        return name
    return next((name for name in TORCHVISION_DETECTORS if weights_file_name(name) == Path(text).name), None)


def _read_local(path: Path) -> dict[str, Tensor]:
    """A torchvision state dict from a local file (a bare state dict, or a reference-script checkpoint's `model`)."""
    state = read_torch_file(path, "torchvision weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' holds no state dict of tensors; pass torchvision's model.state_dict() file")
    return state


def torchvision_state_dict(name: str, weights_path: str | Path | None = None) -> dict[str, Tensor]:
    """torchvision's state dict for detector `name`: from `weights_path` when given, else its COCO weights (cached)."""
    spec = torchvision_spec(name)
    if weights_path is not None:
        return _read_local(Path(weights_path))
    return fetch_named_weights(spec.weights, "pass a local state-dict file")


def _tower_sources(branch: str, step: int, part: str, param: str, layout: str) -> list[str]:
    """torchvision names of one tower tensor; RetinaNet also accepts its pre-0.13 layout (conv.{2i}, no norm)."""
    prefix = f"head.{BRANCHES[branch]}.conv"
    if layout == "flat":
        return [f"{prefix}.{3 * step + (part == 'norm')}.{param}"]
    sources = [f"{prefix}.{step}.{int(part == 'norm')}.{param}"]
    return sources + [f"{prefix}.{2 * step}.{param}"] if part == "conv" else sources


def _source_names(key: str, spec: TorchvisionDetector) -> list[str]:
    """torchvision names that map onto our state-dict entry `key` (empty when torchvision has none)."""
    if key.startswith("backbone."):
        return [f"backbone.body.{key[len('backbone.') :].removeprefix(spec.body_prefix)}"]
    if key.startswith("neck.fpn.extra_blocks.convs."):
        index, param = key[len("neck.fpn.extra_blocks.convs.") :].split(".")
        return [f"backbone.fpn.extra_blocks.p{6 + int(index)}.{param}"]
    if key.startswith("neck.fpn."):
        return [f"backbone.fpn.{key[len('neck.fpn.') :]}"]
    tower = TOWER_KEY.fullmatch(key)
    if tower:
        branch, step, part, param = tower.groups()
        return _tower_sources(branch, int(step), part, param, spec.tower)
    module, _, param = key[len("head.") :].rpartition(".")
    if module not in spec.predictors:
        return []
    return [f"{spec.predictors[module]}.{param}" if spec.tower == "none" else f"head.{spec.predictors[module]}.{param}"]


def torchvision_key_map(detector: DenseDetector, name: str) -> dict[str, str]:
    """torchvision state-dict key -> our key, for a detector built from `name`'s shipped YAML."""
    spec = torchvision_spec(name)
    return {source: key for key in detector.state_dict() for source in _source_names(key, spec)}


def coco80_rows(tensor: Tensor) -> Tensor:
    """Classifier rows [A*91, ...] (row = anchor * 91 + COCO slot) -> [A*80, ...] of the 80 used COCO categories.

    A tensor whose rows are not a multiple of 91 is returned unchanged, for load_mapped to report as mis-shaped.
    """
    if tensor.shape[0] % len(COCO91_NAMES):
        return tensor
    rows = tensor.unflatten(0, (-1, len(COCO91_NAMES)))  # [A, 91, ...]
    return rows[:, list(COCO80_TO_91)].flatten(0, 1)  # [A*80, ...]


def frcnn_rows(tensor: Tensor) -> Tensor:
    """Softmax-classifier or per-class box rows [91·k, ...] (torchvision: background slot 0 first) -> [81·k, ...]:
    the 80 used COCO categories, then the background (MMDetection's order); k = 1 (scores) or 4 (box deltas).

    A tensor whose rows are not a multiple of 91 is returned unchanged, for load_mapped to report as mis-shaped.
    """
    if tensor.shape[0] % len(COCO91_NAMES):
        return tensor
    rows = tensor.unflatten(0, (len(COCO91_NAMES), -1))  # [91, k, ...]
    return rows[[*COCO80_TO_91, 0]].flatten(0, 1)  # [81*k, ...]


def _transforms(spec: TorchvisionDetector) -> dict[str, Callable[[Tensor], Tensor]]:
    """The class-axis transforms of `spec`'s classifier (and, for Faster R-CNN, box predictor) tensors."""
    if spec.tower == "none":
        return {key: frcnn_rows for key in (*FRCNN_CLASS_KEYS, *FRCNN_BOX_KEYS)}
    return {key: coco80_rows for key in CLASSIFIER_KEYS}


def _is_bn_counter(key: str) -> bool:
    """BatchNorm step counters: absent from torchvision's FrozenBatchNorm2d checkpoints, unused in eval."""
    return key.endswith("num_batches_tracked")


def load_torchvision_detector(name: str, weights_path: str | Path | None = None) -> DenseDetector:
    """torchvision detector `name` as an eval DenseDetector (a FasterRCNN for the fasterrcnn_* names) with the 80 COCO
    classes and their `names`.

    Weights come from `weights_path` (a torchvision state-dict file) or torchvision's COCO weights through torch hub's
    cache; every tensor is copied through an explicit key map, the classifier keeping its 80 used COCO rows.
    """
    spec = torchvision_spec(name)
    state = torchvision_state_dict(name, weights_path)
    detector = build_detector(spec.yaml, len(COCO80_NAMES))
    source = str(weights_path) if weights_path is not None else f"{TORCHVISION_PREFIX}{name}"
    transforms = _transforms(spec)
    count = load_mapped(detector, state, torchvision_key_map(detector, name), source, _is_bn_counter, transforms)
    LOGGER.info(f"Loaded {count} tensors of {TORCHVISION_PREFIX}{name} from {source} into {spec.yaml}")
    detector.names = dict(COCO80_NAMES)
    return detector.eval()
