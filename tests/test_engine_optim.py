"""Learning-rate schedule, optimiser choice and EMA of the trainer."""

import math

import pytest
import torch
from torch import nn

from crosskd.config import get_args
from crosskd.engine.optim import LRSchedule, ModelEMA, build_optimizer, build_schedule, scaled_lr, scaled_steps
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
    args = get_args({"warmup_epochs": 1.5, "warmup_iters": 500, "batch": 16}, "train")
    assert build_schedule(args, iters_per_epoch=20).warmup_iters == 30
    args = get_args({"warmup_iters": 7}, "train")
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
