"""The offline digits demo generator: determinism, disjoint glyph pools, both label layouts, regeneration."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from crosskd.data import generate_digits, load_data_yaml
from crosskd.errors import DataError
from crosskd.paths import resolve_cfg_file

SMALL = {"num_train": 12, "num_val": 8, "imgsz": 96}


def label_bytes(root: Path) -> dict[str, bytes]:
    """Every label and annotation file under `root`, by relative path."""
    files = [*root.glob("labels/*/*.txt"), *root.glob("annotations/*.json")]
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = label_bytes(generate_digits(tmp_path / "a", seed=5, **SMALL))
    second = label_bytes(generate_digits(tmp_path / "b", seed=5, **SMALL))
    other = label_bytes(generate_digits(tmp_path / "c", seed=6, **SMALL))
    assert len(first) == 12 + 8 + 2 and first == second
    assert first != other
    image = "images/val/000003.jpg"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()


def test_splits_use_disjoint_glyphs_and_boxes_are_tight(tmp_path: Path) -> None:
    root = generate_digits(tmp_path, num_train=40, num_val=20, imgsz=128, objects=(2, 3))
    coco = {split: json.loads((root / f"annotations/instances_{split}.json").read_text()) for split in ("train", "val")}
    glyphs = {split: {ann["glyph_index"] for ann in data["annotations"]} for split, data in coco.items()}
    assert glyphs["train"] and glyphs["val"] and not glyphs["train"] & glyphs["val"]
    for image in coco["train"]["images"][:5]:
        pixels = cv2.imread(str(root / "images/train" / image["file_name"]))
        assert max(pixels.shape[:2]) == 128 == max(image["height"], image["width"])
        boxes = [ann["bbox"] for ann in coco["train"]["annotations"] if ann["image_id"] == image["id"]]
        assert 1 <= len(boxes) <= 3
        for x, y, w, h in boxes:
            assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"] and w > 0 and h > 0
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes])
        overlap_w = np.minimum(xyxy[:, None, 2], xyxy[None, :, 2]) - np.maximum(xyxy[:, None, 0], xyxy[None, :, 0])
        overlap_h = np.minimum(xyxy[:, None, 3], xyxy[None, :, 3]) - np.maximum(xyxy[:, None, 1], xyxy[None, :, 1])
        overlapping = (overlap_w > 0) & (overlap_h > 0)
        assert not overlapping[~np.eye(len(boxes), dtype=bool)].any()


def test_yolo_labels_match_coco_annotations(tmp_path: Path) -> None:
    root = generate_digits(tmp_path, **SMALL)
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [f"{i:06d}.jpg" for i in range(1, 13)]
    image = coco["images"][0]
    rows = np.loadtxt(root / "labels/train/000001.txt", ndmin=2)
    anns = [ann for ann in coco["annotations"] if ann["image_id"] == 1]
    assert rows[:, 0].tolist() == [ann["category_id"] for ann in anns]
    scale = np.array([image["width"], image["height"]] * 2)
    expected = np.array([[x + w / 2, y + h / 2, w, h] for x, y, w, h in (ann["bbox"] for ann in anns)]) / scale
    np.testing.assert_allclose(rows[:, 1:], expected, atol=1e-6)


def test_regenerates_only_when_parameters_change(tmp_path: Path) -> None:
    root = generate_digits(tmp_path, **SMALL)
    marker = root / ".done"
    stamp = marker.stat().st_mtime_ns
    generate_digits(tmp_path, **SMALL)
    assert marker.stat().st_mtime_ns == stamp
    generate_digits(tmp_path, **{**SMALL, "num_train": 3})
    assert len(list((root / "images/train").iterdir())) == 3 and len(list((root / "labels/train").iterdir())) == 3
    assert json.loads(marker.read_text())["num_train"] == 3


def image_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.glob("images/*/*.jpg"))}


def test_photo_backgrounds_are_deterministic_per_seed_with_boxes_inside(tmp_path: Path) -> None:
    first = generate_digits(tmp_path / "a", seed=3, background="photos", **SMALL)
    second = generate_digits(tmp_path / "b", seed=3, background="photos", **SMALL)
    closeup = generate_digits(tmp_path / "c", seed=3, **SMALL)
    assert image_files(first) == image_files(second) and label_bytes(first) == label_bytes(second)
    assert image_files(first) != image_files(closeup)
    assert json.loads((first / ".done").read_text())["background"] == "photos"
    assert "background" not in json.loads((closeup / ".done").read_text())  # older closeup data stays valid
    coco = json.loads((first / "annotations/instances_train.json").read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    assert len(coco["annotations"]) >= len(coco["images"])
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height and w > 0 and h > 0


def background_detail(root: Path) -> tuple[float, float]:
    """Mean over the train images of the pixel standard deviation and of the Laplacian's variance (local detail)."""
    images = [cv2.imread(str(path)) for path in sorted(root.glob("images/train/*.jpg"))]
    grey = [cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) for image in images]
    return (float(np.mean([g.std() for g in grey])),
            float(np.mean([cv2.Laplacian(g, cv2.CV_32F).var() for g in grey])))


def test_photo_backgrounds_are_busier_than_closeup_ones(tmp_path: Path) -> None:
    params = {"num_train": 32, "num_val": 1, "imgsz": 64, "objects": (0, 0)}  # backgrounds alone
    closeup_std, closeup_detail = background_detail(generate_digits(tmp_path / "c", **params))
    photos_std, photos_detail = background_detail(generate_digits(tmp_path / "p", background="photos", **params))
    assert photos_std > 1.15 * closeup_std  # measured: 44 vs 32
    assert photos_detail > 2.5 * closeup_detail  # measured: 3,252 vs 691


def test_unknown_background_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"digits: background='plain' is not known; use closeup or photos"):
        generate_digits(tmp_path, background="plain", **SMALL)


def test_dataset_yaml_generate_block_takes_the_background(tmp_path: Path) -> None:
    shipped = yaml.safe_load(resolve_cfg_file("digits_photos.yaml", "datasets").read_text())
    assert shipped["generate"]["background"] == "photos" and shipped["path"] == "digits_photos"
    data = {**shipped, "path": str(tmp_path / "photos"), "generate": {**SMALL, "background": "photos", "seed": 1}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    info = load_data_yaml(tmp_path / "data.yaml")
    assert json.loads((info.path / ".done").read_text())["background"] == "photos"
