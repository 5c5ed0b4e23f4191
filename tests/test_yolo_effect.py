"""benchmarks/yolo_effect.py: its pieces on fabricated results, and at a toy size (8 images of 64 px, 1 epoch) a
crosskd and an Ultralytics training side by side through the peer, both evaluated by crosskd's validator, and the
train-step timing. Timings are the benchmark's business, not asserted."""

import json
import os

import pytest
from conftest import load_benchmark
from ultralytics_peer import ultralytics_python


@pytest.fixture
def bench():
    return load_benchmark("yolo_effect")


def test_epoch_seconds_from_cumulative_times_leave_out_the_validating_last_epoch(bench):
    assert bench.epoch_seconds([10.0, 21.0, 33.0, 50.0]) == [10.0, 11.0, 12.0]
    assert bench.epoch_seconds([10.0, 21.0, 9.0, 20.0]) == [10.0, 11.0, 9.0]  # Ultralytics resumed at epoch 3
    assert bench.epoch_seconds([10.0]) == []


def write_results(bench, out, aps):
    for (side, name), values in aps.items():
        for seed, ap in enumerate(values):
            record = {"side": side, "run": name, "seed": seed, "epochs": 2, "AP": ap, "own_AP": ap, "epoch_s": 1.0}
            (out / f"{side}-{name}-seed{seed}.json").write_text(json.dumps(record))


def test_targets_compare_means_with_seed_spreads(bench, tmp_path):
    aps = {("crosskd", "teacher"): [50, 50, 50], ("ultralytics", "teacher"): [50, 50, 50],
           ("crosskd", "student"): [30.5, 31.5, 32.5], ("ultralytics", "student"): [30, 31, 32],  # gap 0.5 ≤ 1
           ("crosskd", "sl2"): [33, 34, 35],  # CrossKD 5 ahead, needed > 2
           ("ultralytics", "distill_model"): [35, 36, 37],  # CrossKD 3 ahead, needed > 2 × 3
           ("crosskd", "crosskd"): [36, 39, 42]}  # spread 3
    write_results(bench, tmp_path, {**aps, ("crosskd", "crosskd"): [38, 39, 40]})  # spread 1
    lines = bench.targets(tmp_path)
    assert lines[1].endswith("Ultralytics' seed spread 1.00: met") and "+0.50 AP" in lines[1]
    assert lines[2].endswith("needed > 2.00 (twice the larger seed spread): met") and "+5.00" in lines[2]
    assert lines[3].endswith(": met") and "+3.00" in lines[3]
    write_results(bench, tmp_path, aps)  # a wider CrossKD spread (3) now needs a lead over 6
    assert [line.endswith("NOT met") for line in bench.targets(tmp_path)[2:]] == [True, True]
    for path in tmp_path.glob("crosskd-sl2-*.json"):
        path.unlink()
    assert bench.targets(tmp_path) == ["Targets: not all runs have finished."]


def test_commands_resume_from_last_pt_and_name_each_sides_teacher(bench, tmp_path):
    data = {"crosskd": tmp_path / "c.yaml", "ultralytics": tmp_path / "u.yaml"}
    sl2, distill = (next(r for r in bench.RUNS if r.name == name) for name in ("sl2", "distill_model"))
    ours = bench.command(tmp_path, data, sl2, 1, ["peer-python"])
    assert ours[2:4] == ["crosskd", "distill"] and "kd=sl2" in ours and "fliplr=0.0" in ours
    assert f"close_mosaic={bench.close_mosaic(bench.EPOCHS)}" in ours and bench.close_mosaic(40) == 4
    assert bench.close_mosaic(1) == 1
    assert f"teacher={tmp_path / 'crosskd' / 'teacher' / 'seed1' / 'weights' / 'best.pt'}" in ours
    theirs = bench.command(tmp_path, data, distill, 1, ["peer-python"])
    assert theirs[:3] == ["peer-python", str(bench.PEER_SCRIPT), "train"]
    settings = json.loads(theirs[3])
    assert settings["distill_model"] == str(tmp_path / "ultralytics" / "teacher" / "seed1" / "weights" / "best.pt")
    assert (settings["data"], settings["pretrained"], settings["workers"], settings["amp"]) == (
        str(data["ultralytics"]), False, 0, False)
    lasts = [bench.run_dir(tmp_path, run.side, run.name, 1) / "weights" / "last.pt" for run in (sl2, distill)]
    for last in lasts:
        last.parent.mkdir(parents=True)
        last.touch()
    assert bench.command(tmp_path, data, sl2, 1, ["peer-python"])[4:] == [f"resume={lasts[0]}"]
    assert json.loads(bench.command(tmp_path, data, distill, 1, ["peer-python"])[3]) == {"resume": str(lasts[1])}


def test_a_variant_is_crosskd_with_extra_settings_and_joins_the_summary_once_it_has_results(bench, tmp_path):
    assert bench.variant("sl2", ["kd_weight=3"]).settings == {"model": "yolo11n.yaml", "kd": "sl2", "kd_weight": "3"}
    run = bench.variant("crosskd", ["kd_weight=4", "kd_cls_loss=bce"])
    assert run.name == "crosskd-kd_weight=4-kd_cls_loss=bce" and run.teacher == "teacher"
    assert run.settings == {"model": "yolo11n.yaml", "kd": "crosskd", "kd_weight": "4", "kd_cls_loss": "bce"}
    data = {"crosskd": tmp_path / "c.yaml", "ultralytics": tmp_path / "u.yaml"}
    assert {"kd=crosskd", "kd_weight=4", "kd_cls_loss=bce"} <= set(bench.command(tmp_path, data, run, 0, []))
    assert bench.found_variants(tmp_path) == []
    write_results(bench, tmp_path, {("crosskd", run.name): [30, 32], ("crosskd", "crosskd"): [25]})
    assert [found.name for found in bench.found_variants(tmp_path)] == [run.name]
    assert f"| crosskd | {run.name} | 31.0 ± 1.4 (n=2) |" in bench.summary(tmp_path)


def test_the_cpu_1k_scale_has_four_times_the_training_images_and_its_own_folder(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SCALES, "cpu-1k", (bench.SCALES["cpu-1k"][0], tmp_path))
    monkeypatch.setattr("sys.argv", ["yolo_effect.py", "--scale", "cpu-1k", "--summary"])
    bench.main()
    assert (bench.DATA["num_train"], bench.DATA["num_val"]) == (1024, 256)
    assert "Targets: not all runs have finished." in (tmp_path / "summary.md").read_text()
    assert bench.SCALES["cpu"] == ({"num_train": 256, "num_val": 128}, bench.OUT)


def test_coco_commands_cover_both_tools_and_teachers(bench):
    text = bench.coco_commands()
    for teacher in ("yolo11m", "yolo11s"):
        assert f"crosskd distill teacher={teacher}.pt student=yolo11n.yaml kd=crosskd data" in text
        assert f"crosskd distill teacher={teacher}.pt student=yolo11n.yaml kd=crosskd kd_idx=0 data" in text
        assert f"distill_model={teacher}.pt" in text
    assert text.count("epochs=100") == 10 and "YOLO11n 39.5, YOLO11s 47.0, YOLO11m 51.5" in text


@pytest.mark.slow
def test_toy_study_trains_both_sides_and_evaluates_them_with_crosskd(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.DATA, "num_train", 8)
    monkeypatch.setitem(bench.DATA, "num_val", 8)
    monkeypatch.setitem(bench.DATA, "imgsz", 64)
    monkeypatch.setattr(bench, "COMMON", {**bench.COMMON, "epochs": 1, "imgsz": 64, "batch": 4})
    monkeypatch.setitem(os.environ, "YOLO_OFFLINE", "1")
    students = [run for run in bench.RUNS if run.name == "student"]  # both sides'
    bench.execute(tmp_path, [0], 2, ultralytics_python(), students)
    for side in ("crosskd", "ultralytics"):
        record = json.loads((tmp_path / f"{side}-student-seed0.json").read_text())
        assert 0 <= record["AP"] <= 100 and 0 <= record["own_AP"] <= 100 and record["epoch_s"] is None
        assert (tmp_path / side / "student" / "seed0" / "crosskd_val").is_dir()  # crosskd's validator ran on it
    logs = {side: (tmp_path / side / "student" / "seed0" / "train.log").stat().st_size
            for side in ("crosskd", "ultralytics")}
    bench.execute(tmp_path, [0], 2, ["no-such-python"], students)  # finished: skipped, not trained again
    assert logs == {side: (tmp_path / side / "student" / "seed0" / "train.log").stat().st_size for side in logs}
    assert "| ultralytics | student | " in bench.summary(tmp_path)


@pytest.mark.slow
def test_toy_step_timing_runs_both_sides_on_one_batch(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "STEP", {**bench.STEP, "batch": 2, "imgsz": 64, "repeats": 1, "warmup": 0})
    row = bench.time_step(tmp_path, ultralytics_python(), threads=1)
    assert row["crosskd_ms"] > 0 and row["ultralytics_ms"] > 0 and len(row["runs_ms"]["ultralytics"]) == 1
    assert json.loads((tmp_path / "step.json").read_text())["ratio"] == row["ratio"]
    assert "Train step (yolo11n.yaml, batch 2, 64 px" in bench.summary(tmp_path)
