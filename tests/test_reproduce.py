"""benchmarks/reproduce.py: the experiment plan, and its smoke mode end to end (results, summary, resume)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from crosskd.config import get_args

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    """The harness script imported as a module."""
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def test_plan_shares_equal_settings_and_trains_teachers_once(reproduce):
    rows = reproduce.experiment_rows(stacked_convs=2)
    runs = reproduce.plan_runs(rows, seeds=(0, 1, 2))
    keys = [(run.key, run.seed) for run in runs]
    assert len(keys) == len(set(keys))
    assert keys[:2] == [("teacher", 0), ("atss_teacher", 0)]  # teachers first, seed 0 only
    assert not any(key in ("teacher", "atss_teacher") and seed > 0 for key, seed in keys)
    crosskd = reproduce.run_key(reproduce.CROSSKD)
    default_idx = next(row for row in rows if row.table == "1" and row.label == "kd_idx=1")
    assert reproduce.run_key(default_idx.settings) == crosskd  # Table 1's default hold point is the CrossKD run
    assert default_idx.paper_label == "kd_idx=3"  # 1 of 2 convs uses one teacher conv, like the paper's 3 of 4
    students = {key for key, seed in keys if seed == 0} - {"teacher", "atss_teacher"}
    assert len(students) * 3 == len(keys) - 2


def test_every_row_is_valid_crosskd_settings(reproduce, tmp_path):
    scale = reproduce.SCALES["cpu"]
    for run in reproduce.plan_runs(reproduce.experiment_rows(scale.stacked_convs), seeds=(1,)):
        mode, settings = reproduce.run_settings(run, scale, tmp_path)
        args = get_args(settings, mode)  # a misspelt key or value raises ConfigError
        assert args.seed == run.seed and args.model == scale.models[run.settings["model"]]
        assert all(getattr(args, k) == v for k, v in run.settings.items() if k not in ("model", "teacher"))


def test_select_rows_by_table_or_label(reproduce):
    rows = reproduce.experiment_rows(stacked_convs=4)
    assert {row.table for row in reproduce.select_rows(rows, ["T12"])} == {"12"}
    assert {row.label for row in reproduce.select_rows(rows, ["9"])} == {
        "student", "BCE pos", "BCE neg", "BCE all", "QFL pos", "QFL neg", "QFL all"}
    assert {row.table for row in reproduce.select_rows(rows, ["crosskd+pm"])} == {"4"}
    assert [row.label for row in reproduce.select_rows(rows, ["1"]) if row.label.startswith("kd_idx")] == [
        f"kd_idx={i}" for i in range(5)]


def test_coco_scale_prints_the_paper_setting(reproduce, tmp_path, capsys):
    assert reproduce.main(["--scale", "coco", "--rows", "5", "--seeds", "0", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("crosskd train ") and "model=gfl_r101.yaml" in lines[0] and "epochs=24" in lines[0]
    distill = [line for line in lines if line.startswith("crosskd distill ")]
    assert len(distill) == 5 and all("model=gfl_r50.yaml" in line and "imgsz=1333" in line for line in distill)
    assert not (tmp_path / "metrics").exists()  # printed, not run


def test_smoke_end_to_end_then_resume_skips_finished(reproduce, tmp_path, capsys):
    out = tmp_path / "reproduce"
    assert reproduce.main(["--smoke", "--out", str(out), "--jobs", "1"]) == 0
    metrics = sorted(p.name for p in (out / "metrics").glob("*.json"))
    assert metrics == ["student-from-teacher-kd=crosskd-seed0.json", "teacher-seed0.json"]
    student = json.loads((out / "metrics" / metrics[0]).read_text())
    assert student["mode"] == "distill" and student["settings"]["kd"] == "crosskd"
    assert student["settings"]["teacher"].endswith("teacher/seed0/weights/best.pt")
    assert [e["epoch"] for e in student["epochs"]] == [1, 2]
    assert set(student["final"]) == {"epoch", "AP", "AP50", "AP75"}
    summary = (out / "summary.md").read_text()
    assert "Main comparison" in summary and "| CrossKD | 1 |" in summary and "43.7" in summary  # ours beside paper
    assert (out / "ap_per_epoch.png").stat().st_size > 0

    (out / "metrics" / metrics[0]).unlink()  # a training that finished but lost its JSON is collected, not retrained
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("results.csv")}
    capsys.readouterr()
    assert reproduce.main(["--smoke", "--out", str(out), "--jobs", "1"]) == 0
    log = capsys.readouterr().out
    assert "1 of 2 trainings finished earlier, 1 to run" in log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "metrics" / metrics[0]).read_text())["final"] == student["final"]
    assert reproduce.main(["--smoke", "--out", str(out), "--jobs", "1"]) == 0
    assert "2 of 2 trainings finished earlier, 0 to run" in capsys.readouterr().out
