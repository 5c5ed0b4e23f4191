"""Label sources: format detection, COCO JSON and YOLO txt readers, image header probing and label checks.

Both readers produce the same `LabelIndex` (flat arrays, see `index.py`): xyxy boxes in original-image pixels and
contiguous labels 0..nc-1.
Problems (bad class ids, boxes outside the image, zero-size boxes, malformed lines, missing or unreadable images)
are counted and skipped, then reported in one warning line per split; nothing here crashes on bad labels.

Image readability is checked on load from the file header only (Pillow; formats it does not know are decoded
once), which also gives YOLO image sizes and verifies COCO's recorded sizes. A file whose header is fine but whose
body cannot be decoded is handled later by `DetectionDataset.__getitem__` (background sample plus a warning).
"""

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from crosskd.data.index import FlatLabels, LabelIndex, build_index
from crosskd.errors import DataError

IMG_FORMATS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".pfm", ".mpo"}
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image before it counts as outside (it is clipped)
MISSING, UNREADABLE = -1, 0  # probe_images codes stored in place of (width, height)

# problem key -> (counted thing, what is wrong with it); the order is the order of the warning line
PROBLEMS = {
    "malformed": ("malformed label line", ""),
    "class": ("box", "with class id outside 0..{last}"),
    "outside": ("box", "outside the image"),
    "size": ("zero-size box", ""),
    "orphan": ("annotation", "of an unknown image"),
    "missing": ("missing image", ""),
    "unreadable": ("unreadable image", ""),
    "mismatch": ("image", "whose size differs from its annotation"),
}


@dataclass
class SplitSource:
    """Where one split's images and labels live."""

    format: str  # "coco" or "yolo"
    images: Path  # image directory
    annotations: Path  # COCO JSON file or YOLO labels directory


@dataclass
class LabelSet:
    index: LabelIndex  # the kept images, COCO by image id, YOLO by path
    category_ids: list[int]  # contiguous label -> original category id
    counts: Counter  # problem key -> number skipped
    image_names: list[str]  # every image the reader checked, kept or not, relative to the image folder


def resolve_split(root: Path, entry: str | dict, split: str, layout: str = "") -> SplitSource:
    """Find the format of a split entry (relative to `root`): a COCO JSON, an image dir or `{images, annotations}`."""
    hint = f" (expected {layout})" if layout else ""
    if isinstance(entry, dict):
        return _explicit_source(root, entry, split, hint)
    path = root / str(entry)
    if path.suffix == ".json":
        return _coco_json_source(root, path, split, hint)
    if path.suffix == ".txt":
        raise DataError(f"{split}: image list files ({path.name}) are not supported; point '{split}:' at the image "
                        "folder (e.g. images/train2017) or at a COCO JSON")
    if not path.is_dir():
        raise DataError(f"{split}: image folder {path} not found{hint}; check '{split}:' and 'path:' in the YAML")
    labels = yolo_labels_dir(path)
    if labels is not None and labels.is_dir():
        return SplitSource("yolo", path, labels)
    coco_json = root / "annotations" / f"instances_{path.name}.json"
    if coco_json.is_file():
        return SplitSource("coco", path, coco_json)
    raise DataError(
        f"{split}: no labels for {path}{hint}; add YOLO txt files under {labels or '<...>/labels/...'} "
        f"or a COCO file {coco_json}"
    )


def yolo_labels_dir(images: Path) -> Path | None:
    """Ultralytics rule: the labels dir replaces the last `images` component of the image dir with `labels`."""
    parts = images.parts
    if "images" not in parts:
        return None
    last = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:last], "labels", *parts[last + 1 :])


def _explicit_source(root: Path, entry: dict, split: str, hint: str) -> SplitSource:
    if set(entry) != {"images", "annotations"}:
        raise DataError(f"{split}: a dict split needs exactly the keys images and annotations, got {sorted(entry)}")
    images, annotations = root / str(entry["images"]), root / str(entry["annotations"])
    for path in (images, annotations):
        if not path.exists():
            raise DataError(f"{split}: {path} not found{hint}; check '{split}:' and 'path:' in the dataset YAML")
    return SplitSource("coco" if annotations.suffix == ".json" else "yolo", images, annotations)


def _coco_json_source(root: Path, json_file: Path, split: str, hint: str) -> SplitSource:
    if not json_file.is_file():
        raise DataError(f"{split}: annotation file {json_file} not found{hint}; check '{split}:' and 'path:'")
    name = json_file.stem.removeprefix("instances_")
    candidates = [root / name, root / "images" / name]
    images = next((path for path in candidates if path.is_dir()), None)
    if images is None:
        raise DataError(f"{split}: no image folder for {json_file.name}: expected {candidates[0]} or {candidates[1]}")
    return SplitSource("coco", images, json_file)


def read_split(source: SplitSource, nc: int) -> LabelSet:
    """Read and check one split's labels (no warning logged; see `problems_message`)."""
    return read_coco(source.annotations, source.images, nc) if source.format == "coco" else read_yolo(source, nc)


def problems_message(counts: Counter, nc: int) -> str:
    """One line such as '3 boxes with class id outside 0..9, 1 missing image' ('' when nothing was skipped)."""
    parts = []
    for key, (noun, detail) in PROBLEMS.items():
        if counts.get(key):
            nouns = noun if counts[key] == 1 else noun + ("es" if noun.endswith("x") else "s")
            parts.append(" ".join(filter(None, [str(counts[key]), nouns, detail.format(last=nc - 1)])))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- image probing
def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header (Pillow reads only the header; formats Pillow does not know are decoded
    once by OpenCV, which loads them for training); None if the file cannot be read as an image."""
    try:
        with Image.open(path) as image:
            size = image.size
    except (UnidentifiedImageError, SyntaxError, ValueError):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        size = None if image is None else (image.shape[1], image.shape[0])
    return size if size and min(size) > 0 else None


def _probe(path: Path) -> tuple[int, int]:
    try:
        return image_size(path) or (UNREADABLE, UNREADABLE)
    except FileNotFoundError:
        return MISSING, MISSING
    except OSError:
        return UNREADABLE, UNREADABLE


def _probe_chunk(paths: list[Path]) -> list[tuple[int, int]]:
    return [_probe(path) for path in paths]


def probe_images(paths: list[Path], chunk: int = 256) -> np.ndarray:
    """Header sizes `[N, 2]` (width, height) of many files, read by a thread pool; MISSING/UNREADABLE codes.

    The pool gets chunks of `chunk` files: one future per file costs more than the header read itself.
    """
    chunks = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        sizes = [size for sizes_of_chunk in pool.map(_probe_chunk, chunks) for size in sizes_of_chunk]
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def count_image_problems(sizes: np.ndarray, counts: Counter, expected: np.ndarray | None = None) -> np.ndarray:
    """Count missing, unreadable and (given `expected` `[N, 2]`) wrongly sized images; returns the keep mask `[N]`."""
    missing, unreadable = sizes[:, 0] == MISSING, sizes[:, 0] == UNREADABLE
    mismatch = np.zeros_like(missing) if expected is None else (sizes != expected).any(1) & ~missing & ~unreadable
    counts.update(missing=int(missing.sum()), unreadable=int(unreadable.sum()), mismatch=int(mismatch.sum()))
    return ~(missing | unreadable | mismatch)


# ---------------------------------------------------------------------------------------------- box checks
def check_boxes(boxes: np.ndarray, labels: np.ndarray, sizes: np.ndarray, nc: int, counts: Counter) -> np.ndarray:
    """Check xyxy `boxes [K, 4]` with `labels [K]` against their image `sizes [K, 2]` (w, h).

    Boxes within BOX_TOLERANCE of the image are clipped in place. Each failing box is counted under its first
    problem (non-finite → malformed, class, outside, zero size). Returns the keep mask `[K]`.
    """
    width, height = sizes[:, 0], sizes[:, 1]
    finite = np.isfinite(boxes).all(1)
    bad_class = (labels < 0) | (labels >= nc)
    with np.errstate(invalid="ignore"):
        outside = (boxes[:, :2] < -BOX_TOLERANCE).any(1) | (boxes[:, 2] > width + BOX_TOLERANCE)
        outside |= boxes[:, 3] > height + BOX_TOLERANCE
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width[:, None])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height[:, None])
    zero_size = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    keep = finite.copy()
    counts["malformed"] += int((~finite).sum())
    for key, bad in (("class", bad_class), ("outside", outside), ("size", zero_size)):
        counts[key] += int((bad & keep).sum())
        keep &= ~bad
    return keep


# ---------------------------------------------------------------------------------------------- COCO JSON
def read_coco(json_file: Path, images_dir: Path, nc: int) -> LabelSet:
    """Read a COCO detection JSON; category ids map to contiguous labels by sorted id; crowd boxes kept apart."""
    try:
        data = json.loads(json_file.read_text())
        images = data["images"]
        category_ids = sorted(int(category["id"]) for category in data["categories"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{json_file}: not a COCO detection file ({error}); it needs images and categories") from error
    if len(category_ids) != nc:
        raise DataError(
            f"{json_file.name} has {len(category_ids)} categories but the dataset YAML has {nc} names; "
            "list one name per category (in sorted category-id order) under names:"
        )
    counts = Counter()
    image_ids = [int(image["id"]) for image in images]
    sizes = np.array([[image["width"], image["height"]] for image in images], dtype=np.int64).reshape(-1, 2)
    names = [str(image["file_name"]) for image in images]
    keep_image = count_image_problems(probe_images([images_dir / name for name in names]), counts, sizes)
    boxes, labels, crowd, image_index = _coco_annotations(data.get("annotations", []), image_ids, category_ids, counts)
    on_kept = keep_image[image_index]  # annotations of skipped images are dropped uncounted
    boxes, labels, crowd, image_index = boxes[on_kept], labels[on_kept], crowd[on_kept], image_index[on_kept]
    valid = check_boxes(boxes, labels, sizes[image_index], nc, counts)
    flat = FlatLabels(boxes[valid], labels[valid], image_index[valid], crowd[valid])
    kept = np.flatnonzero(keep_image)
    by_id = kept[np.argsort(np.array(image_ids, dtype=np.int64)[kept], kind="stable")]
    return LabelSet(build_index(images_dir, names, sizes, image_ids, by_id, flat), category_ids, counts, names)


def _coco_annotations(
    annotations: list[dict], image_ids: list[int], category_ids: list[int], counts: Counter
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Xyxy boxes `[A, 4]`, labels `[A]` (-1: unknown category), crowd flags `[A]` and image index `[A]`.

    Annotations of unknown image ids are counted and dropped.
    """
    index_of = {image_id: i for i, image_id in enumerate(image_ids)}
    image_index = np.array([index_of.get(ann.get("image_id"), -1) for ann in annotations], dtype=np.int64)
    known = image_index >= 0
    counts["orphan"] += int((~known).sum())
    annotations = [ann for ann, ok in zip(annotations, known, strict=True) if ok]
    xywh = np.array([_bbox_or_nan(ann) for ann in annotations], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    labels = np.array([label_of.get(ann.get("category_id"), -1) for ann in annotations], dtype=np.int64)
    crowd = np.array([bool(ann.get("iscrowd", 0)) for ann in annotations], dtype=bool)
    return boxes, labels, crowd, image_index[known]


def _bbox_or_nan(annotation: dict) -> list[float]:
    bbox = annotation.get("bbox")
    if isinstance(bbox, list | tuple) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox):
        return bbox
    return [np.nan] * 4


# ---------------------------------------------------------------------------------------------- YOLO txt
def read_yolo(source: SplitSource, nc: int) -> LabelSet:
    """Read YOLO txt labels (`class xc yc w h` normalised, or a polygon); a missing/empty file is a background."""
    counts = Counter()
    paths = list_images(source.images)
    label_files = [source.annotations / path.relative_to(source.images).with_suffix(".txt") for path in paths]
    counts["missing"] += _orphan_label_files(source, paths)
    sizes = probe_images(paths)
    keep_image = count_image_problems(sizes, counts)
    kept = np.flatnonzero(keep_image)
    rows, file_index = _yolo_rows([label_files[i] for i in kept], counts)
    image_index = kept[file_index]  # [K] index into paths
    box_sizes = sizes[image_index].astype(np.float64)
    xy, wh = rows[:, 1:3] * box_sizes, rows[:, 3:5] * box_sizes
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)  # [K, 4] xyxy pixels
    labels = rows[:, 0].astype(np.int64)
    valid = check_boxes(boxes, labels, sizes[image_index], nc, counts)
    flat = FlatLabels(boxes[valid], labels[valid], image_index[valid], np.zeros(int(valid.sum()), bool))
    names = [str(path.relative_to(source.images)) for path in paths]
    index = build_index(source.images, names, sizes, _yolo_image_ids(paths), kept, flat)
    return LabelSet(index, list(range(nc)), counts, names)


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMG_FORMATS)


def _orphan_label_files(source: SplitSource, paths: list[Path]) -> int:
    """Number of label files without an image (counted as missing images); classes.txt is not a label file."""
    image_stems = {path.relative_to(source.images).with_suffix("") for path in paths}
    label_stems = {
        path.relative_to(source.annotations).with_suffix("")
        for path in source.annotations.rglob("*.txt")
        if path.name != "classes.txt"
    }
    return len(label_stems - image_stems)


def _yolo_rows(label_files: list[Path], counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """All label rows `[K, 5]` (class, xc, yc, w, h normalised) and the index `[K]` of the file each came from."""
    rows, index = [], []
    for i, label_file in enumerate(label_files):
        file_rows = _parse_label_file(label_file, counts)
        rows.extend(file_rows)
        index.extend([i] * len(file_rows))
    return np.array(rows, dtype=np.float64).reshape(-1, 5), np.array(index, dtype=np.int64)


def _parse_label_file(label_file: Path, counts: Counter) -> list[list[float]]:
    try:
        lines = label_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError):
        counts["malformed"] += 1
        return []
    rows = []
    for line in filter(str.strip, lines):
        row = _parse_label_line(line.split())
        if row is None:
            counts["malformed"] += 1
        else:
            rows.append(row)
    return rows


def _parse_label_line(fields: list[str]) -> list[float] | None:
    """`class xc yc w h`, or `class x1 y1 x2 y2 ...` (a polygon, ≥ 3 points) reduced to its box; None if malformed."""
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return None
    is_polygon = len(values) >= 7 and len(values) % 2 == 1
    if (len(values) != 5 and not is_polygon) or not values[0].is_integer():
        return None
    if is_polygon:
        xs, ys = values[1::2], values[2::2]
        return [values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    return values


def _yolo_image_ids(paths: list[Path]) -> list[int]:
    """Numeric file stems when all are distinct integers, else the index in sorted order."""
    stems = [path.stem for path in paths]
    if all(stem.isdigit() for stem in stems) and len({int(stem) for stem in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(len(paths)))
