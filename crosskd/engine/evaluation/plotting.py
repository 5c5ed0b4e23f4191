"""Plots of a run: the one box drawer, image grids with boxes (labels or predictions), results.png from results.csv,
labels.jpg, the PR / F1 / P / R curves and the confusion matrices.

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


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot state) and its axes [rows, cols]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def smooth_series(values: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """A centred moving average over ~`fraction` of the points (NaNs ignored), for the dotted trend lines."""
    width = max(1, round(len(values) * fraction) // 2 * 2 + 1)
    valid = np.isfinite(values)
    kernel = np.ones(width)
    sums = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
    counts = np.convolve(valid.astype(float), kernel, mode="same")
    return np.where(valid, sums / np.maximum(counts, 1), np.nan)


def plot_results(csv_path: str | Path) -> Path:
    """Save results.png next to results.csv: one panel per column (CSV order) against the epoch, with a smoothed
    trend line, as Ultralytics' results.png."""
    data = read_results(csv_path)
    series = [c for c in data if c not in ("epoch", "time")]
    cols = min(5, max(len(series), 1))
    rows = max(math.ceil(len(series) / cols), 1)
    fig, axes = new_figure(3 * cols, 2.6 * rows, rows, cols)
    for ax, name in zip(axes.flat, series, strict=False):
        values = np.asarray(data[name], dtype=float)
        ax.plot(data["epoch"], values, marker=".", linewidth=1.5, label="results")
        if len(values) > 2:
            ax.plot(data["epoch"], smooth_series(values), ":", linewidth=1.5, label="smooth")
        ax.set_title(name, fontsize=10)
    if series:
        axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    out = Path(csv_path).with_name("results.png")
    fig.savefig(out, dpi=150)
    return out


def plot_curves(
    x: np.ndarray, ys: np.ndarray, labels: list[str], mean_label: str, path: str | Path, xlabel: str, ylabel: str
) -> Path:
    """One line per class (`ys` [C, P] against `x` [P]; labelled when C <= 20) and their mean in bold blue, as
    Ultralytics' PR_curve.png / F1_curve.png."""
    fig, axes = new_figure(9, 6)
    ax = axes[0, 0]
    for y, label in zip(ys, labels, strict=True):
        ax.plot(x, y, linewidth=1, label=label if len(labels) <= 20 else None)
    if len(ys):
        ax.plot(x, ys.mean(0), linewidth=3, color="blue", label=mean_label)
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)
    ax.set_title(f"{ylabel}-{xlabel} Curve")
    fig.savefig(path, dpi=150)
    return Path(path)


def plot_confusion_matrix(matrix: np.ndarray, names: dict[int, str], path: str | Path, normalize: bool) -> Path:
    """The [nc + 1, nc + 1] matrix (rows predicted, columns true, last the background) as a heat map; `normalize`
    divides each column by its count, so a column shows where the boxes of one true class went."""
    values = matrix / np.maximum(matrix.sum(0, keepdims=True), 1) if normalize else matrix.astype(float)
    ticks = [names.get(i, str(i)) for i in range(len(matrix) - 1)] + ["background"]
    size = min(4 + 0.5 * len(ticks), 24)
    fig, axes = new_figure(size, size * 0.8)
    ax = axes[0, 0]
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if len(ticks) <= 30:
        ax.set_xticks(range(len(ticks)), ticks, rotation=90)
        ax.set_yticks(range(len(ticks)), ticks)
        for (row, col), value in np.ndenumerate(values):
            if value > 0:
                text = f"{value:.2f}" if normalize else str(int(value))
                ax.text(col, row, text, ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 * values.max() else "black")
    ax.set(xlabel="True", ylabel="Predicted")
    ax.set_title("Confusion Matrix" + (" Normalized" if normalize else ""))
    fig.savefig(path, dpi=150)
    return Path(path)


def plot_labels(boxes: np.ndarray, labels: np.ndarray, names: dict[int, str], path: str | Path) -> Path:
    """labels.jpg: instances per class, up to 1000 boxes drawn at the centre, and histograms of box centres (x, y)
    and sizes (width, height). `boxes` [N, 4] are xyxy normalised by their image's width and height, `labels` [N]."""
    counts = np.bincount(labels, minlength=len(names))
    fig, axes = new_figure(10, 10, 2, 2)
    bars = axes[0, 0]
    bars.bar(range(len(counts)), counts, color=[np.array(class_color(i)[::-1]) / 255 for i in range(len(counts))])
    bars.set(ylabel="instances", title=f"{len(labels)} boxes")
    if len(names) <= 30:
        bars.set_xticks(range(len(counts)), [names.get(i, str(i)) for i in range(len(counts))], rotation=90)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centres_x, centres_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    canvas = np.full((1000, 1000, 3), 255, dtype=np.uint8)
    for w, h, label in zip(widths[:1000], heights[:1000], labels[:1000], strict=True):
        half = np.array([w, h]) * 500
        top_left, bottom_right = (500 - half).round().astype(int), (500 + half).round().astype(int)
        cv2.rectangle(canvas, tuple(top_left), tuple(bottom_right), class_color(int(label))[::-1], 1)
    axes[0, 1].imshow(canvas)
    axes[0, 1].axis("off")
    for ax, (x, y, xlabel, ylabel) in zip(axes[1], ((centres_x, centres_y, "x", "y"),
                                                   (widths, heights, "width", "height")), strict=True):
        ax.hist2d(x, y, bins=50, range=((0, 1), (0, 1)), cmap="Blues")
        ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.savefig(path, dpi=100)
    return Path(path)
