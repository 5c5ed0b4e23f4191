"""Paths: shipped YAML lookup, run directories and the newest files under runs/."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from crosskd.errors import CheckpointError, ConfigError, DataError
from crosskd.paths import (
    CFG_DIR,
    DEFAULT_CFG_PATH,
    increment_path,
    make_save_dir,
    newest_best,
    newest_file,
    resolve_cfg_file,
    runs_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_cfg_dir_is_the_top_level_cfg():
    assert DEFAULT_CFG_PATH == CFG_DIR / "default.yaml"
    assert DEFAULT_CFG_PATH.read_text() == (ROOT / "cfg" / "default.yaml").read_text()


def test_resolve_cfg_file_finds_shipped_names_and_paths(tmp_path):
    assert resolve_cfg_file("gfl_r18.yaml", "models") == CFG_DIR / "models" / "gfl_r18.yaml"
    assert resolve_cfg_file("digits", "datasets") == CFG_DIR / "datasets" / "digits.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("nc: 1\n")
    assert resolve_cfg_file(own, "models") == own
    with pytest.raises(ConfigError, match=r"'nope.yaml' is neither a file nor a YAML in .*models \(shipped: .*gfl_r18"):
        resolve_cfg_file("nope.yaml", "models")
    with pytest.raises(DataError, match="shipped: .*digits.yaml"):
        resolve_cfg_file("nope.yaml", "datasets")
    with pytest.raises(ValueError, match="kind must be 'models' or 'datasets'"):
        resolve_cfg_file("gfl_r18.yaml", "weights")


def test_runs_dir_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runs_dir() == tmp_path / "runs"


def test_increment_path_numbers_like_ultralytics_8_3(tmp_path):
    run = tmp_path / "runs" / "train"
    assert increment_path(run) == run
    run.mkdir(parents=True)
    assert increment_path(run) == tmp_path / "runs" / "train2"
    assert increment_path(run, exist_ok=True) == run
    (tmp_path / "runs" / "train2").mkdir()
    made = increment_path(run, mkdir=True)
    assert made == tmp_path / "runs" / "train3" and made.is_dir()


def test_increment_path_keeps_file_suffixes(tmp_path):
    (tmp_path / "results.csv").write_text("a")
    assert increment_path(tmp_path / "results.csv") == tmp_path / "results2.csv"


def run_args(project: str | None, name: str | None = None, exist_ok: bool = False) -> SimpleNamespace:
    return SimpleNamespace(project=project, name=name, exist_ok=exist_ok)


def test_save_dir_increments_unless_exist_ok(tmp_path):
    args = run_args(str(tmp_path), "exp")
    first, second = make_save_dir(args, "val"), make_save_dir(args, "val")
    assert (first.name, second.name) == ("exp", "exp2") and second.is_dir()
    assert make_save_dir(run_args(str(tmp_path), "exp", exist_ok=True), "val") == first
    assert make_save_dir(run_args(str(tmp_path)), "train") == tmp_path / "train"


def test_save_dir_defaults_to_runs_mode_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make_save_dir(run_args(None), "predict") == tmp_path / "runs" / "predict" / "predict"
    assert make_save_dir(run_args("coco", "exp"), "train") == tmp_path / "runs" / "coco" / "exp"


def test_newest_file_finds_the_latest_match(tmp_path):
    assert newest_file(tmp_path, "last.pt") is None
    old, new = tmp_path / "train" / "weights" / "last.pt", tmp_path / "train2" / "weights" / "last.pt"
    for path, mtime in ((old, 1_000_000), (new, 2_000_000)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    (tmp_path / "train3").mkdir()
    (tmp_path / "train3" / "best.pt").write_bytes(b"x")
    assert newest_file(tmp_path, "last.pt") == new
    os.utime(old, (3_000_000, 3_000_000))
    assert newest_file(tmp_path, "last.pt") == old


def test_newest_best_logs_its_choice_or_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no model= given and no best.pt under .*runs; pass model="):
        newest_best("validating")
    best = tmp_path / "runs" / "train" / "exp" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"x")
    assert newest_best("validating") == best
    assert f"No model= given: validating the newest best.pt, {best}" in capsys.readouterr().out

