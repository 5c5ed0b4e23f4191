"""Learning-rate schedule, optimiser choice and EMA of the trainer."""

import math

import pytest
import torch
from torch import nn

from crosskd.config import get_args
from crosskd.engine.training.optim import (
    AUTO_SGD_MIN_ITERS,
    DEFAULT_LR0,
    LRSchedule,
    ModelEMA,
    build_optimizer,
    build_schedule,
    resolve_run_length_defaults,
    scaled_lr,
    scaled_steps,
)
from crosskd.errors import ConfigError


def test_lr_scales_linearly_with_total_batch():
    assert scaled_lr(0.01, 16) == pytest.approx(0.01)
    assert scaled_lr(0.01, 8) == pytest.approx(0.005)
    assert scaled_lr(0.02, 32) == pytest.approx(0.04)
    args = get_args({"batch": 4, "lr0": 0.01}, "train")
    assert build_schedule(args, iters_per_epoch=10).base_lr == pytest.approx(0.0025)


def test_linear_warmup_from_ratio():
    schedule = LRSchedule(base_lr=0.01, iters_per_epoch=100, epochs=12, warmup_iters=500, warmup_ratio=0.001)
    assert schedule(0) == pytest.approx(0.01 * 0.001)
    assert schedule(250) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert schedule(499) == pytest.approx(0.01 * (0.001 + 0.999 * 499 / 500))
    assert schedule(500) == pytest.approx(0.01)


def test_warmup_epochs_override_warmup_iters():
    args = get_args({"warmup_epochs": 1.5, "warmup_iters": 500, "batch": 16, "lr0": 0.01}, "train")
    assert build_schedule(args, iters_per_epoch=20).warmup_iters == 30
    args = get_args({"warmup_iters": 7, "lr0": 0.01}, "train")
    assert build_schedule(args, iters_per_epoch=20).warmup_iters == 7


def test_step_decay_at_epochs_scaled_from_the_1x_schedule():
    assert scaled_steps([8, 11], 12) == [8, 11]
    assert scaled_steps([8, 11], 24) == [16, 22]
    assert scaled_steps([8, 11], 6) == [4, 6]
    schedule = LRSchedule(base_lr=0.02, iters_per_epoch=10, epochs=24, warmup_iters=0, lr_steps=(8, 11))
    assert schedule(16 * 10 - 1) == pytest.approx(0.02)  # last iteration of epoch 15
    assert schedule(16 * 10) == pytest.approx(0.002)  # first iteration of epoch 16
    assert schedule(22 * 10 - 1) == pytest.approx(0.002)
    assert schedule(22 * 10) == pytest.approx(0.0002)


def test_cosine_ends_at_lr0_times_lrf():
    schedule = LRSchedule(base_lr=0.01, iters_per_epoch=10, epochs=5, warmup_iters=0, cos_lr=True, lrf=0.05)
    assert schedule(0) == pytest.approx(0.01)
    assert schedule(25) == pytest.approx(0.0005 + (0.01 - 0.0005) * 0.5)  # half way: the mean of start and end
    assert schedule(50) == pytest.approx(0.01 * 0.05)
    values = [schedule(i) for i in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_is_a_pure_function_of_the_iteration():
    schedule = LRSchedule(base_lr=0.01, iters_per_epoch=7, epochs=3, warmup_iters=5, lr_steps=(8, 11))
    first = [schedule(i) for i in range(21)]
    again = LRSchedule(**{**schedule.state_dict(), "lr_steps": tuple(schedule.state_dict()["lr_steps"])})
    assert [again(i) for i in reversed(range(21))] == list(reversed(first))


def test_build_optimizer_sgd_and_adamw():
    params = [nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(params, "SGD", 0.01, 0.9, 1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer(params, "AdamW", 0.001, 0.9, 0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ConfigError, match="optimizer=Adam "):
        build_optimizer(params, "Adam", 0.01, 0.9, 0.0)


def test_ema_follows_the_model_with_ramped_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 3
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2000))
    assert ema.updates == 1
    torch.testing.assert_close(ema.module[0].weight, start * d + model[0].weight * (1 - d))
    assert int(ema.module[1].num_batches_tracked) == 3  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_auto_picks_adamw_and_a_capped_warmup_for_a_short_run(caplog):
    args = get_args({"batch": 8, "epochs": 10}, "train")  # 64 iterations per epoch: a 640-iteration run
    with caplog.at_level("INFO", logger="crosskd"):
        resolved = resolve_run_length_defaults(args, iters_per_epoch=64)
    assert (resolved.optimizer, resolved.lr0, resolved.warmup_iters) == ("AdamW", DEFAULT_LR0["AdamW"], 64)
    assert "auto -> AdamW(lr0=0.004 by optimizer) for a run of 640 iterations, warmup_iters 500 -> 64" in caplog.text
    assert build_schedule(resolved, iters_per_epoch=64).base_lr == pytest.approx(0.002)


def test_auto_keeps_the_papers_sgd_recipe_for_a_coco_1x_run():
    args = get_args({"batch": 16, "epochs": 12}, "train")
    resolved = resolve_run_length_defaults(args, iters_per_epoch=7330)  # COCO train2017 at batch 16
    assert (resolved.optimizer, resolved.lr0, resolved.warmup_iters) == ("SGD", 0.01, 500)
    assert resolve_run_length_defaults(args, AUTO_SGD_MIN_ITERS // 12 + 1).optimizer == "SGD"
    assert resolve_run_length_defaults(args, AUTO_SGD_MIN_ITERS // 12 - 1).optimizer == "AdamW"


def test_typed_keys_are_never_changed():
    typed = {"optimizer": "SGD", "lr0": 0.02, "warmup_iters": 300, "batch": 8, "epochs": 2}
    resolved = resolve_run_length_defaults(get_args(typed, "train"), iters_per_epoch=10)
    assert (resolved.optimizer, resolved.lr0, resolved.warmup_iters) == ("SGD", 0.02, 300)
    empty_lr = resolve_run_length_defaults(get_args({"optimizer": "SGD", "epochs": 2}, "train"), iters_per_epoch=10)
    assert (empty_lr.optimizer, empty_lr.lr0, empty_lr.warmup_iters) == ("SGD", DEFAULT_LR0["SGD"], 2)
    by_epochs = resolve_run_length_defaults(get_args({"warmup_epochs": 1.5, "epochs": 2}, "train"), 20)
    assert build_schedule(by_epochs, iters_per_epoch=20).warmup_iters == 30


def test_resolved_args_resolve_to_themselves():
    """A resumed run reads the resolved values from its checkpoint: resolving again changes nothing."""
    first = resolve_run_length_defaults(get_args({"batch": 8, "epochs": 10}, "train"), iters_per_epoch=64)
    again = resolve_run_length_defaults(get_args(first.to_dict(), "train"), iters_per_epoch=64)
    assert again.to_dict() == first.to_dict()


def test_coco_1x_recipe_gives_the_papers_values():
    args = get_args({"cfg": "coco_1x.yaml"}, "train")
    paper = {"epochs": 12, "batch": 16, "optimizer": "SGD", "lr0": 0.01, "momentum": 0.9, "weight_decay": 0.0001,
             "warmup_iters": 500, "warmup_ratio": 0.001, "lr_steps": [8, 11], "cos_lr": False}
    assert {key: getattr(args, key) for key in paper} == paper
    short = resolve_run_length_defaults(args, iters_per_epoch=5)  # every recipe key counts as given
    assert (short.optimizer, short.lr0, short.warmup_iters) == ("SGD", 0.01, 500)
    assert get_args({"cfg": "coco_1x", "batch": 32}, "train").batch == 32
