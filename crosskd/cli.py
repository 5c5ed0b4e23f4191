"""The `crosskd MODE key=value ...` command: parse, validate, dispatch. The only place that catches UserError.

Plain `sys.argv` words, no argument-parser library: every word is a mode, a special command or `key=value`.

Shell words become typed overrides here (`parse_cli_args`); `crosskd.config.get_args` validates them into Args.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from crosskd import __version__
from crosskd.config import Args, check_required, get_args, unknown_key_error
from crosskd.dist import end_torchrun_worker, is_torchrun_worker
from crosskd.errors import ConfigError, RunStopped, UserError
from crosskd.paths import DEFAULT_CFG_PATH
from crosskd.settings import ALIASES, MODES, SETTINGS, render_mode_help
from crosskd.user_settings import load_user_settings, render_user_settings, reset_user_settings, update_user_settings
from crosskd.utils import LOGGER, console

MODE_TARGETS = {  # mode -> (module, function taking Args); imported only when the mode runs
    "train": ("crosskd.engine.training.launch", "run"),
    "distill": ("crosskd.engine.training.launch", "run"),
    "val": ("crosskd.engine.evaluation.validator", "run"),
    "predict": ("crosskd.engine.prediction.predictor", "run"),
    "export": ("crosskd.engine.tools.export", "run"),
    "benchmark": ("crosskd.engine.tools.benchmark", "run"),
    "info": ("crosskd.engine.tools.info", "run"),
    "convert": ("crosskd.engine.deployment.converter", "run"),
    "analyze": ("crosskd.engine.tools.analyzer", "run"),
}
SPECIAL_WORDS = {  # spelling -> special command
    "help": "help", "h": "help", "-h": "help", "--help": "help", "-help": "help",
    "version": "version", "-v": "version", "--version": "version",
    "checks": "checks", "check": "checks",
    "cfg": "cfg",
    "copy-cfg": "copy-cfg", "copy_cfg": "copy-cfg",
    "settings": "settings",
}
HELP_TEXT = f"""crosskd {__version__}: dense object detectors and Cross-Head Knowledge Distillation (CrossKD)

Usage: crosskd MODE key=value ...
  MODE is one of: {", ".join(MODES)}
  key=value settings override cfg/default.yaml ('crosskd cfg' lists them); a bare bool key means key=true.

Examples:
  1. Train a detector from a model YAML:
       crosskd train model=cfg/models/gfl_r50.yaml data=coco.yaml epochs=12
  2. Distil a student from a trained teacher with CrossKD:
       crosskd distill teacher=gfl_r101.pt student=gfl_r50.yaml data=coco.yaml
  3. Validate a checkpoint (COCO mAP):
       crosskd val model=best.pt data=coco.yaml
  4. Predict on a folder of images:
       crosskd predict model=best.pt source=images/ conf=0.25
  5. Export to ONNX (or torchscript, openvino), or compare every format's size, AP and speed:
       crosskd export model=best.pt format=onnx imgsz=640
       crosskd benchmark model=best.pt data=coco.yaml imgsz=640
  6. Distil from an MMDetection or torchvision teacher, or convert one to a crosskd .pt:
       crosskd distill teacher=gfl_r101_fpn_mstrain_2x_coco.pth student=gfl_r50.yaml data=coco.yaml
       crosskd convert model=torchvision:retinanet_resnet50_fpn_v2
  7. Measure the target conflict of a teacher-student pair (paper Fig. 3), per FPN level:
       crosskd analyze teacher=gfl_r101.pt student=best.pt data=coco.yaml

Special commands:
  crosskd help        this text (also -h, --help)
  crosskd version     the installed crosskd version
  crosskd checks      software and hardware report
  crosskd cfg         every setting with its default and comment
  crosskd copy-cfg    write default_copy.yaml here, to edit and pass back as cfg=
  crosskd settings    user settings (runs_dir, datasets_dir, tensorboard, coco_eval); 'crosskd settings key=value'
                      changes one, 'crosskd settings reset' restores the defaults
  crosskd MODE --help that mode's keys with their defaults and comments

Docs: README.md and docs/ in the crosskd repository (docs/cli.md lists every setting)."""

def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command, turning user errors into one red line and exit code 2.

    A torchrun worker ends through `end_torchrun_worker` once the command has returned or failed cleanly."""
    tokens = sys.argv[1:] if argv is None else list(argv)
    code = run_command_line(tokens)
    if is_torchrun_worker():
        end_torchrun_worker(code)
    if code:
        raise SystemExit(code)


def run_command_line(tokens: list[str]) -> int:
    """Run `dispatch(tokens)` and return the exit code: 0, 2 after a user error, 128 + signum after a stop."""
    try:
        dispatch(tokens)
    except UserError as error:
        return _fail(str(error))
    except RunStopped as stop:  # a signal stopped training after saving last.pt: the resume command, exit 128 + signum
        if str(stop):
            Console(stderr=True, soft_wrap=True).print(Text(str(stop), style="bold yellow"))
        return stop.exit_code
    except KeyboardInterrupt:
        return _fail("interrupted by the user")
    return 0


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(Text(f"ERROR: {message}", style="bold red"))
    return 2


def dispatch(tokens: list[str]) -> None:
    """Run one command line (without the program name): a special command or a mode."""
    tokens = join_tokens(tokens)
    specials = [SPECIAL_WORDS[token] for token in tokens if token in SPECIAL_WORDS]
    if not tokens or specials:
        special = specials[0] if specials else "help"
        _run_special(special, [token for token in tokens if SPECIAL_WORDS.get(token) != special])
        return
    mode, rest = _split_mode(tokens)
    overrides = parse_cli_args(rest)
    args = get_args(overrides, _resolve_mode(mode, overrides))
    check_required(args)
    _load_runner(args.mode)(args)


def _split_mode(tokens: list[str]) -> tuple[str | None, list[str]]:
    """Take the one mode word out of the tokens (it may stand anywhere); reject unknown bare words."""
    bare = [token for token in tokens if "=" not in token]
    modes = [token for token in bare if token in MODES]
    if len(modes) > 1:
        raise ConfigError(f"more than one mode given ({', '.join(modes)}); pass exactly one, e.g. crosskd train")
    keys = set(SETTINGS) | set(ALIASES)
    for word in bare:
        if word not in MODES and word.lstrip("-") not in keys:
            _raise_if_mode_typo(word)
    if not modes:
        return None, tokens
    rest = list(tokens)
    rest.remove(modes[0])
    return modes[0], rest


def _raise_if_mode_typo(word: str) -> None:
    """A bare word close to a mode or special command is a mistyped mode; others fall to argument checks."""
    similar = difflib.get_close_matches(word, [*MODES, *dict.fromkeys(SPECIAL_WORDS.values())], n=3, cutoff=0.6)
    if similar:
        raise ConfigError(f"'{word}' is not a valid crosskd mode. Similar: {', '.join(similar)}")


def _resolve_mode(mode: str | None, overrides: dict[str, Any]) -> str:
    """The mode word wins; `mode=` may stand in for it; neither means default.yaml's mode, with a warning."""
    given = overrides.pop("mode", None)
    if mode and given and given != mode:
        raise ConfigError(f"mode word '{mode}' and mode={given} disagree; pass only one")
    if mode or given:
        return mode or given
    default = SETTINGS["mode"].default
    LOGGER.warning(f"no mode given (valid modes: {', '.join(MODES)}); using mode={default}")
    return default


# Shell words -> typed overrides ---------------------------------------------------------------------------------------
BARE_KINDS = ("bool", "resume")  # kinds whose bare key means key=true


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


def _bare_key(key: str) -> bool:
    """A bare word: True for a bool-like setting, else a one-line error."""
    setting = SETTINGS.get(ALIASES.get(key, key))
    if setting is None:
        raise unknown_key_error([key])
    if setting.kind not in BARE_KINDS:
        example = f"{key}={setting.example_value()}"
        raise ConfigError(f"'{key}' is a valid crosskd argument but is missing '=' — try '{example}'")
    return True


def parse_cli_args(tokens: list[str]) -> dict[str, Any]:
    """Parse `key=value` shell words into a dict of typed values (keys as written; aliases resolved by get_args)."""
    overrides: dict[str, Any] = {}
    for token in join_tokens(tokens):
        token = _clean_token(token)
        key, sep, text = token.partition("=")
        if not key:
            raise ConfigError(f"'{token}' has no key; write key=value, e.g. epochs=12")
        if not sep:
            overrides[key] = _bare_key(key)
            continue
        setting = SETTINGS.get(ALIASES.get(key, key))
        if setting is None:
            raise unknown_key_error([key])
        overrides[key] = text if setting.raw and text else smart_value(text)
    return overrides


def _load_runner(mode: str) -> Callable[[Args], Any]:
    """Import the engine of a mode lazily; a missing crosskd module means that mode is not built yet."""
    module_name, function_name = MODE_TARGETS[mode]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (error.name == "crosskd" or error.name.startswith("crosskd.")):
            raise UserError(f"'{mode}' is not built yet ({error.name} is missing)") from None
        raise
    runner = getattr(module, function_name, None)
    if runner is None:
        raise UserError(f"'{mode}' is not built yet ({module_name} has no {function_name}())")
    return runner


def _help_values(mode: str, extra: list[str]) -> dict[str, Any]:
    """The values `crosskd MODE key=value ... --help` shows instead of the defaults: the keys given, and for train
    and distill with a model the recipe keys (augmentation, optimisation) as the model's recipe resolves them."""
    overrides = parse_cli_args([word for word in extra if "=" in word])
    if not overrides:
        return {}
    args = get_args(overrides, mode)
    values = {key: getattr(args, key) for key in overrides if hasattr(args, key)}
    if mode in ("train", "distill") and (args.model or args.student):
        from crosskd.engine.training.recipe import resolved_help_values

        values.update(resolved_help_values(args))
    return values


def _run_special(special: str, extra: list[str]) -> None:
    if special == "settings":
        _user_settings_command(extra)
        return
    if special == "help":
        modes = [word for word in extra if word in MODES]
        print(render_mode_help(modes[0], _help_values(modes[0], extra)) if modes else HELP_TEXT)
        return
    if extra:
        raise ConfigError(f"'{special}' takes no arguments (got {' '.join(extra)}); "
                          "to use a settings file write e.g. crosskd train cfg=my.yaml")
    actions: dict[str, Callable[[], None]] = {
        "version": lambda: print(__version__),
        "checks": _print_checks,
        "cfg": lambda: print(DEFAULT_CFG_PATH.read_text(), end=""),
        "copy-cfg": _copy_cfg,
    }
    actions[special]()


def _user_settings_command(words: list[str]) -> None:
    """`crosskd settings` prints the user settings, `... key=value ...` changes them, `... reset` restores them."""
    if words == ["reset"]:
        values = reset_user_settings()
    elif words:
        pairs = [word.partition("=") for word in words]
        bad = [word for word, (_, sep, _) in zip(words, pairs) if not sep]
        if bad:
            raise ConfigError(f"'{bad[0]}' is not key=value; e.g. crosskd settings runs_dir=/data/runs, "
                              "or crosskd settings reset")
        values = update_user_settings({key: value for key, _, value in pairs})
    else:
        values = load_user_settings()
    print(render_user_settings(values))


def _copy_cfg() -> None:
    """Write default.yaml to ./default_copy.yaml (never over an existing file) and show how to use it."""
    target = Path.cwd() / "default_copy.yaml"
    if target.exists():
        raise ConfigError(f"{target} already exists; rename or delete it, then run 'crosskd copy-cfg' again")
    target.write_text(DEFAULT_CFG_PATH.read_text())
    print(f"{DEFAULT_CFG_PATH} copied to {target}\nExample: crosskd train cfg={target} imgsz=320 batch=8")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ram_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (AttributeError, ValueError, OSError):
        return "unknown"


def _cuda_devices() -> str:
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(f"{index}: {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    return "; ".join(devices) or "none"


def environment_report() -> list[tuple[str, str]]:
    """(item, value) rows describing the software and hardware this process runs on."""
    cuda = torch.cuda.is_available()
    return [
        ("Python", platform.python_version()),
        ("crosskd", __version__),
        ("torch", torch.__version__),
        ("torchvision", _package_version("torchvision")),
        ("CUDA available", "yes" if cuda else "no"),
        ("CUDA version", torch.version.cuda or "none (CPU build)"),
        ("CUDA devices", _cuda_devices() if cuda else "none"),
        ("onnx", _package_version("onnx")),
        ("onnxruntime", _package_version("onnxruntime")),
        ("OS", platform.platform()),
        ("CPU count", str(os.cpu_count())),
        ("RAM", _ram_gib()),
    ]


def _print_checks() -> None:
    table = Table(title=f"crosskd {__version__} checks")
    table.add_column("item", style="bold")
    table.add_column("value")
    for item, value in environment_report():
        table.add_row(item, value)
    console.print(table)
