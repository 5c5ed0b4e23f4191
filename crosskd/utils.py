"""Shared helpers: logging, rich colours, atomic saving, seeding and device selection (paths live in crosskd.paths)."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import secrets
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style

from crosskd.dist import get_rank, is_dist
from crosskd.errors import CheckpointError, UserError

console = Console()

def _process_rank() -> int:
    """This process's global rank, also before the process group exists (torchrun sets RANK)."""
    return get_rank() if is_dist() else int(os.environ.get("RANK", 0))


class _RankZeroFilter(logging.Filter):
    """Let only rank 0 log below ERROR, so N processes do not print N copies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _process_rank() == 0


class _StdoutHandler(logging.StreamHandler):
    """Write to the current sys.stdout (looked up per record, so redirections and pytest capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


class _PlainFormatter(logging.Formatter):
    """Plain messages; warnings and errors get a WARNING:/ERROR: prefix."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def _build_logger(name: str = "crosskd") -> logging.Logger:
    logger = logging.getLogger(name)
    handler = _StdoutHandler()
    handler.setFormatter(_PlainFormatter("%(message)s"))
    handler.addFilter(_RankZeroFilter())
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


LOGGER = _build_logger()


def _use_colour() -> bool:
    return "NO_COLOR" not in os.environ and sys.stdout.isatty()


def colorstr(*parts: str) -> str:
    """Colour a string for the terminal with rich styles: colorstr('bold', 'red', 'text'); one argument means bold blue.

    Plain text when stdout is not a terminal or NO_COLOR is set, so logs and CI output stay clean.
    """
    *styles, text = parts
    if not _use_colour():
        return text
    return Style.parse(" ".join(styles) or "bold blue").render(text, color_system=ColorSystem.STANDARD)


TORCH_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError)


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load` a file on the CPU with weights_only=True (no code can run); any problem is one CheckpointError line
    naming `what` the file was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' not found; pass an existing .pt/.pth file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol note; a failure says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_READ_ERRORS as e:
        if isinstance(e, pickle.UnpicklingError) and "global" in str(e).lower():  # names a class or function
            raise CheckpointError(
                f"{what} '{path}' holds Python objects, not only tensors, and was refused (loading it could run "
                "code); use a .pt written by crosskd, or turn foreign weights into one with crosskd convert"
            ) from None
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {what} '{path}' (corrupt, or not a file of tensors: {reason}); "
                              "use a complete copy (re-download or re-export it)") from None


def temp_path(path: Path) -> Path:
    """The hidden temporary name of an atomic write of `path`: `.NAME.PID.RANDOM.tmp` in the same directory."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that atomic writes of processes no longer running left in `folder` (killed mid-save).

    Returns the removed paths. A file of a live process (or one whose pid now belongs to another process) stays.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp", path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same directory, then os.replace: readers never see half a file.

    The file gets the permissions of any other run file (0o666 minus the umask), not mkstemp's 0o600. A failed write
    (full disk, read-only folder) raises its OSError, removes the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = temp_path(path)
    handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            writer = WriteErrorRecorder(tmp_file)
            try:
                torch.save(obj, writer)
            except RuntimeError:  # torch reports a failed write as "unexpected pos"; raise the write's own error
                if writer.error is None:
                    raise
                raise writer.error from None
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    return path


class WriteErrorRecorder:
    """A binary file for torch.save that keeps the OSError of a failed write (e.g. ENOSPC), which torch's zip writer
    would otherwise turn into a RuntimeError without the cause."""

    def __init__(self, file: Any):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally make CUDA kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def parse_device_list(device: str | int | list[int] | tuple[int, ...] | None) -> list[int]:
    """CUDA indices named by a device setting: '0,1' -> [0, 1], 'cuda:1' -> [1]; [] for cpu, mps, cuda or auto."""
    if device is None:
        return []
    if isinstance(device, int) and not isinstance(device, bool):
        return [device]
    if isinstance(device, list | tuple):
        return [index for item in device for index in parse_device_list(item)]
    text = str(device).strip().lower().replace(" ", "").removeprefix("cuda:")
    if text in ("", "cpu", "mps", "cuda"):
        return []
    indices = [item for item in text.strip("[]()").split(",") if item]
    if not all(item.isdigit() for item in indices):
        raise UserError(f"device={device} is not valid; use cpu, a CUDA index like 0, or a list like 0,1")
    return [int(item) for item in indices]


def select_device(device: str | int | list[int] | tuple[int, ...] | None = None) -> torch.device:
    """The torch.device to run on: cpu, mps, the first listed GPU (this process's GPU under torchrun) or auto."""
    text = "" if device is None else str(device).strip().lower()
    if text in ("cpu", "mps"):
        if text == "mps" and not torch.backends.mps.is_available():
            raise UserError("device=mps asks for Apple MPS but it is not available; use device=cpu")
        return torch.device(text)
    if text == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda asks for CUDA but torch.cuda.is_available() is False; use device=cpu")
    indices = parse_device_list(device)
    if not indices:
        return _auto_device()
    if not torch.cuda.is_available():
        raise UserError(f"device={device} asks for CUDA but torch.cuda.is_available() is False; use device=cpu")
    visible = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= len(indices):
        raise UserError(f"device={device} lists {len(indices)} GPU(s) but this is local rank {local_rank}; "
                        f"list one GPU per process, e.g. device=0,1")
    index = indices[local_rank]
    if index >= visible:
        raise UserError(f"device={device} asks for GPU {index} but only {visible} CUDA device(s) are visible")
    return torch.device("cuda", index)


def _auto_device() -> torch.device:
    """CUDA (this process's local rank) when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
