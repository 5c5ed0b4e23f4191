"""benchmarks/speed.py --quick end to end (the CI smoke run): every section measured, finite numbers, JSON written."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
NUMBERS = {  # per section: the keys that must hold a finite number in every row
    "a": ("ours_ms", "torchvision_ms", "ratio"),
    "b": ("distill_ms", "floor_ms", "time_ratio", "distill_peak_mb", "floor_peak_mb"),
    "c": ("runtime_ms", "eager_ms", "speedup"),
    "d": ("loader_first_pass_ips", "loader_ips", "train_ips", "ratio"),
    "e": ("val_ips", "predict_ips", "ratio"),
    "compile": ("eager_ms", "compiled_ms", "speedup", "first_call_s"),
}


def load_speed():
    sys.path.insert(0, str(SPEED.parent))  # as when run as a script: speed.py imports its sibling step_cost
    spec = importlib.util.spec_from_file_location("speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_section_with_finite_numbers(tmp_path):
    speed = load_speed()
    returned = speed.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "cpu_quick.json").read_text())
    assert written["sections"] == returned["cpu"]["sections"]
    assert set(written["sections"]) == set(speed.SECTIONS) == set(NUMBERS)
    assert written["meta"]["quick"] and written["meta"]["device"] == "cpu"
    for section, keys in NUMBERS.items():
        rows = written["sections"][section]
        assert rows, section
        for row in rows:
            assert "skipped" not in row, (section, row)
            for key in keys:
                assert isinstance(row[key], int | float) and math.isfinite(row[key]) and row[key] > 0, (section, key)
    assert {row["what"] for row in written["sections"]["a"]} == {"train step", "inference"}
    assert [row["kd"] for row in written["sections"]["b"]] == ["crosskd", "crosskd+pkd"]
    assert written["sections"]["compile"][0]["status"] == "eager"  # the quick run traces with the eager backend
