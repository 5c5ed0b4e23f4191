"""Batching: the padded `Batch` every consumer (trainer, validator, distiller) reads, and the DataLoader builder."""

import dataclasses
import itertools
import math
import multiprocessing.util
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

from crosskd.data.dataset import Sample, SampleKey
from crosskd.errors import UserError
from crosskd.utils import LOGGER


@dataclass
class Batch:
    """A padded batch; boxes are xyxy in input (resized) pixels, see docs/architecture.md."""

    images: torch.Tensor  # [B, 3, H, W] RGB, zero padding: uint8 as collated, float32 0..1 after `.to(device)`
    gt_boxes: torch.Tensor  # [B, M, 4] float32, zero rows for padding (M ≥ 1)
    gt_labels: torch.Tensor  # [B, M] int64, -1 for padding
    img_sizes: torch.Tensor  # [B, 2] int64 (h, w) of the valid region
    orig_sizes: torch.Tensor  # [B, 2] int64 (h, w) of the original image
    ratios: torch.Tensor  # [B] float32, input = original × ratio
    image_ids: torch.Tensor  # [B] int64
    paths: list[str]
    unreadable: list[str] = field(default_factory=list)  # images that could not be read (DetectionDataset)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device` and the images as the models take them: float32 0..1.

        Loader workers collate uint8 images (a quarter of float32's bytes to pass between processes and to copy to a
        GPU); the conversion happens here, on the device."""
        moved = self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))
        if moved.images.dtype == torch.uint8:
            moved.images = moved.images.float().div_(255)
        return moved

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
    return Batch(
        images=images,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        img_sizes=img_sizes,
        orig_sizes=torch.tensor([sample.orig_size for sample in samples], dtype=torch.int64),
        ratios=torch.tensor([sample.ratio for sample in samples], dtype=torch.float32),
        image_ids=torch.tensor([sample.image_id for sample in samples], dtype=torch.int64),
        paths=[sample.path for sample in samples],
        unreadable=[path for sample in samples for path in sample.unreadable],
    )


def resize_batch(batch: Batch, size: int, pad_multiple: int) -> Batch:
    """The batch with its long side scaled to `size` (bilinear), padding and boxes scaled alike; the padded shape is
    rounded up to `pad_multiple`. Used for Ultralytics' per-batch multi_scale."""
    height, width = batch.images.shape[-2:]
    factor = size / max(height, width)
    if factor == 1:
        return batch
    shape = [math.ceil(side * factor / pad_multiple) * pad_multiple for side in (height, width)]
    images = torch.nn.functional.interpolate(batch.images, size=shape, mode="bilinear", align_corners=False)
    img_sizes = (batch.img_sizes * factor).round().long().clamp(max=torch.tensor(shape, device=images.device))
    return dataclasses.replace(batch, images=images, gt_boxes=batch.gt_boxes * factor, img_sizes=img_sizes,
                               ratios=batch.ratios * factor)


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
    """Shut down the workers of a multi-process DataLoader iterator the orderly way (no-op when they are gone), and
    kill any that is still alive after it: they ignore SIGTERM (`seed_worker`), torch's fallback."""
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


def stop_all_workers() -> None:
    """At exit, stop the workers still running. They ignore SIGTERM (see `seed_worker`), so the terminate-then-join
    of multiprocessing's exit handler would otherwise wait forever.

    Registered as one of multiprocessing's own exit finalizers (priority >= 0 runs before that terminate-then-join),
    not with `atexit`: a training inside a multiprocessing child (a process pool running one training per task) never
    runs `atexit` handlers, only multiprocessing's, and hung at exit with its workers alive.
    """
    for iterator in list(WORKER_ITERATORS):
        stop_workers(iterator)


multiprocessing.util.Finalize(None, stop_all_workers, exitpriority=10)


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


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed that is a function of the non-negative ints `parts` alone, well spread (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """The RNG seed of the sample at `position` of an epoch's order on `rank`: a function of those four numbers only,
    so the augmentation of a sample does not depend on the number of workers or on where a resumed run started."""
    return mixed_seed(seed, rank, epoch, position)


class SkippingSampler(Sampler[SampleKey]):
    """Wraps a sampler of indices into one of `SampleKey`s: each index with its own seed and, from epoch
    `mix_off_from` on, the mixing steps (mosaic, mixup, cutmix) off. `skip_next(n)` makes the next pass leave out its
    first n keys, drawn but never loaded.

    The wrapped sampler draws its whole order as usual and the seeds follow the positions in it, so a mid-epoch resume
    sees the rest of the same order with the same augmentation. `len()` stays the full length (the loader's batches
    per epoch); `set_epoch` also reaches a DistributedSampler.
    """

    def __init__(self, sampler: Sampler[int], seed: int = 0, rank: int = 0):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch = 0
        self.mix_off_from: int | None = None  # first epoch without mosaic/mixup/cutmix (close_mosaic), None: never
        self.skip = 0

    def __iter__(self) -> Iterator[SampleKey]:
        skip, self.skip = self.skip, 0
        mix_off = self.mix_off_from is not None and self.epoch >= self.mix_off_from
        keys = (SampleKey(index, sample_seed(self.seed, self.rank, self.epoch, position), mix_off)
                for position, index in enumerate(self.sampler))
        return itertools.islice(keys, skip, None)

    def __len__(self) -> int:
        return len(self.sampler)

    def skip_next(self, num: int) -> None:
        self.skip = num

    def set_epoch(self, epoch: int) -> None:
        """Epoch `epoch`'s order (a shuffling sampler's generator reseeded with seed + epoch) and sample seeds."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        generator = getattr(self.sampler, "generator", None)
        if generator is not None:
            generator.manual_seed(self.seed + epoch)


def skip_batches(loader: DataLoader, num: int) -> None:
    """Make the loader's next pass start at batch `num` of the same order (a loader from `build_dataloader`)."""
    loader.sampler.skip_next(num * loader.batch_size)


def build_dataloader(
    dataset: Dataset, batch: int, workers: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A reproducible DataLoader of `Batch`es; `batch` is the number of images per batch on this rank.

    Call `loader.sampler.set_epoch(epoch)` each epoch: the order (a DistributedSampler's with world_size > 1, else a
    generator reseeded with seed + epoch) and the sample seeds are then a function of (seed, rank, epoch) alone.
    `skip_batches(loader, n)` makes the next pass start at batch n (a mid-epoch resume).
    Each sample is augmented with a generator of its own (`sample_seed`): any number of workers gives the same batches.
    """
    generator = torch.Generator().manual_seed(seed + rank)
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    elif shuffle:  # its own generator: the DataLoader's draws worker seeds from `generator`, per pass or not
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    workers = min(workers, os.cpu_count() or 1)
    return DetectionLoader(
        dataset,
        batch_size=batch,
        sampler=SkippingSampler(sampler, seed, rank),
        num_workers=workers,
        collate_fn=partial(collate, pad_multiple=getattr(dataset, "pad_multiple", 1)),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
    )
