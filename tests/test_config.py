"""Run settings: command-line parsing rules, cfg= precedence, aliases, type/range/choice checks, YAML lookup."""

import tomllib
from pathlib import Path

import pytest
import yaml

from crosskd.cli import parse_cli_args, smart_value
from crosskd.config import Args, check_required, get_args, load_defaults
from crosskd.errors import ConfigError
from crosskd.settings import format_value

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match=r"Similar arguments: .*lr0=0\.01"):
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


def test_defaults_come_back_typed():
    args = get_args()
    assert isinstance(args, Args)
    assert args.to_dict() == load_defaults()
    assert args.epochs == 12 and args.lr_steps == [8, 11] and args.kd == "crosskd"


def test_mode_argument_sets_mode():
    assert get_args({}, mode="distill").mode == "distill"
    with pytest.raises(ConfigError, match="'mode' must be one of train, distill"):
        get_args({}, mode="fit")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": "abc"}, "'epochs=abc' is invalid: 'epochs' must be an int, e.g. epochs=12"),
        ({"epochs": 2.5}, "'epochs=2.5' is invalid: 'epochs' must be an int, e.g. epochs=12"),
        ({"lr0": "fast"}, "'lr0=fast' is invalid: 'lr0' must be a number, e.g. lr0=0.01"),
        ({"amp": 1}, "'amp=1' is invalid: 'amp' must be a bool (true or false), e.g. amp=true"),
        ({"data": 5}, "'data=5' is invalid: 'data' must be a string, e.g. data=digits.yaml"),
        ({"kd_idx": "two"}, "'kd_idx=two' is invalid: 'kd_idx' must be an int, e.g. kd_idx=2"),
        ({"conf": "high"}, "'conf=high' is invalid: 'conf' must be a number, e.g. conf=0.25"),
        ({"imgsz": (640, 480, 3)}, "'imgsz=[640,480,3]' is invalid: 'imgsz' must be an int or an h,w pair"),
        ({"classes": "cat"}, "'classes=cat' is invalid: 'classes' must be a class id or a list of class ids"),
        ({"epochs": None}, "'epochs' cannot be empty: it must be an int, e.g. epochs=12"),
    ],
)
def test_wrong_types_name_key_type_and_example(overrides, message):
    with pytest.raises(ConfigError) as error:
        get_args(overrides)
    assert str(error.value).startswith(message)


def test_numbers_are_coerced_to_the_expected_type():
    args = get_args({"lr0": 0, "epochs": 1e2, "warmup_epochs": 1, "kd_idx": 2.0, "opset": 17})
    assert args.lr0 == 0.0 and isinstance(args.lr0, float)
    assert args.epochs == 100 and isinstance(args.epochs, int)
    assert args.warmup_epochs == 1.0 and isinstance(args.warmup_epochs, float)
    assert args.kd_idx == 2 and isinstance(args.kd_idx, int) and args.opset == 17


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr0": 1.5}, "'lr0=1.5' is out of range: 'lr0' must be between 0 and 1, e.g. lr0=0.01"),
        ({"conf": -0.1}, "'conf=-0.1' is out of range: 'conf' must be between 0 and 1, e.g. conf=0.25"),
        ({"fliplr": 2}, "'fliplr=2' is out of range: 'fliplr' must be between 0 and 1"),
        ({"ema_decay": 1.01}, "'ema_decay=1.01' is out of range"),
        ({"epochs": 0}, "'epochs=0' is out of range: 'epochs' must be >= 1, e.g. epochs=12"),
        ({"batch": 0}, "'batch=0' is out of range: 'batch' must be >= 1, e.g. batch=16"),
        ({"classes": [0, -1]}, "'classes=[0,-1]' is out of range: 'classes' must be >= 0"),
    ],
)
def test_ranges_are_checked(overrides, message):
    with pytest.raises(ConfigError) as error:
        get_args(overrides)
    assert str(error.value).startswith(message)


def test_fraction_bounds_are_inclusive():
    args = get_args({"lr0": 1, "fliplr": 0, "conf": 1.0})
    assert (args.lr0, args.fliplr, args.conf) == (1.0, 0.0, 1.0)


def test_choices_are_checked_and_canonicalised():
    args = get_args({"optimizer": "adamw", "format": "ONNX", "kd": None})
    assert (args.optimizer, args.format, args.kd) == ("AdamW", "onnx", "none")
    with pytest.raises(ConfigError) as error:
        get_args({"kd": "fitnet"})
    assert str(error.value) == "'kd=fitnet' is invalid: 'kd' must be one of crosskd, pm, ld, pkd, crosskd+pkd, none"
    with pytest.raises(ConfigError, match="'optimizer' must be one of SGD, AdamW"):
        get_args({"optimizer": "Adam"})


def test_structured_values_are_normalised():
    args = get_args({"imgsz": (640, 480), "device": (0, 1), "classes": 3, "lr_steps": (16, 22)})
    assert args.imgsz == [640, 480] and args.device == "0,1" and args.classes == [3] and args.lr_steps == [16, 22]
    assert get_args({"device": 0}).device == "0"
    assert get_args({"device": "cuda:1"}).device == "cuda:1"
    assert get_args({"imgsz": [320]}).imgsz == 320
    assert get_args({"source": 0}).source == 0
    assert get_args({"resume": "runs/train/weights/last.pt"}).resume == "runs/train/weights/last.pt"


def test_unknown_override_key_from_python_is_rejected():
    with pytest.raises(ConfigError, match="'epoch' is not a valid crosskd argument. Similar arguments: epochs=12"):
        get_args({"epoch": 3})


def test_aliases_map_to_crosskd_keys():
    args = get_args(parse_cli_args(["distill_model=teacher.pt", "dis=2"]))
    assert args.teacher == "teacher.pt" and args.kd_weight == 2.0
    assert not hasattr(args, "dis") and not hasattr(args, "distill_model")
    with pytest.raises(ConfigError, match="'dis' and 'kd_weight' name the same setting"):
        get_args({"dis": 1.0, "kd_weight": 2.0})


def test_model_and_student_name_the_same_network():
    assert get_args({"student": "gfl_r18.yaml"}).model == "gfl_r18.yaml"
    assert get_args({"model": "gfl_r18.yaml"}).student == "gfl_r18.yaml"
    with pytest.raises(ConfigError, match="model=a.yaml and student=b.yaml disagree"):
        get_args({"model": "a.yaml", "student": "b.yaml"})


def test_cfg_file_beats_defaults_and_command_line_beats_file(tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("epochs: 3\nlr0: 0.02\ndis: 4.0\n")
    from_file = get_args({"cfg": str(cfg)})
    assert (from_file.epochs, from_file.lr0, from_file.kd_weight, from_file.batch) == (3, 0.02, 4.0, 16)
    assert "Overriding default.yaml with" in capsys.readouterr().out
    both = get_args(parse_cli_args(["epochs=5", f"cfg={cfg}"]))
    assert (both.epochs, both.lr0) == (5, 0.02)


def test_cfg_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cfg file '.*missing.yaml' not found"):
        get_args({"cfg": str(tmp_path / "missing.yaml")})
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="'epoch' in bad.yaml is not a valid crosskd argument"):
        get_args({"cfg": str(bad_key)})
    bad_type = tmp_path / "type.yaml"
    bad_type.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="'epochs=many' is invalid"):
        get_args({"cfg": str(bad_type)})
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        get_args({"cfg": str(not_mapping)})


def test_every_default_survives_a_command_line_round_trip():
    """What a DDP relaunch relies on: format_value -> shell word -> parse_cli_args -> get_args is the identity."""
    args = get_args({"imgsz": [640, 480], "device": "0,1", "classes": [0, 2], "kd": "none", "name": "123"})
    tokens = [f"{key}={format_value(value)}" for key, value in args.to_dict().items()]
    assert get_args(parse_cli_args(tokens)).to_dict() == args.to_dict()


def test_to_dict_is_yaml_safe():
    args = get_args({"imgsz": (640, 480)})
    assert yaml.safe_load(yaml.safe_dump(args.to_dict())) == args.to_dict()


def test_check_required_names_the_missing_input():
    with pytest.raises(ConfigError) as error:
        check_required(get_args({}, mode="train"))
    assert str(error.value) == "'train' needs model=, e.g. crosskd train model=gfl_r18.yaml data=digits.yaml"
    with pytest.raises(ConfigError, match="'distill' needs teacher="):
        check_required(get_args({"model": "gfl_r18.yaml"}, mode="distill"))
    with pytest.raises(ConfigError, match="'predict' needs source="):
        check_required(get_args({"model": "best.pt"}, mode="predict"))
    check_required(get_args({"resume": True}, mode="train"))
    check_required(get_args({}, mode="val"))
    check_required(get_args({"teacher": "t.pt", "student": "s.yaml"}, mode="distill"))


def test_package_data_globs_cover_every_shipped_yaml():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["crosskd"]
    shipped = {path.relative_to(ROOT / "crosskd") for path in (ROOT / "crosskd" / "cfg").rglob("*.yaml")}
    covered = {path for path in shipped if any(path.match(pattern) for pattern in globs)}
    assert shipped and covered == shipped
    assert pyproject["project"]["scripts"]["crosskd"] == "crosskd.cli:main"
