"""The crosskd command: shell words to overrides, special commands, dispatch, user errors as one red line (exit 2)."""

import ast
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from crosskd import __version__, cli
from crosskd.cli import parse_cli_args, smart_value
from crosskd.errors import ConfigError
from crosskd.paths import DEFAULT_CFG_PATH
from crosskd.settings import MODES

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv: list[str]) -> int:
    """crosskd.cli.main in-process; the exit code (0 when it returns)."""
    try:
        cli.main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def assert_user_error(capsys, argv: list[str], *fragments: str) -> str:
    """The command fails with exit 2 and exactly one 'ERROR: ...' line on stderr containing every fragment."""
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def fake_engine(monkeypatch):
    """Route every mode to an in-memory module whose run() records the Args it gets."""
    calls = []
    module = types.ModuleType("fake_crosskd_engine")
    module.run = calls.append
    monkeypatch.setitem(sys.modules, "fake_crosskd_engine", module)
    for mode in cli.MODE_TARGETS:
        monkeypatch.setitem(cli.MODE_TARGETS, mode, ("fake_crosskd_engine", "run"))
    return types.SimpleNamespace(module=module, calls=calls)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", None), ("None", None), ("TRUE", True), ("false", False), ("3", 3), ("0.01", 0.01), ("1e2", 100.0),
        ("[0,1]", [0, 1]), ("640,480", (640, 480)), ("'text'", "text"), ("gfl_r18.yaml", "gfl_r18.yaml"),
        ("cuda:0", "cuda:0"), ("crosskd+pkd", "crosskd+pkd"), ("", None),
    ],
)
def test_smart_value(text, expected):
    value = smart_value(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "tokens",
    [["epochs=3"], ["epochs", "=", "3"], ["epochs=", "3"], ["epochs", "=3"]],
)
def test_spaces_around_equals_are_rejoined(tokens):
    assert parse_cli_args(tokens) == {"epochs": 3}


def test_bracket_values_split_across_words_are_glued():
    assert parse_cli_args(["imgsz=[640,", "480]", "classes", "=", "[0,", "2]"]) == {"imgsz": [640, 480],
                                                                                   "classes": [0, 2]}


@pytest.mark.parametrize("tokens", [["imgsz=[640,", "480"], ["imgsz=640]"]])
def test_unmatched_bracket_is_an_error(tokens):
    with pytest.raises(ConfigError, match="unmatched"):
        parse_cli_args(tokens)


def test_dashed_key_is_accepted_with_a_warning(capsys):
    assert parse_cli_args(["--epochs=5", "--amp"]) == {"epochs": 5, "amp": True}
    out = capsys.readouterr().out
    assert "WARNING: '--epochs=5' does not need leading dashes; using 'epochs=5'" in out


def test_trailing_comma_is_stripped_with_a_warning(capsys):
    assert parse_cli_args(["classes=0,"]) == {"classes": 0}
    assert "trailing comma" in capsys.readouterr().out


def test_bare_bool_key_means_true():
    assert parse_cli_args(["amp", "exist_ok", "dynamic"]) == {"amp": True, "exist_ok": True, "dynamic": True}


def test_bare_non_bool_key_is_an_error():
    with pytest.raises(ConfigError) as error:
        parse_cli_args(["epochs"])
    assert str(error.value) == "'epochs' is a valid crosskd argument but is missing '=' — try 'epochs=12'"


def test_unknown_key_is_one_line_with_close_matches_and_defaults():
    with pytest.raises(ConfigError) as error:
        parse_cli_args(["epoch=3"])
    message = str(error.value)
    assert message.startswith("'epoch' is not a valid crosskd argument. Similar arguments: epochs=12")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"Similar arguments: lrf=0\.01, lr0=$"):
        parse_cli_args(["lr=0.1"])
    with pytest.raises(ConfigError, match="Run 'crosskd cfg' to list all arguments"):
        parse_cli_args(["zzzzzz=1"])


def test_unknown_bare_key_is_reported_as_unknown():
    with pytest.raises(ConfigError, match="'epoch' is not a valid crosskd argument"):
        parse_cli_args(["epoch"])


def test_name_and_project_stay_strings_and_empty_values_are_none():
    assert parse_cli_args(["name=123", "project=1e2", "kd_idx=", "conf=none"]) == {
        "name": "123", "project": "1e2", "kd_idx": None, "conf": None,
    }


def test_version_prints_the_bare_version(capsys):
    assert run_main(["version"]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"


@pytest.mark.parametrize("argv", [[], ["help"], ["-h"], ["--help"]])  # `crosskd train help`: test_user_settings
def test_help_shows_usage_and_examples(capsys, argv):
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "Usage: crosskd MODE key=value ..." in out
    assert "crosskd distill teacher=gfl_r101.pt student=gfl_r50.yaml data=coco.yaml" in out
    assert "copy-cfg" in out


def test_cfg_prints_default_yaml_with_comments(capsys):
    assert run_main(["cfg"]) == 0
    assert capsys.readouterr().out == DEFAULT_CFG_PATH.read_text()


def test_copy_cfg_writes_default_copy_and_refuses_to_overwrite(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["copy-cfg"]) == 0
    target = tmp_path / "default_copy.yaml"
    assert target.read_text() == DEFAULT_CFG_PATH.read_text()
    assert f"crosskd train cfg={target} imgsz=320 batch=8" in capsys.readouterr().out
    target.write_text("epochs: 3\n")
    assert_user_error(capsys, ["copy-cfg"], "already exists")
    assert target.read_text() == "epochs: 3\n"


def test_checks_reports_the_environment(capsys):
    assert run_main(["checks"]) == 0
    out = capsys.readouterr().out
    for fragment in (torch.__version__, "torchvision", "CUDA available", "onnxruntime", "CPU count", "RAM"):
        assert fragment in out


def test_special_commands_take_no_arguments(capsys):
    assert_user_error(capsys, ["cfg", "train"], "'cfg' takes no arguments", "cfg=my.yaml")


def test_train_dispatches_validated_args(fake_engine):
    argv = ["train", "model", "=", "gfl_r18.yaml", "epochs=3", "imgsz=[320,", "256]", "--amp=false", "dis=2"]
    assert run_main(argv) == 0
    (args,) = fake_engine.calls
    assert (args.mode, args.model, args.epochs, args.imgsz, args.amp, args.kd_weight) == (
        "train", "gfl_r18.yaml", 3, [320, 256], False, 2.0)


def test_mode_word_may_stand_anywhere_and_distill_takes_aliases(fake_engine):
    assert run_main(["distill_model=t.pt", "student=s.yaml", "distill", "kd=pkd"]) == 0
    (args,) = fake_engine.calls
    assert (args.mode, args.teacher, args.model, args.kd) == ("distill", "t.pt", "s.yaml", "pkd")


def test_mode_key_stands_in_for_the_mode_word_and_no_mode_means_train(fake_engine, capsys):
    assert run_main(["mode=val", "model=best.pt"]) == 0
    assert run_main(["model=gfl_r18.yaml"]) == 0
    assert [args.mode for args in fake_engine.calls] == ["val", "train"]
    assert "WARNING: no mode given" in capsys.readouterr().out


def test_cfg_file_then_command_line(fake_engine, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("epochs: 3\nbatch: 4\n")
    assert run_main(["train", "model=m.yaml", f"cfg={cfg}", "batch=2"]) == 0
    (args,) = fake_engine.calls
    assert (args.epochs, args.batch) == (3, 2)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "epoch=3"], ["'epoch' is not a valid crosskd argument. Similar arguments: epochs=12"]),
        (["train", "epochs=abc"], ["'epochs=abc' is invalid: 'epochs' must be an int, e.g. epochs=12"]),
        (["train", "epochs"], ["missing '=' — try 'epochs=12'"]),
        (["train", "lr0=2"], ["'lr0=2' is out of range: 'lr0' must be between 0 and 1"]),
        (["trian", "model=m.yaml"], ["'trian' is not a valid crosskd mode. Similar: train"]),
        (["train", "val"], ["more than one mode given (train, val)"]),
        (["train", "mode=val"], ["mode word 'train' and mode=val disagree"]),
        (["train"], ["'train' needs model="]),
        (["predict", "model=best.pt"], ["'predict' needs source="]),
        (["train", "imgsz=[640,"], ["unmatched '['"]),
    ],
)
def test_user_errors_are_one_red_line_with_exit_2(capsys, fake_engine, argv, fragments):
    assert_user_error(capsys, argv, *fragments)
    assert fake_engine.calls == []


def test_a_mode_whose_engine_is_missing_is_not_built_yet(capsys, monkeypatch):
    monkeypatch.setitem(cli.MODE_TARGETS, "val", ("crosskd.engine.no_such_engine", "run"))
    assert_user_error(capsys, ["val", "model=best.pt"],
                      "'val' is not built yet (crosskd.engine.no_such_engine is missing)")
    monkeypatch.setitem(cli.MODE_TARGETS, "val", ("crosskd.errors", "run"))
    assert_user_error(capsys, ["val", "model=best.pt"], "'val' is not built yet (crosskd.errors has no run())")


def test_missing_third_party_modules_are_bugs_with_tracebacks(monkeypatch):
    monkeypatch.setitem(cli.MODE_TARGETS, "val", ("zz_not_installed_anywhere", "run"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["val", "model=best.pt"])


def test_engine_bugs_propagate(fake_engine):
    def broken(args):
        raise RuntimeError("a bug")

    fake_engine.module.run = broken
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "model=m.yaml"])


def test_keyboard_interrupt_is_one_line_exit_2(capsys, fake_engine):
    def interrupted(args):
        raise KeyboardInterrupt

    fake_engine.module.run = interrupted
    assert_user_error(capsys, ["train", "model=m.yaml"], "interrupted by the user")


def test_engine_user_errors_are_caught_too(capsys, fake_engine):
    from crosskd.errors import CheckpointError

    def missing(args):
        raise CheckpointError(f"'{args.model}' not found; pass model=path/to/best.pt")

    fake_engine.module.run = missing
    assert_user_error(capsys, ["val", "model=[x].pt"], "ERROR: '[x].pt' not found")


def test_every_mode_has_an_engine_entry():
    assert set(cli.MODE_TARGETS) == set(MODES) >= {"train", "distill", "val", "predict", "export", "info", "convert"}
    for module, function in cli.MODE_TARGETS.values():
        assert callable(getattr(importlib.import_module(module), function))


def run_module(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "crosskd", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_python_m_crosskd_reports_bad_input_without_traceback(tmp_path):
    result = run_module("train", "epoch=3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "ERROR: 'epoch' is not a valid crosskd argument. Similar arguments: epochs=12"
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_python_m_crosskd_version(tmp_path):
    result = run_module("version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"{__version__}\n")


def test_starting_the_cli_imports_no_engine_models_or_distill():
    """The kd= choices and every other setting come from the spec, so parsing a command line stays light."""
    code = "import sys, crosskd.cli; print(sorted(m for m in sys.modules if m.startswith('crosskd.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = ast.literal_eval(result.stdout)
    assert {"crosskd.settings", "crosskd.config"} <= set(loaded)
    tables = {"crosskd.engine", "crosskd.engine.deployment", "crosskd.engine.deployment.formats"}  # plain data
    heavy = [name for name in loaded if name.split(".")[1] in ("engine", "models", "distill", "data")]
    assert set(heavy) <= tables, loaded
