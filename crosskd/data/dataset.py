"""Dataset YAML loading and the detection dataset (COCO JSON or YOLO txt labels, see `labels.py`)."""

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from crosskd.data.augment import ImagePool
from crosskd.data.cache import load_labels
from crosskd.data.digits import generate_digits
from crosskd.data.image_cache import build_image_cache
from crosskd.data.index import ImageRecord, LabelIndex
from crosskd.data.labels import SplitSource, problems_message, resolve_split
from crosskd.data.pipeline import build_transforms
from crosskd.data.transforms import LabeledImage, load_image, scale_boxes
from crosskd.dist import barrier, is_main_process
from crosskd.errors import DataError
from crosskd.paths import default_datasets_dir, resolve_cfg_file
from crosskd.utils import LOGGER

SPLITS = ("train", "val", "test")
GENERATE_KEYS = ("num_train", "num_val", "imgsz", "objects", "seed", "background")  # generate_digits() arguments
MAX_FALLBACKS = 16  # unreadable images in a row that a sample may skip before the run stops


@dataclass(kw_only=True)
class DataInfo:
    """A parsed dataset YAML. Split entries stay as written (relative to `path`); `source()` resolves them."""

    path: Path  # dataset root
    train: str | dict
    val: str | dict
    test: str | dict | None = None
    names: dict[int, str]
    nc: int
    fliplr: float | None = None  # None: use the run setting
    yaml_file: Path
    layout: str = ""  # one-line description of the expected files, used in not-found messages

    def source(self, split: str) -> SplitSource:
        """Where the images and labels of `split` are, and in which format."""
        entry = getattr(self, split, None) if split in SPLITS else None
        if entry is None:
            listed = ", ".join(name for name in SPLITS if getattr(self, name) is not None)
            raise DataError(f"split={split} is not in {self.yaml_file.name}; use one of: {listed}")
        return resolve_split(self.path, entry, split, self.layout)


def load_data_yaml(
    data: str | Path, datasets_dir: str | Path | None = None, generate_overrides: dict | None = None
) -> DataInfo:
    """Read a dataset YAML (a path or a name shipped in cfg/datasets), generating demo data on first use.

    A relative `path:` resolves against the current directory when it exists there, else under `datasets_dir`
    (None: the user setting, `crosskd settings`; ./datasets by default);
    without `path:` the YAML's own folder is the root. The val split is checked here, the others when used.
    """
    yaml_file = resolve_cfg_file(data, "datasets")
    cfg = _read_yaml(yaml_file)
    for key in ("train", "val", "names"):
        if not cfg.get(key):
            raise DataError(f"{yaml_file.name}: '{key}:' is missing; add it (cfg/datasets/coco.yaml is an example)")
    names = _parse_names(cfg, yaml_file.name)
    root = _resolve_root(cfg.get("path"), yaml_file, Path(datasets_dir) if datasets_dir else default_datasets_dir())
    if cfg.get("generate") is not None:
        _generate(root, cfg["generate"], generate_overrides or {}, yaml_file.name)
    layout = str(cfg.get("layout") or "")
    if not root.is_dir():
        expected = f" (expected {layout})" if layout else ""
        raise DataError(
            f"{yaml_file.name}: dataset not found at {root}{expected}; place or symlink it at {root}, "
            f"or copy {yaml_file.name}, set path: to where your data is and pass data=<your copy>"
        )
    info = DataInfo(
        path=root, train=cfg["train"], val=cfg["val"], test=cfg.get("test"), names=names, nc=len(names),
        fliplr=_parse_fliplr(cfg.get("fliplr"), yaml_file.name), yaml_file=yaml_file, layout=layout,
    )
    info.source("val")
    return info


def read_dataset_names(data: str | Path) -> dict[int, str]:
    """The class names of a dataset YAML, read only: nothing is generated or checked on disk."""
    yaml_file = resolve_cfg_file(data, "datasets")
    cfg = _read_yaml(yaml_file)
    if not cfg.get("names"):
        raise DataError(f"{yaml_file.name}: 'names:' is missing; add it (cfg/datasets/coco.yaml is an example)")
    return _parse_names(cfg, yaml_file.name)


def _read_yaml(yaml_file: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(yaml_file.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"{yaml_file}: not valid YAML ({str(error).splitlines()[0]}); fix the syntax") from error
    if not isinstance(cfg, dict):
        raise DataError(f"{yaml_file}: a dataset YAML must be a mapping with path, train, val and names")
    return cfg


def _parse_names(cfg: dict[str, Any], yaml_name: str) -> dict[int, str]:
    """`names` as a list or a {0: name, ...} dict with contiguous keys; `nc`, when given, must match."""
    names = cfg["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
        raise DataError(f"{yaml_name}: names must be a list or a dict with keys 0..nc-1, got {names!r:.80}")
    if cfg.get("nc") is not None and cfg["nc"] != len(names):
        raise DataError(f"{yaml_name}: nc: {cfg['nc']} but names lists {len(names)} classes; make them agree")
    return {int(key): str(value) for key, value in names.items()}


def _parse_fliplr(value: Any, yaml_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise DataError(f"{yaml_name}: fliplr: {value!r} must be a probability between 0 and 1")
    return float(value)


def _resolve_root(path: str | None, yaml_file: Path, datasets_dir: Path) -> Path:
    if path is None:
        return yaml_file.resolve().parent
    root = Path(path).expanduser()
    if not root.is_absolute() and not root.exists():
        root = datasets_dir / root
    return root.resolve()


def _generate(root: Path, params: dict, overrides: dict, yaml_name: str) -> None:
    """Generate the digits demo data under `root` (rank 0 only) unless it exists with the same parameters."""
    params = {**params, **overrides}
    unknown = sorted(set(params) - set(GENERATE_KEYS))
    if unknown:
        raise DataError(f"{yaml_name}: unknown generate: keys {unknown}; valid keys are {', '.join(GENERATE_KEYS)}")
    if "objects" in params:
        params["objects"] = tuple(params["objects"])
    if is_main_process():
        generate_digits(root, **params)
    barrier()


# ---------------------------------------------------------------------------------------------- dataset
class SampleKey(NamedTuple):
    """What a training loader asks its dataset for (`loader.SkippingSampler`): an index, the seed of the sample's own
    random generator, and whether the mixing steps (mosaic, mixup, cutmix) are off (the last close_mosaic epochs)."""

    index: int
    seed: int
    mix_off: bool = False


MIXING_STEPS = ("mosaic", "mixup", "cutmix")


class Sample(NamedTuple):
    """One transformed image with its boxes in input (resized) pixels."""

    image: torch.Tensor  # [3, h, w] uint8 RGB
    boxes: torch.Tensor  # [K, 4] float32 xyxy
    labels: torch.Tensor  # [K] int64
    image_id: int
    orig_size: tuple[int, int]  # (h, w) of the original image
    ratio: float  # input = original × ratio
    path: str
    unreadable: tuple[str, ...] = ()  # images that could not be read any more and were left out for this one


class DetectionDataset(Dataset):
    """Images and checked labels of one split, resized keep-ratio so the long side is `imgsz`.

    Bad labels are counted, skipped and reported in one warning line. An image that cannot be decoded when it is
    loaded (pixels corrupt, or deleted or damaged after indexing) does not stop the run: with `skip_unreadable`
    (training) the next readable image of the list takes its place, otherwise (evaluation, where every image id must
    be seen once) it becomes a black background. Either way the sample lists it in `unreadable`, and the loader warns
    once per file and counts them (`loader.DetectionLoader`).

    `cache` ('ram', 'disk', True = 'ram', False) keeps the decoded images resized to `imgsz` between epochs
    (`image_cache.py`): it is filled here, in the main process, before loader workers start.
    """

    def __init__(
        self, info: DataInfo, split: str, imgsz: int, augment: bool, pad_multiple: int = 128,
        fliplr: float = 0.5, fraction: float = 1.0, skip_unreadable: bool = False, cache: str | bool = False,
        **augmentations: Any,
    ) -> None:
        self.source = info.source(split)
        labels = load_labels(self.source, info.nc)
        message = problems_message(labels.counts, info.nc)
        if message:
            LOGGER.warning(f"{split}: {message} skipped")
        if not len(labels.index):
            skipped = f" ({message} skipped)" if message else ""
            raise DataError(f"{split}: no usable images in {self.source.images}{skipped}; check the dataset YAML "
                            "and that the image files open")
        self.records: LabelIndex = labels.index[: max(1, round(len(labels.index) * fraction))]  # flat arrays
        self.category_ids = labels.category_ids
        self.names = info.names
        self.split, self.imgsz, self.augment, self.pad_multiple = split, imgsz, augment, pad_multiple
        self.skip_unreadable = skip_unreadable
        self.fliplr = (info.fliplr if info.fliplr is not None else fliplr) if augment else 0.0
        self.pool = ImagePool(self.labeled_sample, len(self.records))
        self.transforms = build_transforms(imgsz, augment, pool=self.pool, fliplr=self.fliplr, **augmentations)
        self.image_ids: list[int] = self.records.image_ids.tolist()
        self._coco_gt: COCO | None = None
        summary = self.labels_summary()
        if not summary["instances"]:
            skipped = f" ({message} skipped)" if message else ""
            raise DataError(f"{split}: no boxes left in the labels of {self.source.images}{skipped}; a detector needs "
                            f"boxes to learn and be scored: fix the labels (class ids 0..{info.nc - 1})")
        LOGGER.info(
            f"{split}: {summary['images']} images, {summary['backgrounds']} backgrounds, "
            f"{summary['instances']} boxes ({self.source.format} labels from {self.source.annotations})"
        )
        self.image_cache = build_image_cache(self.records, imgsz, cache, split)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def unreadable_action(self) -> str:
        """What happens to an image that cannot be read, for the loader's messages."""
        return "skipped" if self.skip_unreadable else "replaced by a black background"

    def __getitem__(self, key: int | SampleKey) -> Sample:
        """The sample at an index, or at a `SampleKey` (see `load_sample`), through the pipeline, as CHW tensors.

        A key's random steps draw from a generator seeded with its seed; a bare index draws from torch's default
        generator (evaluation, where nothing is random, and direct indexing). Mosaic, MixUp and CutMix draw their
        other images from the whole dataset.
        """
        return self._transformed(key, *self.load_sample(self._index(key)))

    def __getitems__(self, keys: list[int | SampleKey]) -> list[Sample]:
        """The samples of a loader's batch: each image is loaded once, and Mosaic, MixUp and CutMix draw their other
        images from the batch (`augment.ImagePool`)."""
        loaded = {index: self.load_sample(index) for index in map(self._index, keys)}
        with self.pool.batch({index: sample for index, (_, sample) in loaded.items()}):
            return [self._transformed(key, *loaded[self._index(key)]) for key in keys]

    def _transformed(self, key: int | SampleKey, record: ImageRecord, sample: LabeledImage) -> Sample:
        """The loaded image `sample` of `record` through the pipeline with the generator of `key`."""
        rng, skip = self._generator(key)
        sample = self.transforms(sample, rng, skip=skip)
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))  # HWC -> CHW
        return Sample(
            image, torch.from_numpy(sample.boxes), torch.from_numpy(sample.labels.copy()), record.image_id,
            sample.orig_size, sample.ratio, str(record.path), sample.unreadable,
        )

    @staticmethod
    def _index(key: int | SampleKey) -> int:
        return key.index if isinstance(key, SampleKey) else int(key)

    @staticmethod
    def _generator(key: int | SampleKey) -> tuple[torch.Generator, tuple[str, ...]]:
        """(generator, steps to skip) of a loader's key or a bare index."""
        if isinstance(key, SampleKey):
            return torch.Generator().manual_seed(key.seed), MIXING_STEPS if key.mix_off else ()
        return torch.default_generator, ()

    def load_sample(self, index: int) -> tuple[ImageRecord, LabeledImage]:
        """Image `index` with its boxes in original pixels, untransformed, or in its place (skip_unreadable) the first
        readable one after it in the list; returns the record of the image actually used."""
        unreadable: list[str] = []
        for offset in range(min(MAX_FALLBACKS, len(self.records))):
            position = (index + offset) % len(self.records)
            record = self.records[position]
            cached = self.image_cache.get(position) if self.image_cache is not None else None
            if cached is not None:  # already resized to imgsz: boxes scaled as Resize would, which then does nothing
                image, ratio = cached
                boxes = scale_boxes(record.boxes, ratio, *image.shape[:2])
                return record, self._labeled(record, image, boxes, record.labels, unreadable, ratio)
            image = load_image(record.path) if self.image_cache is None else None
            if image is not None:
                return record, self._labeled(record, image, record.boxes, record.labels, unreadable)
            unreadable.append(str(record.path))
            if not self.skip_unreadable:
                blank = np.zeros((record.height, record.width, 3), np.uint8)
                return record, self._labeled(record, blank, record.boxes[:0], record.labels[:0], unreadable)
        others = f" and the {len(unreadable) - 1} images after it in the list" if len(unreadable) > 1 else ""
        raise DataError(
            f"{self.split}: {unreadable[0]}{others} cannot be read any more (deleted or corrupted during the run); "
            "restore the images, then resume the run"
        )

    def labeled_sample(self, index: int) -> LabeledImage:
        """Image `index` as `load_sample` gives it, without its record: the other images of Mosaic, MixUp, CutMix."""
        return self.load_sample(index)[1]

    @staticmethod
    def _labeled(
        record: ImageRecord, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, unreadable: list[str],
        ratio: float = 1.0,
    ) -> LabeledImage:
        size = (record.height, record.width)
        return LabeledImage(image, boxes, labels, orig_size=size, valid_size=image.shape[:2], ratio=ratio,
                            unreadable=tuple(unreadable))

    def __getstate__(self) -> dict[str, Any]:
        """Worker processes need no COCO ground truth: leave the cached one out of the pickle."""
        return {**self.__dict__, "_coco_gt": None}

    def coco_gt(self) -> COCO:
        """pycocotools ground truth of the checked labels in original pixels (crowd regions as iscrowd=1)."""
        if self._coco_gt is None:
            coco = COCO()
            coco.dataset = coco_dict(self.records, self.category_ids, self.names)
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco_gt = coco
        return self._coco_gt

    def labels_summary(self) -> dict[str, Any]:
        """Image, background and box counts, with per-class box counts and per-class image counts."""
        nc, labels, num_boxes = len(self.names), self.records.labels, self.records.num_boxes()  # [K], [N]
        image_index = np.repeat(np.arange(len(self.records)), num_boxes)  # [K]
        image_class = np.unique(image_index * nc + labels)  # distinct (image, class) pairs
        return {
            "images": len(self.records),
            "backgrounds": int((num_boxes == 0).sum()),
            "instances": len(labels),
            "instances_per_class": np.bincount(labels, minlength=nc).tolist(),
            "images_per_class": np.bincount(image_class % nc, minlength=nc).tolist(),
        }


def coco_dict(
    records: LabelIndex | list[ImageRecord], category_ids: list[int], names: dict[int, str]
) -> dict[str, list]:
    """A COCO-format dict of `records`: boxes xywh in original pixels, area = w × h, original category ids."""
    images = [
        {"id": record.image_id, "file_name": record.path.name, "width": record.width, "height": record.height}
        for record in records
    ]
    annotations = []
    for record in records:
        for boxes, labels, crowd in ((record.boxes, record.labels, 0), (record.crowd_boxes, record.crowd_labels, 1)):
            for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
                width, height = box[2] - box[0], box[3] - box[1]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": record.image_id, "category_id": category_ids[label],
                    "bbox": [box[0], box[1], width, height], "area": width * height, "iscrowd": crowd,
                })
    categories = [{"id": category_id, "name": names[label]} for label, category_id in enumerate(category_ids)]
    return {"images": images, "annotations": annotations, "categories": categories}
