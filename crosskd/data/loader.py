"""Batching: the padded `Batch` every consumer (trainer, validator, distiller) reads, and the DataLoader builder."""

import atexit
import itertools
import math
import os
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import partial

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from crosskd.data.dataset import Sample
from crosskd.errors import UserError
from crosskd.utils import LOGGER


@dataclass
class Batch:
    """A padded batch; boxes are xyxy in input (resized) pixels, see docs/architecture.md."""

    images: torch.Tensor  # [B, 3, H, W] float32 0..1 RGB, zero padding
    gt_boxes: torch.Tensor  # [B, M, 4] float32, zero rows for padding (M ≥ 1)
    gt_labels: torch.Tensor  # [B, M] int64, -1 for padding
    img_sizes: torch.Tensor  # [B, 2] int64 (h, w) of the valid region
    valid_masks: torch.Tensor  # [B, H, W] bool, True inside the valid region
    orig_sizes: torch.Tensor  # [B, 2] int64 (h, w) of the original image
    ratios: torch.Tensor  # [B] float32, input = original × ratio
    image_ids: torch.Tensor  # [B] int64
    paths: list[str]
    unreadable: list[str] = field(default_factory=list)  # images that could not be read (DetectionDataset)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device`."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in pinned memory (DataLoader calls this when pin_memory=True)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return Batch(**{name: function(v) if isinstance(v, torch.Tensor) else v for name, v in values.items()})


def collate(samples: list[Sample], pad_multiple: int) -> Batch:
    """Pad images to the batch's largest (h, w) rounded up to `pad_multiple`, and gt to the largest box count."""
    img_sizes = torch.tensor([sample.image.shape[-2:] for sample in samples], dtype=torch.int64)  # [B, 2]
    height, width = (math.ceil(int(size) / pad_multiple) * pad_multiple for size in img_sizes.max(0).values)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    max_boxes = max(1, *(len(sample.labels) for sample in samples))
    gt_boxes = torch.zeros(len(samples), max_boxes, 4, dtype=torch.float32)
    gt_labels = torch.full((len(samples), max_boxes), -1, dtype=torch.int64)
    for i, sample in enumerate(samples):
        images[i, :, : sample.image.shape[1], : sample.image.shape[2]] = sample.image
        gt_boxes[i, : len(sample.labels)] = sample.boxes
        gt_labels[i, : len(sample.labels)] = sample.labels
    rows = torch.arange(height)[None, :, None] < img_sizes[:, 0, None, None]  # [B, H, 1]
    cols = torch.arange(width)[None, None, :] < img_sizes[:, 1, None, None]  # [B, 1, W]
    return Batch(
        images=images.float().div_(255),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        img_sizes=img_sizes,
        valid_masks=rows & cols,
        orig_sizes=torch.tensor([sample.orig_size for sample in samples], dtype=torch.int64),
        ratios=torch.tensor([sample.ratio for sample in samples], dtype=torch.float32),
        image_ids=torch.tensor([sample.image_id for sample in samples], dtype=torch.int64),
        paths=[sample.path for sample in samples],
        unreadable=[path for sample in samples for path in sample.unreadable],
    )


class DetectionLoader(DataLoader):
    """A DataLoader of `Batch`es that reports the images its dataset could not read, from the main process.

    Each unreadable file is warned about once for the loader's life, whichever worker met it; at the end of a pass
    one line gives their number, kept in `num_unreadable` (distinct files in the last pass).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.split = getattr(self.dataset, "split", "data")
        self.unreadable_action = getattr(self.dataset, "unreadable_action", "left out")
        self.warned: set[str] = set()
        self.num_unreadable = 0

    def __iter__(self) -> Iterator[Batch]:
        self.num_unreadable, seen = 0, set()
        batches = super().__iter__()
        if hasattr(batches, "_shutdown_workers"):
            WORKER_ITERATORS.add(batches)
        try:
            for batch in batches:
                self._note(batch.unreadable, seen)
                yield batch
        except UserError as error:  # the run stops; from a worker, torch appends its traceback: keep the one line
            self._iterator = None
            stop_workers(batches)
            lines = str(error).strip().splitlines()
            raise type(error)(lines[-1].partition(": ")[2] if len(lines) > 1 else lines[0]) from None
        if seen:
            LOGGER.warning(f"{self.split}: {len(seen)} image(s) could not be read in this pass and were "
                           f"{self.unreadable_action}")

    def _note(self, paths: list[str], seen: set[str]) -> None:
        for path in dict.fromkeys(paths):
            if path not in self.warned:
                self.warned.add(path)
                LOGGER.warning(f"{self.split}: cannot read {path} any more; {self.unreadable_action}")
        seen.update(paths)
        self.num_unreadable = len(seen)


WORKER_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # live multi-process iterators of DetectionLoaders


def stop_workers(iterator: Iterator[Batch]) -> None:
    """Shut down the workers of a multi-process DataLoader iterator the orderly way (no-op when they are gone)."""
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@atexit.register
def stop_all_workers() -> None:
    """At exit, stop the workers still running. They ignore SIGTERM (see `seed_worker`), so the terminate-then-join
    of multiprocessing's own exit handler, which runs after this one, would otherwise wait forever."""
    for iterator in list(WORKER_ITERATORS):
        stop_workers(iterator)


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and `random` in a worker from its torch seed (set by the loader's generator); single-threaded cv2.

    Workers ignore SIGINT and SIGTERM (a Ctrl-C or a scheduler signals the whole process group): the main process
    decides when to stop and shuts them down; they still exit when it dies.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class SkippingSampler(Sampler[int]):
    """Wraps a sampler; `skip_next(n)` makes its next pass leave out its first n indices, drawn but never loaded.

    The wrapped sampler draws its whole order as usual, so a mid-epoch resume sees the rest of the same order.
    `len()` stays the full length (the loader's batches per epoch); `set_epoch` goes to a DistributedSampler.
    """

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)

    def skip_next(self, num: int) -> None:
        self.skip = num

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def skip_batches(loader: DataLoader, num: int) -> None:
    """Make the loader's next pass start at batch `num` of the same order (a loader from `build_dataloader`)."""
    loader.sampler.skip_next(num * loader.batch_size)


def build_dataloader(
    dataset: Dataset, batch: int, workers: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A reproducible DataLoader of `Batch`es; `batch` is the number of images per batch on this rank.

    With world_size > 1 the sampler is a DistributedSampler: call `loader.sampler.set_epoch(epoch)` each epoch.
    `skip_batches(loader, n)` makes the next pass start at batch n (a mid-epoch resume).
    Otherwise shuffling draws from a generator seeded with `seed`, so two loaders with one seed give one order.
    Augmentation in workers is seeded from the same generator; with workers=0 it uses torch's global RNG.
    """
    generator = torch.Generator().manual_seed(seed + rank)
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    workers = min(workers, os.cpu_count() or 1)
    return DetectionLoader(
        dataset,
        batch_size=batch,
        sampler=SkippingSampler(sampler),
        num_workers=workers,
        collate_fn=partial(collate, pad_multiple=getattr(dataset, "pad_multiple", 1)),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
    )
