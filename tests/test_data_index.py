"""The flat label index (data/index.py) and the label cache next to the annotations (data/cache.py)."""

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from crosskd.data import DetectionDataset, load_data_yaml
from crosskd.data import cache as label_cache
from crosskd.data.index import LabelIndex

SIZES = {7: (64, 48), 3: (40, 40), 9: (64, 48), 5: (32, 64), 1: (40, 40)}  # image id -> (width, height)


def coco_dataset(root: Path, seed: int = 0) -> Path:
    """A 3-class COCO split (ids listed out of order, crowd boxes, a background, one box outside); returns its YAML."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, (width, height) in SIZES.items():
        name = f"img_{image_id}.png"
        cv2.imwrite(str(root / "images" / name), np.full((height, width, 3), image_id, np.uint8))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for _ in range(0 if image_id == 5 else int(rng.integers(1, 5))):
            x, y = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
            annotations.append({"image_id": image_id, "category_id": int(rng.choice([2, 4, 8])), "iscrowd": 0,
                                "bbox": [round(x, 2), round(y, 2), round(width / 3, 2), round(height / 3, 2)]})
    annotations[1]["iscrowd"] = 1
    annotations.append({"image_id": 7, "category_id": 2, "iscrowd": 0, "bbox": [60, 0, 30, 10]})  # outside
    for i, annotation in enumerate(annotations, start=1):
        annotation["id"] = i
    (root / "annotations").mkdir()
    categories = [{"id": i, "name": str(i)} for i in (8, 2, 4)]
    write_json(root / "annotations/instances_images.json", images, annotations, categories)
    yaml_file = root / "data.yaml"
    yaml_file.write_text(f"path: {root}\ntrain: images\nval: images\nnames: [a, b, c]\n")
    return yaml_file


def write_json(path: Path, images: list, annotations: list, categories: list) -> None:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def reference_records(root: Path) -> list[tuple]:
    """What the old per-image readers gave, computed naively from the JSON: one tuple per image, by image id."""
    data = json.loads((root / "annotations/instances_images.json").read_text())
    label_of = {category_id: label for label, category_id in enumerate(sorted(c["id"] for c in data["categories"]))}
    records = []
    for image in sorted(data["images"], key=lambda image: image["id"]):
        rows = {0: ([], []), 1: ([], [])}
        for annotation in data["annotations"]:
            x, y, w, h = annotation["bbox"]
            if annotation["image_id"] == image["id"] and x + w <= image["width"] + 1 and y + h <= image["height"] + 1:
                rows[annotation["iscrowd"]][0].append([x, y, x + w, y + h])
                rows[annotation["iscrowd"]][1].append(label_of[annotation["category_id"]])
        records.append((root / "images" / image["file_name"], image["width"], image["height"], image["id"],
                        *(np.array(rows[c][0], np.float32).reshape(-1, 4) for c in (0, 1)),
                        *(np.array(rows[c][1], np.int64) for c in (0, 1))))
    return records


def as_tuples(records) -> list[tuple]:
    return [(r.path, r.width, r.height, r.image_id, r.boxes, r.crowd_boxes, r.labels, r.crowd_labels) for r in records]


def assert_same_records(ours: list[tuple], expected: list[tuple]) -> None:
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        assert a[:4] == b[:4]
        for array_a, array_b in zip(a[4:], b[4:], strict=True):
            assert array_a.dtype == array_b.dtype and array_a.shape == array_b.shape
            np.testing.assert_allclose(array_a, array_b, atol=1e-4)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every split the label readers read (a cache hit reads none)."""
    reads, read_split = [], label_cache.read_split

    def counting(source, nc):
        reads.append(source.format)
        return read_split(source, nc)

    monkeypatch.setattr(label_cache, "read_split", counting)
    return reads


def build(yaml_file: Path) -> DetectionDataset:
    return DetectionDataset(load_data_yaml(yaml_file), "train", imgsz=64, augment=False)


def test_index_arrays_give_the_old_records_and_round_trip(tmp_path: Path) -> None:
    dataset = build(coco_dataset(tmp_path / "coco"))
    index = dataset.records
    assert isinstance(index, LabelIndex) and index.boxes.shape == (index.box_offsets[-1], 4)
    expected = reference_records(tmp_path / "coco")
    assert_same_records(as_tuples(index), expected)
    assert dataset.image_ids == [1, 3, 5, 7, 9] and index[2].boxes.shape == (0, 4)  # image 5: a background
    assert_same_records(as_tuples(LabelIndex.from_arrays(index.root, index.arrays())), expected)
    assert_same_records(as_tuples(index[1:4]), expected[1:4])
    assert_same_records(as_tuples(index.select(np.array([4, 0]))), [expected[4], expected[0]])
    assert_same_records(as_tuples(pickle.loads(pickle.dumps(index))), expected)
    assert np.shares_memory(index[3].boxes, index.boxes)  # records are views of the one boxes array
    summary = dataset.labels_summary()
    assert summary["backgrounds"] == 1 and summary["instances"] == sum(len(r[6]) for r in expected)
    assert summary["instances_per_class"] == np.bincount(np.concatenate([r[6] for r in expected]), minlength=3).tolist()


def test_cache_written_then_reused_with_the_same_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    yaml_file = coco_dataset(tmp_path / "coco")
    reads = count_reads(monkeypatch)
    first = build(yaml_file)
    cache_file = tmp_path / "coco/annotations/instances_images.cache"
    assert reads == ["coco"] and cache_file.is_file()
    second = build(yaml_file)
    assert reads == ["coco"]  # read from the cache
    assert_same_records(as_tuples(second.records), as_tuples(first.records))
    assert second.category_ids == first.category_ids == [2, 4, 8]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING: train: 1 box outside the image skipped"] * 2


def test_yolo_cache_beside_the_labels_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_digits_yaml
) -> None:
    yaml_file = write_digits_yaml(tmp_path, num_train=6, num_val=2)
    load_data_yaml(yaml_file)  # generates the images with COCO and YOLO labels
    yaml_file.write_text(yaml_file.read_text().replace("annotations/instances_train.json", "images/train"))
    reads = count_reads(monkeypatch)
    first = build(yaml_file)
    labels_dir = first.source.annotations
    assert labels_dir.with_name(labels_dir.name + ".cache").is_file()
    assert_same_records(as_tuples(build(yaml_file).records), as_tuples(first.records))
    assert reads == ["yolo"]
    extra = next(first.source.images.iterdir())
    (first.source.images / f"copy{extra.suffix}").write_bytes(extra.read_bytes())  # a new image: read again
    assert len(build(yaml_file)) == len(first) + 1 and reads == ["yolo", "yolo"]


def test_cache_invalidated_when_the_annotations_or_an_image_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_file = coco_dataset(tmp_path / "coco")
    reads = count_reads(monkeypatch)
    before = build(yaml_file)
    json_file = tmp_path / "coco/annotations/instances_images.json"
    data = json.loads(json_file.read_text())
    data["annotations"].append({"id": 99, "image_id": 5, "category_id": 4, "iscrowd": 0, "bbox": [1, 2, 3, 4]})
    json_file.write_text(json.dumps(data))
    changed = build(yaml_file)
    assert reads == ["coco", "coco"] and changed.records[2].boxes.tolist() == [[1, 2, 4, 6]]
    build(yaml_file)
    assert len(reads) == 2
    image = tmp_path / "coco/images/img_9.png"
    cv2.imwrite(str(image), np.zeros((10, 10, 3), np.uint8))  # now smaller than its annotation: skipped
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # whatever the clock's resolution
    assert build(yaml_file).image_ids == [1, 3, 5, 7] and len(reads) == 3
    assert before.image_ids == [1, 3, 5, 7, 9]


def test_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = coco_dataset(tmp_path / "coco")
    first = build(yaml_file)
    cache_file = tmp_path / "coco/annotations/instances_images.cache"
    cache_file.write_bytes(b"PK\x03\x04 not a zip any more")
    reads = count_reads(monkeypatch)
    assert_same_records(as_tuples(build(yaml_file).records), as_tuples(first.records))
    assert reads == ["coco"] and cache_file.stat().st_size > 100


def test_read_only_folder_falls_back_to_no_cache_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    yaml_file = coco_dataset(tmp_path / "coco")
    folder = tmp_path / "coco/annotations"
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores the mode bits: fail the write the way a read-only folder does

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(label_cache.tempfile, "mkstemp", refuse)
    try:
        reads = count_reads(monkeypatch)
        datasets = [build(yaml_file) for _ in range(2)]
        assert sorted(path.name for path in folder.iterdir()) == ["instances_images.json"]
    finally:
        folder.chmod(0o755)
    assert reads == ["coco", "coco"]
    assert_same_records(as_tuples(datasets[0].records), as_tuples(datasets[1].records))
    lines = [line for line in capsys.readouterr().out.splitlines() if "label cache" in line]
    assert len(lines) == 1 and lines[0].startswith(f"WARNING: cannot write the label cache {folder}")
    assert "Permission denied" in lines[0]
