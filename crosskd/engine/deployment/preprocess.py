"""The first step of every input convention (`runtimes.exported.InputConvention`): keep-ratio resize into imgsz,
padding bottom/right to a multiple of the largest stride, 0..1 RGB; `InputConvention.place` then puts the images
where the exported graph expects them (centred for a YOLO file). Predict and INT8 calibration both take these two
steps, so a quantized graph is calibrated on exactly what it will be fed."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from crosskd.data.transforms import resize_long_side


def resize_to_fit(image: np.ndarray, imgsz: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Keep-ratio resize into h x w: the validation resize (long side = imgsz) when square."""
    height, width = imgsz
    if height == width:
        return resize_long_side(image, height)
    ratio = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, round(image.shape[1] * ratio)), max(1, round(image.shape[0] * ratio)))  # cv2 takes (w, h)
    if size != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image, ratio


def letterbox(
    images: Sequence[np.ndarray], imgsz: tuple[int, int], pad_multiple: int, device: torch.device, pad_value: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BGR uint8 images [H, W, 3] -> model input [B, 3, H', W'] 0..1 RGB, resize ratios [B] and each resized
    image's (h, w) [B, 2] inside the input.

    crosskd's input convention: keep-ratio resize, padding with `pad_value` bottom/right to
    a multiple of `pad_multiple`.
    """
    resized = [resize_to_fit(image, imgsz) for image in images]
    height = -(-max(image.shape[0] for image, _ in resized) // pad_multiple) * pad_multiple
    width = -(-max(image.shape[1] for image, _ in resized) // pad_multiple) * pad_multiple
    batch = torch.full((len(images), 3, height, width), pad_value, dtype=torch.uint8)
    for i, (image, _) in enumerate(resized):
        batch[i, :, : image.shape[0], : image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1).flip(0)  # RGB
    ratios = torch.tensor([ratio for _, ratio in resized], dtype=torch.float32)
    sizes = torch.tensor([image.shape[:2] for image, _ in resized], dtype=torch.int64)  # [B, 2] (h, w)
    return batch.to(device).float().div_(255), ratios.to(device), sizes.to(device)
