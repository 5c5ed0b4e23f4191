"""Per-sample image transforms: decoding, keep-ratio resize and horizontal flip."""

from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# EXIF orientation is ignored on purpose: COCO annotations and the header sizes read by `labels.image_size`
# both describe the pixels as stored in the file.
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def load_image(path: str | Path) -> np.ndarray | None:
    """Decode an image file to RGB uint8 `[H, W, 3]`, or None when it is gone or OpenCV cannot decode it.

    The bytes are read first and decoded in memory, so a file deleted mid-run prints no OpenCV warning.
    """
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, IMREAD_FLAGS) if data.size else None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_long_side(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, float]:
    """Keep-ratio resize so that the long side equals `imgsz`; returns the image and the ratio (new = old × ratio)."""
    height, width = image.shape[:2]
    ratio = imgsz / max(height, width)
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))  # cv2 takes (w, h)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image, ratio


def scale_boxes(boxes: np.ndarray, ratio: float, height: int, width: int) -> np.ndarray:
    """Scale xyxy boxes `[K, 4]` by `ratio` and clip them to a `height` × `width` image."""
    scaled = boxes * np.float32(ratio)
    scaled[:, 0::2] = scaled[:, 0::2].clip(0, width)
    scaled[:, 1::2] = scaled[:, 1::2].clip(0, height)
    return scaled


def random_hflip(image: torch.Tensor, boxes: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a CHW image and its xyxy boxes `[K, 4]` left-right with probability `p` (torch's global RNG)."""
    if p <= 0:
        return image, boxes
    canvas = tuple(image.shape[-2:])
    image, boxes = v2.RandomHorizontalFlip(p)(
        tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    )
    return image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)
