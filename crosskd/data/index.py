"""The checked labels of a split as a few flat numpy arrays (the Detectron2 layout), not one Python object per image.

Forked DataLoader workers share numpy buffers with the main process page for page; a list of per-image objects
is copied into every worker as reference counts and the garbage collector touch it. `LabelIndex` keeps one boxes
array for the whole split with per-image offsets, and hands out `ImageRecord` views on demand.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    """One checked image and its boxes in original-image pixels (a view into a `LabelIndex`)."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [K, 4] float32 xyxy
    labels: np.ndarray  # [K] int64, contiguous 0..nc-1
    image_id: int
    crowd_boxes: np.ndarray  # [C, 4] float32 xyxy, COCO iscrowd=1 regions (ground truth only, never trained on)
    crowd_labels: np.ndarray  # [C] int64


@dataclass(eq=False)
class LabelIndex:
    """Images and boxes of one split; image i's boxes are `boxes[box_offsets[i]:box_offsets[i + 1]]`.

    Indexing gives an `ImageRecord` (an int) or a smaller `LabelIndex` (a slice); iterating gives the records.
    """

    root: Path  # image folder: image i is root / name(i)
    names: np.ndarray  # [L] uint8, every image's path relative to root (os.fsencode), concatenated
    name_offsets: np.ndarray  # [N + 1] int64
    sizes: np.ndarray  # [N, 2] int64 (width, height) in pixels
    image_ids: np.ndarray  # [N] int64
    box_offsets: np.ndarray  # [N + 1] int64
    boxes: np.ndarray  # [K, 4] float32 xyxy pixels
    labels: np.ndarray  # [K] int64
    crowd_offsets: np.ndarray  # [N + 1] int64
    crowd_boxes: np.ndarray  # [C, 4] float32 xyxy pixels
    crowd_labels: np.ndarray  # [C] int64

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self.record(i) for i in range(len(self)))

    def __getitem__(self, item: int | slice) -> "ImageRecord | LabelIndex":
        if isinstance(item, slice):
            return self if item.indices(len(self)) == (0, len(self), 1) else self.select(np.arange(len(self))[item])
        return self.record(range(len(self))[item])

    def record(self, i: int) -> ImageRecord:
        """Image i with views of its boxes."""
        box, crowd = slice(*self.box_offsets[i : i + 2]), slice(*self.crowd_offsets[i : i + 2])
        return ImageRecord(
            self.path(i), int(self.sizes[i, 0]), int(self.sizes[i, 1]), self.boxes[box], self.labels[box],
            int(self.image_ids[i]), self.crowd_boxes[crowd], self.crowd_labels[crowd],
        )

    def path(self, i: int) -> Path:
        return self.root / self.name(i)

    def name(self, i: int) -> str:
        """Image i's path relative to `root`."""
        return os.fsdecode(self.names[self.name_offsets[i] : self.name_offsets[i + 1]].tobytes())

    def num_boxes(self) -> np.ndarray:
        """Training boxes per image `[N]`."""
        return np.diff(self.box_offsets)

    def select(self, indices: np.ndarray) -> "LabelIndex":
        """The images at `indices` `[M]`, in that order (copies)."""
        name_rows, name_offsets = _ragged_rows(self.name_offsets, indices)
        box_rows, box_offsets = _ragged_rows(self.box_offsets, indices)
        crowd_rows, crowd_offsets = _ragged_rows(self.crowd_offsets, indices)
        return LabelIndex(self.root, **{
            "names": self.names[name_rows], "name_offsets": name_offsets, "sizes": self.sizes[indices],
            "image_ids": self.image_ids[indices], "box_offsets": box_offsets, "boxes": self.boxes[box_rows],
            "labels": self.labels[box_rows], "crowd_offsets": crowd_offsets,
            "crowd_boxes": self.crowd_boxes[crowd_rows], "crowd_labels": self.crowd_labels[crowd_rows],
        })

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array field by name (what the label cache stores)."""
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name != "root"}

    @classmethod
    def from_arrays(cls, root: Path, arrays: dict[str, np.ndarray]) -> "LabelIndex":
        """The inverse of `arrays`."""
        return cls(root, **{field.name: arrays[field.name] for field in fields(cls) if field.name != "root"})


@dataclass
class FlatLabels:
    """Checked boxes of a whole split, one row per box."""

    boxes: np.ndarray  # [K, 4] float32 xyxy pixels
    labels: np.ndarray  # [K] int64
    image_index: np.ndarray  # [K] index of the box's image
    crowd: np.ndarray  # [K] bool


def build_index(
    root: Path, names: list[str], sizes: np.ndarray, image_ids: np.ndarray, keep: np.ndarray, flat: FlatLabels
) -> LabelIndex:
    """The index of the images at `keep` `[M]` (indices into `names`, in that order) with their boxes out of `flat`.

    `names [N]` are paths relative to `root`, `sizes [N, 2]` (width, height), `image_ids [N]`.
    """
    packed, name_offsets = pack_names(names)
    box_offsets, box_order = _group(flat.image_index[~flat.crowd], len(names))
    crowd_offsets, crowd_order = _group(flat.image_index[flat.crowd], len(names))
    every = LabelIndex(
        root, packed, name_offsets, sizes.astype(np.int64).reshape(-1, 2),
        np.asarray(image_ids, dtype=np.int64), box_offsets, flat.boxes[~flat.crowd][box_order],
        flat.labels[~flat.crowd][box_order], crowd_offsets, flat.boxes[flat.crowd][crowd_order],
        flat.labels[flat.crowd][crowd_order],
    )
    return every.select(keep)


def pack_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 array `[L]` of their os.fsencode bytes and offsets `[N + 1]`."""
    encoded = [os.fsencode(name) for name in names]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), _offsets(np.array(list(map(len, encoded)), np.int64))


def unpack_names(packed: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The inverse of `pack_names`."""
    data = packed.tobytes()
    return [os.fsdecode(data[start:end]) for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _offsets(counts: np.ndarray) -> np.ndarray:
    """`[N + 1]` start offsets (0 first, total last) of rows grouped `counts [N]` per item."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _group(image_index: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets `[N + 1]` and the stable order `[K]` that groups rows by their image index `[K]`."""
    return _offsets(np.bincount(image_index, minlength=num_images)), np.argsort(image_index, kind="stable")


def _ragged_rows(offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `[R]` of the items at `indices` in a ragged array with `offsets [N + 1]`, and the new offsets `[M + 1]`."""
    starts, counts = offsets[indices], offsets[indices + 1] - offsets[indices]
    new_offsets = _offsets(counts)
    return np.repeat(starts - new_offsets[:-1], counts) + np.arange(new_offsets[-1]), new_offsets
