"""crosskd checkpoints: plain dicts of tensors and Python values, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosskd import __version__
from crosskd.errors import CheckpointError
from crosskd.models import DenseDetector, build_detector
from crosskd.utils import LOGGER, atomic_save, read_torch_file

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "model_yaml", "nc", "format_version")
TRAINING_STATE_KEYS = ("optimizer", "scaler", "ema", "scheduler")
KD_STATE_KEY = "kd_state"  # distilled last.pt: {kd method name: its state_dict} (width adapters, connectors)
LEGACY_KD_KEYS = {"kd_adapter": ("crosskd", "adapter.")}  # older files: key -> (method, prefix in its state_dict)


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write `ckpt` to `path` atomically (temporary file in the same directory, then os.replace).

    A failed write (full disk, read-only folder: any OSError) removes the temporary file, leaves a previous file at
    `path` as it was and raises a one-line CheckpointError naming the folder, its free space and the space needed.
    """
    path = Path(path)
    try:
        return atomic_save(ckpt, path)
    except OSError as error:
        raise CheckpointError(save_failure_message(ckpt, path, error)) from None


def save_failure_message(ckpt: dict, path: Path, error: OSError) -> str:
    """What failed, the folder's free space against the checkpoint's size, and the fix."""
    folder = path.parent
    free = free_bytes(folder)
    free_text = f"{format_bytes(free)} free" if free is not None else "unknown free space"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "make room there, or train with project= on another disk"
    else:
        fix = "make the folder writable, or train with project= in a writable place"
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    return (f"cannot write checkpoint {path}: {error.strerror or error}; {folder} has {free_text} and the checkpoint "
            f"needs {format_bytes(serialized_size(ckpt))}: {fix}{kept}")


class ByteCounter:
    """A write-only binary file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        count = memoryview(data).nbytes
        self.size += count
        return count

    def flush(self) -> None:
        pass


def serialized_size(obj: Any) -> int:
    """Bytes torch.save writes for `obj` (serialised into a counter, nothing kept in memory)."""
    counter = ByteCounter()
    torch.save(obj, counter)
    return counter.size


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder` (or of its nearest existing parent); None when unknown."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def format_bytes(size: int) -> str:
    """Sizes as people read them: '830 B', '12.3 MB', '1.5 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def is_crosskd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and all(key in obj for key in REQUIRED_KEYS)


def check_checkpoint(obj: Any, path: str | Path) -> dict:
    """`obj` as a crosskd checkpoint dict, or a one-line CheckpointError saying what it is not."""
    if not is_crosskd_checkpoint(obj):
        raise CheckpointError(
            f"'{path}' is not a crosskd checkpoint (needs keys {list(REQUIRED_KEYS)}); "
            "use a .pt written by crosskd train/distill"
        )
    if obj["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint format {obj['format_version']}, newer than this crosskd supports "
            f"({FORMAT_VERSION}); upgrade crosskd"
        )
    return obj


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a crosskd checkpoint (CPU, weights_only=True); any problem is a one-line CheckpointError."""
    return check_checkpoint(read_torch_file(path), path)


def _float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to float32 (stripped checkpoints store fp16)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def detector_from_checkpoint(ckpt: dict) -> DenseDetector:
    """Rebuild the DenseDetector of a loaded crosskd checkpoint (float32 weights, `names` set)."""
    nc = int(ckpt["nc"])
    detector = build_detector(ckpt["model_yaml"], nc)
    detector.load_state_dict(_float_state(ckpt["model"]))
    detector.names = {int(k): str(v) for k, v in (ckpt.get("names") or {}).items()} or {i: str(i) for i in range(nc)}
    return detector


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state_dict."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def make_checkpoint(
    model: DenseDetector,
    *,
    epoch: int,
    best_fitness: float | None,
    names: dict[int, str],
    train_args: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
    ema_updates: int = 0,
    scheduler: dict | None = None,
    train_metrics: dict | None = None,
    **extra: Any,
) -> dict:
    """Assemble a checkpoint dict of plain values; `extra` adds keys such as teacher/kd_args or rng."""
    ckpt = {
        "epoch": epoch,
        "best_fitness": best_fitness,
        "model": cpu_state(model),
        "model_yaml": dict(model.yaml),
        "names": {int(k): str(v) for k, v in names.items()},
        "nc": int(model.nc),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ema": cpu_state(ema) if ema is not None else None,
        "ema_updates": ema_updates,
        "scheduler": scheduler,
        "train_args": train_args,
        "train_metrics": train_metrics or {},
        "date": datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "format_version": FORMAT_VERSION,
    }
    ckpt.update(extra)
    return ckpt


def read_kd_state(ckpt: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The KD methods' learnable state saved in a checkpoint, by method name; an older file's `kd_adapter` is
    CrossKD's width adapter."""
    states = dict(ckpt.get(KD_STATE_KEY) or {})
    for key, (method, prefix) in LEGACY_KD_KEYS.items():
        if ckpt.get(key) is not None and method not in states:
            states[method] = {prefix + name: value for name, value in ckpt[key].items()}
    return states


def drop_kd_state(ckpt: dict) -> bool:
    """Remove the KD methods' state (no part of the deployed student) from `ckpt`; True when it held some."""
    dropped = [ckpt.pop(key, None) for key in (KD_STATE_KEY, *LEGACY_KD_KEYS)]
    return any(value is not None for value in dropped)


def is_resumable(ckpt: dict) -> bool:
    """True for an unfinished training checkpoint (has optimizer state and epoch >= 0)."""
    return ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None


def strip_checkpoint(path: str | Path) -> Path:
    """Make a final checkpoint: EMA weights as the model when present, fp16, no training state, epoch -1."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    for key in TRAINING_STATE_KEYS:
        ckpt[key] = None
    ckpt.pop("rng", None)
    ckpt.pop("rank_rng", None)
    ckpt.update(epoch=-1, ema_updates=0)
    save_checkpoint(ckpt, path)
    size_mb = path.stat().st_size / 1e6
    LOGGER.info(f"Optimizer stripped from {path}, {size_mb:.1f}MB")
    return path
