"""The transform pipeline: each step on a hand-made image, probabilities, the pipeline's order and where it is built."""

import ast
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as tvf

import crosskd
from crosskd.data import DetectionDataset, build_dataloader, generate_digits, load_data_yaml
from crosskd.data.augment import ImagePool
from crosskd.data.pipeline import build_transforms
from crosskd.data.transforms import Compose, LabeledImage, RandomHFlip, Resize, Transform, load_image
from crosskd.engine.prediction.sources import read_image

BOX = [[10.0, 10.0, 30.0, 30.0]]


def labeled(height: int = 40, width: int = 100, boxes: list[list[float]] = BOX) -> LabeledImage:
    """A gray image whose left half is dark (so a flip shows) with one box per row of `boxes`."""
    image = np.full((height, width, 3), 200, np.uint8)
    image[:, : width // 2] = 50
    boxes_array = np.array(boxes, np.float32).reshape(-1, 4)
    labels = np.arange(len(boxes_array), dtype=np.int64)
    return LabeledImage(image, boxes_array, labels, orig_size=(height, width), valid_size=(height, width))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_resize_scales_image_and_boxes_keeping_the_ratio() -> None:
    sample = labeled()
    out = Resize(50)(sample, seeded())
    assert out.image.shape == (20, 50, 3) and out.valid_size == (20, 50) and out.orig_size == (40, 100)
    assert out.ratio == 0.5 and out.boxes.tolist() == [[5.0, 5.0, 15.0, 15.0]] and out.labels.tolist() == [0]
    assert (out.image[:, :25] == 50).all() and (out.image[:, 25:] == 200).all()
    assert sample.boxes.tolist() == BOX and sample.image.shape == (40, 100, 3)  # the input is left as it was


def test_resize_up_clips_boxes_and_composes_ratios() -> None:
    sample = labeled(10, 20, [[-2.0, 1.0, 25.0, 12.0]]).replace(ratio=0.5)
    out = Resize(40)(sample, seeded())
    assert out.image.shape == (20, 40, 3) and out.ratio == 1.0
    assert out.boxes.tolist() == [[0.0, 2.0, 40.0, 20.0]]  # (-4, 2, 50, 24) clipped to the 40 × 20 image


def test_flip_moves_the_box_and_mirrors_the_image() -> None:
    sample = labeled()
    out = RandomHFlip(1.0)(sample, seeded())
    assert out.boxes.tolist() == [[70.0, 10.0, 90.0, 30.0]]  # x -> 100 - x, x1 and x2 swapped
    assert np.array_equal(out.image, sample.image[:, ::-1]) and out.image.flags.c_contiguous
    assert (out.image[:, 50:] == 50).all() and sample.boxes.tolist() == BOX
    assert (out.valid_size, out.ratio, out.labels.tolist()) == (sample.valid_size, 1.0, [0])


def test_flip_matches_torchvision_on_random_boxes() -> None:
    """An independent reference: torchvision's flip of the same xyxy boxes on a 100-pixel-wide canvas."""
    corners = np.sort(np.random.default_rng(0).uniform(0, 100, (2, 20, 2)), axis=0)  # [2, K, 2] sorted x, y
    boxes = np.concatenate([corners[0], corners[1]], axis=1).astype(np.float32)  # [K, 4] xyxy
    boxes[0] = [0, 0, 100, 40]  # touching both edges
    out = RandomHFlip(1.0)(labeled(boxes=boxes.tolist()), seeded())
    xyxy = tv_tensors.BoundingBoxFormat.XYXY
    expected = tvf.horizontal_flip_bounding_boxes(torch.from_numpy(boxes), xyxy, canvas_size=(40, 100))
    assert torch.equal(torch.from_numpy(out.boxes), expected)  # equal values; torchvision's x1 = 0 is -0.0


def test_flip_of_no_boxes_keeps_the_empty_shape() -> None:
    out = RandomHFlip(1.0)(labeled(boxes=[]), seeded())
    assert out.boxes.shape == (0, 4) and out.boxes.dtype == np.float32


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_probability_zero_and_one_decide_without_a_draw(p: float) -> None:
    sample, rng = labeled(), seeded()
    state = rng.get_state()
    outs = [RandomHFlip(p)(sample, rng) for _ in range(5)]
    assert torch.equal(rng.get_state(), state)
    if p == 0:
        assert all(out is sample for out in outs)
    else:
        assert all(out.boxes.tolist() == [[70.0, 10.0, 90.0, 30.0]] for out in outs)


def test_probability_takes_one_draw_per_call_from_the_given_generator() -> None:
    """Flip exactly when `torch.rand(1, generator=rng) < p`, one draw per call, as torchvision's flip did."""
    flip, sample = RandomHFlip(0.3), labeled()
    rng, reference = seeded(7), seeded(7)
    flipped = [flip(sample, rng) is not sample for _ in range(400)]
    assert flipped == [bool(torch.rand(1, generator=reference) < 0.3) for _ in range(400)]
    assert 0.22 < np.mean(flipped) < 0.38


def test_compose_runs_in_order_and_disables_by_name() -> None:
    pipeline = Compose([Resize(50), RandomHFlip(1.0)])
    assert pipeline.names == ["resize", "fliplr"]
    assert pipeline(labeled(), seeded()).boxes.tolist() == [[35.0, 5.0, 45.0, 15.0]]  # resized, then 50 - x
    pipeline.disable("fliplr")
    assert pipeline(labeled(), seeded()).boxes.tolist() == [[5.0, 5.0, 15.0, 15.0]]
    with pytest.raises(ValueError, match="no transform named 'mosaic'.*resize, fliplr"):
        pipeline.disable("mosaic")


def test_a_transform_without_apply_is_a_bug() -> None:
    with pytest.raises(NotImplementedError):
        Transform()(labeled(), seeded())


def test_build_transforms_for_train_and_eval() -> None:
    train = build_transforms(640, augment=True, fliplr=0.25)
    assert train.names == ["resize", "fliplr"] and train.transforms[0].size == 640 and train.transforms[1].p == 0.25
    assert build_transforms(320, augment=False, fliplr=0.25).names == ["resize"]


def test_transforms_are_built_only_in_build_transforms() -> None:
    """Steps are constructed in one function, which the dataset alone calls (tests may build their own)."""
    steps = {
        "Compose", "Resize", "RandomHFlip", "RandomResize", "Mosaic", "RandomAffine", "MixUp", "CutMix", "RandomHSV",
        "RandomVFlip", "SampleSource",
    }
    package = Path(crosskd.__file__).parent
    callers: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
                    name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr  # Resize or steps.Mosaic
                    if name in steps | {"build_transforms"}:
                        callers.setdefault(name, set()).add(f"{path.relative_to(package)}:{function.name}")
    assert callers == {
        **dict.fromkeys(steps, {"data/pipeline.py:build_transforms"}),
        "build_transforms": {"data/dataset.py:__init__"},
    }


@pytest.fixture(scope="module")
def digits_info(tmp_path_factory: pytest.TempPathFactory):
    """Digits (8 + 4 images, 128 px) under a YAML that leaves fliplr to the run setting."""
    root = generate_digits(tmp_path_factory.mktemp("transforms") / "digits", num_train=8, num_val=4, seed=0)
    yaml_file = root / "data.yaml"
    yaml_file.write_text(yaml.safe_dump({
        "path": str(root), "train": "annotations/instances_train.json", "val": "annotations/instances_val.json",
        "names": {i: str(i) for i in range(10)},
    }))
    return load_data_yaml(yaml_file)


def test_dataset_builds_its_pipeline_from_its_arguments(digits_info) -> None:
    train = DetectionDataset(digits_info, "train", 96, augment=True, fliplr=0.25)
    val = DetectionDataset(digits_info, "val", 96, augment=False, fliplr=0.25)
    assert train.transforms.names == ["resize", "fliplr"] and train.transforms.transforms[1].p == 0.25
    assert val.transforms.names == ["resize"] and val.transforms.transforms[0].size == 96


def test_dataset_item_is_load_sample_through_the_pipeline(digits_info) -> None:
    dataset = DetectionDataset(digits_info, "train", 96, augment=True, fliplr=0.5)
    record, loaded = dataset.load_sample(3)
    size = (record.height, record.width)
    assert record.image_id == dataset.image_ids[3] and loaded.image.shape == (*size, 3) and max(size) == 128
    assert np.array_equal(loaded.boxes, record.boxes) and loaded.ratio == 1.0 and loaded.unreadable == ()
    torch.manual_seed(5)
    sample = dataset[3]
    expected = dataset.transforms(loaded, torch.Generator().manual_seed(5))
    assert torch.equal(sample.image, torch.from_numpy(expected.image).permute(2, 0, 1))
    assert torch.equal(sample.boxes, torch.from_numpy(expected.boxes)) and sample.ratio == 0.75
    assert (sample.image_id, sample.orig_size, sample.path) == (record.image_id, size, str(record.path))


def test_dataset_gives_mixing_steps_its_own_images(digits_info) -> None:
    """Mosaic and MixUp load the dataset's other images; the dataset (with its pipeline) survives a pickle, as for
    spawned loader workers, and gives the same sample for the same seed."""
    dataset = DetectionDataset(digits_info, "train", 96, augment=True, mosaic=1.0, mixup=1.0, translate=0.1, scale=0.5)
    assert dataset.transforms.names == ["resize", "mosaic", "affine", "mixup", "fliplr"]
    torch.manual_seed(3)
    sample = dataset[2]
    copy = pickle.loads(pickle.dumps(dataset))
    torch.manual_seed(3)
    again = copy[2]
    assert sample.image.shape == (3, 96, 96) and len(sample.boxes) > 0
    assert torch.equal(sample.image, again.image) and torch.equal(sample.boxes, again.boxes)


def test_disabled_flip_reaches_loader_workers_built_after_it(digits_info) -> None:
    dataset = DetectionDataset(digits_info, "train", 96, augment=True, fliplr=1.0)
    plain = DetectionDataset(digits_info, "train", 96, augment=False)
    dataset.transforms.disable("fliplr")
    batches = [build_dataloader(d, 4, workers=2, shuffle=False, pin_memory=False) for d in (dataset, plain)]
    assert all(torch.equal(a.images, b.images) for a, b in zip(*batches, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_flips_is_reproducible_per_seed(digits_info, workers: int) -> None:
    """Same seed, same batches (workers=0 draws from torch's global generator: seeded here as the trainer does)."""
    dataset = DetectionDataset(digits_info, "train", 96, augment=True, fliplr=0.5)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        loader = build_dataloader(dataset, 4, workers=workers, shuffle=True, seed=seed, pin_memory=False)
        return [batch.images for batch in loader]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_describe_lists_the_enabled_steps_with_their_probabilities() -> None:
    pipeline = build_transforms(64, augment=True, fliplr=0.5, hsv_h=0.015, mosaic=1.0, mixup=0.25,
                                pool=ImagePool(lambda index: None, 4))
    assert pipeline.describe() == "resize → mosaic → affine → mixup 0.25 → hsv → fliplr 0.5"
    pipeline.disable("mixup")
    assert pipeline.describe() == "resize → mosaic → affine → hsv → fliplr 0.5"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_training_images_decode_to_rgb_and_prediction_frames_to_bgr(tmp_path, suffix: str) -> None:
    bgr = np.zeros((16, 24, 3), np.uint8)
    bgr[..., 2] = 255  # red, as OpenCV stores it
    path = tmp_path / f"red{suffix}"
    cv2.imwrite(str(path), bgr)
    assert np.abs(load_image(path)[8, 12].astype(int) - [255, 0, 0]).max() <= 2  # JPEG: nearly exact
    assert np.abs(read_image(path, 0).image[8, 12].astype(int) - [0, 0, 255]).max() <= 2
