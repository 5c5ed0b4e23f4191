"""Backbone weights a training run starts from: torchvision ImageNet weights, a local .pth, or a crosskd .pt.

A spec is what `backbone.pretrained` (model YAML) or the `pretrained=` run key holds:
- `true` / `imagenet`: the backbone's torchvision ImageNet weights that MMDetection's configs use (`IMAGENET1K_V1`);
- a torchvision weights name, with or without its class: `ResNet50_Weights.IMAGENET1K_V2`, `IMAGENET1K_V2`;
- a path ending in .pth or .pt: a torchvision state_dict, an MMDetection checkpoint (`state_dict` + `meta`) or a
  crosskd checkpoint (its `backbone.*` tensors; as the `pretrained=` key, every matching detector tensor);
- `false` / empty: nothing (train from scratch).

Named weights are read through torchvision's weights API from torch hub's cache (`$TORCH_HOME/hub/checkpoints`),
fetched once when online. Building a model never loads weights: the trainer calls `load_pretrained_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    Swin_T_Weights,
    WeightsEnum,
    get_weight,
)

from crosskd.errors import CheckpointError, ConfigError
from crosskd.utils import LOGGER, TORCH_READ_ERRORS, read_torch_file

from .backbones import MOBILENET_STAGE_ENDS, MobileNetV2, MobileNetV3Large, ResNet, SwinT
from .foreign.mapping import load_mapped

IMAGENET = "IMAGENET1K_V1"  # the torchvision weights MMDetection's `torchvision://` and configs use
RESNET_WEIGHTS: dict[int, type[WeightsEnum]] = {
    18: ResNet18_Weights,
    34: ResNet34_Weights,
    50: ResNet50_Weights,
    101: ResNet101_Weights,
}
OFF = ("", "false", "none")
ON = ("true", "imagenet")


@dataclass(frozen=True)
class WeightsSource:
    """Where backbone weights come from: a torchvision weights enum member, or a local file."""

    weights: WeightsEnum | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.weights) if self.weights is not None else str(self.path)


def weights_class(backbone: nn.Module) -> type[WeightsEnum]:
    """The torchvision weights enum of a backbone's architecture (e.g. ResNet50_Weights for a depth-50 ResNet)."""
    if isinstance(backbone, ResNet):
        return RESNET_WEIGHTS[backbone.depth]
    if isinstance(backbone, MobileNetV2):
        return MobileNet_V2_Weights
    if isinstance(backbone, MobileNetV3Large):
        return MobileNet_V3_Large_Weights
    if isinstance(backbone, SwinT):
        return Swin_T_Weights
    raise ConfigError(f"{type(backbone).__name__} has no torchvision weights; use a .pth path or pretrained=false")


def _valid_names(enum: type[WeightsEnum]) -> str:
    return f"true/imagenet ({enum.__name__}.{IMAGENET}), {', '.join(map(str, enum))}, a .pth/.pt path or false"


def _named_weights(text: str, enum: type[WeightsEnum]) -> WeightsEnum:
    """`IMAGENET1K_V2` or `ResNet50_Weights.IMAGENET1K_V2` as a member of `enum`; a one-line ConfigError otherwise."""
    class_name, _, member = text.rpartition(".")
    if class_name and class_name != enum.__name__ and _is_torchvision_weights(text):
        raise ConfigError(f"pretrained '{text}' are weights of another architecture; valid: {_valid_names(enum)}")
    if class_name not in ("", enum.__name__) or member not in enum.__members__:
        raise ConfigError(f"pretrained '{text}' is not a known weights name; valid: {_valid_names(enum)}")
    return enum[member]


def _is_torchvision_weights(name: str) -> bool:
    try:
        get_weight(name)
    except (ValueError, KeyError, AttributeError):
        return False
    return True


def _check_width(backbone: nn.Module, weights: WeightsEnum) -> None:
    width = getattr(backbone, "width", 1.0)
    if width != 1.0:
        raise ConfigError(
            f"pretrained {weights} fits backbone width 1.0, not {width}; set backbone.width: 1.0 or pretrained=false"
        )


def resolve_backbone_weights(spec: bool | str | Path | None, backbone: nn.Module) -> WeightsSource | None:
    """Parse a `pretrained` spec for `backbone`; None means no weights (train from scratch).

    Raises a one-line ConfigError for an unknown weights name or weights of another architecture (listing the
    valid ones), and for named weights on a backbone whose width is not 1.0.
    """
    if spec is None or spec is False:
        return None
    text = "imagenet" if spec is True else str(spec).strip()
    if text.lower() in OFF:
        return None
    if Path(text).suffix.lower() in (".pth", ".pt"):
        return WeightsSource(path=Path(text))
    enum = weights_class(backbone)
    weights = enum[IMAGENET] if text.lower() in ON else _named_weights(text, enum)
    _check_width(backbone, weights)
    return WeightsSource(weights=weights)


def cached_file(weights: WeightsEnum) -> Path:
    """Where torch hub keeps `weights`: `torch.hub.get_dir()/checkpoints/<basename of weights.url>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def fetch_named_weights(weights: WeightsEnum, alternative: str) -> dict[str, Tensor]:
    """The state_dict of named torchvision weights from torch hub's cache, downloaded (hash-checked) when missing.

    Offline and not cached, one CheckpointError line names the exact file, the folder to put it in and `alternative`.
    """
    file = cached_file(weights)
    cached = file.is_file()  # else torch hub downloads it (and says so)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (*TORCH_READ_ERRORS, IndexError) as e:  # IndexError: torch.load on some garbage files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cached:
            raise CheckpointError(f"cannot read cached '{file}' ({reason}); delete it to fetch it again") from None
        raise CheckpointError(
            f"{weights} is not cached and cannot be downloaded ({reason}): put '{file.name}' (from {weights.url}) "
            f"in {file.parent} (torch hub cache under TORCH_HOME), or {alternative}"
        ) from None


def _is_crosskd_checkpoint(obj: Any) -> bool:
    """A crosskd .pt: a dict holding the detector's `model` state_dict and its `model_yaml`."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_yaml" in obj


def backbone_state(obj: Any, source: str) -> dict[str, Tensor]:
    """The backbone tensors of a loaded file, names without `module.`/`backbone.` prefixes.

    Accepts a plain state_dict, MMDetection's `{'state_dict', 'meta'}` and crosskd's `{'model', ...}`; when the
    names carry a `backbone.` prefix (a whole detector), only those tensors are kept.
    """
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"'{source}' holds no state_dict of tensors; give a torchvision or crosskd weights file")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _unused_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Source tensors a torchvision classifier file has and the backbone does not use (classifier, last stage)."""
    if isinstance(backbone, ResNet):
        return ("fc.",)
    if isinstance(backbone, MobileNetV3Large):
        return ("classifier.",)
    if isinstance(backbone, MobileNetV2):
        return ("classifier.", f"features.{MOBILENET_STAGE_ENDS[-1]}.")  # the 1280-channel conv after stage 4
    if isinstance(backbone, SwinT):
        return ("head.",) if 3 in backbone.out_indices else ("head.", "norm.")
    return ()


def _key_map(backbone: nn.Module) -> dict[str, str]:
    """torchvision name -> our name for every backbone tensor (Swin-T: the final `norm` is the last output norm)."""
    key_map = {name: name for name in backbone.state_dict() if not name.startswith("norms.")}
    if isinstance(backbone, SwinT) and 3 in backbone.out_indices:
        last = len(backbone.out_indices) - 1
        key_map.update({f"norm.{p}": f"norms.{last}.{p}" for p in ("weight", "bias")})
    return key_map


def _may_stay(name: str) -> bool:
    """Target entries a torchvision file may leave at their initial value (BN counters, Swin's new output norms)."""
    return name.endswith("num_batches_tracked") or name.startswith("norms.")


def _source_state(source: WeightsSource) -> dict[str, Tensor]:
    if source.weights is not None:
        return fetch_named_weights(source.weights, "set pretrained=false")
    return backbone_state(read_torch_file(source.path, "pretrained"), str(source.path))


def load_backbone_weights(backbone: nn.Module, spec: bool | str | Path | None) -> int:
    """Load the weights `spec` names into `backbone`; returns the number of tensors copied (0 for no weights).

    Every backbone tensor must be filled and every source tensor used, except the classifier and unused last stage
    of a torchvision file; otherwise one CheckpointError counts the unexpected/missing/mis-shaped tensors.
    """
    source = resolve_backbone_weights(spec, backbone)
    if source is None:
        return 0
    unused = _unused_prefixes(backbone)
    state = {k: v for k, v in _source_state(source).items() if not k.startswith(unused)}
    copied = load_mapped(backbone, state, _key_map(backbone), source.name, optional=_may_stay)
    total = sum(not name.endswith("num_batches_tracked") for name in backbone.state_dict())
    done = sum(not name.endswith("num_batches_tracked") for name in state)
    LOGGER.info(f"Transferred {done}/{total} backbone tensors from {source.name}")
    return copied


def transfer_matching(model: nn.Module, state: dict[str, Tensor]) -> tuple[int, int]:
    """Copy every entry of `state` whose name and shape match `model`; returns (transferred, total in model)."""
    own = model.state_dict()
    matching = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return len(matching), len(own)


def load_pretrained_weights(detector: nn.Module, pretrained: bool | str | Path | None = None) -> int:
    """Load the backbone weights a training run starts from into `detector` (a DenseDetector); returns tensors copied.

    `pretrained` is a backbone spec (true/imagenet, a weights name, a .pth, a crosskd .pt's backbone, false); None
    keeps the model YAML's `backbone.pretrained`. Whole detectors go through engine's `load_pretrained`.
    """
    return load_backbone_weights(detector.backbone, detector.backbone.pretrained if pretrained is None else pretrained)
