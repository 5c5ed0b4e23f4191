"""Decoded images kept between epochs (`cache=ram|disk`), with Ultralytics' semantics.

ram   Every image is decoded once and resized keep-ratio to the long side `imgsz`; all of them sit in one flat uint8
      buffer with per-image offsets (the `LabelIndex` layout), which forked loader workers share page for page (with
      the spawn start method, macOS and Windows, each worker gets a pickled copy: the memory check does not count
      those).
      Before filling, the bytes it needs (exact, from the image sizes in the label index), plus a 50% margin, are
      compared with the memory available; a cache that does not fit is refused with one line (DataError, exit 2).
disk  Every image is decoded once and saved at full resolution as `<image file name>.npy` beside it (RGB uint8);
      later loads read the array instead of decoding the image, then resize it. Later runs reuse the files, unless
      the image is newer than its array. A folder that cannot be written, or a disk without room for the arrays
      (plus 50%), falls back to decoding with one warning. The name keeps the image's extension (`000001.jpg.npy`),
      so it never collides with Ultralytics' `000001.npy` (BGR, EXIF-rotated) or with another image of that stem.

Either way `get(i)` returns image i exactly as `load_image` followed by `resize_long_side(image, imgsz)` would,
with its ratio, or None when the image cannot be read. The cache is filled in the main process when the dataset is
built, before the loader's workers start. Under DDP each rank builds its own dataset and so its own cache: a RAM
cache takes its memory once per rank on the node (the check counts them, from LOCAL_WORLD_SIZE); the ranks share
the .npy files of a disk cache (written atomically, so two ranks writing one file is harmless).
"""

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crosskd.data.index import LabelIndex
from crosskd.data.transforms import load_image, resize_long_side
from crosskd.errors import ConfigError, DataError
from crosskd.utils import LOGGER

CACHE_MODES = ("ram", "disk")
SAFETY_MARGIN = 0.5  # memory or disk space asked for on top of the estimate, as Ultralytics
NPY_HEADER_BYTES = 128
PROGRESS_INTERVAL_S = 10.0  # a progress line at most this often while filling
GB = 1 << 30

Cached = tuple[np.ndarray, float]  # image [h, w, 3] uint8 RGB (long side imgsz), ratio (resized = original × ratio)


def cache_mode(cache: str | bool | None) -> str | None:
    """`cache` as 'ram', 'disk' or None (no cache); True means ram, as in Ultralytics."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return "ram"
    value = cache.strip().lower() if isinstance(cache, str) else None
    if value in ("", "false", "none"):
        return None
    if value in ("true", *CACHE_MODES):
        return "ram" if value == "true" else value
    raise ConfigError(f"cache={cache!r} is not valid; use cache=ram, cache=disk or cache=False")


def build_image_cache(
    records: LabelIndex, imgsz: int, cache: str | bool | None, prefix: str
) -> "RamImageCache | DiskImageCache | None":
    """The filled cache of `records`' images at `imgsz`, or None for no cache (`cache` false, or a disk cache
    that fell back to decoding). `prefix` starts every message (the split name)."""
    mode = cache_mode(cache)
    if mode == "ram":
        return RamImageCache(records, imgsz, prefix)
    if mode == "disk":
        disk = DiskImageCache(records, imgsz, prefix)
        return disk if disk.on_disk.any() else None
    return None


def resized_shape(height: int, width: int, imgsz: int) -> tuple[int, int]:
    """(h, w) that `resize_long_side` gives an image of `height` × `width` (same formula)."""
    ratio = imgsz / max(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def npy_path(image_path: Path) -> Path:
    """Where the disk cache keeps an image's array: beside it, the image's name plus `.npy`."""
    return image_path.with_name(image_path.name + ".npy")


def size_text(nbytes: float) -> str:
    """Bytes as GB (one decimal) from 1 GB up, else as MB."""
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 2**20:.1f} MB"


def available_memory() -> int | None:
    """Bytes of memory new allocations can take: Linux MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        available = _sysconf_available()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available or 2**63, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _ranks_on_node() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _threads() -> int:
    return min(8, os.cpu_count() or 1)


class _Progress:
    """A line at most every PROGRESS_INTERVAL_S while a cache fills, and one when it is done."""

    def __init__(self, prefix: str, what: str, total: int) -> None:
        self.prefix, self.what, self.total = prefix, what, total
        self.start = self.last = time.perf_counter()

    def update(self, done: int, nbytes: int) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            LOGGER.info(f"{self.prefix}: caching images {done}/{self.total} ({size_text(nbytes)} {self.what})")

    def close(self, text: str) -> None:
        LOGGER.info(f"{self.prefix}: {text} in {time.perf_counter() - self.start:.1f} s")


def _in_order(function: Callable[[int], object], count: int) -> Iterable[tuple[int, object]]:
    """(i, function(i)) for i in 0..count-1 in order, computed by a few threads (decoding releases the GIL)."""
    with ThreadPoolExecutor(_threads()) as pool:
        yield from enumerate(pool.map(function, range(count)))


# ---------------------------------------------------------------------------------------------- ram
class RamImageCache:
    """Every image of `records` decoded and resized to the long side `imgsz`, in one read-only buffer."""

    def __init__(self, records: LabelIndex, imgsz: int, prefix: str) -> None:
        self.imgsz = imgsz
        self.shapes = np.array([resized_shape(h, w, imgsz) for w, h in records.sizes.tolist()], np.int64)  # [N, 2]
        self.offsets = np.zeros(len(records) + 1, np.int64)  # [N + 1]
        np.cumsum(self.shapes.prod(1) * 3, out=self.offsets[1:])
        self._check_memory(prefix, len(records))
        self.pixels = np.empty(int(self.offsets[-1]), np.uint8)  # [total] every image's bytes, concatenated
        self.ratios = np.zeros(len(records), np.float64)  # [N]
        self.readable = np.zeros(len(records), bool)  # [N]
        self.overflow: dict[int, Cached] = {}  # images whose decoded size differs from the label index's
        self._fill(records, prefix)
        self.pixels.flags.writeable = False  # a transform that writes into its input fails loudly

    def _check_memory(self, prefix: str, count: int) -> None:
        needed = int(self.offsets[-1]) * _ranks_on_node() * (1 + SAFETY_MARGIN)
        available = available_memory()
        if available is not None and needed > available:
            ranks = f" on each of {_ranks_on_node()} ranks" if _ranks_on_node() > 1 else ""
            raise DataError(
                f"{prefix}: cache=ram needs {size_text(needed)} of RAM for {count} images at imgsz={self.imgsz}"
                f"{ranks} (with a {SAFETY_MARGIN:.0%} margin) but only {size_text(available)} is available; "
                "use cache=disk (decoded arrays beside the images) or cache=False"
            )

    def _fill(self, records: LabelIndex, prefix: str) -> None:
        progress = _Progress(prefix, "ram", len(records))

        def decode(i: int) -> Cached | None:
            image = load_image(records.path(i))
            return None if image is None else resize_long_side(image, self.imgsz)

        for i, result in _in_order(decode, len(records)):
            if result is not None:
                image, self.ratios[i] = result
                self.readable[i] = True
                if image.shape[:2] == tuple(self.shapes[i]):
                    self.pixels[self.offsets[i] : self.offsets[i + 1]] = image.reshape(-1)
                else:
                    self.overflow[i] = (image, float(self.ratios[i]))
            progress.update(i + 1, int(self.offsets[i + 1]))
        unreadable = f", {len(records) - int(self.readable.sum())} unreadable" if not self.readable.all() else ""
        progress.close(f"cached {len(records)} images ({size_text(self.pixels.nbytes)} in RAM{unreadable})")

    def get(self, index: int) -> Cached | None:
        """Image `index` resized to the long side imgsz (a read-only view) and its ratio; None if unreadable."""
        if index in self.overflow:
            return self.overflow[index]
        if not self.readable[index]:
            return None
        height, width = self.shapes[index].tolist()
        image = self.pixels[self.offsets[index] : self.offsets[index + 1]].reshape(height, width, 3)
        return image, float(self.ratios[index])


# ---------------------------------------------------------------------------------------------- disk
class DiskImageCache:
    """Every image of `records` decoded once into a .npy beside it; `get` reads that array and resizes it."""

    def __init__(self, records: LabelIndex, imgsz: int, prefix: str) -> None:
        self.records, self.imgsz = records, imgsz
        self.on_disk = np.array([_usable(npy_path(records.path(i)), records.path(i)) for i in range(len(records))])
        missing = np.flatnonzero(~self.on_disk)  # [M]
        if len(missing) and self._can_write(missing, prefix):
            self._fill(missing, prefix)

    def _can_write(self, missing: np.ndarray, prefix: str) -> bool:
        """Whether the image folders take files and the disk has room for the missing arrays; one warning if not."""
        sizes = self.records.sizes[missing]  # [M, 2] (w, h)
        needed = float((sizes.prod(1) * 3 + NPY_HEADER_BYTES).sum()) * (1 + SAFETY_MARGIN)
        folders = sorted({self.records.path(int(i)).parent for i in missing})
        problem = None
        for folder in folders:
            problem = _probe_write(folder)
            if problem:
                break
        if problem is None and shutil.disk_usage(folders[0]).free < needed:
            free = shutil.disk_usage(folders[0]).free
            problem = f"{size_text(needed)} needed (with a {SAFETY_MARGIN:.0%} margin), {size_text(free)} free"
        if problem:
            LOGGER.warning(f"{prefix}: cache=disk cannot write the decoded images beside them in {folders[0]} "
                           f"({problem}); images are decoded each time instead (make the folder writable, or use "
                           "cache=ram)")
        return problem is None

    def _fill(self, missing: np.ndarray, prefix: str) -> None:
        progress = _Progress(prefix, "disk", len(missing))
        errors: list[str] = []
        lock = threading.Lock()

        def save(j: int) -> int:
            path = self.records.path(int(missing[j]))
            image = None if errors else load_image(path)
            if image is None:
                return 0
            try:
                _save_atomic(npy_path(path), image)
            except OSError as error:
                with lock:
                    errors.append(f"{npy_path(path)}: {error.strerror or error}")
                return 0
            return image.nbytes

        written = 0
        for j, nbytes in _in_order(save, len(missing)):
            self.on_disk[missing[j]] = nbytes > 0
            written += nbytes
            progress.update(j + 1, written)
        if errors:
            LOGGER.warning(f"{prefix}: cache=disk stopped writing ({errors[0]}); the images without an array are "
                           "decoded each time")
        reused = len(self.on_disk) - len(missing)
        progress.close(f"cached {int(self.on_disk.sum())} of {len(self.on_disk)} images as .npy beside them "
                       f"({size_text(written)} written, {reused} reused)")

    def get(self, index: int) -> Cached | None:
        """Image `index` from its array (decoded from the file when it has none), resized to the long side imgsz,
        and its ratio; None if neither can be read."""
        path = self.records.path(index)
        image = None
        if self.on_disk[index]:
            try:
                image = np.load(npy_path(path), allow_pickle=False)
            except (OSError, ValueError):
                image = None
        if image is None:
            image = load_image(path)
        return None if image is None else resize_long_side(image, self.imgsz)


def _usable(npy: Path, image: Path) -> bool:
    """Whether `npy` holds an RGB uint8 image array no older than the image file (or the image is gone)."""
    try:
        array = np.load(npy, mmap_mode="r", allow_pickle=False)  # reads the header only
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            return False
        return not image.exists() or image.stat().st_mtime_ns <= npy.stat().st_mtime_ns
    except (OSError, ValueError):
        return False


def _probe_write(folder: Path) -> str | None:
    """None when a file can be created in `folder`, else why not."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".crosskd-cache-probe.", dir=folder)
    except OSError as error:
        return error.strerror or str(error)
    os.close(handle)
    os.unlink(probe)
    return None


def _save_atomic(path: Path, image: np.ndarray) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, image, allow_pickle=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
