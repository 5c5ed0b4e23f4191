"""benchmarks/loader_bench.py on a tiny input (8 images of 64 px, 2 batches): the fields it reports, and the one-line
stop when crosskd's build_transforms lacks the augmentations. Timings are the benchmark's business, not asserted."""

import math

import pytest
from conftest import load_benchmark

TIMINGS = ("crosskd_ips", "crosskd_build_s")


def tiny_plan(loader_bench, **changes):
    return loader_bench.LoaderPlan(images=8, imgsz=64, batch=4, workers=(1,), rounds=1, warmup=0, objects=(1, 3),
                                   ultralytics=None, **changes)


def test_tiny_run_reports_every_cache_setting(tmp_path):
    loader_bench = load_benchmark("loader_bench")
    rows = loader_bench.run_loader_benchmark(tiny_plan(loader_bench), tmp_path)
    assert [(row["cache"], row["workers"], row["images"]) for row in rows] == [
        ("none", 1, 8), ("ram", 1, 8), ("disk", 1, 8)]
    for row in rows:
        for key in TIMINGS:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["cache"], key)
        assert len(row["crosskd_ips_runs"]) == 1 and row["ultralytics"].startswith("not measured")
        assert "ultralytics_ips" not in row
    images = tmp_path / "digits_photos64_8" / "images" / "train"
    assert len(list(images.glob("*.jpg.npy"))) == 8  # cache=disk wrote its arrays beside the images


def test_missing_augmentations_stop_with_one_line(tmp_path, monkeypatch):
    loader_bench = load_benchmark("loader_bench")

    def old_build_transforms(imgsz, augment, fliplr=0.5):
        raise AssertionError("not called")

    monkeypatch.setattr(loader_bench, "build_transforms", old_build_transforms)
    with pytest.raises(SystemExit) as stop:
        loader_bench.run_loader_benchmark(tiny_plan(loader_bench), tmp_path)
    assert str(stop.value) == (
        "loader benchmark: crosskd's build_transforms takes no hsv_h, hsv_s, hsv_v, degrees, translate, scale, shear, "
        "perspective, flipud, mosaic, mixup, cutmix; this crosskd predates its augmentations "
        "(crosskd/data/augment.py): update it, then run this again")
    assert not list(tmp_path.iterdir())  # stopped before generating anything


def test_an_ultralytics_python_that_cannot_import_it_is_refused(tmp_path):
    loader_bench = load_benchmark("loader_bench")
    with pytest.raises(SystemExit, match=r"cannot import ultralytics; install it there"):
        loader_bench.find_ultralytics(str(tmp_path / "no-python"))
