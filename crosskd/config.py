"""Run settings: merge defaults, the `cfg=` YAML and overrides; validate every value against its spec -> Args.

Precedence, lowest to highest: the spec's defaults (= `cfg/default.yaml`) <- the `cfg=` YAML <- command-line or Python
overrides. The keys, kinds, ranges and choices come from `crosskd.settings`; turning shell words into overrides is the
CLI's job (`crosskd.cli.parse_cli_args`).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from crosskd.errors import ConfigError
from crosskd.paths import CFG_DIR, DEFAULT_CFG_PATH, newest_file, runs_dir
from crosskd.settings import ALIASES, KIND_NAMES, SETTINGS, Setting, format_value
from crosskd.utils import LOGGER

RECIPES_DIR = CFG_DIR / "recipes"  # shipped cfg= files: the paper's COCO recipe (coco_1x.yaml)
REQUIRED_INPUTS = {  # mode -> (keys it needs, a command line that gives them); val/export fall back to best.pt
    "train": (("model",), "crosskd train model=gfl_r18.yaml data=digits.yaml"),
    "distill": (("teacher", "model"), "crosskd distill teacher=gfl_r50.pt student=gfl_r18.yaml data=digits.yaml"),
    "predict": (("source",), "crosskd predict model=best.pt source=images/"),
    "info": (("model",), "crosskd info model=gfl_r18.yaml"),
    "convert": (("model",), "crosskd convert model=torchvision:retinanet_resnet50_fpn_v2"),
    "analyze": (("teacher", "model"), "crosskd analyze teacher=gfl_r50.pt student=best.pt data=digits.yaml"),
}
BEST_FALLBACK = {  # modes whose missing model= means the newest best.pt under runs/ -> an example command
    "val": "crosskd val model=best.pt data=digits.yaml",
    "export": "crosskd export model=best.pt format=onnx",
    "benchmark": "crosskd benchmark model=best.pt data=digits.yaml",
}


class Args(types.SimpleNamespace):
    """Validated run settings; attribute access like `args.epochs`.

    `explicit` is the frozenset of keys the user gave (command line, Python overrides or the `cfg=` file): only the
    other keys yield to a model's own value (`setting_or_model_default`). It is not a setting, so `to_dict()` leaves
    it out.
    """

    def to_dict(self) -> dict[str, Any]:
        """A plain dict copy (lists, not tuples), safe for yaml.safe_dump and torch.load(weights_only=True)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()
                if key != "explicit"}

    def typed(self, key: str) -> bool:
        """Whether the user gave `key`; Args built without a record count a value other than the default as given."""
        explicit = vars(self).get("explicit")
        return getattr(self, key) != load_defaults()[key] if explicit is None else key in explicit

    def with_values(self, **changes: Any) -> Args:
        """A copy with `changes` validated and set; the record of typed keys is kept (the changes are not typed)."""
        return Args(**{**vars(self), **{key: check_value(key, value) for key, value in changes.items()}})


def load_defaults() -> dict[str, Any]:
    """Every setting's default, in default.yaml order (lists as lists)."""
    return {name: list(s.default) if isinstance(s.default, tuple) else s.default for name, s in SETTINGS.items()}


def imgsz_hw(imgsz: int | Sequence[int]) -> tuple[int, int]:
    """An imgsz setting (640, [640], or [h, w]) as (h, w)."""
    return (int(imgsz), int(imgsz)) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))


def unknown_key_error(keys: list[str], where: str = "") -> ConfigError:
    """One line naming every unknown key with its close matches (shown with their defaults)."""
    parts = []
    for key in keys:
        similar = difflib.get_close_matches(key, [*SETTINGS, *ALIASES], n=3, cutoff=0.6)
        shown = [f"{match}={format_value(SETTINGS[ALIASES.get(match, match)].default)}" for match in similar]
        hint = f"Similar arguments: {', '.join(shown)}" if shown else "Run 'crosskd cfg' to list all arguments"
        parts.append(f"'{key}'{where} is not a valid crosskd argument. {hint}")
    return ConfigError("; ".join(parts))


def _check_keys(overrides: dict[str, Any], where: str = "") -> None:
    unknown = [key for key in overrides if ALIASES.get(key, key) not in SETTINGS]
    if unknown:
        raise unknown_key_error(unknown, where)


def _resolve_aliases(overrides: dict[str, Any]) -> dict[str, Any]:
    """Rename Ultralytics-style aliases (`distill_model`, `dis`) to their crosskd keys."""
    resolved = {}
    for key, value in overrides.items():
        target = ALIASES.get(key, key)
        if target != key and target in overrides:
            raise ConfigError(f"'{key}' and '{target}' name the same setting; pass only '{target}='")
        resolved[target] = value
    return resolved


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError
    return int(value)


def _as_int_list(value: Any) -> list[int]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [_as_int(item) for item in items]


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError
    return float(value)


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _as_imgsz(value: Any) -> int | list[int]:
    sizes = _as_int_list(value)
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError
    return sizes[0] if len(sizes) == 1 else sizes


def _as_device(value: Any) -> str:
    """Normalise a device to its string form: 'cpu', '0', '0,1', 'cuda:1'."""
    if isinstance(value, str):
        return value.replace(" ", "")
    return ",".join(str(index) for index in _as_int_list(value))


def _as_source(value: Any) -> str | int:
    return value if isinstance(value, int) and not isinstance(value, bool) else _as_str(value)


def _as_resume(value: Any) -> bool | str:
    return value if isinstance(value, bool) else _as_str(value)


def _as_cache(value: Any) -> bool | str:
    """False, 'ram' or 'disk' (true means ram, as in Ultralytics)."""
    if isinstance(value, bool):
        return "ram" if value else False
    if _as_str(value).lower() not in ("ram", "disk"):
        raise ValueError
    return value.lower()


def _as_scales(value: Any) -> str | list[int]:
    """'head' or a list of positive sizes."""
    if isinstance(value, str) and value.lower() == "head":
        return "head"
    sizes = _as_int_list(value)
    if not sizes or min(sizes) < 1:
        raise ValueError
    return sizes


COERCE: dict[str, Callable[[Any], Any]] = {  # kind -> normaliser raising ValueError/TypeError on a wrong type
    "bool": _as_bool,
    "int": _as_int,
    "float": _as_float,
    "str": _as_str,
    "int_list": _as_int_list,
    "imgsz": _as_imgsz,
    "device": _as_device,
    "source": _as_source,
    "classes": _as_int_list,
    "resume": _as_resume,
    "weights": _as_resume,  # a bool or a string, like resume
    "cache": _as_cache,
    "scales": _as_scales,
}


def _check_range(setting: Setting, given: Any, numbers: list[float]) -> None:
    """Every number of a value must lie in the setting's [low, high] range (`given` is the value as typed)."""
    low = -float("inf") if setting.low is None else setting.low
    high = float("inf") if setting.high is None else setting.high
    if any(not low <= number <= high for number in numbers):
        raise ConfigError(f"'{setting.name}={format_value(given)}' is out of range: '{setting.name}' must be "
                          f"{setting.range_text()}, e.g. {setting.name}={setting.example_value()}")


def _check_choice(setting: Setting, value: str) -> str:
    """Match a choice case-insensitively and return its canonical spelling."""
    for choice in setting.choices:
        if choice.lower() == value.lower():
            return choice
    raise ConfigError(f"'{setting.name}={value}' is invalid: '{setting.name}' must be one of "
                      f"{', '.join(setting.choices)}")


def _empty_value(setting: Setting) -> Any:
    """An empty value (None) is allowed when the default is empty; `none` stands for it among choices."""
    if setting.default is None:
        return None
    if "none" in setting.choices:
        return "none"
    raise ConfigError(f"'{setting.name}' cannot be empty: it must be {KIND_NAMES[setting.kind]}, "
                      f"e.g. {setting.name}={setting.example_value()}")


def check_value(key: str, value: Any) -> Any:
    """Validate one setting against its spec (kind, range, choices); return the normalised value."""
    setting = SETTINGS[key]
    if value is None:
        return _empty_value(setting)
    try:
        normalised = COERCE[setting.kind](value)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"'{key}={format_value(value)}' is invalid: '{key}' must be {KIND_NAMES[setting.kind]}, "
                          f"e.g. {setting.name}={setting.example_value()}") from None
    if setting.choices:
        return _check_choice(setting, normalised)
    if setting.low is not None or setting.high is not None:
        numbers = normalised if isinstance(normalised, list) else [normalised]
        _check_range(setting, value, numbers)
    return normalised


def cfg_file_path(name: Any) -> Path:
    """The `cfg=` YAML: an existing path, else a recipe shipped in cfg/recipes (`cfg=coco_1x.yaml` or `coco_1x`)."""
    file = Path(str(name))
    for candidate in (file, RECIPES_DIR / file.name, RECIPES_DIR / f"{file.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"cfg file '{file}' not found; pass an existing YAML (e.g. cfg=my.yaml) or a shipped recipe: "
                      f"{shipped}")


def _load_cfg_file(path: Any) -> dict[str, Any]:
    """Read a `cfg=` YAML of overrides (keys checked, aliases resolved)."""
    file = cfg_file_path(path)
    content = yaml.safe_load(file.read_text()) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"cfg file '{file}' must be a YAML mapping of key: value lines")
    content.pop("cfg", None)
    _check_keys(content, where=f" in {file.name}")
    LOGGER.info(f"Overriding {DEFAULT_CFG_PATH.name} with {file}")
    return _resolve_aliases(content)


def _merge_student(settings: dict[str, Any]) -> None:
    """`student=` and `model=` name the same network: fill one from the other, reject two different ones."""
    model, student = settings.get("model"), settings.get("student")
    if model is not None and student is not None and model != student:
        raise ConfigError(f"model={model} and student={student} disagree; pass only one of them")
    settings["model"] = settings["student"] = model if model is not None else student


def get_args(overrides: dict[str, Any] | None = None, mode: str | None = None) -> Args:
    """Merge defaults <- `cfg=` file <- overrides, resolve aliases, validate every value and return Args."""
    overrides = dict(overrides or {})
    _check_keys(overrides)
    overrides = _resolve_aliases(overrides)
    file_settings = _load_cfg_file(overrides["cfg"]) if overrides.get("cfg") else {}
    settings = {**load_defaults(), **file_settings, **overrides}
    if mode is not None:
        settings["mode"] = mode
    settings = {key: check_value(key, value) for key, value in settings.items()}
    _merge_student(settings)
    explicit = {*file_settings, *overrides} - {"cfg"}
    if explicit & {"model", "student"}:
        explicit |= {"model", "student"}
    return Args(**settings, explicit=frozenset(explicit))


def check_required(args: Args) -> None:
    """Raise a ConfigError when the mode's required inputs (e.g. model= for train) are missing, before any data or
    model is loaded; val and export without model= need a best.pt under runs/ to fall back on."""
    keys, command = REQUIRED_INPUTS.get(args.mode, ((), ""))
    resuming = args.mode in ("train", "distill") and bool(args.resume)
    missing = [f"{key}=" for key in keys if getattr(args, key) is None and not resuming]
    if missing:
        raise ConfigError(f"'{args.mode}' needs {' and '.join(missing)}, e.g. {command}")
    if args.mode in BEST_FALLBACK and args.model is None and newest_file(runs_dir(), "best.pt") is None:
        raise ConfigError(f"'{args.mode}' needs model= (no best.pt under {runs_dir()} to fall back on), "
                          f"e.g. {BEST_FALLBACK[args.mode]}")


def setting_or_model_default(args: Args, key: str, model_value: Any) -> Any:
    """The user's setting when they gave the key (even a value equal to the default), else `model_value` if any."""
    return model_value if model_value is not None and not args.typed(key) else getattr(args, key)
