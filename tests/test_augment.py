"""The training augmentations (crosskd/data/augment.py) and the train pipeline build_transforms makes of them.

Most tests draw filled rectangles on black images, one box per rectangle, and check after a step or the whole
pipeline that every box still covers its rectangle. Where a rectangle's pixels landed is found without trusting
colours (HSV and MixUp change them): the same seed is run again with that one rectangle left undrawn, and the pixels
that differ are its footprint. The random geometry only depends on the seed and the boxes, never on the pixels.
"""

import inspect
import random

import cv2
import numpy as np
import pytest
import torch
from conftest import load_benchmark

from crosskd.data.augment import (
    CutMix,
    ImagePool,
    MixUp,
    Mosaic,
    RandomAffine,
    RandomHSV,
    RandomResize,
    RandomVFlip,
    SampleSource,
    beta_32,
    box_candidates,
)
from crosskd.data.pipeline import AUGMENTATION_KEYS, augmentation_settings, build_transforms
from crosskd.data.transforms import Compose, LabeledImage, RandomHFlip, Resize
from crosskd.settings import SETTINGS

IMGSZ = 128
DEFAULTS = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "translate": 0.1, "scale": 0.5, "fliplr": 0.5, "mosaic": 1.0}
STRONG = {**DEFAULTS, "degrees": 10.0, "shear": 5.0, "perspective": 0.0005, "mixup": 0.5, "cutmix": 0.5, "flipud": 0.5}
CONTRAST = 24  # a pixel belongs to a rectangle's footprint when hiding the rectangle changes it by more than this


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def colour(label: int) -> tuple[int, int, int]:
    """A bright colour per label (hue steps of 47 of OpenCV's 180), so each rectangle has its own."""
    hsv = np.array([[[label * 47 % 180, 255, 255]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


class Scene:
    """A dataset of black images with filled rectangles, one box each, labelled with the rectangle's own id.

    `load(index)` is the dataset's `load_sample`: read-only arrays, so a step that writes into its input fails. It
    records which image each call loaded; with `hidden = (call, label)` that call leaves that rectangle undrawn.
    """

    def __init__(self, num_images: int = 8, seed: int = 0, empty: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.sizes = [(int(rng.integers(64, 161)), int(rng.integers(64, 161))) for _ in range(num_images)]
        self.boxes, self.labels = [], []
        for height, width in self.sizes:
            boxes = [] if empty else self.rectangles(rng, height, width)
            first = sum(len(labels) for labels in self.labels)
            self.boxes.append(self.read_only(np.array(boxes, np.float32).reshape(-1, 4)))
            self.labels.append(self.read_only(np.arange(first, first + len(boxes), dtype=np.int64)))
        self.loaded: list[int] = []
        self.hidden: tuple[int, int] | None = None
        self.pool = ImagePool(self.load, num_images)

    @staticmethod
    def read_only(array: np.ndarray) -> np.ndarray:
        array.flags.writeable = False
        return array

    @staticmethod
    def rectangles(rng: np.random.Generator, height: int, width: int) -> list[list[int]]:
        """2 or 3 non-overlapping rectangles, 12 to 45 % of the image side, the first touching the right edge."""
        boxes: list[list[int]] = []
        count = int(rng.integers(2, 4))
        while len(boxes) < count:
            w, h = (int(rng.integers(0.12 * side, 0.45 * side)) for side in (width, height))
            x = width - w if not boxes else int(rng.integers(0, width - w))
            box = [x, int(rng.integers(0, height - h)), x + w, 0]
            box[3] = box[1] + h
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                boxes.append(box)
        return boxes

    def load(self, index: int) -> LabeledImage:
        """Image `index` in original pixels."""
        call = len(self.loaded)
        self.loaded.append(index)
        height, width = self.sizes[index]
        image = np.zeros((height, width, 3), np.uint8)
        for (x1, y1, x2, y2), label in zip(self.boxes[index].astype(int), self.labels[index]):
            if self.hidden != (call, label):
                image[y1:y2, x1:x2] = colour(label)
        size = (height, width)
        return LabeledImage(self.read_only(image), self.boxes[index], self.labels[index], size, size)

    def run(self, pipeline: Compose, index: int, seed: int, hidden: tuple[int, int] | None = None) -> LabeledImage:
        """Image `index` through `pipeline` with generator seed `seed`, rectangle `hidden` left undrawn."""
        self.loaded, self.hidden = [], hidden
        return pipeline(self.load(index), seeded(seed))


def pixels_in(box: np.ndarray, shape: tuple[int, int], grow: float = 0.0) -> np.ndarray:
    """[H, W] mask of the pixels whose centres lie in the xyxy `box` grown by `grow` on each side."""
    ys, xs = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    inside_x = (xs >= box[0] - grow) & (xs <= box[2] + grow)
    inside_y = (ys >= box[1] - grow) & (ys <= box[3] + grow)
    return inside_y[:, None] & inside_x[None, :]


def footprints(scene: Scene, pipeline: Compose, index: int, seed: int) -> tuple[LabeledImage, dict]:
    """The pipeline's output, and per drawn rectangle (load call, label) the `[H, W]` mask of where it landed."""
    out = scene.run(pipeline, index, seed)
    instances = [(call, int(label)) for call, image in enumerate(scene.loaded) for label in scene.labels[image]]
    masks = {}
    for instance in instances:
        hidden = scene.run(pipeline, index, seed, hidden=instance)
        assert np.array_equal(hidden.boxes, out.boxes) and np.array_equal(hidden.labels, out.labels)
        masks[instance] = np.abs(out.image.astype(np.int16) - hidden.image).max(axis=2) > CONTRAST
    return out, masks


def check_boxes_cover_rectangles(scene: Scene, pipeline: Compose, index: int, seed: int, min_side: float) -> None:
    """Every box lies in the image, is wider and taller than `min_side` and covers one rectangle of its label:
    ≥ 90 % of the rectangle's footprint inside it (1 px of interpolation allowed), filling ≥ 40 % of it (a rotated
    rectangle fills less than its box). Together the boxes cover ≥ 85 % of all footprints: the boxes dropped are
    the rectangles that are mostly gone."""
    out, masks = footprints(scene, pipeline, index, seed)
    shape = out.image.shape[:2]
    boxes = out.boxes
    assert boxes.dtype == np.float32 and out.labels.dtype == np.int64 and boxes.shape == (len(out.labels), 4)
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= shape[1]).all() and (boxes[:, [1, 3]] <= shape[0]).all()
    assert (boxes[:, 2] - boxes[:, 0] > min_side).all() and (boxes[:, 3] - boxes[:, 1] > min_side).all()
    for box, label in zip(boxes, out.labels):
        near, inner = pixels_in(box, shape, grow=1.0), pixels_in(box, shape)
        assert any(
            (mask & near).sum() >= 0.9 * mask.sum() and (mask & inner).sum() >= 0.4 * inner.sum()
            for (_, drawn), mask in masks.items() if drawn == label and mask.any()
        ), f"box {box} of rectangle {label} does not cover it"
    covered = [
        (mask & np.any([pixels_in(b, shape, 1.0) for b in boxes[out.labels == label]], axis=0)).sum()
        for (_, label), mask in masks.items() if (out.labels == label).any()
    ]
    assert sum(covered) >= 0.85 * sum(mask.sum() for mask in masks.values())


# ---------------------------------------------------------------------------------- boxes cover their rectangles
def single_steps(scene: Scene) -> dict[str, Compose]:
    """Each step after a resize, at the strength of the STRONG case (mixing steps always applied)."""
    resized = SampleSource(scene.pool, Compose([Resize(IMGSZ)]))
    return {
        "affine": Compose([Resize(IMGSZ), RandomAffine(degrees=10, translate=0.1, scale=0.5, shear=5)]),
        "perspective": Compose([Resize(IMGSZ), RandomAffine(degrees=10, scale=0.5, perspective=0.0005)]),
        "mosaic": Compose([Resize(IMGSZ), Mosaic(resized, IMGSZ), RandomAffine(0, 0, 0, 0, 0)]),
        "mixup": Compose([Resize(IMGSZ), MixUp(resized, p=1.0)]),
        "cutmix": Compose([Resize(IMGSZ), CutMix(resized, p=1.0)]),
        "hsv": Compose([Resize(IMGSZ), RandomHSV(0.015, 0.7, 0.4)]),
        "flips": Compose([Resize(IMGSZ), RandomVFlip(1.0), RandomHFlip(1.0)]),
        "multiscale": Compose([RandomResize((64, 160)), RandomAffine(translate=0.1, scale=0.5)]),
    }


@pytest.mark.parametrize("step", ["affine", "perspective", "mosaic", "mixup", "cutmix", "hsv", "flips", "multiscale"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_step_keeps_boxes_on_their_rectangles(step: str, seed: int) -> None:
    scene = Scene()
    min_side = 2.0 if step in ("affine", "perspective", "mosaic", "multiscale") else 0.0  # box_candidates ran last
    check_boxes_cover_rectangles(scene, single_steps(scene)[step], index=seed + 1, seed=seed, min_side=min_side)


@pytest.mark.parametrize("settings", [DEFAULTS, STRONG], ids=["ultralytics-defaults", "strong"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_keeps_boxes_on_their_rectangles(settings: dict, seed: int) -> None:
    scene = Scene()
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, **settings)
    min_side = 0.0 if settings.get("cutmix") else 2.0  # CutMix keeps the other image's boxes clipped to its rectangle
    check_boxes_cover_rectangles(scene, pipeline, index=seed, seed=seed, min_side=min_side)


def test_the_footprint_check_fails_on_a_wrong_box() -> None:
    """The check above is not vacuous: a pipeline that shifts the boxes but not the pixels fails it."""

    class ShiftBoxes(RandomHFlip):
        def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
            boxes = sample.boxes + np.array([6, 0, 6, 0], np.float32)  # [K, 4] 6 px to the right, pixels left in place
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, sample.image.shape[1])
            return sample.replace(boxes=boxes.astype(np.float32))

    scene = Scene()
    with pytest.raises(AssertionError, match="does not cover"):
        check_boxes_cover_rectangles(scene, Compose([Resize(IMGSZ), ShiftBoxes(1.0)]), index=1, seed=0, min_side=0)


# ---------------------------------------------------------------------------------------------- affine and box rules
def test_box_candidates_follow_ultralytics_thresholds() -> None:
    before = np.array([[0, 0, 10, 10]] * 5 + [[0, 0, 2, 300]], np.float32)  # [6, 4] (already times the zoom)
    after = np.array([
        [0, 0, 10, 10],  # whole: kept
        [0, 0, 2, 10],  # 2 px wide: not over 2, dropped
        [0, 0, 2.5, 4.5],  # area 11.25 % of before: kept
        [0, 0, 2.5, 3.9],  # area 9.75 %: dropped
        [0, 0, 10, 10.5],  # grown a little: kept
        [0, 0, 2.5, 260],  # aspect 104 over 100: dropped
    ], np.float32)
    assert box_candidates(before, after).tolist() == [True, False, True, False, True, False]


def canvas_sample(boxes: list[list[float]], side: int = 128) -> LabeledImage:
    """A Mosaic-like `side` × `side` canvas of random pixels (border side/4) with `boxes`."""
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    boxes_array = np.array(boxes, np.float32).reshape(-1, 4)
    return LabeledImage(image, boxes_array, np.arange(len(boxes_array)), (side, side), (side, side), border=side // 4)


def test_affine_after_mosaic_crops_the_centre_and_clips_or_drops_cut_boxes() -> None:
    """With every gain 0 the affine step is the centre crop: 32 px off each side of a 128 canvas, boxes moved by −32,
    clipped to the 64 × 64 output, then kept or dropped by Ultralytics' size and area rule."""
    sample = canvas_sample([
        [40, 40, 60, 60],  # inside: [8, 8, 28, 28]
        [20, 40, 50, 60],  # cut by the left edge: [0, 8, 18, 28], 60 % left: kept
        [0, 40, 34, 60],  # 2 px left: dropped
        [0, 40, 35.5, 80],  # 3.5 × 40 of 35.5 × 40 left, 9.9 %: dropped
        [0, 40, 36, 80],  # 4 × 40 of 36 × 40, 11 %: kept
        [0, 0, 20, 20],  # in the cropped-off border: dropped
    ])
    out = RandomAffine(0, 0, 0, 0, 0)(sample, seeded(0))
    assert out.image.shape == (64, 64, 3) and np.array_equal(out.image, sample.image[32:96, 32:96])
    assert out.boxes.tolist() == [[8, 8, 28, 28], [0, 8, 18, 28], [0, 8, 4, 48]] and out.labels.tolist() == [0, 1, 4]
    assert (out.valid_size, out.border) == ((64, 64), 0)


def test_affine_with_no_box_left_gives_empty_arrays() -> None:
    out = RandomAffine(0, 0, 0, 0, 0)(canvas_sample([[0, 0, 20, 20], [110, 100, 128, 128]]), seeded(0))
    assert out.boxes.shape == (0, 4) and out.boxes.dtype == np.float32
    assert out.labels.shape == (0,) and out.labels.dtype == np.int64


def test_affine_without_gains_or_border_is_the_identity() -> None:
    sample = canvas_sample([[5, 6, 70, 90]]).replace(border=0)
    out = RandomAffine(0, 0, 0, 0, 0)(sample, seeded(0))
    assert np.array_equal(out.image, sample.image) and np.array_equal(out.boxes, sample.boxes)


def test_affine_rotation_and_zoom_match_opencv_about_the_centre() -> None:
    """Without translation the matrix is OpenCV's rotation about the image centre, angle and zoom from the 8 draws
    in Ultralytics' order; a box centred on the image stays centred and scales by the zoom."""
    step = RandomAffine(degrees=30, translate=0, scale=0.5)
    draws = torch.rand(8, generator=seeded(3), dtype=torch.float64).numpy() * 2 - 1
    angle, zoom = draws[2] * 30, 1 + draws[3] * 0.5
    matrix, drawn_zoom = step.draw_matrix(seeded(3), (80, 120), (80, 120))
    assert drawn_zoom == pytest.approx(zoom)
    np.testing.assert_allclose(matrix[:2], cv2.getRotationMatrix2D((60, 40), angle, zoom), atol=1e-9)
    out = RandomAffine(translate=0, scale=0.5)(canvas_sample([[54, 54, 74, 74]]).replace(border=0), seeded(3))
    np.testing.assert_allclose(out.boxes[0], [64 - 10 * zoom] * 2 + [64 + 10 * zoom] * 2, rtol=1e-6)


def test_affine_area_rule_compares_with_the_zoomed_box() -> None:
    """Ultralytics compares the area left with the box's area times zoom²: a box zoomed up and cut by the edge to 8 %
    of that is dropped, though it keeps more than 10 % of its area before the zoom; one left with 15 % is kept."""
    step = RandomAffine(translate=0, scale=0.5)
    seed = next(s for s in range(100) if step.draw_matrix(seeded(s), (128, 128), (128, 128))[1] > 1.4)
    zoom = step.draw_matrix(seeded(seed), (128, 128), (128, 128))[1]
    # a box [0, 54, length, 74] keeps width 64 - (64 - length) × zoom after zooming about x = 64: a share
    # (length − 64 (zoom − 1) / zoom) / length of its zoomed width, so length = 64 (zoom − 1) / (zoom (1 − share))
    lengths = [64 * (zoom - 1) / (zoom * (1 - share)) for share in (0.08, 0.15)]
    out = step(canvas_sample([[0, 54, length, 74] for length in lengths]).replace(border=0), seeded(seed))
    assert out.labels.tolist() == [1] and out.boxes[0, 2] - out.boxes[0, 0] > 2


# ---------------------------------------------------------------------------------------------- mosaic
def noise(index: int) -> LabeledImage:
    """Image `index`: random pixels, a random size (long side 128 or less) and two boxes, one over the edge."""
    rng = np.random.default_rng(index)
    height, width = int(rng.integers(40, 129)), int(rng.integers(40, 129))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, width / 2, height / 2], [width / 3, height / 3, width, height]], np.float32)
    return LabeledImage(image, boxes, np.array([2 * index, 2 * index + 1]), (height, width), (height, width))


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_places_the_four_images_around_the_centre(seed: int) -> None:
    """Ultralytics' layout: this image ends at the centre (top left), the others are top right, bottom left and
    bottom right of it, cut at the 2s canvas; boxes move with their image, clipped to the canvas."""
    mosaic = Mosaic(SampleSource(ImagePool(noise, 50), Compose([Resize(IMGSZ)])), IMGSZ)
    out = mosaic(noise(0), seeded(seed))
    reference = seeded(seed)
    others = torch.randint(50, (3,), generator=reference).tolist()
    centre_y, centre_x = torch.randint(IMGSZ // 2, 3 * IMGSZ // 2, (2,), generator=reference).tolist()
    side = 2 * IMGSZ
    assert out.image.shape == (side, side, 3) and (out.border, out.valid_size) == (IMGSZ // 2, (side, side))
    canvas, boxes = np.full((side, side, 3), 114, np.uint8), []
    for tile, (right, below) in zip([noise(0), *(Resize(IMGSZ)(noise(i), seeded(0)) for i in others)],
                                    [(0, 0), (1, 0), (0, 1), (1, 1)]):
        height, width = tile.image.shape[:2]
        x, y = (centre_x - width, centre_x)[right], (centre_y - height, centre_y)[below]  # the tile's top-left
        shown = tile.image[max(-y, 0) : side - y, max(-x, 0) : side - x]
        canvas[max(y, 0) : max(y, 0) + shown.shape[0], max(x, 0) : max(x, 0) + shown.shape[1]] = shown
        boxes.append((tile.boxes + np.array([x, y, x, y], np.float32)).clip(0, side))
    expected = np.concatenate(boxes)  # [8, 4]
    kept = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    assert np.array_equal(out.image, canvas) and np.array_equal(out.boxes, expected[kept])
    labels = np.concatenate([[0, 1], *([2 * i, 2 * i + 1] for i in others)])
    assert out.labels.tolist() == labels[kept].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_pipeline_gives_imgsz_squares_with_boxes_of_several_images(seed: int) -> None:
    scene = Scene()
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, mosaic=1.0)
    out = scene.run(pipeline, index=seed, seed=seed)
    assert out.image.shape == (IMGSZ, IMGSZ, 3) and out.valid_size == (IMGSZ, IMGSZ) and out.border == 0
    images_of_boxes = {next(i for i, labels in enumerate(scene.labels) if label in labels) for label in out.labels}
    assert len(images_of_boxes) >= 2 and len(set(scene.loaded)) >= 2


# ---------------------------------------------------------------------------------------------- mixup and cutmix
class Fixed:
    """A stand-in SampleSource that always gives `sample` (and draws nothing)."""

    def __init__(self, sample: LabeledImage) -> None:
        self.sample = sample

    def draw(self, rng: torch.Generator, count: int = 1) -> list[LabeledImage]:
        return [self.sample] * count


def flat(height: int, width: int, value: int, boxes: list[list[float]], first_label: int = 0) -> LabeledImage:
    image = np.full((height, width, 3), value, np.uint8)
    boxes_array = np.array(boxes, np.float32).reshape(-1, 4)
    labels = np.arange(first_label, first_label + len(boxes_array))
    return LabeledImage(image, boxes_array, labels, (height, width), (height, width))


def test_mixup_blends_by_a_beta_ratio_and_keeps_both_box_sets() -> None:
    sample = flat(60, 80, 200, [[10, 10, 30, 30]])
    other = flat(70, 70, 40, [[5, 5, 20, 20], [60, 50, 70, 70], [10, 62, 30, 70]], first_label=10)
    out = MixUp(Fixed(other), p=1.0)(sample, seeded(2))
    reference = seeded(2)  # Fixed draws no index
    ratio = float(torch.rand(63, generator=reference, dtype=torch.float64).median())
    padded = np.full((60, 80, 3), 114, np.uint8)  # the other image cut to 60 rows, padded to 80 columns
    padded[:, :70] = 40
    assert np.array_equal(out.image, (sample.image * ratio + padded * (1 - ratio)).astype(np.uint8))
    assert out.boxes.tolist() == [[10, 10, 30, 30], [5, 5, 20, 20], [60, 50, 70, 60]]  # third box cut off, dropped
    assert out.labels.tolist() == [0, 10, 11] and out.image.shape == (60, 80, 3)


def test_mixup_image_goes_through_resize_mosaic_and_affine() -> None:
    """In the built pipeline the image MixUp blends in is another image through the same resize → mosaic → affine,
    drawing from the same generator in turn."""
    scene = Scene()
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, mosaic=1.0, mixup=1.0, fliplr=0.0,
                                translate=0.1, scale=0.5)
    out = scene.run(pipeline, 3, seed=6)
    assert pipeline.names[:4] == ["resize", "mosaic", "affine", "mixup"] and len(scene.loaded) == 8
    first_steps, rng = Compose(pipeline.transforms[:3]), seeded(6)
    this = first_steps(scene.load(3), rng)
    other = first_steps(scene.load(int(torch.randint(8, (1,), generator=rng))), rng)
    ratio = beta_32(rng)
    assert np.array_equal(out.image, (this.image * ratio + other.image * (1 - ratio)).astype(np.uint8))
    assert np.array_equal(out.boxes, np.concatenate([this.boxes, other.boxes]))


def test_mixup_ratio_is_beta_32_32() -> None:
    rng = seeded(0)
    draws = np.array([beta_32(rng) for _ in range(4000)])
    assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.std() - 1 / (4 * 65) ** 0.5) < 0.004  # std 0.0620


def test_cutmix_pastes_a_rectangle_clear_of_this_images_boxes() -> None:
    """The pasted rectangle avoids this image's box; the other image's boxes with ≥ 10 % of their area inside it are
    kept, clipped to it, the others left out (a grid of 10 px boxes gives partial overlaps either side of 10 %)."""
    sample = flat(100, 120, 200, [[0, 0, 30, 30]])
    grid = [[x, y, x + 10, y + 10] for x in range(0, 120, 15) for y in range(0, 100, 15)]
    other = flat(100, 120, 30, grid, first_label=10)
    pasted_seeds, left_out = 0, 0
    for seed in range(12):
        out = CutMix(Fixed(other), p=1.0)(sample, seeded(seed))
        if out is sample:
            continue
        pasted_seeds += 1
        changed = np.argwhere((out.image != sample.image).any(axis=2))  # [P, 2] rows, columns
        (y1, x1), (y2, x2) = changed.min(axis=0), changed.max(axis=0) + 1
        assert len(changed) == (y2 - y1) * (x2 - x1) and (out.image[y1:y2, x1:x2] == 30).all()
        assert x1 >= 30 or y1 >= 30  # clear of this image's box
        area = np.array([x1, y1, x2, y2], np.float32)
        pasted = other.boxes.clip(area[[0, 1, 0, 1]], area[[2, 3, 2, 3]])  # [K, 4]
        share = np.prod(pasted[:, 2:] - pasted[:, :2], axis=1) / 100  # each grid box is 10 × 10
        keep = share >= 0.1
        left_out += int(((share > 0) & ~keep).sum())
        assert out.boxes.tolist() == [[0, 0, 30, 30], *pasted[keep].tolist()]
        assert out.labels.tolist() == [0, *other.labels[keep].tolist()]
        assert (sample.image == 200).all()  # the input is left as it was
    assert pasted_seeds >= 4 and left_out > 0


def test_cutmix_without_a_free_rectangle_or_a_box_to_paste_changes_nothing() -> None:
    covered = flat(60, 60, 200, [[0, 0, 60, 60]])
    assert CutMix(Fixed(flat(60, 60, 30, [[0, 0, 60, 60]])), 1.0)(covered, seeded(0)) is covered
    free = flat(60, 60, 200, [])
    assert CutMix(Fixed(flat(60, 60, 30, [])), 1.0)(free, seeded(0)) is free


# ---------------------------------------------------------------------------------------------- HSV, flip, resize
def test_hsv_changes_colours_but_moves_no_pixel() -> None:
    """Equal pixels stay equal (a per-pixel table; OpenCV's vector and scalar HSV→RGB code may round 1 apart),
    black stays black, the boxes are the same arrays."""
    palette = np.array([[0, 0, 0], [255, 0, 0], [30, 200, 90], [128, 128, 128], [250, 250, 10]], np.uint8)
    which = np.random.default_rng(0).integers(0, len(palette), (64, 96))
    sample = LabeledImage(palette[which], np.zeros((0, 4), np.float32), np.zeros(0, np.int64), (64, 96), (64, 96))
    out = RandomHSV(0.015, 0.7, 0.4)(sample, seeded(1))
    assert not np.array_equal(out.image, sample.image)
    for index in range(len(palette)):
        pixels = out.image[which == index].astype(np.int16)  # [P, 3]
        assert (np.abs(pixels - pixels[0]) <= 1).all()
    assert (out.image[which == 0] == 0).all() and out.boxes is sample.boxes and out.labels is sample.labels


def test_hsv_value_gain_and_hue_wrap_follow_ultralytics() -> None:
    grey = LabeledImage(np.full((4, 4, 3), 100, np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                        (4, 4), (4, 4))
    draws = torch.rand(3, generator=seeded(5), dtype=torch.float64).numpy() * 2 - 1
    out = RandomHSV(0, 0, 0.4)(grey, seeded(5))
    assert (out.image == int(100 * (1 + 0.4 * draws[2]))).all()  # value × (1 + r), truncated
    seed = next(s for s in range(50) if torch.rand(1, generator=seeded(s), dtype=torch.float64) < 0.5)  # shift < 0
    red = grey.replace(image=np.full((4, 4, 3), (255, 0, 0), np.uint8))
    shifted = RandomHSV(0.1, 0, 0)(red, seeded(seed)).image[0, 0]
    assert shifted[0] == 255 and shifted[1] == 0 and shifted[2] > 0  # hue 0 − δ wrapped to 180 − δ: towards magenta


def test_hsv_with_zero_gains_is_a_no_op_without_a_draw() -> None:
    sample, rng = flat(8, 8, 50, []), seeded(0)
    state = rng.get_state()
    assert RandomHSV(0, 0, 0)(sample, rng) is sample and torch.equal(rng.get_state(), state)


def test_vertical_flip_moves_boxes_and_mirrors_the_image() -> None:
    sample = flat(40, 100, 0, [[10, 5, 30, 15]])
    image = sample.image.copy()
    image[:20] = 50
    sample = sample.replace(image=image)
    out = RandomVFlip(1.0)(sample, seeded(0))
    assert out.boxes.tolist() == [[10, 25, 30, 35]] and np.array_equal(out.image, sample.image[::-1])
    assert out.image.flags.c_contiguous and sample.boxes.tolist() == [[10, 5, 30, 15]]


@pytest.mark.parametrize(("sizes", "mode"), [((100, 103), "range"), ((64, 96, 160), "choice")])
def test_random_resize_draws_long_sides_from_the_range_or_the_choices(sizes: tuple, mode: str) -> None:
    step, sample = RandomResize(sizes, mode), flat(60, 120, 0, [[12, 6, 60, 30]])
    long_sides = set()
    for seed in range(60):
        out = step(sample, seeded(seed))
        long_side = max(out.image.shape[:2])
        long_sides.add(long_side)
        assert out.ratio == long_side / 120
        np.testing.assert_allclose(out.boxes, [[12 * out.ratio, 6 * out.ratio, 60 * out.ratio, 30 * out.ratio]])
    assert long_sides == (set(range(100, 104)) if mode == "range" else set(sizes))  # both ends of the range


def test_random_resize_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        RandomResize((64, 128), "ratio")


# ---------------------------------------------------------------------------------------------- pipeline and seeds
def test_same_seed_same_output_and_other_seeds_differ() -> None:
    scene = Scene()
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, **STRONG)
    first, again = scene.run(pipeline, 2, seed=7), scene.run(pipeline, 2, seed=7)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.boxes, again.boxes)
    others = [scene.run(pipeline, 2, seed=seed) for seed in (8, 9)]
    assert all(not np.array_equal(first.image, other.image) for other in others)


def test_pipeline_draws_only_from_the_given_generator() -> None:
    """Seeding torch, numpy and random differently changes nothing: all randomness comes from `rng`."""
    scene = Scene()
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, **STRONG)
    outputs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        outputs.append(scene.run(pipeline, 3, seed=5))
    assert np.array_equal(outputs[0].image, outputs[1].image) and np.array_equal(outputs[0].boxes, outputs[1].boxes)


@pytest.mark.parametrize("step", ["mosaic", "mixup", "cutmix", "flipud", "fliplr"])
def test_probability_zero_leaves_the_sample_and_the_generator_alone(step: str) -> None:
    scene = Scene()
    source = SampleSource(scene.pool, Compose([Resize(IMGSZ)]))
    transform = {
        "mosaic": Mosaic(source, IMGSZ, p=0.0), "mixup": MixUp(source, p=0.0),
        "cutmix": CutMix(source, p=0.0), "flipud": RandomVFlip(0.0), "fliplr": RandomHFlip(0.0),
    }[step]
    sample, rng = scene.load(0), seeded(0)
    state = rng.get_state()
    assert transform(sample, rng) is sample and torch.equal(rng.get_state(), state)


@pytest.mark.parametrize("empty", [True, False], ids=["no-boxes-anywhere", "this-image-empty"])
def test_images_without_boxes_go_through(empty: bool) -> None:
    scene = Scene(empty=empty)
    scene.boxes[0], scene.labels[0] = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, **STRONG)
    for seed in range(3):
        out = scene.run(pipeline, 0, seed)
        assert out.image.shape == (IMGSZ, IMGSZ, 3) and out.boxes.dtype == np.float32 and out.labels.dtype == np.int64
        assert out.boxes.shape == (len(out.labels), 4) and (len(out.labels) == 0) == empty


def test_disabling_mosaic_gives_the_non_mosaic_pipeline() -> None:
    """Without mosaic (here also in MixUp's image) the output keeps the resized image's size, and equals a pipeline
    built with mosaic=0 for the same seed."""
    scene = Scene()
    settings = {**STRONG, "cutmix": 0.0, "mixup": 1.0}
    pipeline = build_transforms(IMGSZ, True, pool=scene.pool, **settings)
    pipeline.disable("mosaic")
    plain = build_transforms(IMGSZ, True, pool=scene.pool,
                             **{**settings, "mosaic": 0.0})
    assert "mosaic" not in plain.names
    for index in range(3):
        out, expected = scene.run(pipeline, index, seed=index), scene.run(plain, index, seed=index)
        assert out.image.shape[:2] == Resize(IMGSZ)(scene.load(index), seeded(0)).image.shape[:2]
        assert np.array_equal(out.image, expected.image) and np.array_equal(out.boxes, expected.boxes)


def test_build_transforms_orders_the_steps_as_ultralytics() -> None:
    scene = Scene()
    full = build_transforms(IMGSZ, True, pool=scene.pool, **STRONG, ms_sizes=(96, 160))
    assert full.names == ["resize", "mosaic", "affine", "mixup", "cutmix", "hsv", "flipud", "fliplr"]
    assert isinstance(full.transforms[0], RandomResize) and full.transforms[0].sizes == (96, 160)
    assert build_transforms(IMGSZ, True).names == ["resize", "fliplr"]  # the defaults: as before the augmentations
    assert build_transforms(IMGSZ, True, degrees=5).names == ["resize", "affine", "fliplr"]
    assert build_transforms(IMGSZ, True, hsv_v=0.4).names == ["resize", "hsv", "fliplr"]
    assert build_transforms(IMGSZ, False, pool=scene.pool, **STRONG).names == ["resize"]


def test_a_batch_of_four_or_more_is_the_pool_and_is_not_loaded_again() -> None:
    scene = Scene()
    batch = {index: scene.load(index) for index in (1, 4, 6, 7)}
    scene.loaded.clear()
    with scene.pool.batch(batch):
        drawn = scene.pool.draw(seeded(0), 200)
        assert set(drawn) == set(batch) and all(scene.pool.load(i) is batch[i] for i in drawn)
    assert scene.loaded == []  # every image mixed in came from the batch
    with scene.pool.batch({index: batch[index] for index in (1, 4, 6)}):  # too few: the whole dataset
        assert set(scene.pool.draw(seeded(0), 200)) == set(range(len(scene.sizes)))
    assert set(scene.pool.draw(seeded(0), 200)) == set(range(len(scene.sizes)))  # outside a batch


def test_build_transforms_needs_the_dataset_for_mixing_steps() -> None:
    for key in ("mosaic", "mixup", "cutmix"):
        with pytest.raises(ValueError, match="needs their pool"):
            build_transforms(IMGSZ, True, **{key: 0.5})


def test_augmentation_keys_are_build_transforms_keywords() -> None:
    keywords = [name for name, parameter in inspect.signature(build_transforms).parameters.items()
                if parameter.kind == parameter.KEYWORD_ONLY and name != "pool"]
    assert [*AUGMENTATION_KEYS, "ms_sizes", "ms_mode"] == keywords  # the last two resolved by the trainer
    assert set(AUGMENTATION_KEYS) <= set(SETTINGS)  # each a run setting

    class Settings:
        pass

    settings = Settings()
    for key in AUGMENTATION_KEYS:
        setattr(settings, key, f"value of {key}")
    assert augmentation_settings(settings) == {key: f"value of {key}" for key in AUGMENTATION_KEYS}


def test_augment_speed_benchmark_runs(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/augment_speed.py (the figures in docs/training.md) runs and prints a time per row."""
    load_benchmark("augment_speed").main(repeats=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all(line.split()[1] == "ms" and float(line.split()[0]) > 0 for line in lines[1:])
