"""Training augmentations as pipeline steps: Ultralytics 8.4's set and MMDetection-style multi-scale resizing.

Mosaic, RandomAffine (Ultralytics' random perspective), MixUp, CutMix, RandomHSV and RandomVFlip follow the keys,
defaults, formulas and thresholds of Ultralytics 8.4 (`ultralytics/data/augment.py`, AGPL: the behaviour is
followed, the code here is our own); RandomResize follows MMDetection's RandomResize and RandomChoiceResize.
Pixels go through OpenCV (cv2.warpAffine / warpPerspective, cv2.LUT, cv2.resize); boxes go through the same matrix
by hand in numpy. Every random number is drawn from the generator a step is called with, never from a global one,
so a sample is a function of its generator's seed alone.
"""

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import cv2
import numpy as np
import torch

from crosskd.data.transforms import Compose, LabeledImage, Transform, flip_sample, resize_sample

FILL = 114  # grey of the canvas outside the images (mosaic, affine borders, padding)
CUTMIX_MIN_IOA = 0.1  # share of another image's box inside the pasted rectangle for CutMix to keep it


# ---------------------------------------------------------------------------------------------- box and pixel helpers
def box_candidates(
    before: np.ndarray, after: np.ndarray, min_size: float = 2.0, max_aspect: float = 100.0,
    min_area_ratio: float = 0.1, eps: float = 1e-16,
) -> np.ndarray:
    """Which boxes to keep after a geometric step, Ultralytics' rule: width and height over `min_size` pixels,
    area over `min_area_ratio` of the area before, aspect ratio under `max_aspect`.

    Args:
        before: [K, 4] xyxy boxes before the step, scaled by the step's zoom (so only cropping lowers the ratio).
        after: [K, 4] xyxy boxes after the step, clipped to the output image.

    Returns:
        [K] bool mask of the boxes to keep.
    """
    width_before, height_before = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]  # [K]
    width, height = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]  # [K]
    aspect = np.maximum(width / (height + eps), height / (width + eps))
    area_ratio = width * height / (width_before * height_before + eps)
    return (width > min_size) & (height > min_size) & (area_ratio > min_area_ratio) & (aspect < max_aspect)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """xyxy boxes `[K, 4]` clipped to a `height` × `width` image (a new array)."""
    return boxes.clip(0, np.array([width, height, width, height], np.float32))


def non_empty(boxes: np.ndarray) -> np.ndarray:
    """[K] mask of the xyxy boxes `[K, 4]` with a positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The boxes enclosing xyxy boxes `[K, 4]` once their 4 corners go through the 3×3 `matrix` (projective)."""
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)  # [K, 4, 2] x, y of the 4 corners
    points = np.concatenate([corners, np.ones_like(corners[..., :1])], axis=2) @ matrix.T  # [K, 4, 3]
    xy = points[..., :2] / points[..., 2:]  # [K, 4, 2]; the divide is by 1 for an affine matrix
    return np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32)  # [K, 4]


def box_ioa(areas: np.ndarray, boxes: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of each xyxy area `[A, 4]` with each xyxy box `[K, 4]` over the box's area: `[A, K]`."""
    top_left = np.maximum(areas[:, None, :2], boxes[None, :, :2])  # [A, K, 2]
    bottom_right = np.minimum(areas[:, None, 2:], boxes[None, :, 2:])  # [A, K, 2]
    intersection = (bottom_right - top_left).clip(0).prod(axis=2)  # [A, K]
    return intersection / ((boxes[:, 2:] - boxes[:, :2]).prod(axis=1) + eps)


def paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    """Write `image` into `canvas` with its top-left corner at (x, y); the part outside the canvas is left out."""
    height, width = canvas.shape[:2]
    x1, y1 = max(x, 0), max(y, 0)
    x2, y2 = min(x + image.shape[1], width), min(y + image.shape[0], height)
    if x2 > x1 and y2 > y1:
        canvas[y1:y2, x1:x2] = image[y1 - y : y2 - y, x1 - x : x2 - x]


def fit_to(sample: LabeledImage, height: int, width: int) -> LabeledImage:
    """`sample` cut or padded (grey) at the bottom and right to `height` × `width`; boxes clipped, empty ones gone."""
    if sample.image.shape[:2] == (height, width):
        return sample
    canvas = np.full((height, width, 3), FILL, np.uint8)
    paste(canvas, sample.image, 0, 0)
    boxes = clip_boxes(sample.boxes, height, width)
    keep = non_empty(boxes)
    valid_size = (min(sample.valid_size[0], height), min(sample.valid_size[1], width))
    return sample.replace(image=canvas, boxes=boxes[keep], labels=sample.labels[keep], valid_size=valid_size)


def symmetric_uniform(rng: torch.Generator, count: int) -> np.ndarray:
    """`count` draws uniform in [-1, 1) from `rng`, as float64 `[count]`."""
    return torch.rand(count, generator=rng, dtype=torch.float64).numpy() * 2 - 1


def random_index(rng: torch.Generator, count: int) -> int:
    """One index uniform in [0, count) from `rng`."""
    return int(torch.randint(count, (1,), generator=rng))


def beta_32(rng: torch.Generator) -> float:
    """A Beta(32, 32) draw (Ultralytics' MixUp ratio): the median of 63 uniforms, whose 32nd smallest is Beta(32, 32).

    torch.distributions.Beta takes no generator; an order statistic of uniforms drawn from `rng` is exact.
    """
    return float(torch.rand(63, generator=rng, dtype=torch.float64).median())


class ImagePool:
    """Where Mosaic, MixUp and CutMix take their other images from: any of the dataset's `num_images` images
    (`load(index)` in original pixels), or, inside `with pool.batch(images)`, one of the batch's own images, already
    loaded.

    A loader's batch (`DetectionDataset.__getitems__`) is the pool when it holds at least `min_batch` images, so a
    mosaic decodes no image beyond its batch: Ultralytics keeps a buffer of recently loaded images for the same
    reason, but a buffer depends on the worker that filled it, the batch does not (its indices follow from the seed
    and the epoch), so the batches stay the same with any number of workers and after a resume.
    """

    def __init__(self, load: Callable[[int], LabeledImage], num_images: int, min_batch: int = 4) -> None:
        self._load, self.num_images, self.min_batch = load, num_images, min_batch
        self.loaded: Mapping[int, LabeledImage] = {}

    def draw(self, rng: torch.Generator, count: int) -> list[int]:
        """`count` image indices drawn uniformly (with replacement) from the pool."""
        if not self.loaded:
            return torch.randint(self.num_images, (count,), generator=rng).tolist()
        indices = list(self.loaded)
        return [indices[i] for i in torch.randint(len(indices), (count,), generator=rng).tolist()]

    def load(self, index: int) -> LabeledImage:
        """Image `index` in original pixels: the batch's copy when it is there."""
        loaded = self.loaded.get(index)
        return self._load(index) if loaded is None else loaded

    @contextmanager
    def batch(self, images: Mapping[int, LabeledImage]) -> Iterator[None]:
        """Draw from `images` (index -> image in original pixels) while inside, when there are `min_batch` of them."""
        self.loaded = images if len(images) >= self.min_batch else {}
        try:
            yield
        finally:
            self.loaded = {}


class SampleSource:
    """Other images of the pool through the first steps of a pipeline: what Mosaic, MixUp and CutMix mix in.

    `steps` (e.g. resize, or resize → mosaic → affine) bring an image to where the mixing step is, drawing from the
    same generator.
    """

    def __init__(self, pool: ImagePool, steps: Compose) -> None:
        self.pool = pool
        self.steps = steps

    def draw(self, rng: torch.Generator, count: int = 1) -> list[LabeledImage]:
        """`count` images drawn from the pool, through the steps."""
        return [self.steps(self.pool.load(index), rng) for index in self.pool.draw(rng, count)]

    def __repr__(self) -> str:
        return f"SampleSource({self.steps})"


# ---------------------------------------------------------------------------------------------- steps
class RandomResize(Transform):
    """Keep-ratio resize to a long side drawn per image: `mode="range"` uniform integer in [min(sizes), max(sizes)]
    (MMDetection's RandomResize), `mode="choice"` one of `sizes` (RandomChoiceResize)."""

    name = "resize"
    modes = ("range", "choice")

    def __init__(self, sizes: Sequence[int], mode: str = "range") -> None:
        if mode not in self.modes or not sizes:
            raise ValueError(f"RandomResize needs sizes and a mode in {self.modes}; got sizes={sizes}, mode={mode!r}")
        super().__init__(p=1.0)
        self.sizes = tuple(int(size) for size in sizes)
        self.mode = mode

    def draw_size(self, rng: torch.Generator) -> int:
        """The long side of this image."""
        if self.mode == "range":
            low, high = min(self.sizes), max(self.sizes)
            return low + random_index(rng, high - low + 1)
        return self.sizes[random_index(rng, len(self.sizes))]

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        return resize_sample(sample, self.draw_size(rng))

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, mode={self.mode!r})"


class RandomVFlip(Transform):
    """Mirror the image and its boxes top-bottom with probability `p` (y → height − y)."""

    name = "flipud"

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        return flip_sample(sample, horizontal=False)


class RandomHSV(Transform):
    """Random hue shift and saturation and value gains through lookup tables on the HSV image (Ultralytics 8.4).

    Draws r uniform in [-1, 1) per channel, times the gains: hue moves by r_h × 180 (OpenCV's hue is 0..179, it
    wraps), saturation and value are multiplied by 1 + r_s and 1 + r_v and clipped to 255. Pixels do not move; boxes
    are unchanged. All-zero gains are a no-op without a draw.
    """

    name = "hsv"

    def __init__(self, hsv_h: float = 0.015, hsv_s: float = 0.7, hsv_v: float = 0.4) -> None:
        super().__init__(p=1.0)
        self.gains = np.array([hsv_h, hsv_s, hsv_v], np.float64)

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        if not self.gains.any():
            return sample
        hue, saturation, value = symmetric_uniform(rng, 3) * self.gains
        levels = np.arange(256, dtype=np.float64)
        lut = np.stack([
            (levels + hue * 180) % 180, (levels * (1 + saturation)).clip(0, 255), (levels * (1 + value)).clip(0, 255),
        ], axis=1).astype(np.uint8)  # [256, 3] one table per HSV channel
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV)
        image = cv2.cvtColor(cv2.LUT(hsv, lut.reshape(1, 256, 3)), cv2.COLOR_HSV2RGB)
        return sample.replace(image=image)

    def __repr__(self) -> str:
        return f"RandomHSV(hsv_h={self.gains[0]}, hsv_s={self.gains[1]}, hsv_v={self.gains[2]})"


class RandomAffine(Transform):
    """Ultralytics' random perspective: rotation, scale, shear, translation and perspective as one 3×3 matrix.

    The matrix is translation @ shear @ rotation-and-scale @ perspective @ centre, with angle uniform in ±`degrees`,
    zoom in 1 ± `scale`, shear angles in ±`shear` degrees, perspective terms in ±`perspective` and the image centre
    moved to (0.5 ± `translate`) of the output size. The image is warped with cv2.warpAffine (cv2.warpPerspective
    when `perspective` ≠ 0), grey outside; boxes are their 4 corners through the matrix, enclosed, clipped to the
    output and filtered by `box_candidates`. The output is the input's size, or after Mosaic (`sample.border`) the
    centre of its canvas, `border` pixels in from each side; `valid_size` becomes the whole output.
    """

    name = "affine"

    def __init__(
        self, degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5, shear: float = 0.0,
        perspective: float = 0.0,
    ) -> None:
        super().__init__(p=1.0)
        self.degrees, self.translate, self.scale = degrees, translate, scale
        self.shear, self.perspective = shear, perspective

    def draw_matrix(
        self, rng: torch.Generator, in_size: tuple[int, int], out_size: tuple[int, int]
    ) -> tuple[np.ndarray, float]:
        """A random 3×3 matrix from (h, w) `in_size` pixels to `out_size` pixels, and its zoom."""
        draws = symmetric_uniform(rng, 8)  # [8] Ultralytics' order: perspective x y, angle, zoom, shear x y, move x y
        centre = np.eye(3)
        centre[:2, 2] = -in_size[1] / 2, -in_size[0] / 2
        perspective = np.eye(3)
        perspective[2, :2] = draws[0:2] * self.perspective
        angle, zoom = math.radians(draws[2] * self.degrees), 1 + draws[3] * self.scale
        cos, sin = zoom * math.cos(angle), zoom * math.sin(angle)
        rotate = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]])  # as cv2.getRotationMatrix2D about (0, 0)
        shear = np.eye(3)
        shear[0, 1], shear[1, 0] = np.tan(np.radians(draws[4:6] * self.shear))
        move = np.eye(3)
        move[:2, 2] = (0.5 + draws[6:8] * self.translate) * (out_size[1], out_size[0])
        return move @ shear @ rotate @ perspective @ centre, zoom

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        height, width = sample.image.shape[:2]
        out_size = (height - 2 * sample.border, width - 2 * sample.border)
        matrix, zoom = self.draw_matrix(rng, (height, width), out_size)
        dsize, grey = (out_size[1], out_size[0]), (FILL, FILL, FILL)  # cv2 takes (w, h)
        if self.perspective:
            image = cv2.warpPerspective(sample.image, matrix, dsize, borderValue=grey)
        else:
            image = cv2.warpAffine(sample.image, matrix[:2], dsize, borderValue=grey)
        boxes = clip_boxes(transform_boxes(sample.boxes, matrix), *out_size)  # [K, 4]
        keep = box_candidates(sample.boxes * np.float32(zoom), boxes)  # [K]
        return sample.replace(
            image=image, boxes=boxes[keep], labels=sample.labels[keep], valid_size=out_size, border=0
        )

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
                f"shear={self.shear}, perspective={self.perspective})")


class Mosaic(Transform):
    """Ultralytics' 4-image mosaic: this image and 3 random others on a 2s × 2s grey canvas around a random centre.

    The centre (x, y) is uniform in [s/2, 3s/2); this image ends at the centre (top left), the others start or end
    there (top right, bottom left, bottom right), cut at the canvas edges. `others` draws the other three from the
    pool, resized to long side s. Boxes move with their image and are clipped to the canvas; empty ones are dropped.
    Sets `border` = s/2 so that the RandomAffine after it crops the centre s × s.
    """

    name = "mosaic"
    quadrants = ((0, 0), (1, 0), (0, 1), (1, 1))  # (right of the centre, below it) per tile

    def __init__(self, others: SampleSource, size: int, p: float = 1.0) -> None:
        super().__init__(p)
        self.others, self.size = others, size

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        side = 2 * self.size
        tiles = [sample, *self.others.draw(rng, 3)]
        centre_y, centre_x = torch.randint(self.size // 2, side - self.size // 2, (2,), generator=rng).tolist()
        canvas = np.full((side, side, 3), FILL, np.uint8)
        boxes = []
        for (right, below), tile in zip(self.quadrants, tiles):
            height, width = tile.image.shape[:2]
            x, y = centre_x - width * (1 - right), centre_y - height * (1 - below)  # the tile's top-left corner
            paste(canvas, tile.image, x, y)
            boxes.append(tile.boxes + np.array([x, y, x, y], np.float32))
        all_boxes = clip_boxes(np.concatenate(boxes), side, side)  # [K, 4]
        keep = non_empty(all_boxes)
        labels = np.concatenate([tile.labels for tile in tiles])  # [K]
        return sample.replace(
            image=canvas, boxes=all_boxes[keep], labels=labels[keep], valid_size=(side, side), border=self.size // 2,
            unreadable=sum((tile.unreadable for tile in tiles), ()),
        )

    def __repr__(self) -> str:
        return f"Mosaic(size={self.size}, p={self.p})"


class MixUp(Transform):
    """Ultralytics' MixUp: blend with another image (through the same first steps), ratio r ~ Beta(32, 32).

    image = this × r + other × (1 − r), truncated to uint8; the boxes of both are kept. The other image is cut or
    padded at the bottom and right to this one's size.
    """

    name = "mixup"

    def __init__(self, others: SampleSource, p: float = 0.0) -> None:
        super().__init__(p)
        self.others = others

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        other = fit_to(self.others.draw(rng)[0], *sample.image.shape[:2])
        ratio = beta_32(rng)
        image = (sample.image * ratio + other.image * (1 - ratio)).astype(np.uint8)
        return sample.replace(
            image=image, boxes=np.concatenate([sample.boxes, other.boxes]),
            labels=np.concatenate([sample.labels, other.labels]), unreadable=sample.unreadable + other.unreadable,
        )

    def __repr__(self) -> str:
        return f"MixUp(p={self.p})"


class CutMix(Transform):
    """Ultralytics 8.4's CutMix: paste a random rectangle of another image (through the same first steps).

    `num_areas` candidate rectangles are drawn (side fraction sqrt(1 − λ), λ uniform, centre uniform); one that
    overlaps none of this image's boxes is chosen at random, and the other image's boxes with at least
    `CUTMIX_MIN_IOA` of their area inside it are kept, clipped to it. With no free rectangle or no such box the
    sample is returned unchanged. This image's boxes are all kept.
    """

    name = "cutmix"

    def __init__(self, others: SampleSource, p: float = 0.0, num_areas: int = 3) -> None:
        super().__init__(p)
        self.others, self.num_areas = others, num_areas

    def draw_areas(self, rng: torch.Generator, height: int, width: int) -> np.ndarray:
        """`num_areas` random xyxy rectangles `[num_areas, 4]` inside a `height` × `width` image."""
        side = np.sqrt(1 - torch.rand(self.num_areas, generator=rng, dtype=torch.float64).numpy())  # [A]
        half_w, half_h = (width * side).astype(np.int64) // 2, (height * side).astype(np.int64) // 2  # [A]
        centre_x = torch.randint(width, (self.num_areas,), generator=rng).numpy()
        centre_y = torch.randint(height, (self.num_areas,), generator=rng).numpy()
        areas = np.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=1)
        return clip_boxes(areas.astype(np.float32), height, width)  # [A, 4]

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        height, width = sample.image.shape[:2]
        other = fit_to(self.others.draw(rng)[0], height, width)
        areas = self.draw_areas(rng, height, width)
        free = np.flatnonzero(box_ioa(areas, sample.boxes).sum(axis=1) <= 0)  # rectangles clear of this image's boxes
        if not len(free):
            return sample
        area = areas[free[random_index(rng, len(free))]]  # [4]
        inside = box_ioa(area[None], other.boxes)[0] >= CUTMIX_MIN_IOA  # [K_other]
        if not inside.any():
            return sample
        x1, y1, x2, y2 = area.astype(np.int64).tolist()
        image = sample.image.copy()
        image[y1:y2, x1:x2] = other.image[y1:y2, x1:x2]
        pasted = other.boxes[inside].clip(area[[0, 1, 0, 1]], area[[2, 3, 2, 3]])  # [M, 4] clipped to the rectangle
        return sample.replace(
            image=image, boxes=np.concatenate([sample.boxes, pasted]),
            labels=np.concatenate([sample.labels, other.labels[inside]]),
            unreadable=sample.unreadable + other.unreadable,
        )

    def __repr__(self) -> str:
        return f"CutMix(p={self.p}, num_areas={self.num_areas})"
