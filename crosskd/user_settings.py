"""User settings that outlive runs, as Ultralytics' `yolo settings`: where runs and datasets go, and run defaults.

They live in `settings.yaml` under $CROSSKD_CONFIG_DIR, else $XDG_CONFIG_HOME/crosskd, else ~/.config/crosskd.
The file is read when a value is needed and written only by `crosskd settings key=value` and `crosskd settings
reset`; without it every key has its default. Relative paths resolve against the current directory when used.
A ground-level module (like `paths`): any layer may import it, and it imports no crosskd layer.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from crosskd.errors import ConfigError

FILE_NAME = "settings.yaml"
DEFAULTS: dict[str, Any] = {
    "runs_dir": "runs",
    "datasets_dir": "datasets",
    "tensorboard": False,
    "coco_eval": "auto",
}
HELP = {
    "runs_dir": "root of run directories (train, val, predict ...); relative = under the current directory",
    "datasets_dir": "default datasets_dir=: where dataset YAML relative paths and generated demo data live",
    "tensorboard": "default tensorboard=: log runs to TensorBoard (needs pip install 'crosskd[tensorboard]')",
    "coco_eval": "COCO evaluator: auto (faster-coco-eval when installed), pycocotools or faster-coco-eval",
}
COCO_EVAL_CHOICES = ("auto", "pycocotools", "faster-coco-eval")


def config_dir() -> Path:
    """The folder of settings.yaml: $CROSSKD_CONFIG_DIR, else $XDG_CONFIG_HOME/crosskd, else ~/.config/crosskd."""
    if os.environ.get("CROSSKD_CONFIG_DIR"):
        return Path(os.environ["CROSSKD_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "crosskd"


def settings_file() -> Path:
    return config_dir() / FILE_NAME


def check_user_setting(key: str, value: Any) -> Any:
    """`value` checked and typed for `key` (bools accept true/false text); a ConfigError names the fix."""
    if key not in DEFAULTS:
        similar = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f"did you mean {similar[0]}? " if similar else ""
        raise ConfigError(f"'{key}' is not a crosskd user setting; {hint}valid keys: {', '.join(DEFAULTS)}")
    if isinstance(DEFAULTS[key], bool):
        text = str(value).lower()
        if text not in ("true", "false"):
            raise ConfigError(f"user setting {key}={value} must be true or false, e.g. crosskd settings {key}=true")
        return text == "true"
    if value is None or str(value) == "":
        raise ConfigError(f"user setting {key} cannot be empty; e.g. crosskd settings {key}={DEFAULTS[key]}")
    value = str(value)
    if key == "coco_eval" and value not in COCO_EVAL_CHOICES:
        raise ConfigError(f"user setting coco_eval={value} is not one of {', '.join(COCO_EVAL_CHOICES)}")
    return value


def load_user_settings() -> dict[str, Any]:
    """Every user setting: the file's values over DEFAULTS (a missing file means all defaults)."""
    path = settings_file()
    if not path.is_file():
        return dict(DEFAULTS)
    try:
        stored = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError) as error:
        raise ConfigError(f"cannot read user settings {path} ({type(error).__name__}); "
                          "fix it or run 'crosskd settings reset'") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"user settings {path} is not a key: value mapping; run 'crosskd settings reset'")
    known = {key: check_user_setting(key, value) for key, value in stored.items() if key in DEFAULTS}
    return {**DEFAULTS, **known}


def user_setting(key: str) -> Any:
    """One user setting's current value."""
    return load_user_settings()[key]


def save_user_settings(values: dict[str, Any]) -> Path:
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def update_user_settings(updates: dict[str, Any]) -> dict[str, Any]:
    """Check `updates`, merge them into the stored settings, write the file and return every setting."""
    values = {**load_user_settings(), **{key: check_user_setting(key, value) for key, value in updates.items()}}
    save_user_settings(values)
    return values


def reset_user_settings() -> dict[str, Any]:
    """Write the defaults to the file and return them."""
    save_user_settings(dict(DEFAULTS))
    return dict(DEFAULTS)


def render_user_settings(values: dict[str, Any]) -> str:
    """The settings as `key: value  # help` lines under a header naming the file."""
    lines = [f"# crosskd user settings: {settings_file()}", "# change with: crosskd settings key=value (reset: "
             "crosskd settings reset)"]
    lines += [f"{key}: {yaml.safe_dump(value).strip().removesuffix('...').strip()}  # {HELP[key]}"
              for key, value in values.items()]
    return "\n".join(lines)
