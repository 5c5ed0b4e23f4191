"""benchmarks/reproduce.py: the experiment plan, and its smoke mode end to end (results, summary, resume)."""

import json

import pytest
from conftest import load_benchmark

from crosskd.config import get_args


@pytest.fixture(scope="module")
def reproduce():
    """The harness script imported as a module."""
    return load_benchmark("reproduce")


def test_plan_shares_equal_settings_and_trains_teachers_once(reproduce):
    rows = reproduce.experiment_rows(stacked_convs=2)
    runs = reproduce.plan_runs(rows, seeds=(0, 1, 2))
    keys = [(run.key, run.seed) for run in runs]
    assert len(keys) == len(set(keys))
    teachers = ["teacher", "atss_teacher", "frcnn_teacher"]
    assert keys[:3] == [(key, 0) for key in teachers]  # teachers first, seed 0 only
    assert not any(key in teachers and seed > 0 for key, seed in keys)
    crosskd = reproduce.run_key(reproduce.CROSSKD)
    default_idx = next(row for row in rows if row.table == "1" and row.label == "kd_idx=1")
    assert reproduce.run_key(default_idx.settings) == crosskd  # Table 1's default hold point is the CrossKD run
    assert default_idx.paper_label == "kd_idx=3"  # 1 of 2 convs uses one teacher conv, like the paper's 3 of 4
    students = {key for key, seed in keys if seed == 0} - set(teachers)
    assert len(students) * 3 == len(keys) - 3


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
    distill = [line for line in lines if line.startswith("crosskd distill ")]  # PM, LD, PKD, CrossKD(+PKD) post, pre
    assert len(distill) == 7 and all("model=gfl_r50.yaml" in line and "imgsz=1333" in line for line in distill)
    assert not (tmp_path / "metrics").exists()  # printed, not run


def test_table11_dry_run_lists_the_faster_rcnn_rows_with_the_papers_numbers(reproduce, tmp_path, capsys):
    assert reproduce.main(["--rows", "table11", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith("crosskd ")]
    assert len(commands) == 1 + 3 * 3  # the teacher once, student / CrossKD / CrossKD+PKD at 3 seeds
    assert "model=faster_rcnn_r18s.yaml" in commands[0] and "epochs=24" in commands[0]
    assert all("faster_rcnn_r18q_student.yaml" in line for line in commands[1:])
    assert sum(line.endswith("kd=crosskd+pkd") for line in commands) == 3
    assert sum(line.endswith("kd=crosskd") for line in commands) == 3
    assert lines[-4:] == ["# Table 11, teacher: paper AP 37.4  AP50 58.1  AP75 40.4",
                          "# Table 11, student: paper AP 33.5  AP50 53.7  AP75 35.9",
                          "# Table 11, CrossKD: paper AP 35.5  AP50 55.8  AP75 38.0",
                          "# Table 11, CrossKD+PKD: paper no number in the paper"]
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "runs").exists()  # nothing trained

    assert reproduce.main(["--scale", "coco", "--rows", "11", "--seeds", "0", "--out", str(tmp_path)]) == 0
    coco = [line for line in capsys.readouterr().out.splitlines() if line.startswith("crosskd ")]
    assert "model=faster_rcnn_r50.yaml" in coco[0] and "epochs=12" in coco[0]  # MMDetection's 1x teacher
    assert all("model=faster_rcnn_r18.yaml" in line and "epochs=12" in line for line in coco[1:]) and len(coco) == 4


def test_execute_trains_the_undistilled_students_beside_the_teachers(reproduce, tmp_path, monkeypatch):
    """The first group holds the teacher and the students alone (no core idles while a teacher trains), the second
    the distilled students, which wait for their teacher's metrics."""
    rows = [row for row in reproduce.experiment_rows(stacked_convs=2) if row.table == "11"]
    runs = reproduce.plan_runs(rows, seeds=(0, 1))
    groups = []
    monkeypatch.setattr(reproduce, "load_data_yaml", lambda path: None)
    monkeypatch.setattr(reproduce, "run_group", lambda group, *args: groups.append([r.key for r in group]) or [])
    failed = reproduce.execute(runs, reproduce.SCALES["cpu"], tmp_path, jobs=1)
    assert groups[0] == ["frcnn_teacher", "frcnn_student", "frcnn_student"]
    assert groups[1] == []  # nothing trained: every distilled student lacks its teacher
    assert len(failed) == 4 and all(name.endswith("(no teacher)") for name in failed)

    teacher = runs[0]  # finished with its checkpoint (a resumed study): its students start beside the students alone
    reproduce.metrics_path(tmp_path, teacher).parent.mkdir(parents=True)
    reproduce.metrics_path(tmp_path, teacher).write_text("{}")
    best = reproduce.run_dir(tmp_path, teacher) / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    best.touch()
    groups.clear()
    assert reproduce.execute(runs, reproduce.SCALES["cpu"], tmp_path, jobs=1) == []
    assert sorted(groups[0]) == sorted(run.key for run in runs[1:]) and groups[1] == []
    best.unlink()  # its checkpoint gone: the teacher trains again first, its students after it
    groups.clear()
    reproduce.execute(runs, reproduce.SCALES["cpu"], tmp_path, jobs=1)
    assert groups[0] == ["frcnn_teacher", "frcnn_student", "frcnn_student"] and len(groups[1]) == 4


@pytest.mark.slow  # four tiny Faster R-CNN trainings, about 2 minutes on 2 cores
def test_smoke_runs_table11_tiny(reproduce, tmp_path):
    out = tmp_path / "reproduce"
    assert reproduce.main(["--smoke", "--rows", "table11", "--out", str(out), "--jobs", "1"]) == 0
    metrics = sorted(p.name for p in (out / "metrics").glob("*.json"))
    assert metrics == ["frcnn_student-from-frcnn_teacher-kd=crosskd+pkd-seed0.json",
                       "frcnn_student-from-frcnn_teacher-kd=crosskd-seed0.json", "frcnn_student-seed0.json",
                       "frcnn_teacher-seed0.json"]
    assert "Table 11: two-stage" in (out / "summary.md").read_text()


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


def test_issue20_rows_put_kd_hold_pre_beside_post(reproduce):
    rows = reproduce.select_rows(reproduce.experiment_rows(stacked_convs=2), ["issue20"])
    assert list(dict.fromkeys(row.table for row in rows)) == ["5", "1", "3", "12", "7"]
    table5 = {row.label: row for row in rows if row.table == "5"}
    for label in ("CrossKD", "CrossKD+PKD"):
        post, pre = table5[label], table5[f"{label} (pre)"]
        assert pre.settings == {**post.settings, "kd_hold": "pre"} and "kd_hold" not in post.settings
        assert reproduce.run_key(pre.settings) == reproduce.run_key(post.settings) + "-kd_hold=pre"
        assert pre.paper_label == label
    runs = reproduce.plan_runs(rows, seeds=(0, 1, 2))
    assert len(runs) == 2 + 18 * 3  # two teachers, 18 student settings at 3 seeds (issue20 has no Table 11)


def test_cpu_long_scale_plans_the_main_rows_from_the_cpu_teacher(reproduce, tmp_path):
    scale = reproduce.SCALES["cpu-long"]
    cpu = reproduce.SCALES["cpu"]
    assert (scale.data, scale.models["teacher"], scale.teacher_epochs) == (cpu.data, cpu.models["teacher"], 24)
    assert scale.epochs == 4 * cpu.epochs and scale.teachers_from == "cpu"
    rows = reproduce.select_rows(reproduce.experiment_rows(scale.stacked_convs), scale.default_rows)
    assert [row.label for row in rows] == ["teacher", "student", "PM", "LD", "PKD", "CrossKD", "CrossKD (pre)",
                                           "CrossKD+PKD"]
    runs = reproduce.plan_runs(rows, seeds=(0, 1, 2))
    assert len(runs) == 1 + 7 * 3 and runs[0].key == "teacher"
    for run in runs[1:]:
        mode, settings = reproduce.run_settings(run, scale, tmp_path)
        args = get_args(settings, mode)
        assert args.epochs == 32 and args.kd_hold == run.settings.get("kd_hold", "post")


def test_results_folders_of_old_and_new_defaults_never_mix(reproduce, tmp_path):
    folders = {reproduce.default_out(scale) for scale in reproduce.SCALES.values()}
    assert len(folders) == len(reproduce.SCALES) and reproduce.OLD_RESULTS_DIR not in folders
    assert reproduce.current_defaults() == {"kd_hold": "post", "valid_region": "mmdet"}
    old = tmp_path / "old"
    reproduce.write_json(old / "metrics" / "student-seed0.json", {"key": "student", "seed": 0})
    with pytest.raises(SystemExit, match="other crosskd defaults"):
        reproduce.claim_folder(old)  # results without defaults.json: trained before the defaults were recorded
    new = tmp_path / "new"
    reproduce.claim_folder(new)
    reproduce.claim_folder(new)  # a restart resumes its own folder
    assert json.loads((new / "defaults.json").read_text()) == reproduce.current_defaults()
    reproduce.write_json(new / "defaults.json", {"kd_hold": "pre", "valid_region": "image"})
    with pytest.raises(SystemExit):
        reproduce.claim_folder(new)


def test_link_teachers_reuses_the_source_scales_teacher(reproduce, tmp_path):
    source, out = tmp_path / "cpu", tmp_path / "cpu-long"
    teacher = reproduce.teacher_run("teacher")
    (reproduce.run_dir(source, teacher) / "weights").mkdir(parents=True)
    reproduce.write_json(reproduce.metrics_path(source, teacher), {"key": "teacher", "seed": 0, "final": {"AP": 48.7}})
    student = reproduce.Run("student", 0, reproduce.STUDENT)
    reproduce.link_teachers([teacher, reproduce.teacher_run("atss_teacher"), student], out, source)
    assert (reproduce.run_dir(out, teacher) / "weights").is_dir()
    assert json.loads(reproduce.metrics_path(out, teacher).read_text())["final"] == {"AP": 48.7}
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["teacher-seed0.json"]  # unfinished: left out
    crosskd = reproduce.Run(reproduce.run_key(reproduce.CROSSKD), 0, reproduce.CROSSKD)
    assert not reproduce.teacher_missing(crosskd, out)


def fake_results(reproduce, folder, aps):
    """Metrics JSONs of the given final AP per (run key, seed)."""
    for (key, seed), ap in aps.items():
        reproduce.write_json(folder / "metrics" / f"{key}-seed{seed}.json",
                             {"key": key, "seed": seed, "final": {"AP": ap, "AP50": ap, "AP75": ap}})


def test_comparison_sets_regimes_side_by_side_with_the_orderings(reproduce, tmp_path):
    crosskd, pkd = reproduce.run_key(reproduce.CROSSKD), reproduce.run_key(reproduce.PKD)
    fake_results(reproduce, tmp_path / "old", {(crosskd, 0): 23.0, (crosskd, 1): 24.0, (pkd, 0): 27.4, (pkd, 1): 27.4})
    fake_results(reproduce, tmp_path / "new", {(crosskd, 0): 30.0, (crosskd, 1): 30.0, (pkd, 0): 26.0})
    rows = reproduce.select_rows(reproduce.experiment_rows(stacked_convs=2), ["issue20"])
    text = reproduce.comparison_markdown(rows, {"old": tmp_path / "old", "new": tmp_path / "new"}, (0, 1))
    assert "| row | old | new | paper AP |" in text
    assert "| CrossKD | 23.5 ± 0.7 | 30.0 ± 0.0 | 43.7 |" in text and "| CrossKD (pre) | — | — | 43.7 |" in text
    assert ("| 5 | CrossKD > PKD (43.7 vs 43.3) | does not hold (23.5 vs 27.4) | holds (30.0 vs 26.0) |" in text)
    assert "| 1 | kd_idx=1 > kd_idx=2 (38.7 vs 38.2) | holds (23.5 vs —" not in text  # a missing row gives —
    assert "| 1 | kd_idx=1 > kd_idx=2 (38.7 vs 38.2) | — | — |" in text
    assert reproduce.ordering_cell((23.5, 1.3), (22.0, 2.0)) == "holds (23.5 vs 22.0, within std)"


def test_cpu_long_summary_writes_the_main_table_and_the_comparison(reproduce, tmp_path, capsys):
    assert reproduce.main(["--scale", "cpu-long", "--summary", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "scale 'cpu-long'" in summary and "| CrossKD (pre) (paper CrossKD) | 0 |" in summary
    assert "### Table 1" not in summary and "| 5 | CrossKD > PKD (43.7 vs 43.3) | — |" in summary
    comparison = (tmp_path / "comparison.md").read_text()
    assert "| row | cpu, old (pre, image) | cpu, new (post, mmdet) | cpu-long, new | paper AP |" in comparison
    assert "| student | 9.5 ± 1.2 |" in comparison  # the old results, read from benchmarks/results/reproduce
    assert not (tmp_path / "defaults.json").exists()  # summarising claims no folder


def test_summary_of_some_rows_prints_them_and_keeps_every_table_in_the_file(reproduce, tmp_path, capsys):
    crosskd = reproduce.run_key(reproduce.CROSSKD)
    reproduce.write_json(tmp_path / "metrics" / f"{crosskd}-seed0.json",
                         {"key": crosskd, "seed": 0, "final": {"AP": 23.0, "AP50": 30.0, "AP75": 25.0},
                          "train_seconds": 60.0, "epochs": [{"epoch": 1, "AP": 23.0}]})
    assert reproduce.main(["--rows", "table11", "--summary", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "### Table 11" in printed and "### Main comparison" not in printed
    summary = (tmp_path / "summary.md").read_text()
    assert "### Table 11" in summary and "### Table 1:" in summary and "| CrossKD | 1 | 23.0 | 30.0 |" in summary


def test_a_teacher_without_its_checkpoint_is_trained_again_while_a_student_needs_it(reproduce, tmp_path):
    """A fresh clone has the teachers' metrics JSONs but not their .pt: students still to run need it retrained."""
    runs = reproduce.plan_runs([reproduce.Row("5", "teacher", {"model": "teacher"}),
                                reproduce.Row("5", "CrossKD", reproduce.CROSSKD)], seeds=(0,))
    teacher, student = runs
    reproduce.write_json(reproduce.metrics_path(tmp_path, teacher), {"AP": 40.0})
    assert reproduce.teacher_to_retrain(teacher, runs, tmp_path)
    weights = reproduce.run_dir(tmp_path, teacher) / "weights"
    weights.mkdir(parents=True)
    (weights / "best.pt").write_bytes(b"")
    assert not reproduce.teacher_to_retrain(teacher, runs, tmp_path)
    (weights / "best.pt").unlink()
    reproduce.write_json(reproduce.metrics_path(tmp_path, student), {"AP": 20.0})
    assert not reproduce.teacher_to_retrain(teacher, runs, tmp_path)  # every student of it has finished
    assert not reproduce.teacher_to_retrain(student, runs, tmp_path)


def test_cpu_long_trains_the_source_scales_lost_teacher_again(reproduce, tmp_path, monkeypatch):
    """A fresh clone's cpu-long students distil from the cpu scale's teacher, whose .pt the clone lacks."""
    source, out = tmp_path / "cpu", tmp_path / "cpu-long"
    runs = reproduce.plan_runs([reproduce.Row("5", "CrossKD", reproduce.CROSSKD)], seeds=(0,))
    teacher, student = runs
    reproduce.claim_folder(source)
    reproduce.write_json(reproduce.metrics_path(source, teacher), {"key": "teacher", "seed": 0})
    trained = []

    def record_training(group, scale, folder, pool):
        trained.append((group, folder))
        return []

    monkeypatch.setattr(reproduce, "load_data_yaml", lambda path: None)
    monkeypatch.setattr(reproduce, "run_group", record_training)
    scale = reproduce.SCALES["cpu"]
    assert reproduce.retrain_lost_teachers(runs, out, scale, source) == []
    assert trained == [([teacher], source)]
    reproduce.write_json(reproduce.metrics_path(out, student), {"AP": 20.0})
    trained.clear()
    reproduce.retrain_lost_teachers(runs, out, scale, source)  # its only student has finished: nothing to train
    assert trained == []
