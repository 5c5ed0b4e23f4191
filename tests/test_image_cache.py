"""cache=ram|disk (crosskd/data/image_cache.py): the same samples as no cache, bit for bit; .npy files reused without
decoding; a RAM cache that does not fit refused in one line; an unwritable folder falls back with one warning."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crosskd.data import DetectionDataset, build_dataloader, generate_digits, load_data_yaml
from crosskd.data import image_cache as image_cache_module
from crosskd.data.dataset import SampleKey
from crosskd.data.image_cache import cache_mode, npy_path, resized_shape
from crosskd.data.transforms import load_image, resize_long_side
from crosskd.errors import ConfigError, DataError, UserError

NAMES = "\n".join(f"  {i}: '{i}'" for i in range(10))


def write_data(root: Path) -> Path:
    """8 train and 4 val digits images of 64 px (long side; the short side 48-64), COCO labels."""
    generate_digits(root, num_train=8, num_val=4, imgsz=64, objects=(1, 3), seed=0)
    yaml_file = root / "data.yaml"
    yaml_file.write_text(f"path: {root}\ntrain: annotations/instances_train.json\n"
                         f"val: annotations/instances_val.json\nnames:\n{NAMES}\n")
    return yaml_file


@pytest.fixture
def data_yaml(tmp_path: Path) -> Path:
    return write_data(tmp_path / "digits")


def samples(dataset: DetectionDataset, seed: int = 0) -> list[tuple]:
    """Every sample's arrays and sizes, drawn after seeding torch's generator (augmentation draws from it)."""
    torch.manual_seed(seed)
    return [(s.image, s.boxes, s.labels, s.ratio, s.orig_size, s.image_id, s.unreadable)
            for s in (dataset[i] for i in range(len(dataset)))]


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a[0].shape == b[0].shape and torch.equal(a[0], b[0])  # pixels
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # boxes bit for bit, labels
        assert a[3:] == b[3:]  # ratio, original size, id, unreadable


def npy_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy"))


@pytest.mark.parametrize("imgsz", [48, 64, 80])  # down, unchanged (long side already 64), up
@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_cached_samples_equal_uncached_bit_for_bit(data_yaml: Path, cache: str, imgsz: int) -> None:
    info = load_data_yaml(data_yaml)
    for split, augment in (("train", True), ("val", False)):
        plain = DetectionDataset(info, split, imgsz, augment=augment, fliplr=0.5)
        cached = DetectionDataset(info, split, imgsz, augment=augment, fliplr=0.5, cache=cache)
        assert cached.image_cache is not None
        assert_same(samples(cached), samples(plain))


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_cached_samples_equal_uncached_through_mosaic_mixup_and_affine(data_yaml: Path, cache: str) -> None:
    info = load_data_yaml(data_yaml)
    augmentations = {"mosaic": 1.0, "mixup": 0.5, "cutmix": 0.5, "degrees": 5.0, "translate": 0.1, "scale": 0.5,
                     "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}  # the mixed-in images come from the cache too
    plain = DetectionDataset(info, "train", 48, augment=True, **augmentations)
    cached = DetectionDataset(info, "train", 48, augment=True, cache=cache, **augmentations)
    keys = [SampleKey(i, seed=100 + i) for i in range(len(plain))]
    for a, b in zip((cached[key] for key in keys), (plain[key] for key in keys)):
        assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
        assert a.ratio == b.ratio


def test_ram_cache_is_one_read_only_buffer_loader_workers_share(data_yaml: Path) -> None:
    dataset = DetectionDataset(load_data_yaml(data_yaml), "train", 48, augment=False, cache=True)
    cache = dataset.image_cache
    assert cache.pixels.nbytes == sum(h * w * 3 for h, w in cache.shapes.tolist()) and not cache.overflow
    image, _ = cache.get(0)
    assert not image.flags.writeable  # a transform writing into its input would corrupt every later epoch
    plain = DetectionDataset(load_data_yaml(data_yaml), "train", 48, augment=False)
    batches = [[b.images for b in build_dataloader(d, 4, workers=1, shuffle=False)] for d in (dataset, plain)]
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_disk_cache_writes_npy_beside_images_and_a_second_dataset_reads_them_without_decoding(
    data_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = load_data_yaml(data_yaml)
    expected = samples(DetectionDataset(info, "train", 48, augment=False))
    first = DetectionDataset(info, "train", 48, augment=False, cache="disk")
    images = sorted((data_yaml.parent / "images" / "train").glob("*.jpg"))
    assert npy_files(data_yaml.parent) == [npy_path(path) for path in images]  # train only, 000001.jpg.npy
    assert np.array_equal(np.load(npy_path(images[0])), load_image(images[0]))  # full resolution, RGB
    assert_same(samples(first), expected)

    def no_decoding(path: Path) -> None:
        raise AssertionError(f"decoded {path} although its .npy exists")

    monkeypatch.setattr(image_cache_module, "load_image", no_decoding)
    second = DetectionDataset(info, "train", 48, augment=False, cache="disk")
    for path in images:
        path.unlink()  # the arrays alone must do
    assert_same(samples(second), expected)


def test_disk_cache_rewrites_an_array_older_than_its_image(data_yaml: Path) -> None:
    info = load_data_yaml(data_yaml)
    DetectionDataset(info, "val", 48, augment=False, cache="disk")
    image = data_yaml.parent / "images" / "val" / "000001.jpg"
    stale = npy_path(image)
    np.save(stale, np.zeros((2, 2, 3), np.uint8))
    newer = stale.stat().st_mtime_ns + 10**9
    os.utime(image, ns=(newer, newer))
    DetectionDataset(info, "val", 48, augment=False, cache="disk")
    assert np.array_equal(np.load(stale), load_image(image))


def test_ram_cache_that_does_not_fit_is_refused_in_one_line(data_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = load_data_yaml(data_yaml)
    plain = DetectionDataset(info, "train", 48, augment=False)
    needed = sum(3 * h * w for h, w in (resized_shape(h0, w0, 48) for w0, h0 in plain.records.sizes.tolist()))
    monkeypatch.setattr(image_cache_module, "available_memory", lambda: needed)  # below needed × 1.5
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(DataError) as error:
        DetectionDataset(info, "train", 48, augment=False, cache="ram")
    assert isinstance(error.value, UserError)  # the CLI prints it and exits 2
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"train: cache=ram needs {needed * 1.5 / 2**20:.1f} MB of RAM for 8 images at imgsz=48 "
                       f"(with a 50% margin) but only {needed / 2**20:.1f} MB is available; use cache=disk (decoded "
                       "arrays beside the images) or cache=False")
    monkeypatch.setattr(image_cache_module, "available_memory", lambda: round(needed * 1.5) + 1)
    assert DetectionDataset(info, "train", 48, augment=False, cache="ram").image_cache is not None


def test_ram_estimate_counts_every_rank_on_the_node(data_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = load_data_yaml(data_yaml)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(image_cache_module, "available_memory", lambda: 2**20)  # 1 MB: one rank's 8 images fit
    assert DetectionDataset(info, "train", 48, augment=False, cache="ram").image_cache is not None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    with pytest.raises(DataError, match=r"for 8 images at imgsz=48 on each of 64 ranks"):
        DetectionDataset(info, "train", 48, augment=False, cache="ram")


def test_unwritable_folder_falls_back_to_decoding_with_one_warning(
    data_yaml: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    info = load_data_yaml(data_yaml)
    expected = samples(DetectionDataset(info, "train", 48, augment=False))  # also writes the label cache

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_cache_module.tempfile, "mkstemp", refuse)  # root ignores chmod: refuse the write
    capsys.readouterr()
    dataset = DetectionDataset(info, "train", 48, augment=False, cache="disk")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    folder = data_yaml.parent / "images" / "train"
    assert warnings == [f"WARNING: train: cache=disk cannot write the decoded images beside them in {folder} "
                        "(Permission denied); images are decoded each time instead (make the folder writable, or "
                        "use cache=ram)"]
    assert dataset.image_cache is None and npy_files(data_yaml.parent) == []
    assert_same(samples(dataset), expected)


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_image_unreadable_while_caching_is_handled_as_without_cache(
    data_yaml: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    info = load_data_yaml(data_yaml)
    monkeypatch.setattr("crosskd.data.cache.fingerprint", lambda *args: "same")  # the label cache stays valid
    DetectionDataset(info, "val", 48, augment=False)  # indexes the labels and caches them
    broken = data_yaml.parent / "images" / "val" / "000002.jpg"
    broken.write_bytes(b"not a jpeg")  # after indexing: the labels still list it
    plain = samples(DetectionDataset(info, "val", 48, augment=False))
    got = samples(DetectionDataset(info, "val", 48, augment=False, cache=cache))
    assert plain[1][6] == (str(broken),)  # a black background that names the file
    assert_same(got, plain)


def test_cache_values() -> None:
    assert [cache_mode(v) for v in (False, None, "", "false", "None")] == [None] * 5
    assert [cache_mode(v) for v in (True, "true", "ram", "RAM", "disk")] == ["ram", "ram", "ram", "ram", "disk"]
    with pytest.raises(ConfigError, match=r"cache='memory' is not valid; use cache=ram, cache=disk or cache=False"):
        cache_mode("memory")


def test_resized_shape_is_what_resize_long_side_gives() -> None:
    for height, width in ((480, 640), (640, 480), (1, 999), (333, 334), (427, 640), (7, 5)):
        for imgsz in (32, 320, 640, 1333):
            image, _ = resize_long_side(np.zeros((height, width, 3), np.uint8), imgsz)
            assert resized_shape(height, width, imgsz) == image.shape[:2], (height, width, imgsz)
