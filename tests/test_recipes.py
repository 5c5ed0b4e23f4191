"""Training recipes and the loader's per-sample seeds: the model's recipe fills the augmentation keys not given,
ms_scales=head takes the head's mstrain sizes, close_mosaic turns the mixing steps off by epoch, and multi_scale
resizes whole batches."""

import numpy as np
import pytest
import torch
import yaml

from crosskd.cli import dispatch
from crosskd.config import get_args
from crosskd.data import Batch, collate
from crosskd.data.dataset import MIXING_STEPS, DetectionDataset, Sample, SampleKey
from crosskd.data.loader import SkippingSampler, resize_batch
from crosskd.data.recipes import PAPER, RECIPES, ULTRALYTICS
from crosskd.data.transforms import LabeledImage
from crosskd.engine.training.recipe import apply_recipe, multiscale_size, multiscale_sizes, step_generator
from crosskd.engine.training.trainer import Trainer
from crosskd.errors import ConfigError
from crosskd.models.heads.fcos import FCOSHead
from crosskd.models.heads.gfl import GFLHead
from crosskd.models.heads.retinanet import RetinaHead


def test_a_dense_model_gets_the_papers_recipe_and_typed_keys_win() -> None:
    args = apply_recipe(get_args({"hsv_h": 0.015, "mosaic": 0.5}, "train"), {"backbone": {}})
    assert args.mosaic == 0.5 and args.hsv_h == 0.015  # given, even equal to the setting's default
    assert args.hsv_s == PAPER["hsv_s"] == 0 and args.close_mosaic == 0 and args.fliplr == 0.5
    assert get_args({}, "train").hsv_s == ULTRALYTICS["hsv_s"] == 0.7  # the settings' own defaults are Ultralytics'


def test_a_model_yaml_names_its_recipe_and_an_unknown_one_is_one_line() -> None:
    args = apply_recipe(get_args({}, "train"), {"recipe": "ultralytics"})
    assert {key: getattr(args, key) for key in ULTRALYTICS} == ULTRALYTICS
    with pytest.raises(ConfigError, match="'yolo' is not a training recipe; use one of paper, ultralytics"):
        apply_recipe(get_args({}, "train"), {"recipe": "yolo"})
    assert set(PAPER) == set(ULTRALYTICS) and set(RECIPES) == {"paper", "ultralytics"}


@pytest.mark.parametrize(("head", "imgsz", "expected"), [
    (GFLHead, 800, ((480, 800), "range")), (GFLHead, 640, ((384, 640), "range")),
    (RetinaHead, 800, ((640, 800), "range")), (FCOSHead, 400, ((320, 400), "choice")),
])
def test_ms_scales_head_takes_the_heads_mstrain_sizes_scaled_to_imgsz(head, imgsz, expected) -> None:
    assert multiscale_sizes(get_args({"ms_scales": "head"}, "train"), head.mstrain, imgsz) == expected
    given = get_args({"ms_scales": [96, 128], "ms_mode": "choice"}, "train")
    assert multiscale_sizes(given, head.mstrain, imgsz) == ((96, 128), "choice")
    assert multiscale_sizes(get_args({}, "train"), head.mstrain, imgsz) == ((), "range")


def test_sample_keys_carry_seeds_of_their_position_and_mixing_off_from_the_close_epoch() -> None:
    sampler = SkippingSampler(range(6), seed=3)
    sampler.mix_off_from = 2
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert [[key.index for key in keys] for keys in epochs] == [list(range(6))] * 3
    assert [{key.mix_off for key in keys} for keys in epochs] == [{False}, {False}, {True}]
    assert len({key.seed for keys in epochs for key in keys}) == 18  # every (epoch, position) its own seed
    sampler.set_epoch(1)
    sampler.skip_next(4)
    assert list(sampler) == epochs[1][4:]  # a resume mid-epoch: the same keys, seeds included


def test_a_key_with_mixing_off_skips_mosaic_mixup_and_cutmix(monkeypatch) -> None:
    seen = {}

    def transforms(sample, rng, skip=()):
        seen["skip"], seen["draw"] = tuple(skip), float(torch.rand(1, generator=rng))
        return sample

    dataset = DetectionDataset.__new__(DetectionDataset)
    monkeypatch.setattr(dataset, "transforms", transforms, raising=False)
    monkeypatch.setattr(dataset, "load_sample", lambda index: (_Record(), _labeled()), raising=False)
    dataset[SampleKey(0, 7, mix_off=True)]
    first = seen["draw"]
    assert seen["skip"] == MIXING_STEPS
    dataset[SampleKey(0, 7)]
    assert seen["skip"] == () and seen["draw"] == first  # the key's seed, not a global generator


class _Record:
    image_id, path = 1, "a.jpg"


def _labeled() -> LabeledImage:
    return LabeledImage(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                        orig_size=(8, 8), valid_size=(8, 8))


def test_resize_batch_scales_images_boxes_and_sizes() -> None:
    image = torch.zeros(3, 64, 48, dtype=torch.uint8)
    image[:, 16:32, 8:24] = 255
    samples = [Sample(image, torch.tensor([[8.0, 16, 24, 32]]), torch.tensor([1]), 1, (64, 48), 1.0, "a"),
               Sample(image[:, :32], torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 2, (32, 48), 1.0, "b")]
    batch: Batch = collate(samples, pad_multiple=32).to("cpu")  # [2, 3, 64, 64]
    resized = resize_batch(batch, 96, pad_multiple=32)
    assert resized.images.shape == (2, 3, 96, 96)
    assert resized.gt_boxes[0, 0].tolist() == [12, 24, 36, 48]
    assert resized.img_sizes.tolist() == [[96, 72], [48, 72]] and resized.ratios.tolist() == [1.5, 1.5]
    inside = resized.images[0, :, 26:46, 14:34]  # the white square, away from its blurred edge
    assert inside.min() == 1 and resize_batch(batch, 64, 32) is batch


def test_multi_scale_sizes_are_stride_multiples_in_range_and_follow_the_iteration() -> None:
    sizes = [multiscale_size(640, 0.5, 32, step_generator(0, 0, i)) for i in range(200)]
    assert all(size % 32 == 0 and 320 <= size <= 960 for size in sizes)
    assert len(set(sizes)) > 10
    assert sizes == [multiscale_size(640, 0.5, 32, step_generator(0, 0, i)) for i in range(200)]


def test_args_yaml_shows_the_resolved_recipe(tmp_path, write_digits_yaml) -> None:
    data = write_digits_yaml(tmp_path, 4, 2)
    args = get_args({"model": "gfl_r18t.yaml", "data": str(data), "epochs": 1, "imgsz": 64, "batch": 2,
                     "workers": 0, "device": "cpu", "val": False, "plots": False, "project": str(tmp_path),
                     "name": "run", "pretrained": False, "hsv_v": 0.2}, "train")
    trainer = Trainer(args)
    trainer.setup()
    saved = yaml.safe_load((trainer.save_dir / "args.yaml").read_text())
    assert saved["mosaic"] == 0 and saved["hsv_s"] == 0 and saved["hsv_v"] == 0.2 and saved["fliplr"] == 0.5


def test_help_with_a_model_shows_its_resolved_recipe(capsys) -> None:
    dispatch(["train", "model=gfl_r18t.yaml", "hsv_v=0.3", "--help"])
    resolved = capsys.readouterr().out
    assert "  mosaic=0.0 " in resolved and "  hsv_v=0.3 " in resolved and "  fliplr=0.5 " in resolved
    dispatch(["train", "--help"])
    assert "  mosaic=1.0 " in capsys.readouterr().out  # no model: the settings' defaults (Ultralytics')
