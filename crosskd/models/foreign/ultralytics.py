"""Ultralytics YOLOv8 / YOLO11 detection checkpoints (`.pt`) onto crosskd's YOLO detectors, without running their code.

An Ultralytics `.pt` is a `torch.save` of a dict (`date`, `version`, `epoch`, `model`, `ema`, `train_args`, ...) whose
`ema` (training checkpoints) or `model` (`Model.save`, stripped best.pt) is a pickled `DetectionModel` in half
precision. It is read with `inert_pickle` (no Ultralytics class is imported, no pickled code runs); the weights are
collected from the modules' pickled `_parameters` / `_buffers` / `_modules` under the keys Ultralytics' own
`state_dict()` gives (`model.{i}.<suffix>`), in float32. As Ultralytics does when loading, `ema` wins over `model`.

The family comes from the layer types of the model's `yaml` (YOLOv8: C2f blocks; YOLO11: C3k2 and C2PSA), the scale
from its `scale` (else from `yaml_file`, e.g. yolo11n.yaml). `ultralytics_key_map` is index-based: layers below the
family's backbone count go to `backbone.layers.{i}`, the rest up to Detect to `neck.layers.{i - n_backbone}`, Detect's
box branches `cv2` and class branches `cv3` to the head's `reg_branches`/`reg_preds` and `cls_branches`/`cls_preds`,
and DFL's constant 1x1 conv (`dfl.conv.weight` [1, 16, 1, 1]) to the head's `dfl_bins` [16].

A file saved after `fuse()` holds each Conv's BatchNorm folded into a conv bias; it is unfolded exactly (weight 1,
bias = the conv bias, mean 0, variance 1 - eps), so fused and unfused files load onto the same model.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosskd.errors import CheckpointError

from ..build import build_detector
from ..dense_detector import DenseDetector
from .inert_pickle import InertObject, RefusedGlobal, pickle_globals, read_inert
from .mapping import load_mapped

ULTRALYTICS_PACKAGE = "ultralytics."
DETECTION_MODEL = "ultralytics.nn.tasks.DetectionModel"
FOLDED_CONVS = ("ultralytics.nn.modules.conv.Conv", "ultralytics.nn.modules.conv.DWConv")
BN_EPS = 1e-3  # Ultralytics' BatchNorm eps (initialize_weights), as crosskd's YOLO blocks use
SCALES = ("n", "s", "m", "l", "x")
DFL_KEY = "dfl.conv.weight"
DETECT_BRANCHES = {"cv2": ("reg_branches", "reg_preds"), "cv3": ("cls_branches", "cls_preds")}
BRANCH_CONVS = 2  # cv2.{l}.0, cv2.{l}.1 are the branch; cv2.{l}.2 is the predictor
READ_ERRORS = (  # a damaged file, or a pickle of unexpected shape (an inert class called with arguments)
    pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, TypeError, KeyError,
)


@dataclass(frozen=True)
class YoloFamily:
    """An Ultralytics model family as crosskd maps it: its layer types (yaml order) and its backbone's length."""

    name: str  # crosskd's model YAML: cfg/models/{name}.yaml
    title: str
    layer_types: tuple[str, ...]  # backbone then head, as the Ultralytics yaml lists them; Detect last
    num_backbone: int

    @property
    def detect_index(self) -> int:
        return len(self.layer_types) - 1


_PAN_HEAD = ("nn.Upsample", "Concat", "{block}", "nn.Upsample", "Concat", "{block}",
             "Conv", "Concat", "{block}", "Conv", "Concat", "{block}", "Detect")


def _family(name: str, title: str, backbone: tuple[str, ...], block: str) -> YoloFamily:
    head = tuple(layer.format(block=block) for layer in _PAN_HEAD)
    return YoloFamily(name, title, backbone + head, len(backbone))


FAMILIES = {
    family.name: family
    for family in (
        _family("yolov8", "YOLOv8",
                ("Conv", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "SPPF"), "C2f"),
        _family("yolo11", "YOLO11",
                ("Conv", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "SPPF", "C2PSA"), "C3k2"),
    )
}


@dataclass(frozen=True)
class UltralyticsCheckpoint:
    """What crosskd takes from an Ultralytics detection checkpoint."""

    state: dict[str, Tensor]  # Ultralytics' state_dict keys (model.{i}.<suffix>), floating tensors in float32
    names: dict[int, str]
    family: YoloFamily
    scale: str  # n, s, m, l or x
    train_args: dict = field(default_factory=dict)
    version: str | None = None  # the Ultralytics version that wrote it

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def model_yaml(self) -> str:
        """crosskd's model YAML name with the scale, as Ultralytics names it (yolo11n.yaml)."""
        return f"{self.family.name}{self.scale}.yaml"


# ----- recognising and reading ----------------------------------------------------------------------------
def is_ultralytics_checkpoint(path: str | Path) -> bool:
    """A torch zip file whose pickle names Ultralytics classes (read with pickletools; nothing is unpickled)."""
    return any(name.startswith(ULTRALYTICS_PACKAGE) for name in pickle_globals(path))


def read_ultralytics(path: str | Path) -> UltralyticsCheckpoint:
    """Read an Ultralytics YOLOv8/YOLO11 detection `.pt` inertly; any problem is one CheckpointError line."""
    ckpt = _read_dict(Path(path))
    model = _detection_model(ckpt, path)
    attributes = model.attributes
    yaml = attributes.get("yaml") if isinstance(attributes.get("yaml"), dict) else {}
    family = _family_of(yaml, path)
    detect = _layers(model)[family.detect_index]
    nc = int(detect.attributes.get("nc", yaml.get("nc", 0)))
    return UltralyticsCheckpoint(
        state=module_state(model),
        names=_names(attributes.get("names"), nc),
        family=family,
        scale=_scale_of(yaml, path),
        train_args=ckpt.get("train_args") if isinstance(ckpt.get("train_args"), dict) else {},
        version=ckpt.get("version"),
    )


def _read_dict(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Ultralytics checkpoint '{path}' not found; pass an existing .pt file")
    try:
        ckpt = read_inert(path)
    except RefusedGlobal as refused:
        raise CheckpointError(
            f"'{path}' was refused: its pickle names {refused.name}, which could run code when loaded; crosskd reads "
            "Ultralytics YOLOv8/YOLO11 checkpoints without running their code, so only their model classes may appear"
        ) from None
    except READ_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read Ultralytics checkpoint '{path}' (corrupt or truncated: {reason}); "
                              "use a complete copy (re-download it or save it again)") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' holds a pickled {type(ckpt).__name__}, not an Ultralytics checkpoint dict; "
                              "save the model with Ultralytics' model.save('file.pt')")
    return ckpt


def _detection_model(ckpt: dict, path: str | Path) -> InertObject:
    """The checkpoint's DetectionModel: `ema` when present, else `model` (as Ultralytics loads it)."""
    if ckpt.get("modelopt"):
        raise CheckpointError(f"'{path}' is a quantization-aware (QAT) Ultralytics checkpoint, which crosskd does not "
                              "read; pass the float checkpoint it was trained from")
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, InertObject):
        raise CheckpointError(f"'{path}' holds no Ultralytics model under 'ema' or 'model'; pass a checkpoint "
                              "written by Ultralytics training or model.save()")
    if model.class_path != DETECTION_MODEL:
        kind = model.class_path.rpartition(".")[2]
        raise CheckpointError(f"'{path}' is an Ultralytics {kind}; crosskd reads detection models (DetectionModel) "
                              "only: pass a YOLOv8 or YOLO11 detection checkpoint")
    return model


def _family_of(yaml: Mapping, path: str | Path) -> YoloFamily:
    """The family whose layer types the model's yaml lists, or one line naming what the file is."""
    layers = [*yaml.get("backbone", []), *yaml.get("head", [])]
    types = tuple(str(layer[2]) for layer in layers if isinstance(layer, list | tuple) and len(layer) > 2)
    for family in FAMILIES.values():
        if types == family.layer_types:
            return family
    what = yaml.get("yaml_file") or "a model"
    supported = ", ".join(f"{family.title} ({family.name}{{n,s,m,l,x}}.yaml)" for family in FAMILIES.values())
    raise CheckpointError(f"'{path}' holds Ultralytics {what}, whose layers crosskd does not map; "
                          f"supported: {supported}")


def _scale_of(yaml: Mapping, path: str | Path) -> str:
    """The yaml's `scale`, else the letter after the version in `yaml_file` (yolo11n.yaml -> n)."""
    scale = yaml.get("scale")
    if scale is None:
        match = re.search(r"yolo(?:v8|11)([nslmx])", str(yaml.get("yaml_file", "")))
        scale = match.group(1) if match else None
    if scale not in SCALES:
        raise CheckpointError(f"'{path}' does not say its model scale (yaml 'scale' {scale!r}, yaml_file "
                              f"{yaml.get('yaml_file')!r}); expected one of {', '.join(SCALES)}")
    return scale


def _names(names: Any, nc: int) -> dict[int, str]:
    """The model's class names (a dict or list in the file) when they cover the nc classes, else '0', '1', ..."""
    if isinstance(names, list | tuple):
        names = dict(enumerate(names))
    if isinstance(names, dict) and sorted(names) == list(range(nc)):
        return {int(i): str(name) for i, name in names.items()}
    return {i: str(i) for i in range(nc)}


def _layers(model: InertObject) -> list[InertObject]:
    """The DetectionModel's layers (its `model` Sequential), in order."""
    sequential = model.attributes.get("_modules", {}).get("model")
    return list(sequential.attributes.get("_modules", {}).values()) if isinstance(sequential, InertObject) else []


# ----- weights --------------------------------------------------------------------------------------------
def module_state(module: InertObject, prefix: str = "") -> dict[str, Tensor]:
    """The flat state dict of a pickled nn.Module, as its `state_dict()` would name it; floating tensors float32.

    Non-persistent buffers are left out, like `state_dict()` does; a fused Conv gets its BatchNorm back."""
    attributes = module.attributes
    non_persistent = attributes.get("_non_persistent_buffers_set") or set()
    state = {f"{prefix}{name}": _float32(tensor) for name, tensor in (attributes.get("_parameters") or {}).items()
             if tensor is not None}
    state |= {f"{prefix}{name}": _float32(tensor) for name, tensor in (attributes.get("_buffers") or {}).items()
              if tensor is not None and name not in non_persistent}
    children = attributes.get("_modules") or {}
    for name, child in children.items():
        if isinstance(child, InertObject):
            state |= module_state(child, f"{prefix}{name}.")
    if module.class_path in FOLDED_CONVS and "bn" not in children and f"{prefix}conv.bias" in state:
        state |= unfolded_batchnorm(state.pop(f"{prefix}conv.bias"), f"{prefix}bn.")
    return state


def _float32(tensor: Tensor) -> Tensor:
    tensor = tensor.detach()
    return tensor.float() if tensor.is_floating_point() else tensor


def unfolded_batchnorm(bias: Tensor, prefix: str) -> dict[str, Tensor]:
    """The BatchNorm that adds `bias` [C] and nothing else: what `fuse()` folded away, given back exactly."""
    return {
        f"{prefix}weight": torch.ones_like(bias),
        f"{prefix}bias": bias,
        f"{prefix}running_mean": torch.zeros_like(bias),
        f"{prefix}running_var": torch.full_like(bias, 1 - BN_EPS),
        f"{prefix}num_batches_tracked": torch.tensor(0),
    }


def ultralytics_key_map(keys: list[str], family: YoloFamily) -> dict[str, str]:
    """Ultralytics state-dict keys -> crosskd keys; a key no rule covers is left out (load_mapped reports it)."""
    key_map = {}
    for key in keys:
        match = re.fullmatch(r"model\.(\d+)\.(.+)", key)
        target = _target_key(int(match.group(1)), match.group(2), family) if match else None
        if target is not None:
            key_map[key] = target
    return key_map


def _target_key(index: int, suffix: str, family: YoloFamily) -> str | None:
    if index < family.num_backbone:
        return f"backbone.layers.{index}.{suffix}"
    if index < family.detect_index:
        return f"neck.layers.{index - family.num_backbone}.{suffix}"
    return _head_key(suffix) if index == family.detect_index else None


def _head_key(suffix: str) -> str | None:
    """Detect's `cv2/cv3.{level}.{step}.<rest>` and `dfl.conv.weight` as the crosskd head names them."""
    if suffix == DFL_KEY:
        return "head.dfl_bins"
    match = re.fullmatch(r"(cv2|cv3)\.(\d+)\.(\d+)\.(.+)", suffix)
    if match is None:
        return None
    branch, level, step, rest = match.groups()
    branches, preds = DETECT_BRANCHES[branch]
    if int(step) < BRANCH_CONVS:
        return f"head.{branches}.{level}.{step}.{rest}"
    return f"head.{preds}.{level}.{rest}" if int(step) == BRANCH_CONVS else None


def key_transforms(key_map: Mapping[str, str]) -> dict[str, Callable[[Tensor], Tensor]]:
    """DFL's [1, 16, 1, 1] conv weight is the head's flat [16] bins."""
    return {key: lambda weight: weight.reshape(-1) for key, target in key_map.items() if target == "head.dfl_bins"}


# ----- the crosskd detector -------------------------------------------------------------------------------
def ultralytics_detector(ckpt: UltralyticsCheckpoint, source_name: str) -> DenseDetector:
    """crosskd's YOLO detector of the checkpoint's family, scale and classes, with its weights and names."""
    detector = build_detector(ckpt.model_yaml, ckpt.nc)  # yolo11n.yaml: the family YAML at that scale
    key_map = ultralytics_key_map(list(ckpt.state), ckpt.family)
    load_mapped(detector, ckpt.state, key_map, source_name, transforms=key_transforms(key_map))
    detector.names = dict(ckpt.names)
    return detector


def load_ultralytics(path: str | Path) -> DenseDetector:
    """An Ultralytics YOLOv8/YOLO11 detection `.pt` as a crosskd detector (float32, CPU)."""
    return ultralytics_detector(read_ultralytics(path), str(path))
