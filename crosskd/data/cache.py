"""The label cache: a split's checked `LabelIndex` saved next to its labels, the way Ultralytics caches labels.

COCO `annotations/instances_train.json` is cached in `annotations/instances_train.cache`, YOLO `labels/train/` in
`labels/train.cache` (an uncompressed npz: the index arrays plus one JSON string of metadata, no pickle). The cache
is used only while the fingerprint of the files it was read from still matches: the names, sizes and modification
times of the annotation file and of every image it lists (COCO), or of every image and label file in the two
folders (YOLO). A folder that cannot be written falls back to no cache with one warning.
"""

import hashlib
import json
import os
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from crosskd.data.index import LabelIndex, pack_names, unpack_names
from crosskd.data.labels import LabelSet, SplitSource, list_images, read_split
from crosskd.utils import LOGGER

CACHE_VERSION = 1  # bump when the readers' checks or the stored arrays change
_warned: set[Path] = set()  # cache files whose failed write was already reported


def load_labels(source: SplitSource, nc: int) -> LabelSet:
    """A split's checked labels: from its cache when that still matches the files on disk, else read and cached."""
    path = cache_file(source)
    labels = read_cache(path, source, nc)
    if labels is None:
        labels = read_split(source, nc)
        write_cache(path, source, nc, labels)
    return labels


def cache_file(source: SplitSource) -> Path:
    """Where a split's cache lives: beside the COCO JSON, or beside the YOLO labels folder."""
    if source.format == "coco":
        return source.annotations.with_suffix(".cache")
    return source.annotations.with_name(source.annotations.name + ".cache")


def fingerprint(source: SplitSource, image_names: list[str]) -> str:
    """Hash of the paths, sizes and modification times of the files a split's labels come from.

    COCO: the annotation file and its images (`image_names`, relative to the image folder); YOLO: every image
    and label file found in the two folders now (so added or removed files count too).
    """
    if source.format == "coco":
        files = [str(source.annotations), *(os.path.join(source.images, name) for name in image_names)]
    else:
        files = [*map(str, list_images(source.images)), *sorted(map(str, source.annotations.rglob("*.txt")))]
    stats = np.array([_size_and_mtime(file) for file in files], dtype=np.int64)  # [F, 2]
    digest = hashlib.blake2b("\n".join(files).encode("utf-8", "surrogateescape"), digest_size=16)
    digest.update(stats.tobytes())
    return digest.hexdigest()


def _size_and_mtime(file: str) -> tuple[int, int]:
    try:
        stat = os.stat(file)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def read_cache(path: Path, source: SplitSource, nc: int) -> LabelSet | None:
    """The cached labels, or None when there is no usable cache (missing, unreadable, stale or for another nc)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
        image_names = unpack_names(arrays.pop("image_names"), arrays.pop("image_name_offsets"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    expected = {"version": CACHE_VERSION, "format": source.format, "nc": nc}
    if any(meta.get(key) != value for key, value in expected.items()):
        return None
    if meta.get("fingerprint") != fingerprint(source, image_names):
        return None
    index = LabelIndex.from_arrays(source.images, arrays)
    return LabelSet(index, meta["category_ids"], Counter(meta["counts"]), image_names)


def write_cache(path: Path, source: SplitSource, nc: int, labels: LabelSet) -> None:
    """Save `labels` atomically to `path`; a folder that cannot be written is warned about once and left alone."""
    meta = {
        "version": CACHE_VERSION, "format": source.format, "nc": nc,
        "fingerprint": fingerprint(source, labels.image_names), "category_ids": labels.category_ids,
        "counts": dict(labels.counts),
    }
    names, offsets = pack_names(labels.image_names)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            np.savez(file, meta=np.array(json.dumps(meta)), image_names=names, image_name_offsets=offsets,
                     **labels.index.arrays())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if path not in _warned:
            _warned.add(path)
            LOGGER.warning(f"cannot write the label cache {path} ({error.strerror or error}); the labels will be "
                           "read and checked again next time (make the folder writeable to cache them)")
