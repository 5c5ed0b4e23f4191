"""Images that become unreadable after the dataset was indexed: skipped (training) or blanked (evaluation), one
warning per file whatever the workers, counted per pass; training goes on."""

import csv
from pathlib import Path

import pytest

from crosskd.config import get_args
from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml
from crosskd.engine.training.trainer import Trainer
from crosskd.errors import DataError


@pytest.fixture()
def digits(tmp_path: Path, write_digits_yaml) -> Path:
    """A fresh 8-train / 4-val digits dataset (its files get damaged by the tests)."""
    data = write_digits_yaml(tmp_path, num_train=8, num_val=4)
    load_data_yaml(data)  # generates the images
    return data


def damage(dataset: DetectionDataset, deleted: int, corrupted: int) -> list[str]:
    """Delete one indexed image and overwrite another with bytes no decoder reads; returns their paths."""
    dataset.records[deleted].path.unlink()
    dataset.records[corrupted].path.write_bytes(b"\xff\xd8 not a jpeg any more")
    return [str(dataset.records[deleted].path), str(dataset.records[corrupted].path)]


def warnings_of(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]


def test_training_sample_falls_back_to_the_next_readable_image(digits: Path) -> None:
    dataset = DetectionDataset(load_data_yaml(digits), "train", 64, augment=False, skip_unreadable=True)
    broken = damage(dataset, deleted=2, corrupted=3)
    sample = dataset[2]
    assert sample.image_id == dataset.image_ids[4] and sample.unreadable == tuple(broken)
    again = dataset[2]
    assert again.image_id == sample.image_id and bool((again.image == sample.image).all())  # deterministic
    assert dataset[7].unreadable == () and dataset[7].image_id == dataset.image_ids[7]


def test_evaluation_sample_keeps_its_image_id_as_a_blank(digits: Path) -> None:
    dataset = DetectionDataset(load_data_yaml(digits), "val", 64, augment=False)
    path = dataset.records[1].path
    path.unlink()
    sample = dataset[1]
    assert sample.image_id == dataset.image_ids[1] and sample.unreadable == (str(path),)
    assert int(sample.image.sum()) == 0 and len(sample.labels) == 0


def test_loader_with_workers_warns_once_per_file_and_counts_each_pass(digits: Path, capsys) -> None:
    dataset = DetectionDataset(load_data_yaml(digits), "train", 64, augment=False, skip_unreadable=True)
    broken = damage(dataset, deleted=0, corrupted=5)
    loader = build_dataloader(dataset, batch=2, workers=2, shuffle=True, seed=0)
    capsys.readouterr()
    for _ in range(2):
        ids = [image_id for batch in loader for image_id in batch.image_ids.tolist()]
        assert len(ids) == len(dataset) and loader.num_unreadable == 2
        assert not {dataset.image_ids[0], dataset.image_ids[5]} & set(ids)
    lines = warnings_of(capsys)
    assert sorted(line for line in lines if "cannot read" in line) == sorted(
        f"WARNING: train: cannot read {path} any more; skipped" for path in broken
    )
    assert lines.count("WARNING: train: 2 image(s) could not be read in this pass and were skipped") == 2


def test_images_gone_for_good_stop_with_one_line_from_a_worker(digits: Path) -> None:
    dataset = DetectionDataset(load_data_yaml(digits), "train", 64, augment=False, skip_unreadable=True)
    for record in dataset.records:
        record.path.unlink()
    loader = build_dataloader(dataset, batch=2, workers=1, shuffle=False)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"train: {dataset.records[0].path} and the 7 images after it") and "resume" in message


def test_training_continues_when_images_vanish_mid_run(digits: Path, tmp_path: Path, capsys) -> None:
    settings = {"model": "gfl_r18t.yaml", "data": str(digits), "epochs": 2, "batch": 4, "imgsz": 64, "workers": 0,
                "device": "cpu", "project": str(tmp_path / "runs"), "name": "exp", "val": False, "plots": False}
    trainer = Trainer(get_args(settings, "train"))
    vanished = []

    def delete_one(trainer: Trainer) -> None:
        if not vanished:
            vanished.append(trainer.train_loader.dataset.records[1].path)
            vanished[0].unlink()

    trainer.add_callback("on_train_epoch_start", delete_one)
    trainer.train()
    with open(trainer.save_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"] and [row["unreadable_images"] for row in rows] == ["1", "1"]
    lines = warnings_of(capsys)
    assert lines.count(f"WARNING: train: cannot read {vanished[0]} any more; skipped") == 1
    assert lines.count("WARNING: train: 1 image(s) could not be read in this pass and were skipped") == 2
