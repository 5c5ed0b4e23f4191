"""Time the pixel work of the augmentations: OpenCV (what crosskd uses) next to torchvision.transforms.v2.

Usage: python benchmarks/augment_speed.py [--repeats 20]
Prints the median milliseconds of each call on this machine's CPU (see docs/training.md, "Augmentations").
"""

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvf

from crosskd.data.augment import ImagePool, RandomAffine, RandomHSV
from crosskd.data.pipeline import build_transforms
from crosskd.data.transforms import LabeledImage


def median_ms(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of `function()` in milliseconds, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def labeled(image: np.ndarray, num_boxes: int = 20) -> LabeledImage:
    """`image` with `num_boxes` random boxes."""
    height, width = image.shape[:2]
    corners = np.sort(np.random.default_rng(0).uniform(0, 1, (2, num_boxes, 2)), axis=0) * (width, height)  # [2, K, 2]
    boxes = np.concatenate([corners[0], corners[1]], axis=1).astype(np.float32)  # [K, 4]
    return LabeledImage(image, boxes, np.zeros(num_boxes, np.int64), (height, width), (height, width))


def main(repeats: int) -> None:
    """Print one line per measurement."""
    rng = np.random.default_rng(0)
    mosaic_canvas = rng.integers(0, 256, (1280, 1280, 3), dtype=np.uint8)
    image_640 = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)
    tensor_1280 = torch.from_numpy(mosaic_canvas).permute(2, 0, 1).contiguous()  # [3, 1280, 1280]
    tensor_640 = torch.from_numpy(image_640).permute(2, 0, 1).contiguous()  # [3, 640, 640]
    generator = torch.Generator().manual_seed(0)
    affine = RandomAffine(degrees=10, translate=0.1, scale=0.5, shear=5)
    matrix = affine.draw_matrix(generator, (1280, 1280), (640, 640))[0][:2]

    def loader(index: int) -> LabeledImage:
        return labeled(image_640)

    pipeline = build_transforms(640, True, pool=ImagePool(loader, 4), hsv_h=0.015, hsv_s=0.7, hsv_v=0.4,
                                translate=0.1, scale=0.5, mosaic=1.0)
    rows = {
        "torchvision v2 F.affine, [3, 1280, 1280] uint8": lambda: tvf.affine(
            tensor_1280, angle=10.0, translate=[20, 20], scale=1.2, shear=[5.0, 0.0]),
        "cv2.warpAffine 1280 -> 1280 (F.affine's output size)": lambda: cv2.warpAffine(
            mosaic_canvas, matrix, (1280, 1280), borderValue=(114, 114, 114)),
        "cv2.warpAffine 1280 -> 640 (mosaic crop)": lambda: cv2.warpAffine(
            mosaic_canvas, matrix, (640, 640), borderValue=(114, 114, 114)),
        "RandomAffine step, mosaic canvas 1280 -> 640, 20 boxes": lambda: affine(
            labeled(mosaic_canvas).replace(border=320), generator),
        "torchvision v2 adjust_hue, [3, 640, 640] uint8": lambda: tvf.adjust_hue(tensor_640, 0.01),
        "cv2 HSV round trip with LUT (RandomHSV), 640 x 640": lambda: RandomHSV()(labeled(image_640), generator),
        "whole pipeline at Ultralytics' defaults, 640 (mosaic of 640 images)": lambda: pipeline(
            labeled(image_640), generator),
    }
    print(f"torch threads {torch.get_num_threads()}, OpenCV threads {cv2.getNumThreads()}, median of {repeats}")
    for name, function in rows.items():
        print(f"{median_ms(function, repeats):8.1f} ms  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
