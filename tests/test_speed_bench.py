"""benchmarks/speed.py --quick end to end (the CI smoke run): every section measured, finite numbers, JSON written."""

import json
import math

from conftest import load_benchmark

NUMBERS = {  # per section: the keys that must hold a finite number in every row
    "a": ("ours_ms", "torchvision_ms", "ratio"),
    "b": ("distill_ms", "floor_ms", "time_ratio", "distill_peak_mb", "floor_peak_mb"),
    "c": ("runtime_ms", "eager_ms", "speedup"),
    "d": ("loader_first_pass_ips", "loader_ips", "train_ips", "ratio"),
    "e": ("val_ips", "predict_ips", "ratio"),
    "roi": ("ours_ms", "torchvision_ms", "ratio"),
    "compile": ("eager_ms", "compiled_ms", "speedup", "first_call_s"),
    "loader": ("crosskd_ips", "crosskd_build_s", "train_ips_demo", "train_ips_loader_size", "loader_over_train_demo"),
}


def load_speed():
    return load_benchmark("speed")  # speed.py imports its sibling step_cost, as when run as a script


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
    assert [row["cache"] for row in written["sections"]["loader"]] == ["none", "ram", "disk"]
