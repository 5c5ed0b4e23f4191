"""Run settings: the spec and its generated files, cfg= precedence, aliases, type/range/choice checks -> Args."""

import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from crosskd import settings
from crosskd.cli import parse_cli_args
from crosskd.config import COERCE, Args, check_required, check_value, get_args, imgsz_hw, load_defaults
from crosskd.distill.registry import kd_names
from crosskd.errors import ConfigError
from crosskd.paths import DEFAULT_CFG_PATH
from crosskd.settings import (
    ALIASES,
    KD_METHOD_NAMES,
    KIND_NAMES,
    SETTINGS,
    Kind,
    Setting,
    format_value,
    render_cli_reference,
    render_default_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


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
    assert str(error.value) == ("'kd=fitnet' is invalid: 'kd' must be one of crosskd, pm, ld, pkd, sl2, "
                                  "crosskd+pkd, crosskd+pm, crosskd+ld, none")
    with pytest.raises(ConfigError, match="'optimizer' must be one of auto, SGD, AdamW"):
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


def test_check_required_names_the_missing_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    with pytest.raises(ConfigError) as error:
        check_required(get_args({}, mode="train"))
    assert str(error.value) == "'train' needs model=, e.g. crosskd train model=gfl_r18.yaml data=digits.yaml"
    with pytest.raises(ConfigError, match="'distill' needs teacher="):
        check_required(get_args({"model": "gfl_r18.yaml"}, mode="distill"))
    with pytest.raises(ConfigError, match="'predict' needs source="):
        check_required(get_args({"model": "best.pt"}, mode="predict"))
    check_required(get_args({"resume": True}, mode="train"))
    with pytest.raises(ConfigError, match=r"^'val' needs model= \(no best.pt under"):
        check_required(get_args({}, mode="val"))
    (tmp_path / "runs" / "train" / "weights").mkdir(parents=True)
    (tmp_path / "runs" / "train" / "weights" / "best.pt").touch()
    check_required(get_args({}, mode="val"))  # falls back on the newest best.pt
    check_required(get_args({"teacher": "t.pt", "student": "s.yaml"}, mode="distill"))


def test_package_data_globs_cover_every_shipped_yaml():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["crosskd"]
    shipped = {path.relative_to(ROOT / "crosskd") for path in (ROOT / "crosskd" / "cfg").rglob("*.yaml")}
    covered = {path for path in shipped if any(path.match(pattern) for pattern in globs)}
    assert shipped and covered == shipped
    assert pyproject["project"]["scripts"]["crosskd"] == "crosskd.cli:main"


def test_default_yaml_is_the_rendering_of_the_spec():
    assert DEFAULT_CFG_PATH.read_text() == render_default_yaml(), "run `python -m crosskd.settings` to regenerate"


def test_cli_reference_is_the_rendering_of_the_spec():
    assert (ROOT / "docs" / "cli.md").read_text() == render_cli_reference(), "run `python -m crosskd.settings`"


def test_default_yaml_loads_back_to_the_spec_defaults_with_their_types():
    loaded = yaml.safe_load(render_default_yaml())
    defaults = load_defaults()
    assert list(loaded) == list(SETTINGS) and loaded == defaults
    assert {key: type(value) for key, value in loaded.items()} == {key: type(value) for key, value in defaults.items()}


def test_generated_files_carry_every_key_help_choice_and_alias():
    text, reference = render_default_yaml(), render_cli_reference()
    assert "kd: crosskd  # distillation method: crosskd | pm | ld | pkd | sl2 | crosskd+pkd | crosskd+pm | " in text
    assert "kd_weight: 1.0  # global multiplier of every distillation loss (alias dis)" in text
    assert "lr_steps: [8, 11]  # step-decay epochs" in text
    assert "| `lr0` | empty | a number | between 0 and 1 |  | initial learning rate" in reference
    assert "| `teacher` | empty | a string |  | `distill_model` |" in reference
    assert all(f"| `{name}` |" in reference for name in SETTINGS)


def test_regenerating_writes_both_files(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "DEFAULT_CFG_PATH", tmp_path / "cfg" / "default.yaml")
    monkeypatch.setattr(settings, "CLI_REFERENCE_PATH", tmp_path / "docs" / "cli.md")
    (tmp_path / "cfg").mkdir()
    assert settings.write_generated_files() == [tmp_path / "cfg" / "default.yaml"]  # no docs/ outside a checkout
    (tmp_path / "docs").mkdir()
    assert len(settings.write_generated_files()) == 2
    assert (tmp_path / "cfg" / "default.yaml").read_text() == render_default_yaml()
    assert (tmp_path / "docs" / "cli.md").read_text() == render_cli_reference()


def test_the_spec_is_self_consistent():
    assert set(typing.get_args(Kind)) == set(KIND_NAMES) == set(COERCE)
    assert not set(ALIASES) & set(SETTINGS)
    for setting in SETTINGS.values():
        assert check_value(setting.name, load_defaults()[setting.name]) == load_defaults()[setting.name], setting.name
        assert not setting.choices or setting.kind == "str", setting.name
        assert "|" not in setting.help, f"{setting.name}: '|' would split its docs/cli.md table row"


def test_kd_choices_are_the_distillation_methods():
    """The spec reads the names from the one method registry (on use, so the CLI's start imports no distill)."""
    assert SETTINGS["kd"].choices is KD_METHOD_NAMES
    assert tuple(KD_METHOD_NAMES) == kd_names() == (
        "crosskd", "pm", "ld", "pkd", "sl2", "crosskd+pkd", "crosskd+pm", "crosskd+ld", "none")


def out_of_range_values(name: str) -> list:
    """Values just outside a numeric setting's range, in the setting's own kind."""
    setting = SETTINGS[name]
    step = 0.5 if setting.kind == "float" else 1
    numbers = [bound for bound in (setting.low - step if setting.low is not None else None,
                                   setting.high + step if setting.high is not None else None) if bound is not None]
    return [[number] if setting.kind in ("int_list", "classes") else number for number in numbers]


@pytest.mark.parametrize("name", [name for name, s in SETTINGS.items() if s.low is not None or s.high is not None])
def test_every_range_in_the_spec_is_enforced(name):
    for value in out_of_range_values(name):
        with pytest.raises(ConfigError, match=f"is out of range: '{name}' must be {SETTINGS[name].range_text()}"):
            check_value(name, value)


@pytest.mark.parametrize(("imgsz", "hw"), [(640, (640, 640)), ([320], (320, 320)), ([480, 640], (480, 640)),
                                           ((96, 128), (96, 128))])
def test_imgsz_hw_gives_height_and_width(imgsz, hw):
    assert imgsz_hw(imgsz) == hw


def test_range_text_words_each_kind_of_bound():
    def bounded(**bounds):
        return Setting("x", "float", 0.5, "help", **bounds).range_text()

    words = (bounded(low=0, high=1), bounded(low=1), bounded(high=9), bounded())
    assert words == ("between 0 and 1", ">= 1", "<= 9", "")
