"""Unwritable run folders and output files: one ConfigError line naming the path and the fix (paths.py)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from crosskd.errors import ConfigError
from crosskd.paths import make_save_dir, writable_dir, writable_file


def test_run_folder_under_a_file_names_the_file_and_the_setting(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    args = SimpleNamespace(project=str(tmp_path / "a_file" / "runs"), name="exp", exist_ok=False)
    with pytest.raises(ConfigError) as error:
        make_save_dir(args, "train")
    message = str(error.value)
    assert message == (f"cannot create or write the folder {tmp_path}/a_file/runs/exp: Not a directory "
                       f"({tmp_path}/a_file is a file, not a folder); pass project= (and name=) a folder you can "
                       "write to")
    assert [path.name for path in tmp_path.iterdir()] == ["a_file"]


def test_writable_dir_creates_the_folder_and_leaves_no_probe_file(tmp_path: Path) -> None:
    folder = writable_dir(tmp_path / "a" / "b", "fix")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_writable_file_refuses_a_folder_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(ConfigError, match=r"model.onnx: a folder of that name is in the way; move it"):
        writable_file(tmp_path / "model.onnx", "move it")
    assert writable_file(tmp_path / "sub" / "model.onnx", "fix") == tmp_path / "sub" / "model.onnx"
