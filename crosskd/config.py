"""Run settings: default.yaml loading, command-line key=value parsing, aliases and type checks -> Args.

Precedence, lowest to highest: `cfg/default.yaml` <- the `cfg=` YAML <- command-line or Python overrides.
"""

from __future__ import annotations

import ast
import difflib
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from crosskd.errors import ConfigError, DataError
from crosskd.utils import LOGGER

CFG_DIR = Path(__file__).resolve().parent / "cfg"
DEFAULT_CFG_PATH = CFG_DIR / "default.yaml"

MODES = ("train", "distill", "val", "predict", "export", "info")
ALIASES = {"distill_model": "teacher", "dis": "kd_weight"}  # Ultralytics spelling -> crosskd key
RAW_STRING_KEYS = {"name", "project"}  # never literal-evaluated

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "kd": ("crosskd", "pm", "ld", "pkd", "crosskd+pkd", "none"),
    "optimizer": ("SGD", "AdamW"),
    "format": ("onnx", "torchscript"),
    "split": ("train", "val", "test"),
}
FRACTION_KEYS = {
    "lr0", "lrf", "momentum", "weight_decay", "conf", "iou", "fliplr", "fraction", "warmup_ratio", "ema_decay",
}
MINIMUMS: dict[str, float] = {
    "epochs": 1, "batch": 1, "workers": 0, "max_det": 1, "nms_pre": 1, "vid_stride": 1, "warmup_iters": 0,
    "warmup_epochs": 0, "clip_grad": 0, "save_period": -1, "kd_idx": 0, "kd_weight": 0, "kd_cls_weight": 0,
    "kd_reg_weight": 0, "kd_ctr_weight": 0, "kd_feat_weight": 0, "line_width": 1, "opset": 7, "classes": 0,
    "lr_steps": 0,
}
# Expected kinds of keys whose default is empty (None); other keys take the kind of their default value.
NONE_DEFAULT_KINDS = {
    "model": "str", "student": "str", "pretrained": "str", "teacher": "str", "teacher_weights": "str",
    "kd_idx": "int", "kd_cls_weight": "float", "kd_reg_weight": "float", "kd_ctr_weight": "float",
    "kd_feat_weight": "float", "device": "device", "project": "str", "name": "str", "conf": "float",
    "source": "source", "classes": "classes", "line_width": "int", "opset": "int", "cfg": "str",
}
KIND_OVERRIDES = {"imgsz": "imgsz", "resume": "resume", "lr_steps": "int_list"}  # keys with a richer kind
EXAMPLES = {
    "model": "gfl_r18.yaml", "student": "gfl_r18.yaml", "pretrained": "resnet18.pth", "teacher": "gfl_r50.pt",
    "teacher_weights": "gfl_r50.pt", "kd_idx": "2", "kd_cls_weight": "1.0", "kd_reg_weight": "1.0",
    "kd_ctr_weight": "1.0", "kd_feat_weight": "6.0", "device": "0", "project": "coco", "name": "exp",
    "conf": "0.25", "source": "images/", "classes": "0,2", "line_width": "2", "opset": "17", "cfg": "my.yaml",
    "imgsz": "640", "resume": "true",
}
KIND_NAMES = {
    "bool": "a bool (true or false)",
    "int": "an int",
    "float": "a number",
    "str": "a string",
    "int_list": "a list of ints",
    "imgsz": "an int or an h,w pair of ints",
    "device": "cpu, a CUDA index or a list of indices",
    "source": "a path, glob or camera index",
    "classes": "a class id or a list of class ids",
    "resume": "true, false or a checkpoint path",
    "any": "a value",
}
REQUIRED_INPUTS = {  # mode -> (keys it needs, a command line that gives them); val/export fall back to best.pt
    "train": (("model",), "crosskd train model=gfl_r18.yaml data=digits.yaml"),
    "distill": (("teacher", "model"), "crosskd distill teacher=gfl_r50.pt student=gfl_r18.yaml data=digits.yaml"),
    "predict": (("source",), "crosskd predict model=best.pt source=images/"),
    "info": (("model",), "crosskd info model=gfl_r18.yaml"),
}


class Args(types.SimpleNamespace):
    """Validated run settings; attribute access like `args.epochs`."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict copy (lists, not tuples), safe for yaml.safe_dump and torch.load(weights_only=True)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}


def load_defaults() -> dict[str, Any]:
    """The settings of `cfg/default.yaml` as a dict, in file order."""
    return yaml.safe_load(DEFAULT_CFG_PATH.read_text())


def format_value(value: Any) -> str:
    """How a value is written on the command line: `true`, `[8,11]`, empty for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value)


def _unknown_key_error(keys: list[str], defaults: dict[str, Any], where: str = "") -> ConfigError:
    """One line naming every unknown key with its close matches (shown with their defaults)."""
    candidates = list(defaults) + list(ALIASES)
    parts = []
    for key in keys:
        similar = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
        shown = [f"{m}={format_value(defaults[ALIASES.get(m, m)])}" for m in similar]
        hint = f"Similar arguments: {', '.join(shown)}" if shown else "Run 'crosskd cfg' to list all arguments"
        parts.append(f"'{key}'{where} is not a valid crosskd argument. {hint}")
    return ConfigError("; ".join(parts))


def _check_keys(overrides: dict[str, Any], defaults: dict[str, Any], where: str = "") -> None:
    unknown = [key for key in overrides if ALIASES.get(key, key) not in defaults]
    if unknown:
        raise _unknown_key_error(unknown, defaults, where)


def _resolve_aliases(overrides: dict[str, Any]) -> dict[str, Any]:
    """Rename Ultralytics-style aliases (`distill_model`, `dis`) to their crosskd keys."""
    resolved = {}
    for key, value in overrides.items():
        target = ALIASES.get(key, key)
        if target != key and target in overrides:
            raise ConfigError(f"'{key}' and '{target}' name the same setting; pass only '{target}='")
        resolved[target] = value
    return resolved


def smart_value(text: str) -> Any:
    """Type a command-line value: none/true/false, Python literals (3, 0.01, [0,1], 640,480), else the raw string."""
    lowered = text.lower()
    if lowered in ("none", ""):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _glue_brackets(tokens: list[str]) -> list[str]:
    """Join shell words of a bracket value split by spaces: `imgsz=[640,` `480]` -> `imgsz=[640,480]`."""
    glued: list[str] = []
    pending = ""
    for token in tokens:
        pending += token
        depth = pending.count("[") - pending.count("]")
        if depth < 0:
            raise ConfigError(f"unmatched ']' in '{pending}'; write lists as key=[a,b]")
        if depth == 0:
            glued.append(pending)
            pending = ""
    if pending:
        raise ConfigError(f"unmatched '[' in '{pending}'; write lists as key=[a,b]")
    return glued


def _glue_equals(tokens: list[str]) -> list[str]:
    """Re-join `key = value`, `key= value` and `key =value` into `key=value`."""
    joined: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        has_next = i + 1 < len(tokens)
        if token == "=" and joined and has_next:
            joined[-1] += "=" + tokens[i + 1]
            i += 2
        elif token.startswith("=") and joined:
            joined[-1] += token
            i += 1
        elif token.endswith("=") and token.count("=") == 1 and has_next and "=" not in tokens[i + 1]:
            joined.append(token + tokens[i + 1])
            i += 2
        else:
            joined.append(token)
            i += 1
    return joined


def join_tokens(tokens: list[str]) -> list[str]:
    """Re-join shell words into whole `key=value` tokens (split brackets and spaces around `=`)."""
    return _glue_equals(_glue_brackets(list(tokens)))


def _clean_token(token: str) -> str:
    """Strip a leading `--` and a trailing comma, each with a warning."""
    if token.startswith("--"):
        LOGGER.warning(f"'{token}' does not need leading dashes; using '{token[2:]}'")
        token = token[2:]
    if token.endswith(","):
        LOGGER.warning(f"'{token}' has a trailing comma; using '{token[:-1]}'")
        token = token[:-1]
    return token


def _bare_key(key: str, defaults: dict[str, Any]) -> bool:
    """A bare word: True for a bool setting, else a one-line error."""
    target = ALIASES.get(key, key)
    if target not in defaults:
        raise _unknown_key_error([key], defaults)
    if not isinstance(defaults[target], bool):
        example = EXAMPLES.get(target) or format_value(defaults[target])
        raise ConfigError(f"'{key}' is a valid crosskd argument but is missing '=' — try '{key}={example}'")
    return True


def parse_cli_args(tokens: list[str]) -> dict[str, Any]:
    """Parse `key=value` shell words into a dict of typed values (keys as written; aliases resolved by get_args)."""
    defaults = load_defaults()
    overrides: dict[str, Any] = {}
    for token in join_tokens(tokens):
        token = _clean_token(token)
        key, sep, text = token.partition("=")
        if not key:
            raise ConfigError(f"'{token}' has no key; write key=value, e.g. epochs=12")
        if not sep:
            overrides[key] = _bare_key(key, defaults)
            continue
        if ALIASES.get(key, key) not in defaults:
            raise _unknown_key_error([key], defaults)
        overrides[key] = text if key in RAW_STRING_KEYS and text else smart_value(text)
    return overrides


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


COERCE: dict[str, Callable[[Any], Any]] = {
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
    "any": lambda value: value,
}


def value_kind(key: str, default: Any) -> str:
    """The expected kind of a setting (a key of COERCE), from the tables above or the default's type."""
    if key in KIND_OVERRIDES:
        return KIND_OVERRIDES[key]
    if default is None:
        return NONE_DEFAULT_KINDS.get(key, "any")
    for kind, type_ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(default, type_):
            return kind
    return "int_list" if isinstance(default, list) else "any"


def _example(key: str, default: Any) -> str:
    return f"{key}={EXAMPLES.get(key) or format_value(default)}"


def _check_range(key: str, given: Any, value: float, default: Any) -> None:
    """Fractions must lie in 0..1 and some settings have a minimum (`value` is the number checked)."""
    shown = f"'{key}={format_value(given)}' is out of range"
    if key in FRACTION_KEYS and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{shown}: '{key}' must be between 0 and 1, e.g. {_example(key, default)}")
    if key in MINIMUMS and value < MINIMUMS[key]:
        raise ConfigError(f"{shown}: '{key}' must be >= {MINIMUMS[key]:g}, e.g. {_example(key, default)}")


def _check_choice(key: str, value: str) -> str:
    """Match a choice case-insensitively and return its canonical spelling."""
    for choice in CHOICES[key]:
        if choice.lower() == value.lower():
            return choice
    raise ConfigError(f"'{key}={value}' is invalid: '{key}' must be one of {', '.join(CHOICES[key])}")


def check_value(key: str, value: Any, default: Any) -> Any:
    """Validate one setting against its expected kind, range and choices; return the normalised value."""
    if value is None:
        if default is None:
            return None
        if "none" in CHOICES.get(key, ()):
            return "none"
        raise ConfigError(f"'{key}' cannot be empty: it must be {KIND_NAMES[value_kind(key, default)]}, "
                          f"e.g. {_example(key, default)}")
    kind = value_kind(key, default)
    given = value
    try:
        value = COERCE[kind](value)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"'{key}={format_value(given)}' is invalid: '{key}' must be {KIND_NAMES[kind]}, "
                          f"e.g. {_example(key, default)}") from None
    if key in CHOICES:
        return _check_choice(key, value)
    if kind in ("int", "float"):
        _check_range(key, given, value, default)
    elif kind in ("classes", "int_list") and value:
        _check_range(key, given, min(value), default)
    return value


def _load_cfg_file(path: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Read a `cfg=` YAML of overrides (keys checked, aliases resolved)."""
    file = Path(str(path))
    if not file.is_file():
        raise ConfigError(f"cfg file '{file}' not found; pass an existing YAML, e.g. cfg=my.yaml")
    content = yaml.safe_load(file.read_text()) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"cfg file '{file}' must be a YAML mapping of key: value lines")
    content.pop("cfg", None)
    _check_keys(content, defaults, where=f" in {file.name}")
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
    defaults = load_defaults()
    overrides = dict(overrides or {})
    _check_keys(overrides, defaults)
    overrides = _resolve_aliases(overrides)
    file_settings = _load_cfg_file(overrides["cfg"], defaults) if overrides.get("cfg") else {}
    settings = {**defaults, **file_settings, **overrides}
    if mode is not None:
        settings["mode"] = mode
    settings = {key: check_value(key, value, defaults[key]) for key, value in settings.items()}
    _merge_student(settings)
    return Args(**settings)


def check_required(args: Args) -> None:
    """Raise a ConfigError when the mode's required inputs (e.g. model= for train) are missing."""
    keys, example = REQUIRED_INPUTS.get(args.mode, ((), ""))
    resuming = args.mode in ("train", "distill") and bool(args.resume)
    missing = [f"{key}=" for key in keys if getattr(args, key) is None and not resuming]
    if missing:
        raise ConfigError(f"'{args.mode}' needs {' and '.join(missing)}, e.g. {example}")


def resolve_cfg_file(name: str | Path, kind: str) -> Path:
    """Find a model or dataset YAML: an existing path, else a file shipped in cfg/models or cfg/datasets."""
    if kind not in ("models", "datasets"):
        raise ValueError(f"kind must be 'models' or 'datasets', not {kind!r}")
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CFG_DIR / kind / path.name, CFG_DIR / kind / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in (CFG_DIR / kind).glob("*.yaml"))) or "none"
    error = DataError if kind == "datasets" else ConfigError
    raise error(f"'{name}' is neither a file nor a YAML in {CFG_DIR / kind} (shipped: {shipped})")


def setting_or_model_default(args: Args, key: str, model_value: Any) -> Any:
    """The user's setting, or `model_value` while the key still holds its default.yaml value.

    Args does not record which keys were typed, so an explicit value equal to the default also yields to the model's.
    """
    value = getattr(args, key)
    return model_value if model_value is not None and value == load_defaults()[key] else value


def imgsz_hw(imgsz: int | Sequence[int]) -> tuple[int, int]:
    """An imgsz setting (640, [640], or [h, w]) as (h, w)."""
    return (int(imgsz), int(imgsz)) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))
