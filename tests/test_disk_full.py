"""A checkpoint that cannot be written (full disk, read-only folder): the previous file stays, no temporary file is
left, and training stops with one line naming the folder, its free space and the space the checkpoint needs."""

import errno
import os
import re
import resource
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from crosskd import cli
from crosskd.engine.deployment import checkpoint
from crosskd.engine.deployment.checkpoint import format_bytes, free_bytes, save_checkpoint, serialized_size
from crosskd.errors import CheckpointError
from crosskd.utils import WriteErrorRecorder

OLD = {"weights": torch.zeros(100), "epoch": 0}
NEW = {"weights": torch.randn(20_000, generator=torch.Generator().manual_seed(0)), "epoch": 1}  # ~80 kB


def fail_writes_after(monkeypatch, limit: int, code: int = errno.ENOSPC) -> None:
    """Writes of atomic_save succeed for `limit` bytes, then fail like a full disk (part of the data written)."""
    real_write = WriteErrorRecorder.write

    def write(self, data):
        self.written = getattr(self, "written", 0) + memoryview(data).nbytes
        if self.written > limit:
            self.error = OSError(code, os.strerror(code))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(WriteErrorRecorder, "write", write)


def fixed_free_space(monkeypatch, free: int) -> list[Path]:
    """shutil.disk_usage reports `free` bytes (the real figure moves while other processes write); returns the list of
    folders it is asked about."""
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return SimpleNamespace(total=10 * free, used=9 * free, free=free)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
    return asked


def folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_serialized_size_is_the_file_size(tmp_path):
    path = save_checkpoint(NEW, tmp_path / "last.pt")
    assert serialized_size(NEW) == path.stat().st_size


def test_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(OLD, tmp_path / "weights" / "last.pt")
    before = path.read_bytes()
    fail_writes_after(monkeypatch, limit=4096)
    fixed_free_space(monkeypatch, 4096)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(NEW, path)
    folder = tmp_path / "weights"
    assert str(error.value) == (
        f"cannot write checkpoint {path}: No space left on device; {folder} has 4.1 kB free and the checkpoint needs "
        f"{format_bytes(serialized_size(NEW))}: make room there, or train with project= on another disk; the "
        f"previous last.pt is unchanged"
    )
    assert path.read_bytes() == before
    assert folder_files(folder) == ["last.pt"]  # the temporary file is gone


@pytest.mark.parametrize(("step", "code", "fix"), [
    ("os.fsync", errno.ENOSPC, "make room there"),  # the file system reports the full disk at the flush
    ("os.replace", errno.EROFS, "make the folder writable"),
    ("os.open", errno.EACCES, "make the folder writable"),
])
def test_any_os_error_of_the_save_is_one_line(tmp_path, monkeypatch, step, code, fix):
    path = save_checkpoint(OLD, tmp_path / "best.pt")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(step, fail)
    with pytest.raises(CheckpointError, match=re.escape(f"{os.strerror(code)}; {tmp_path} has ")) as error:
        save_checkpoint(NEW, path)
    assert fix in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).endswith("the previous best.pt is unchanged")
    assert path.read_bytes() == before
    assert folder_files(tmp_path) == ["best.pt"]


def test_a_real_write_failure_from_the_kernel(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 16 kB (EFBIG), as a full disk refuses them (ENOSPC): torch's
    zip writer would report it as 'unexpected pos'; the save reports the OSError and keeps the old file."""
    path = save_checkpoint(OLD, tmp_path / "last.pt")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))
    try:
        with pytest.raises(CheckpointError, match="File too large; .* needs 8"):
            save_checkpoint(NEW, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    assert folder_files(tmp_path) == ["last.pt"]


def test_free_space_of_a_folder_not_made_yet_is_its_parent_s(tmp_path, monkeypatch):
    asked = fixed_free_space(monkeypatch, 123)
    assert free_bytes(tmp_path / "runs" / "exp" / "weights") == 123 and asked == [tmp_path]
    assert [format_bytes(n) for n in (830, 12_345, 45_600_000, 1_500_000_000)] == ["830 B", "12.3 kB", "45.6 MB",
                                                                                 "1.5 GB"]


def test_training_stops_in_one_line_when_last_pt_cannot_be_written(tmp_path, write_digits_yaml, monkeypatch, capsys):
    data = write_digits_yaml(tmp_path, num_train=16, num_val=4)
    weights = tmp_path / "exp" / "weights"
    saved = {}
    real_atomic_save = checkpoint.atomic_save

    def atomic_save(ckpt, path):
        if ckpt["epoch"] >= 1:  # epoch 2's checkpoint: the disk is full by now
            fail_writes_after(monkeypatch, limit=65_536)
        real_atomic_save(ckpt, path)
        saved[Path(path).name] = Path(path).read_bytes()

    monkeypatch.setattr(checkpoint, "atomic_save", atomic_save)
    settings = {"model": "gfl_r18t.yaml", "data": data, "epochs": 3, "batch": 8, "imgsz": 64, "workers": 0,
                "device": "cpu", "project": tmp_path, "name": "exp", "val": False, "plots": False}
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", *(f"{k}={v}" for k, v in settings.items())])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    match = re.fullmatch(
        rf"ERROR: cannot write checkpoint {re.escape(str(weights / 'last.pt'))}: No space left on device; "
        rf"{re.escape(str(weights))} has [\d.]+ [kMG]?B free and the checkpoint needs ([\d.]+) MB: make room there, "
        r"or train with project= on another disk; the previous last.pt is unchanged\n",
        err,
    )
    assert match, err
    assert float(match.group(1)) == pytest.approx(len(saved["last.pt"]) / 1e6, rel=0.05)  # epoch 2's is as big
    assert (weights / "last.pt").read_bytes() == saved["last.pt"]  # epoch 1's, untouched
    assert torch.load(weights / "last.pt", weights_only=True)["epoch"] == 0
    assert folder_files(weights) == ["last.pt"]
