"""Samples and loader epochs pinned bit for bit: a refactor of the data path must not change what a seed gives.

The val and single-item digests were recorded at commit 59f15e9, before the transform pipeline (resize and flip
hard-coded in `DetectionDataset._sample`). The train epochs were re-recorded when each sample got a generator of its
own (issue 21: the same batches with any number of workers; before, the flips drew from per-worker generators and the
order's generator was shared with the DataLoader's worker-seed draws, so workers=0 and workers=2 differed).
They depend on OpenCV's JPEG decoder and resize: a new OpenCV may need them re-recorded from a commit known to be
right.
"""

import hashlib

import numpy as np
import pytest
import torch
import yaml

from crosskd.data import DetectionDataset, build_dataloader, generate_digits, load_data_yaml, skip_batches

IMGSZ = 96  # digits are 128 px: every sample is resized
SEED = 1

PINNED = {
    "val_items": "f54ffd7c47e8e678",
    "train_items": "306fd127b8c9456f",
    "val_epoch": "c72d24b6ffef5729",
    "train_epochs_workers0": "3e538734f967337c",
    "train_epochs_workers2": "3e538734f967337c",  # the same batches with any number of workers
    "train_resume_workers0": "c6923fb2e4135580",
}


def digest(arrays: list[np.ndarray | torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of the arrays' dtypes, shapes and bytes, in order."""
    sha = hashlib.sha256()
    for array in arrays:
        array = array.numpy() if isinstance(array, torch.Tensor) else array
        sha.update(f"{array.dtype}{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()[:16]


def item_arrays(dataset: DetectionDataset) -> list[torch.Tensor]:
    samples = [dataset[i] for i in range(len(dataset))]
    return [t for sample in samples for t in (sample.image, sample.boxes, sample.labels)]


def epoch_arrays(loader, epochs: int, first_batch: int = 0) -> list[torch.Tensor]:
    """Batches of `epochs` passes, each epoch set as the trainer does (`seed_loader_epoch`)."""
    arrays = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        skip_batches(loader, first_batch if epoch == 0 else 0)
        for batch in loader:
            batch = batch.to("cpu")  # float images as the models take them (the pinned form)
            arrays += [batch.images, batch.gt_boxes, batch.gt_labels, batch.image_ids, batch.img_sizes, batch.ratios]
    return arrays


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[DetectionDataset, DetectionDataset]:
    """Train (augmented, fliplr 0.5) and val datasets of 16 + 8 digits images; the YAML sets no fliplr."""
    root = generate_digits(tmp_path_factory.mktemp("identity") / "digits", num_train=16, num_val=8, seed=0)
    yaml_file = root / "data.yaml"
    yaml_file.write_text(yaml.safe_dump({
        "path": str(root), "train": "annotations/instances_train.json", "val": "annotations/instances_val.json",
        "names": {i: str(i) for i in range(10)},
    }))
    info = load_data_yaml(yaml_file)
    train = DetectionDataset(info, "train", IMGSZ, augment=True, pad_multiple=32, fliplr=0.5, skip_unreadable=True)
    val = DetectionDataset(info, "val", IMGSZ, augment=False, pad_multiple=32)
    return train, val


def fingerprints(train: DetectionDataset, val: DetectionDataset) -> dict[str, str]:
    """Digests of every pinned case; the ones drawing from torch's global RNG (workers=0) seed it first."""
    found = {"val_items": digest(item_arrays(val))}
    torch.manual_seed(0)
    found["train_items"] = digest(item_arrays(train))
    found["val_epoch"] = digest(epoch_arrays(build_dataloader(val, 4, workers=0, shuffle=False, seed=SEED), 1))
    for workers in (0, 2):
        torch.manual_seed(0)
        loader = build_dataloader(train, 4, workers=workers, shuffle=True, seed=SEED, pin_memory=False)
        found[f"train_epochs_workers{workers}"] = digest(epoch_arrays(loader, 2))
    torch.manual_seed(0)
    loader = build_dataloader(train, 4, workers=0, shuffle=True, seed=SEED, pin_memory=False)
    found["train_resume_workers0"] = digest(epoch_arrays(loader, 1, first_batch=2))
    return found


def test_samples_and_epochs_match_the_pinned_digests(datasets: tuple[DetectionDataset, DetectionDataset]) -> None:
    assert fingerprints(*datasets) == PINNED


def test_pinned_train_samples_are_flipped_and_resized(datasets: tuple[DetectionDataset, DetectionDataset]) -> None:
    """The pinned train cases cover both outcomes of the flip draw, so they pin the draws themselves."""
    train, _ = datasets
    torch.manual_seed(0)
    augmented = [train[i].boxes for i in range(len(train))]
    plain = [torch.from_numpy(record.boxes) * IMGSZ / 128 for record in train.records]
    same = [torch.allclose(a, b) for a, b in zip(augmented, plain, strict=True)]
    assert any(same) and not all(same)


def test_a_resumed_epoch_gives_the_rest_of_the_same_batches(datasets: tuple[DetectionDataset, ...]) -> None:
    """Batches 2.. of a pass that skips the first two equal batches 2.. of a whole pass (order and flips), with 2
    workers against none."""
    train, _ = datasets
    whole = epoch_arrays(build_dataloader(train, 4, workers=0, shuffle=True, seed=SEED, pin_memory=False), 1)
    resumed = epoch_arrays(build_dataloader(train, 4, workers=2, shuffle=True, seed=SEED, pin_memory=False), 1, 2)
    per_batch = 6  # arrays per batch in epoch_arrays
    assert len(resumed) == len(whole) - 2 * per_batch
    assert all(torch.equal(a, b) for a, b in zip(whole[2 * per_batch:], resumed, strict=True))
