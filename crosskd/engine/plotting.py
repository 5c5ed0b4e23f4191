"""Plots of a run: the one box drawer, image grids with boxes (labels or predictions) and curves from results.csv.

matplotlib is imported inside the functions that draw figures, so importing this module (predict does) stays light.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch

PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
           (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
           (200, 149, 255), (199, 55, 255)]  # BGR


def class_color(label: int) -> tuple[int, int, int]:
    """The BGR colour of a class id (the palette repeats after 20 classes)."""
    return PALETTE[label % len(PALETTE)]


def draw_boxes(
    canvas: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    scores: np.ndarray | None = None,
    line_width: int | None = None,
) -> np.ndarray:
    """Draw xyxy boxes [K, 4] with filled 'name' or 'name score' captions onto a BGR uint8 image [H, W, 3] in place.

    `labels` [K] are class ids, `scores` [K] or None (ground truth); the line width defaults to ~0.3 % of the image
    side (Ultralytics' Annotator). Returns `canvas`.
    """
    thickness = line_width or max(1, round(sum(canvas.shape[:2]) / 2 * 0.003))
    font_scale = max(0.3, thickness / 3)
    for i, (box, label) in enumerate(zip(boxes.round().astype(int), labels.astype(int), strict=True)):
        color = class_color(label)
        cv2.rectangle(canvas, (box[0], box[1]), (box[2], box[3]), color, thickness, cv2.LINE_AA)
        caption = str(names.get(label, label)) + (f" {scores[i]:.2f}" if scores is not None else "")
        (text_w, text_h), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = box[1] - text_h - baseline if box[1] - text_h - baseline >= 0 else box[1]
        cv2.rectangle(canvas, (box[0], top), (box[0] + text_w, top + text_h + baseline), color, -1)
        cv2.putText(canvas, caption, (box[0], top + text_h), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    1, cv2.LINE_AA)
    return canvas


def plot_images(
    images: torch.Tensor,
    boxes: list[torch.Tensor],
    labels: list[torch.Tensor],
    names: dict[int, str],
    path: str | Path,
    scores: list[torch.Tensor] | None = None,
    max_images: int = 16,
) -> Path:
    """Save a grid of images [B,3,H,W] (0..1 RGB) with per-image xyxy boxes in input pixels.

    `boxes[i]` is [K_i, 4], `labels[i]` and `scores[i]` are [K_i]; at most `max_images` images are drawn.
    """
    count = min(len(images), max_images)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    height, width = images.shape[2:]
    grid = np.full((rows * height, cols * width, 3), 114, dtype=np.uint8)
    for i in range(count):
        tile = (images[i].detach().float().cpu().clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()  # [H, W, 3]
        tile = np.ascontiguousarray(tile[:, :, ::-1])
        tile_scores = scores[i].detach().float().cpu().numpy() if scores is not None else None
        draw_boxes(tile, boxes[i].detach().float().cpu().numpy(), labels[i].cpu().numpy(), names, tile_scores)
        r, c = divmod(i, cols)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = tile
    path = Path(path)
    cv2.imwrite(str(path), grid)
    return path


def read_results(csv_path: str | Path) -> dict[str, list[float]]:
    """results.csv as columns of floats (empty cells become NaN)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0].keys()) if rows else []
    return {c: [float(r[c]) if r[c] not in ("", None) else math.nan for r in rows] for c in columns}


def plot_results(csv_path: str | Path) -> Path:
    """Save results.png next to results.csv: one panel per column against the epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = read_results(csv_path)
    series = [c for c in data if c not in ("epoch", "time")]
    cols = min(5, max(len(series), 1))
    rows = max(math.ceil(len(series) / cols), 1)
    fig = Figure(figsize=(3 * cols, 2.6 * rows), tight_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, series, strict=False):
        ax.plot(data["epoch"], data[name], marker=".", linewidth=1.5)
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    out = Path(csv_path).with_name("results.png")
    fig.savefig(out, dpi=150)
    return out
