"""Build a DenseDetector from a model YAML: each section is `type:` plus constructor keyword arguments (no registry).

The head section may hold an `assigner:` section of the same form (`type:` plus the assigner's keyword arguments).
A YAML with a `scales:` table (name -> [depth, width, max_channels], as Ultralytics' model YAMLs) builds the row its
`scale:` names, passed to the backbone and neck; `yolo11n.yaml` names yolo11.yaml at scale n, as in Ultralytics.
"""

import difflib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from crosskd.assigners import ASSIGNERS
from crosskd.errors import ConfigError
from crosskd.paths import resolve_cfg_file

from .backbones import MobileNetV2, MobileNetV3Large, ResNet, SwinT
from .dense_detector import IMAGENET_MEAN, IMAGENET_STD, DenseDetector
from .heads import ATSSHead, FCOSHead, GFLHead, RetinaHead, YOLOHead
from .neck import FPN
from .two_stage import FasterRCNN, FasterRCNNHead
from .yolo import YOLOBackbone, YOLONeck

BACKBONES = {"resnet": ResNet, "mobilenetv2": MobileNetV2, "mobilenetv3_large": MobileNetV3Large, "swin_t": SwinT,
             "yolo": YOLOBackbone}
NECKS = {"fpn": FPN, "yolo": YOLONeck}
HEADS = {"gfl": GFLHead, "retinanet": RetinaHead, "fcos": FCOSHead, "atss": ATSSHead, "faster_rcnn": FasterRCNNHead,
         "yolo": YOLOHead}
DETECTORS: dict[str, type[DenseDetector]] = {"faster_rcnn": FasterRCNN}  # head type -> detector; else DenseDetector
SECTIONS: dict[str, dict[str, type[nn.Module]]] = {"backbone": BACKBONES, "neck": NECKS, "head": HEADS}
AUTO_ARGS = {"backbone": set(), "neck": {"in_channels"}, "head": {"num_classes", "in_channels", "layout"}}
FORWARDED = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
INPUT_KEYS = ("mean", "std", "bgr")  # the optional `input` section: DenseDetector's normalisation arguments
# recipe: the training recipe's name (crosskd/data/recipes.py); scales/scale: the model's size rows and the one built
TOP_KEYS = (*SECTIONS, "input", "nc", "name", "recipe", "scales", "scale")
SCALE_KEYS = ("depth", "width", "max_channels")  # a scales: row, in order; passed to the backbone and neck
C3K_SCALES = ("m", "l", "x")  # Ultralytics' parse_model: at these scales every C3k2 uses C3k blocks (c3k=True)
SCALED_NAME = re.compile(r"(.*\d)([a-z])")  # yolo11n -> yolo11 at scale n


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path.name}: expected a mapping with backbone, neck and head sections")
    return cfg


def resolve_model_file(model_cfg: str | Path) -> tuple[Path, str | None]:
    """The model YAML a name means and the scale the name picks: `yolo11n.yaml` is yolo11.yaml (which has `scales:`)
    at scale 'n' when no yolo11n.yaml exists; any other name is resolve_cfg_file's, at its own scale (None)."""
    try:
        return resolve_cfg_file(model_cfg, "models"), None
    except ConfigError as not_found:
        named = Path(model_cfg)
        match = SCALED_NAME.fullmatch(named.stem)
        if match is None:
            raise
        try:
            path = resolve_cfg_file(named.with_name(f"{match[1]}{named.suffix or '.yaml'}"), "models")
        except ConfigError:
            raise not_found from None
        if "scales" not in _read_yaml(path):
            raise not_found from None
        return path, match[2]


def load_model_yaml(model_cfg: dict | str | Path) -> tuple[dict[str, Any], str]:
    """The model dict and a source name for messages (the file name, or 'model' for a dict)."""
    if isinstance(model_cfg, dict):
        cfg, source = dict(model_cfg), str(model_cfg.get("name", "model"))
    else:
        path, scale = resolve_model_file(model_cfg)
        cfg, source = _read_yaml(path), path.name if scale is None else f"{path.stem}{scale}{path.suffix}"
        if scale is not None:
            cfg["scale"] = scale
        cfg.setdefault("name", f"{path.stem}{cfg.get('scale', '') if 'scales' in cfg else ''}")
    _check_scale(cfg, source)
    return cfg, source


def _check_scale(cfg: dict[str, Any], source: str) -> None:
    """A `scales:` table of name -> [depth, width, max_channels] and a `scale:` naming one of its rows."""
    if "scales" not in cfg and "scale" not in cfg:
        return
    scales = cfg.get("scales")
    if not isinstance(scales, dict) or not scales:
        raise ConfigError(f"{source}: scale: needs a scales: table of name: [depth, width, max_channels]")
    for name, row in scales.items():
        if not _is_three_numbers(row) or min(row) <= 0 or not isinstance(row[2], int):
            raise ConfigError(f"{source}: scales.{name} {row!r} must be [depth, width, max_channels] > 0, e.g. "
                              "[0.50, 0.25, 1024]")
    if cfg.get("scale") not in scales:
        given = f"scale {cfg['scale']!r} is not one of" if "scale" in cfg else "scale: must name one of"
        raise ConfigError(f"{source}: {given} the scales {', '.join(map(str, scales))} (e.g. yolo11n.yaml: scale n)")


def scale_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The backbone's and neck's arguments of the YAML's scale (none without `scales:`)."""
    if "scales" not in cfg:
        return {}
    return {**dict(zip(SCALE_KEYS, cfg["scales"][cfg["scale"]])), "c3k": cfg["scale"] in C3K_SCALES}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(options)}"


def _check_value(source: str, field: str, value: Any, default: Any) -> None:
    """Reject a value whose type cannot stand in for the constructor default's type."""
    if default is inspect.Parameter.empty or default is None or value is None:
        return
    expected: tuple[type, ...] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default), ())
    if isinstance(default, (tuple, list)):
        expected = (list, tuple)
    bad_bool = isinstance(value, bool) and bool not in expected
    if expected and (bad_bool or not isinstance(value, expected)):
        names = "/".join(t.__name__ for t in expected)
        raise ConfigError(f"{source}: {field} {value!r} must be {names}")


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named constructor parameters of `cls`, with the base class's where its `*args, **kwargs` forward to them."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__).parameters
        for name, param in list(signature.items())[1:]:
            if param.kind not in FORWARDED:
                params.setdefault(name, param)
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            break
    return params


def _checked_kwargs(spec: dict, table: dict[str, type], label: str, skip: set[str], source: str) -> dict[str, Any]:
    """Keyword arguments of a `type:` section `label` (e.g. 'head'), checked against the chosen class's signature."""
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    if kind not in table:
        raise ConfigError(f"{source}: {label}.type '{kind}' is not one of {', '.join(table)}")
    params = {k: p for k, p in constructor_parameters(table[kind]).items() if k not in skip}
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"{source}: {label}.{key} is not an argument of {kind}{_suggest(key, list(params))}")
        _check_value(source, f"{label}.{key}", value, params[key].default)
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{source}: {label}.{missing[0]} is required for {kind}")
    return kwargs


def _section_kwargs(cfg: dict, section: str, source: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and checked keyword arguments of one YAML section."""
    spec = cfg.get(section)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{source}: missing '{section}' section with a 'type' key")
    kwargs = _checked_kwargs(spec, SECTIONS[section], section, AUTO_ARGS[section], source)
    return SECTIONS[section][spec["type"]], kwargs


def _assigner(head_cls: type[nn.Module], head_kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """The head's keyword arguments with a YAML `assigner:` section replaced by the assigner it builds."""
    spec = head_kwargs.get("assigner")
    if spec is None:
        return head_kwargs
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{source}: head.assigner must be a mapping with a 'type' key, one of {', '.join(ASSIGNERS)}")
    shorthand = [k for k in getattr(head_cls, "assigner_keys", ()) if k in head_kwargs]
    if shorthand:
        raise ConfigError(
            f"{source}: head.{shorthand[0]} sets the head's default assigner, which head.assigner replaces: "
            "give it inside head.assigner or drop it"
        )
    kwargs = _checked_kwargs(spec, ASSIGNERS, "head.assigner", set(), source)
    return {**head_kwargs, "assigner": _construct(ASSIGNERS[spec["type"]], source, **kwargs)}


def _is_three_numbers(value: Any) -> bool:
    numbers = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    return numbers and len(value) == 3 and not any(isinstance(v, bool) for v in value)


def _input_kwargs(cfg: dict, source: str) -> dict[str, Any]:
    """DenseDetector's normalisation arguments from the optional `input:` section (mean/std in 0..255 units)."""
    spec = {} if cfg.get("input") is None else cfg["input"]
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: input must be a mapping of {', '.join(INPUT_KEYS)}")
    unknown = [k for k in spec if k not in INPUT_KEYS]
    if unknown:
        hint = _suggest(unknown[0], list(INPUT_KEYS))
        raise ConfigError(f"{source}: input.{unknown[0]} is not a setting of input{hint}")
    for key, example in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = spec.get(key, example)
        if not _is_three_numbers(value) or (key == "std" and min(value) <= 0):
            positive = " > 0" if key == "std" else ""
            raise ConfigError(
                f"{source}: input.{key} {value!r} must be 3 numbers{positive} in 0..255 units, e.g. {list(example)}"
            )
    if not isinstance(spec.get("bgr", False), bool):
        raise ConfigError(f"{source}: input.bgr {spec['bgr']!r} must be true or false")
    return dict(spec)


def _construct(cls: type[nn.Module], source: str, **kwargs: Any) -> nn.Module:
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _scaled(parts: dict[str, tuple[type[nn.Module], dict]], cfg: dict, source: str) -> dict[str, tuple]:
    """`parts` with the scale's arguments added to the backbone's and neck's (which must take them, from scale: only).
    """
    scaling = scale_kwargs(cfg)
    if not scaling:
        return parts
    for section in ("backbone", "neck"):
        cls, kwargs = parts[section]
        if any(key not in constructor_parameters(cls) for key in scaling):
            raise ConfigError(f"{source}: scale: needs a {section} that takes {', '.join(scaling)}; "
                              f"{section}.type {cfg[section]['type']} does not (drop scales: and scale:)")
        given = [key for key in scaling if key in kwargs]
        if given:
            raise ConfigError(f"{source}: {section}.{given[0]} is set by scale: {cfg['scale']}; drop it")
        parts[section] = (cls, {**kwargs, **scaling})
    return parts


def _feature_strides(backbone: nn.Module, neck: nn.Module) -> list[int]:
    """The neck's output strides: its own `strides` (YOLO), else the backbone's output strides followed by FPN's
    extra levels, each twice the stride of the one before."""
    if hasattr(neck, "strides"):
        return list(neck.strides)
    strides = list(backbone.strides)
    return strides + [strides[-1] * 2 ** (i + 1) for i in range(neck.num_outs - len(strides))]


def _check_strides(source: str, backbone: nn.Module, neck: nn.Module, head: nn.Module) -> None:
    expected = _feature_strides(backbone, neck)
    if list(head.strides) != expected:
        raise ConfigError(f"{source}: head.strides {list(head.strides)} must be {expected} for this backbone and neck")


def build_detector(model_cfg: dict | str | Path, nc: int) -> DenseDetector:
    """Build a DenseDetector (a FasterRCNN for `head.type: faster_rcnn`) for `nc` classes from a model YAML path,
    shipped name or dict."""
    cfg, source = load_model_yaml(model_cfg)
    unknown = [k for k in cfg if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown section '{unknown[0]}'{_suggest(unknown[0], list(TOP_KEYS))}")
    if not isinstance(nc, int) or nc < 1:
        raise ConfigError(f"{source}: number of classes {nc!r} must be a positive int")
    if not isinstance(cfg.get("recipe", ""), str):
        raise ConfigError(f"{source}: recipe: {cfg['recipe']!r} must be a recipe name, e.g. recipe: ultralytics")
    parts = _scaled({section: _section_kwargs(cfg, section, source) for section in SECTIONS}, cfg, source)
    normalisation = _input_kwargs(cfg, source)
    backbone = _construct(parts["backbone"][0], source, **parts["backbone"][1])
    neck = _construct(parts["neck"][0], source, in_channels=backbone.out_channels, **parts["neck"][1])
    head_cls, head_kwargs = parts["head"][0], _assigner(*parts["head"], source)
    head = _construct(head_cls, source, num_classes=nc, in_channels=neck.out_channels, **head_kwargs)
    _check_strides(source, backbone, neck, head)
    detector_cls = DETECTORS.get(head.head_type, DenseDetector)
    return detector_cls(backbone, neck, head, yaml={**cfg, "nc": nc}, **normalisation)
