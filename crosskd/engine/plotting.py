"""Plots of a run: image grids with boxes (labels or predictions) and curves from results.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
           (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
           (200, 149, 255), (199, 55, 255)]  # BGR


def class_color(label: int) -> tuple[int, int, int]:
    """The BGR colour of a class id (the palette repeats after 20 classes)."""
    return PALETTE[label % len(PALETTE)]


def _draw_boxes(canvas: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, names: dict):
    """Draw xyxy boxes with 'name' or 'name score' captions onto a BGR uint8 image in place."""
    thickness = max(1, round(min(canvas.shape[:2]) / 200))
    for i, (box, label) in enumerate(zip(boxes.round().astype(int), labels.astype(int), strict=True)):
        color = class_color(label)
        cv2.rectangle(canvas, (box[0], box[1]), (box[2], box[3]), color, thickness)
        caption = str(names.get(label, label)) + (f" {scores[i]:.2f}" if scores is not None else "")
        cv2.putText(canvas, caption, (box[0], max(box[1] - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1,
                    cv2.LINE_AA)


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
        _draw_boxes(tile, boxes[i].detach().float().cpu().numpy(), labels[i].cpu().numpy(), tile_scores, names)
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
