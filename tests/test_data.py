"""Dataset YAML, COCO/YOLO readers and label checks, transforms, collate and the dataloader."""

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from crosskd.data import Batch, DetectionDataset, Sample, build_dataloader, collate, load_data_yaml
from crosskd.data.labels import image_size, resolve_split
from crosskd.data.pipeline import build_transforms
from crosskd.errors import DataError

SMALL = {"num_train": 16, "num_val": 16}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datasets_dir holding the 16 + 16 image digits set."""
    datasets = tmp_path_factory.mktemp("datasets")
    load_data_yaml("digits.yaml", datasets, generate_overrides=SMALL)
    return datasets


def write_image(path: Path, height: int, width: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), value, np.uint8)
    image[:, : width // 2] = 255 - value  # left half differs, so a flip is visible
    cv2.imwrite(str(path), image)


def write_yaml(yaml_file: Path, **content) -> Path:
    yaml_file.write_text(yaml.safe_dump(content))
    return yaml_file


def warnings_of(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]


@pytest.fixture()
def bad_yolo(tmp_path: Path) -> Path:
    """A 3-class YOLO dataset with every kind of bad label; returns its YAML."""
    root = tmp_path / "bad"
    write_image(root / "images/train/good.png", 100, 200)
    write_image(root / "images/train/empty.png", 50, 50)
    write_image(root / "images/train/nolabel.png", 50, 50)
    (root / "images/train/corrupt.jpg").write_bytes(b"this is not a jpeg")
    labels = root / "labels/train"
    labels.mkdir(parents=True)
    (labels / "good.txt").write_text(
        "1 0.5 0.5 0.2 0.4\n"  # kept: (80, 30, 120, 70)
        "2 0.9995 0.5 0.005 0.2\n"  # 0.4 px past the right edge: clipped and kept
        "7 0.5 0.5 0.1 0.1\n"  # class outside 0..2
        "0 1.5 0.5 0.1 0.1\n"  # outside the image
        "0 0.5 0.5 0.0 0.1\n"  # zero width
        "0 0.5 0.5\n"  # wrong column count
        "x 0.5 0.5 0.1 0.1\n"  # not a number
        "1 0.1 0.1 0.3 0.1 0.3 0.3\n"  # polygon: box (20, 10, 60, 30)
    )
    (labels / "empty.txt").write_text("")
    (labels / "corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no image
    return write_yaml(tmp_path / "bad.yaml", path=str(root), train="images/train", val="images/train",
                      names=["a", "b", "c"])


def test_yolo_bad_labels_counted_skipped_in_one_warning(bad_yolo: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = DetectionDataset(load_data_yaml(bad_yolo), "train", imgsz=200, augment=False)
    assert warnings_of(capsys) == [
        "WARNING: train: 2 malformed label lines, 1 box with class id outside 0..2, 1 box outside the image, "
        "1 zero-size box, 1 missing image, 1 unreadable image skipped"
    ]
    records = {record.path.name: record for record in dataset.records}
    assert sorted(records) == ["empty.png", "good.png", "nolabel.png"]
    good = records["good.png"]
    assert (good.width, good.height) == (200, 100)
    np.testing.assert_allclose(good.boxes, [[80, 30, 120, 70], [199.4, 40, 200, 60], [20, 10, 60, 30]], atol=1e-4)
    assert good.labels.tolist() == [1, 2, 1]
    assert len(records["empty.png"].labels) == 0 and len(records["nolabel.png"].labels) == 0
    assert dataset.image_ids == [1, 2, 3]  # non-numeric stems: index among all 4 image files, sorted
    assert dataset.labels_summary()["backgrounds"] == 2


def make_bad_coco(root: Path) -> Path:
    """A COCO dataset (categories 1, 5, 9) with every kind of bad annotation; returns its YAML."""
    write_image(root / "val/a.jpg", 60, 80)
    write_image(root / "val/b.jpg", 40, 40)
    write_image(root / "val/wrong_size.jpg", 40, 40)
    (root / "val/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    images = [
        {"id": 10, "file_name": "a.jpg", "width": 80, "height": 60},
        {"id": 11, "file_name": "b.jpg", "width": 40, "height": 40},
        {"id": 12, "file_name": "missing.jpg", "width": 40, "height": 40},
        {"id": 13, "file_name": "corrupt.jpg", "width": 40, "height": 40},
        {"id": 14, "file_name": "wrong_size.jpg", "width": 50, "height": 40},
    ]
    boxes = [
        (10, 9, [10, 10, 20, 20], 0),  # kept, label 2
        (10, 5, [0, 0, 30, 30], 1),  # crowd: ground truth only
        (10, 3, [10, 10, 5, 5], 0),  # unknown category
        (10, 1, [70, 10, 20, 20], 0),  # outside (x2 = 90 > 80)
        (10, 1, [10, 10, 0, 5], 0),  # zero size
        (10, 1, [10, 10, 5], 0),  # malformed bbox
        (99, 1, [10, 10, 5, 5], 0),  # unknown image
        (12, 1, [10, 10, 5, 5], 0),  # on the missing image: dropped with it
    ]
    annotations = [
        {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": crowd, "area": 1.0}
        for i, (image_id, category, bbox, crowd) in enumerate(boxes, start=1)
    ]
    categories = [{"id": i, "name": str(i)} for i in (9, 1, 5)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return write_yaml(root.parent / "coco_bad.yaml", path=str(root), train="val", val="val", names=["x", "y", "z"])


def test_coco_bad_labels_counted_skipped_in_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = DetectionDataset(load_data_yaml(make_bad_coco(tmp_path / "coco")), "val", imgsz=80, augment=False)
    assert warnings_of(capsys) == [
        "WARNING: val: 1 malformed label line, 1 box with class id outside 0..2, 1 box outside the image, "
        "1 zero-size box, 1 annotation of an unknown image, 1 missing image, 1 unreadable image, "
        "1 image whose size differs from its annotation skipped"
    ]
    assert dataset.image_ids == [10, 11]
    assert dataset.category_ids == [1, 5, 9]
    first = dataset.records[0]
    np.testing.assert_array_equal(first.boxes, [[10, 10, 30, 30]])
    assert first.labels.tolist() == [2]
    gt = dataset.coco_gt()
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[10]))
    assert sorted((a["category_id"], a["iscrowd"], tuple(a["bbox"])) for a in anns) == [
        (5, 1, (0, 0, 30, 30)), (9, 0, (10, 10, 20, 20))
    ]
    assert sorted(gt.getImgIds()) == [10, 11] and gt.getCatIds() == [1, 5, 9]


def test_undecodable_image_becomes_background(tmp_path: Path) -> None:
    root = tmp_path / "trunc"
    write_image(root / "images/train/1.png", 32, 48)
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/1.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    png = root / "images/train/1.png"
    png.write_bytes(png.read_bytes()[:45])  # header and the IDAT chunk's header intact, pixels gone
    yaml_file = write_yaml(tmp_path / "t.yaml", path=str(root), train="images/train", val="images/train", names=["a"])
    dataset = DetectionDataset(load_data_yaml(yaml_file), "train", imgsz=64, augment=False)
    assert image_size(png) == (48, 32) and dataset.image_ids == [1]
    sample = dataset[0]
    assert sample.image.shape == (3, 43, 64) and sample.image.sum() == 0 and len(sample.labels) == 0
    assert sample.unreadable == (str(png),)  # the loader warns about it (tests/test_unreadable_images.py)


def test_digits_coco_and_yolo_give_identical_records(digits_dir: Path) -> None:
    coco = DetectionDataset(load_data_yaml("digits", digits_dir, SMALL), "train", 96, augment=False)
    yolo = DetectionDataset(load_data_yaml("digits-yolo.yaml", digits_dir, SMALL), "train", 96, augment=False)
    assert coco.source.format == "coco" and yolo.source.format == "yolo"
    assert coco.image_ids == yolo.image_ids == list(range(1, 17))
    assert coco.category_ids == yolo.category_ids == list(range(10))
    for a, b in zip(coco.records, yolo.records):
        assert (a.path, a.width, a.height) == (b.path, b.width, b.height)
        assert a.labels.tolist() == b.labels.tolist()
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    batch_a = collate([coco[i] for i in range(4)], 32)
    batch_b = collate([yolo[i] for i in range(4)], 32)
    assert torch.equal(batch_a.images, batch_b.images) and torch.equal(batch_a.gt_labels, batch_b.gt_labels)
    torch.testing.assert_close(batch_a.gt_boxes, batch_b.gt_boxes, atol=1e-3, rtol=0)


def test_pipeline_shapes_padding_masks_and_ratios(digits_dir: Path) -> None:
    dataset = DetectionDataset(load_data_yaml("digits", digits_dir, SMALL), "val", 100, augment=False, pad_multiple=32)
    collated = next(iter(build_dataloader(dataset, batch=5, workers=0, shuffle=False)))
    assert collated.images.dtype == torch.uint8  # workers pass uint8; .to(device) gives the models' float 0..1
    batch = collated.to("cpu")
    assert batch.images.shape == (5, 3, 128, 128) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1 and torch.equal(batch.images * 255,
                                                                                 collated.images.float())
    assert len(batch) == 5
    for i, record in enumerate(dataset.records[:5]):
        ratio = 100 / max(record.width, record.height)
        h, w = round(record.height * ratio), round(record.width * ratio)
        assert batch.img_sizes[i].tolist() == [h, w] and batch.orig_sizes[i].tolist() == [record.height, record.width]
        assert batch.ratios[i].item() == pytest.approx(ratio)
        assert batch.images[i, :, h:].abs().sum() == 0 and batch.images[i, :, :, w:].abs().sum() == 0
        count = len(record.labels)
        expected = torch.from_numpy(record.boxes) * ratio
        expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].clamp(0, w), expected[:, 1::2].clamp(0, h)
        torch.testing.assert_close(batch.gt_boxes[i, :count], expected)
        assert (batch.gt_labels[i, count:] == -1).all() and batch.gt_boxes[i, count:].abs().sum() == 0
    assert batch.image_ids.tolist() == dataset.image_ids[:5]
    moved = batch.to("cpu")  # already float: moved as it is
    assert isinstance(moved, Batch) and moved.paths == batch.paths and torch.equal(moved.images, batch.images)


def test_horizontal_flip_matches_hand_computed_box(tmp_path: Path) -> None:
    root = tmp_path / "flip"
    write_image(root / "images/train/1.png", 40, 100)
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/1.txt").write_text("0 0.2 0.5 0.2 0.5\n")  # (10, 10, 30, 30)
    info = load_data_yaml(write_yaml(tmp_path / "f.yaml", path=str(root), train="images/train", val="images/train",
                                     names=["a"]))
    plain = DetectionDataset(info, "train", 50, augment=False)[0]
    flipped = DetectionDataset(info, "train", 50, augment=True, fliplr=1.0)[0]
    torch.testing.assert_close(plain.boxes, torch.tensor([[5.0, 5.0, 15.0, 15.0]]))
    torch.testing.assert_close(flipped.boxes, torch.tensor([[35.0, 5.0, 45.0, 15.0]]))  # x -> 50 - x
    assert torch.equal(flipped.image, plain.image.flip(-1))


def test_dataset_yaml_fliplr_overrides_run_setting(digits_dir: Path) -> None:
    dataset = DetectionDataset(load_data_yaml("digits", digits_dir, SMALL), "val", 64, augment=True, fliplr=1.0)
    plain = DetectionDataset(load_data_yaml("digits", digits_dir, SMALL), "val", 64, augment=False)
    assert dataset.fliplr == 0.0
    assert all(torch.equal(dataset[i].boxes, plain[i].boxes) for i in range(len(dataset)))


def test_collate_pads_ground_truth() -> None:
    def sample(num_boxes: int, height: int, width: int) -> Sample:
        boxes = torch.arange(num_boxes * 4, dtype=torch.float32).reshape(num_boxes, 4)
        labels = torch.arange(num_boxes, dtype=torch.int64)
        return Sample(torch.full((3, height, width), 255, dtype=torch.uint8), boxes, labels, 7, (height, width), 1.0,
                      "x.jpg")

    batch = collate([sample(0, 10, 20), sample(2, 30, 5), sample(1, 1, 1)], pad_multiple=16)
    assert batch.images.shape == (3, 3, 32, 32)
    assert batch.gt_boxes.shape == (3, 2, 4) and batch.gt_labels.tolist() == [[-1, -1], [0, 1], [0, -1]]
    assert batch.gt_boxes[1].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and batch.gt_boxes[0].abs().sum() == 0
    assert batch.img_sizes.tolist() == [[10, 20], [30, 5], [1, 1]]
    assert collate([sample(0, 8, 8)], pad_multiple=8).gt_labels.tolist() == [[-1]]


def image_ids_in_order(loader) -> list[int]:
    return [image_id for batch in loader for image_id in batch.image_ids.tolist()]


def test_dataloader_is_reproducible(digits_dir: Path) -> None:
    info = load_data_yaml("digits-yolo", digits_dir, SMALL)
    dataset = DetectionDataset(info, "train", 64, augment=False)
    first = image_ids_in_order(build_dataloader(dataset, 4, workers=0, shuffle=True, seed=3))
    again = image_ids_in_order(build_dataloader(dataset, 4, workers=0, shuffle=True, seed=3))
    other = image_ids_in_order(build_dataloader(dataset, 4, workers=0, shuffle=True, seed=4))
    assert first == again != other and sorted(first) == dataset.image_ids
    dataset.transforms = build_transforms(64, augment=True, fliplr=0.5)  # flips drawn in workers follow the seed
    runs = [[batch.images for batch in build_dataloader(dataset, 4, workers=2, shuffle=True, seed=1)] for _ in "ab"]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    distributed = build_dataloader(dataset, 4, workers=0, shuffle=True, seed=0, rank=1, world_size=2)
    distributed.sampler.set_epoch(1)
    assert len(image_ids_in_order(distributed)) == 8


def test_fraction_keeps_the_first_images(digits_dir: Path) -> None:
    dataset = DetectionDataset(load_data_yaml("digits", digits_dir, SMALL), "train", 64, False, fraction=0.25)
    assert dataset.image_ids == [1, 2, 3, 4] and len(dataset.coco_gt().getImgIds()) == 4
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives: no cached ground truth
    assert copy._coco_gt is None and torch.equal(copy[2].image, dataset[2].image)


def test_missing_coco_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_data_yaml("coco.yaml", tmp_path / "datasets")
    message = str(error.value)
    assert "\n" not in message
    assert str((tmp_path / "datasets" / "coco").resolve()) in message
    assert "annotations/instances_{train,val}2017.json" in message and "symlink" in message and "path:" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"val": "v", "names": ["a"]}, "'train:' is missing"),
        ({"train": "t", "names": ["a"]}, "'val:' is missing"),
        ({"train": "t", "val": "v"}, "'names:' is missing"),
        ({"train": "t", "val": "v", "names": ["a"], "nc": 2}, "nc: 2 but names lists 1"),
        ({"train": "t", "val": "v", "names": ["a"], "fliplr": 2}, "fliplr: 2 must be a probability"),
        ({"train": "t", "val": "v", "names": ["a"]}, "image folder"),
    ],
)
def test_bad_dataset_yaml_raises_data_error(tmp_path: Path, content: dict, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_data_yaml(write_yaml(tmp_path / "d.yaml", **content))


def test_split_format_detection(tmp_path: Path) -> None:
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "labels/val").mkdir(parents=True)
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_val2017.json").write_text("{}")
    assert resolve_split(tmp_path, "images/val", "val").format == "yolo"
    assert resolve_split(tmp_path, "val2017", "val").images == tmp_path / "val2017"
    assert resolve_split(tmp_path, "annotations/instances_val2017.json", "val").images == tmp_path / "val2017"
    explicit = resolve_split(tmp_path, {"images": "val2017", "annotations": "labels/val"}, "val")
    assert (explicit.format, explicit.annotations) == ("yolo", tmp_path / "labels/val")
    with pytest.raises(DataError, match="no labels for"):
        resolve_split(tmp_path, "annotations", "val")
    with pytest.raises(DataError, match="image list files"):
        resolve_split(tmp_path, "val2017.txt", "val")
