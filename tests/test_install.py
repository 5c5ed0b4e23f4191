"""Lean install: the demo extra holds the demo-data libraries; `import crosskd`, the CLI's start and `crosskd help`
import no heavy optional module; asking for the digits data without the demo extra is one line with the fix."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from crosskd.data import digits
from crosskd.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "sklearn", "skimage", "scipy", "typer", "faster_coco_eval", "tensorboard", "openvino", "nncf")
PROBE = "import sys; {code}; print('HEAVY:' + ','.join(m for m in {heavy} if m in sys.modules))"


def loaded_heavy_modules(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has imported after running `code`."""
    probe = PROBE.format(code=code, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    line = next(line for line in out.splitlines() if line.startswith("HEAVY:"))
    return [name for name in line.removeprefix("HEAVY:").split(",") if name]


@pytest.mark.parametrize("code", [
    "import crosskd",
    "import crosskd.cli, crosskd.data, crosskd.engine.prediction.predictor, crosskd.engine.evaluation.validator, "
    "crosskd.engine.deployment.exporter, crosskd.engine.tools.export",
    "from crosskd.cli import main; main(['help'])",
    "from crosskd.cli import main; main(['train', '--help'])",
])
def test_start_imports_no_heavy_optional_module(code):
    assert loaded_heavy_modules(code) == []


def test_python_m_crosskd_help_runs():
    done = subprocess.run([sys.executable, "-m", "crosskd", "help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "crosskd settings" in done.stdout


def test_dependencies_keep_demo_and_unused_libraries_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert not names & {"scikit-learn", "scikit-image", "scipy", "typer", "onnxscript"}
    extras = project["optional-dependencies"]
    assert {"scikit-learn>=1.3", "scikit-image>=0.22"} <= set(extras["demo"])
    assert "crosskd[all]" in extras["dev"] and "demo" in extras["all"][0]
    assert extras["compare"] == ["ultralytics>=8.3"] and "ultralytics" not in names  # AGPL: benchmarks only
    assert "compare" not in extras["all"][0] and not any("ultralytics" in dep for dep in extras["dev"])


def test_digits_without_the_demo_extra_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if scikit-learn were absent
    with pytest.raises(DataError, match=r"pip install 'crosskd\[demo\]'") as error:
        digits.generate_digits(tmp_path / "digits", num_train=2, num_val=1)
    assert "\n" not in str(error.value) and not (tmp_path / "digits" / "images").exists()
