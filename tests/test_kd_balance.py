"""benchmarks/kd_balance.py: its pure helpers (gradient norms and cosines, term groups, statistics gaps, windows)."""

import math

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def kd_balance():
    """The diagnostic script imported as a module."""
    return load_benchmark("kd_balance")


def test_grad_norm_and_cosine_treat_unreached_tensors_as_zero(kd_balance):
    first = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    second = [torch.tensor([0.0, 2.0]), torch.tensor([1.0]), torch.tensor([[0.0]])]
    assert kd_balance.grad_norm(first) == pytest.approx(5.0)
    assert kd_balance.grad_cosine(first, second) == pytest.approx(0.0)
    assert kd_balance.grad_cosine(first, [2 * g if g is not None else None for g in first]) == pytest.approx(1.0)
    assert math.isnan(kd_balance.grad_cosine(first, [None, None, None]))


def test_group_terms_sums_detection_crosskd_and_pkd_keys(kd_balance):
    losses = {"loss_cls": torch.tensor(1.0), "loss_box": torch.tensor(2.0), "kd_cls": torch.tensor(3.0),
              "kd_reg": torch.tensor(4.0), "kd_feat": torch.tensor(5.0)}
    groups = kd_balance.group_terms(losses)
    assert {k: float(v) for k, v in groups.items()} == {"det": 3.0, "ckd": 7.0, "pkd": 5.0}
    assert set(kd_balance.group_terms({"loss_cls": torch.tensor(1.0), "kd_feat": torch.tensor(2.0)})) == {"det", "pkd"}


def test_channel_gap_measures_scale_and_shift_against_the_teacher(kd_balance):
    teacher = torch.randn(4, 8, 5, 5)
    assert kd_balance.channel_gap(teacher, teacher) == pytest.approx((1.0, 0.0))
    ratio, gap = kd_balance.channel_gap(3 * teacher, teacher)
    assert ratio == pytest.approx(3.0, rel=1e-5)
    shifted_ratio, shifted_gap = kd_balance.channel_gap(teacher + 2 * teacher.std(), teacher)
    assert shifted_ratio == pytest.approx(1.0, rel=1e-5) and shifted_gap > 1.5
    assert gap > 0


def test_window_means_average_consecutive_records_and_skip_nan(kd_balance):
    rows = [{"iter": i, "a": float(i), "b": math.nan if i == 0 else 1.0} for i in range(6)]
    means = kd_balance.window_means(rows, ("a", "b", "c"), windows=2)
    assert [(m["from"], m["to"]) for m in means] == [(0, 2), (3, 5)]
    assert means[0]["a"] == pytest.approx(1.0) and means[0]["b"] == pytest.approx(1.0)
    assert math.isnan(means[1]["c"])


def test_parse_method_and_warmup(kd_balance):
    assert kd_balance.parse_method("crosskd+pkd") == ("crosskd+pkd", None)
    assert kd_balance.parse_method(" pkd@5 ") == ("pkd", 5)
    assert kd_balance.warmup_lr(1.0, 0, 100) == pytest.approx(0.001)
    assert kd_balance.warmup_lr(1.0, 50, 100) == pytest.approx(0.5005)
    assert kd_balance.warmup_lr(1.0, 100, 100) == 1.0
