"""Where crosskd finds and puts files: shipped YAMLs, run directories, the newest checkpoint under runs/.

A ground-level module (like `errors` and `utils`): any layer may import it, and it imports no crosskd layer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from crosskd.errors import CheckpointError, ConfigError, DataError
from crosskd.user_settings import user_setting
from crosskd.utils import LOGGER

CFG_DIR = Path(__file__).resolve().parent / "cfg"
DEFAULT_CFG_PATH = CFG_DIR / "default.yaml"
CFG_KINDS = ("models", "datasets")


def resolve_cfg_file(name: str | Path, kind: str) -> Path:
    """Find a model or dataset YAML: an existing path, else a file shipped in cfg/models or cfg/datasets.

    `kind` is 'models' or 'datasets'; a missing dataset raises DataError, a missing model ConfigError.
    """
    if kind not in CFG_KINDS:
        raise ValueError(f"kind must be 'models' or 'datasets', not {kind!r}")
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CFG_DIR / kind / path.name, CFG_DIR / kind / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in (CFG_DIR / kind).glob("*.yaml"))) or "none"
    error = DataError if kind == "datasets" else ConfigError
    raise error(f"'{name}' is neither a file nor a YAML in {CFG_DIR / kind} (shipped: {shipped}); "
                "pass an existing file or one of the shipped names")


def runs_dir() -> Path:
    """Root of all run directories: the user setting runs_dir (`crosskd settings`), ./runs by default."""
    return Path.cwd() / Path(user_setting("runs_dir")).expanduser()


def default_datasets_dir() -> Path:
    """The default datasets_dir=: the user setting datasets_dir (`crosskd settings`), ./datasets by default."""
    return Path(user_setting("datasets_dir")).expanduser()


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = False) -> Path:
    """Return `path`, or the first free `path2`, `path3`, ... (Ultralytics 8.3 style: runs/train, runs/train2).

    Files keep their suffix (`results.csv` -> `results2.csv`). With mkdir the directory is created atomically,
    so two runs started together never share one.
    """
    path = Path(path)
    stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
    candidate, number = path, 2
    while True:
        if exist_ok or not candidate.exists():
            if not mkdir:
                return candidate
            try:
                candidate.mkdir(parents=True, exist_ok=exist_ok)
                return candidate
            except FileExistsError:
                pass
        candidate = Path(f"{stem}{number}{suffix}")
        number += 1


def make_save_dir(args: Any, mode: str) -> Path:
    """runs/<project or mode>/<name or mode>, incremented (train2, train3, ...) unless exist_ok; created.

    `args` needs `project`, `name` and `exist_ok` (an Args of any mode).
    """
    project = Path(args.project) if args.project else Path(mode)
    root = project if project.is_absolute() else runs_dir() / project
    fix = "pass project= (and name=) a folder you can write to"
    try:
        path = increment_path(root / (args.name or mode), exist_ok=args.exist_ok, mkdir=True)
    except OSError as error:
        raise unwritable_error(root / (args.name or mode), error, fix) from None
    return writable_dir(path, fix)


def writable_dir(path: str | Path, fix: str) -> Path:
    """Create the folder `path` (with parents) and check that a file can be written in it.

    Anything in the way is a one-line ConfigError naming the folder, the reason and `fix`, e.g.
    'pass project= a folder you can write to'.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise unwritable_error(path, error, fix) from None
    return path


def writable_file(path: str | Path, fix: str) -> Path:
    """Check that the file `path` can be written (its folder is created): not a folder, not read-only."""
    path = Path(path)
    writable_dir(path.parent, fix)
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: a folder of that name is in the way; {fix}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"cannot write {path}: the file is read-only; {fix}")
    return path


def unwritable_error(path: Path, error: OSError, fix: str) -> ConfigError:
    """One line for a folder that cannot be created or written: the reason and, when one is, the file in the way."""
    reason = error.strerror or type(error).__name__
    blocker = _file_in_the_way(path)
    in_the_way = f" ({blocker} is a file, not a folder)" if blocker else ""
    return ConfigError(f"cannot create or write the folder {path}: {reason}{in_the_way}; {fix}")


def _file_in_the_way(path: Path) -> Path | None:
    """The first of `path` and its parents that is a file (None when none is, or when they cannot be looked at)."""
    try:
        return next((parent for parent in (*reversed(path.parents), path) if parent.is_file()), None)
    except OSError:
        return None


def newest_file(pattern_root: str | Path, name: str) -> Path | None:
    """The most recently modified file called `name` anywhere under `pattern_root` (None when there is none)."""
    candidates = [path for path in Path(pattern_root).rglob(name) if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def newest_best(action: str) -> Path:
    """The newest best.pt under runs/, for a mode run without model= (logged, e.g. action='validating')."""
    path = newest_file(runs_dir(), "best.pt")
    if path is None:
        raise CheckpointError(f"no model= given and no best.pt under {runs_dir()}; pass model=path/to/best.pt")
    LOGGER.info(f"No model= given: {action} the newest best.pt, {path}")
    return path
