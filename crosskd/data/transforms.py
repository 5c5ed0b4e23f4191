"""Per-sample transforms: image decoding, and the pipeline of steps over (image, boxes, labels) a dataset applies.

A step is a `Transform`: it takes a `LabeledImage` and a torch generator and returns a new `LabeledImage`, applied
with its probability `p`. `Compose` runs the steps in order; `pipeline.build_transforms` is the one place that turns the
dataset's settings into the train or eval pipeline. Steps never write into the arrays they are given (a record's
boxes are views of the label index that loader workers share), and draw every random number from the generator they
are called with.

This module holds the base (`LabeledImage`, `Transform`, `Compose`) and the steps of the eval pipeline (`Resize`)
and of the default train pipeline (`RandomHFlip`); the other training augmentations (mosaic, affine, mixup, cutmix,
HSV, vertical flip, multi-scale resize) are in `augment.py`. Train pipeline, in Ultralytics' order:
resize → mosaic → affine → mixup → cutmix → HSV → flipud → fliplr, each step only when its setting turns it on.
"""

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

# EXIF orientation is ignored on purpose: COCO annotations and the header sizes read by `labels.image_size`
# both describe the pixels as stored in the file.
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # BGR, as cv2.imread (prediction sources)
IMREAD_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION  # RGB from the decoder: no conversion pass


def load_image(path: str | Path) -> np.ndarray | None:
    """Decode an image file to RGB uint8 `[H, W, 3]`, or None when it is gone or OpenCV cannot decode it.

    The bytes are read first and decoded in memory, so a file deleted mid-run prints no OpenCV warning.
    """
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, IMREAD_RGB) if data.size else None


def resize_long_side(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, float]:
    """Keep-ratio resize so that the long side equals `imgsz`; returns the image and the ratio (new = old × ratio)."""
    height, width = image.shape[:2]
    ratio = imgsz / max(height, width)
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))  # cv2 takes (w, h)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image, ratio


def scale_boxes(boxes: np.ndarray, ratio: float, height: int, width: int) -> np.ndarray:
    """Scale xyxy boxes `[K, 4]` by `ratio` and clip them to a `height` × `width` image (a new array)."""
    scaled = boxes * np.float32(ratio)
    scaled[:, 0::2] = scaled[:, 0::2].clip(0, width)
    scaled[:, 1::2] = scaled[:, 1::2].clip(0, height)
    return scaled


# ---------------------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class LabeledImage:
    """An image with its boxes as it goes through the pipeline; steps return an updated copy (`replace`)."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    boxes: np.ndarray  # [K, 4] float32 xyxy in pixels of `image`
    labels: np.ndarray  # [K] int64 contiguous class ids
    orig_size: tuple[int, int]  # (h, w) of the image as stored in its file
    valid_size: tuple[int, int]  # (h, w) of the top-left region holding pixels: the image size until a step pads
    ratio: float = 1.0  # current = original × ratio
    unreadable: tuple[str, ...] = ()  # image files that could not be read and were left out for this one
    border: int = 0  # set by Mosaic: the next RandomAffine keeps the centre, `border` pixels in from each side

    def replace(self, **changes: object) -> "LabeledImage":
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


class Transform:
    """One pipeline step, applied with probability `p`; `name` lets `Compose.disable` switch it off.

    `__call__` decides: p ≤ 0 never and p ≥ 1 always, without a draw; otherwise one `torch.rand` draw from `rng`
    (apply when it is below p). Subclasses implement `apply`, drawing any further randomness from the same `rng`.
    """

    name = "transform"

    def __init__(self, p: float = 1.0) -> None:
        self.p = p

    def __call__(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        """`apply(sample, rng)` with probability p, else `sample` unchanged."""
        if self.p <= 0:
            return sample
        if self.p < 1 and torch.rand(1, generator=rng) >= self.p:  # compared in float32
            return sample
        return self.apply(sample, rng)

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        """The step itself."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def resize_sample(sample: LabeledImage, size: int) -> LabeledImage:
    """`sample` resized keep-ratio to long side `size`, its boxes scaled and clipped to the new image."""
    image, ratio = resize_long_side(sample.image, size)
    height, width = image.shape[:2]
    boxes = scale_boxes(sample.boxes, ratio, height, width)
    return sample.replace(image=image, boxes=boxes, valid_size=(height, width), ratio=sample.ratio * ratio)


class Resize(Transform):
    """Keep-ratio resize so that the long side is `size`; boxes are scaled and clipped to the new image."""

    name = "resize"

    def __init__(self, size: int) -> None:
        super().__init__(p=1.0)
        self.size = size

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        return resize_sample(sample, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class RandomHFlip(Transform):
    """Mirror the image and its boxes left-right with probability `p` (x → width − x)."""

    name = "fliplr"

    def apply(self, sample: LabeledImage, rng: torch.Generator) -> LabeledImage:
        return flip_sample(sample, horizontal=True)


def flip_sample(sample: LabeledImage, horizontal: bool) -> LabeledImage:
    """The sample mirrored left-right (x → width − x) or top-bottom (y → height − y), image and boxes."""
    axis, coords = (1, [0, 2]) if horizontal else (0, [1, 3])  # image axis; box columns x1, x2 or y1, y2
    boxes = sample.boxes.copy()
    boxes[:, coords] = sample.image.shape[axis] - sample.boxes[:, coords[::-1]]  # [K, 2] new from the old swapped
    return sample.replace(image=cv2.flip(sample.image, axis), boxes=boxes)  # cv2: 1 flips columns, 0 rows


class Compose:
    """The ordered steps of a dataset's pipeline; `disable(name)` switches steps off (e.g. for the last epochs).

    A step that mixes in other images (mosaic, mixup) takes the dataset's `load_sample` when it is built.
    """

    def __init__(self, transforms: Iterable[Transform]) -> None:
        self.transforms = list(transforms)
        self.disabled: set[str] = set()

    def __call__(self, sample: LabeledImage, rng: torch.Generator, skip: Iterable[str] = ()) -> LabeledImage:
        """Run the enabled steps in order, each drawing from `rng`, leaving out those named in `skip` this once."""
        skipped = self.disabled.union(skip)
        for transform in self.transforms:
            if transform.name not in skipped:
                sample = transform(sample, rng)
        return sample

    @property
    def names(self) -> list[str]:
        """The steps' names in order, disabled ones included."""
        return [transform.name for transform in self.transforms]

    def describe(self) -> str:
        """The enabled steps in order with their probabilities below 1, e.g. 'resize → mosaic → affine → fliplr 0.5'."""
        return " → ".join(t.name + (f" {t.p:g}" if t.p < 1 else "") for t in self.transforms
                          if t.name not in self.disabled)

    def head(self, count: int) -> "Compose":
        """The first `count` steps as a pipeline that shares this one's disabled steps (what MixUp's image runs)."""
        head = copy.copy(self)  # shallow: the disabled set is the same object
        head.transforms = self.transforms[:count]
        return head

    def disable(self, name: str) -> None:
        """Skip the steps called `name` from now on (loader workers keep the copy they started with)."""
        if name not in self.names:
            raise ValueError(f"no transform named {name!r} in the pipeline; it has {', '.join(self.names)}")
        self.disabled.add(name)

    def __repr__(self) -> str:
        return f"Compose({self.transforms}, disabled={sorted(self.disabled)})"
