"""`crosskd settings` (a user settings file, as `yolo settings`) and `crosskd MODE --help`."""

from pathlib import Path

import pytest
import yaml

from crosskd.cli import main
from crosskd.data import load_data_yaml
from crosskd.errors import ConfigError
from crosskd.paths import default_datasets_dir, runs_dir
from crosskd.user_settings import DEFAULTS, load_user_settings, settings_file, update_user_settings


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("CROSSKD_CONFIG_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    return folder


def test_defaults_without_a_file_and_reading_never_writes(config_dir):
    assert load_user_settings() == DEFAULTS
    assert runs_dir() == Path.cwd() / "runs" and default_datasets_dir() == Path("datasets")
    assert not config_dir.exists()


def test_settings_key_value_writes_the_file_and_reset_restores(config_dir, capsys, tmp_path):
    main(["settings", f"runs_dir={tmp_path / 'my_runs'}", "tensorboard=true"])
    stored = yaml.safe_load((config_dir / "settings.yaml").read_text())
    assert stored["runs_dir"] == str(tmp_path / "my_runs") and stored["tensorboard"] is True
    assert f"runs_dir: {tmp_path / 'my_runs'}" in capsys.readouterr().out
    assert runs_dir() == tmp_path / "my_runs"
    main(["settings", "reset"])
    assert yaml.safe_load(settings_file().read_text()) == DEFAULTS


def test_bad_key_or_value_is_one_line_and_exit_2(capsys):
    for words, message in ((["settings", "tensorbord=true"], "did you mean tensorboard"),
                           (["settings", "tensorboard=maybe"], "must be true or false"),
                           (["settings", "runs_dir"], "is not key=value")):
        with pytest.raises(SystemExit) as exit_info:
            main(words)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_file_names_the_fix(config_dir):
    config_dir.mkdir()
    (config_dir / "settings.yaml").write_text("runs_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="crosskd settings reset"):
        load_user_settings()


def test_datasets_dir_setting_is_the_default_for_relative_dataset_paths(tmp_path):
    update_user_settings({"datasets_dir": str(tmp_path / "store")})
    for root in (tmp_path / "store/shapes", tmp_path / "other/shapes"):
        (root / "images/val").mkdir(parents=True)
        (root / "labels/val").mkdir(parents=True)
    (tmp_path / "shapes.yaml").write_text("path: shapes\ntrain: images/val\nval: images/val\nnames: [a]\n")
    assert load_data_yaml(tmp_path / "shapes.yaml").path == tmp_path / "store/shapes"
    assert load_data_yaml(tmp_path / "shapes.yaml", tmp_path / "other").path == tmp_path / "other/shapes"


def test_mode_help_lists_that_modes_keys_with_defaults(capsys):
    main(["export", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("crosskd export") and "opset=" in out and "format=onnx" in out and "lr0=" not in out
    main(["distill", "help"])
    out = capsys.readouterr().out
    assert "kd=crosskd" in out and "# distillation method" in out and "optimizer=auto" in out
    main(["help"])
    assert "crosskd settings" in capsys.readouterr().out
