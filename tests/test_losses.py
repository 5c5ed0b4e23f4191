"""Detection and distillation losses against values computed by hand with math/numpy."""

import math

import numpy as np
import pytest
import torch

from crosskd.losses.detection import (
    bce_with_logits,
    distribution_focal_loss,
    focal_loss,
    giou_loss,
    iou_loss,
    l1_loss,
    quality_focal_loss,
    weight_reduce,
)
from crosskd.losses.distill import channel_standardize, kd_quality_focal_loss, kl_div_loss, pkd_loss

TOL = 1e-6


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, t: float) -> float:
    return -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))


def softmax(values: list[float]) -> np.ndarray:
    exp = np.exp(np.asarray(values, dtype=np.float64))
    return exp / exp.sum()


def test_weight_reduce_modes():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert weight_reduce(loss, weight).item() == pytest.approx(4 / 4)
    assert weight_reduce(loss, weight, reduction="sum").item() == pytest.approx(4.0)
    assert weight_reduce(loss, weight, avg_factor=2.0).item() == pytest.approx(2.0, abs=TOL)
    assert weight_reduce(loss, weight, avg_factor=torch.tensor(8.0)).item() == pytest.approx(0.5, abs=TOL)
    np.testing.assert_allclose(weight_reduce(loss, weight, reduction="none").numpy(), [1, 0, 3, 0])
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce(loss, avg_factor=2.0, reduction="sum")


def test_weight_reduce_empty_is_zero_with_graph():
    empty = torch.zeros(0, 5, requires_grad=True)
    reduced = weight_reduce(empty * 2)
    assert reduced.item() == 0.0 and reduced.requires_grad
    reduced.backward()
    assert empty.grad is not None


def test_focal_loss_hand_value():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.3, 0.0, -0.7]])
    labels = torch.tensor([1, -1])  # anchor 0 is class 1, anchor 1 background
    gamma, alpha = 2.0, 0.25

    def term(x: float, positive: bool) -> float:
        p = sigmoid(x)
        if positive:
            return alpha * (1 - p) ** gamma * -math.log(p)
        return (1 - alpha) * p**gamma * -math.log(1 - p)

    expected = [[term(0.5, False), term(-1.0, True), term(2.0, False)], [term(v, False) for v in (0.3, 0.0, -0.7)]]
    np.testing.assert_allclose(focal_loss(logits, labels, gamma, alpha).numpy(), expected, atol=TOL)
    # label == num_classes is background as well
    np.testing.assert_allclose(focal_loss(logits[1:], torch.tensor([3])).numpy(), expected[1:], atol=TOL)


def test_quality_focal_loss_hand_value():
    logits = torch.tensor([[0.4, -0.3], [1.2, -2.0]])
    labels = torch.tensor([1, -1])
    quality = torch.tensor([0.6, 0.9])  # the background's quality is unused
    beta = 2.0
    positive = bce(0.4, 0) * sigmoid(0.4) ** beta + bce(-0.3, 0.6) * abs(0.6 - sigmoid(-0.3)) ** beta
    negative = bce(1.2, 0) * sigmoid(1.2) ** beta + bce(-2.0, 0) * sigmoid(-2.0) ** beta
    np.testing.assert_allclose(
        quality_focal_loss(logits, labels, quality, beta).numpy(), [positive, negative], atol=TOL
    )


def test_quality_focal_loss_gradient_flows_to_logits_only():
    logits = torch.tensor([[0.4, -0.3]], requires_grad=True)
    quality = torch.tensor([0.6], requires_grad=True)
    quality_focal_loss(logits, torch.tensor([0]), quality).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert quality.grad is None


def test_distribution_focal_loss_hand_value():
    logits = torch.tensor([[0.2, 1.0, -0.5], [0.2, 1.0, -0.5]])
    target = torch.tensor([0.3, 2.0])  # 2.0 = last bin: all weight on it
    log_p = np.log(softmax([0.2, 1.0, -0.5]))
    expected = [-log_p[0] * 0.7 - log_p[1] * 0.3, -log_p[2]]
    np.testing.assert_allclose(distribution_focal_loss(logits, target).numpy(), expected, atol=TOL)


def test_giou_and_iou_losses_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]])
    iou = 1 / 7  # intersection 1, union 4 + 4 - 1
    giou = [iou - (9 - 7) / 9, 0 - (9 - 2) / 9]  # enclosing boxes 3x3 in both rows
    np.testing.assert_allclose(giou_loss(pred, target).numpy(), [1 - g for g in giou], atol=TOL)
    np.testing.assert_allclose(iou_loss(pred, target).numpy(), [-math.log(iou), -math.log(1e-6)], atol=1e-5)
    np.testing.assert_allclose(iou_loss(pred, target, mode="linear").numpy(), [1 - iou, 1 - 1e-6], atol=TOL)
    np.testing.assert_allclose(iou_loss(pred, target, mode="square").numpy(), [1 - iou**2, 1.0], atol=TOL)
    with pytest.raises(ValueError, match="mode"):
        iou_loss(pred, target, mode="cubic")


def test_box_losses_in_half_precision_are_float32_and_finite():
    pred = torch.tensor([[0.0, 0.0, 400.0, 400.0]], dtype=torch.float16)  # areas overflow float16
    target = torch.tensor([[100.0, 100.0, 500.0, 500.0]], dtype=torch.float16)
    expected_iou = 300 * 300 / (2 * 400 * 400 - 300 * 300)
    loss = iou_loss(pred, target, mode="linear")
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), [1 - expected_iou], atol=1e-5)
    assert torch.isfinite(giou_loss(pred, target)).all()


def test_l1_and_bce_with_soft_targets():
    np.testing.assert_allclose(l1_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])).numpy(), [0.5, 3.0])
    values = bce_with_logits(torch.tensor([0.3, -1.0]), torch.tensor([0.25, 1.0]))
    np.testing.assert_allclose(values.numpy(), [bce(0.3, 0.25), bce(-1.0, 1.0)], atol=TOL)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_kd_quality_focal_loss_hand_value(beta):
    pred = torch.tensor([[0.7, -1.5]], requires_grad=True)
    teacher = torch.tensor([[-0.2, 0.9]], requires_grad=True)
    loss = kd_quality_focal_loss(pred, teacher, beta)
    expected = [bce(p, sigmoid(t)) * abs(sigmoid(p) - sigmoid(t)) ** beta for p, t in ((0.7, -0.2), (-1.5, 0.9))]
    np.testing.assert_allclose(loss.detach().numpy(), [expected], atol=TOL)
    loss.sum().backward()
    assert pred.grad is not None and teacher.grad is None


@pytest.mark.parametrize(("temperature", "class_reduction"), [(1.0, "sum"), (2.0, "sum"), (2.0, "mean")])
def test_kl_div_loss_hand_value(temperature, class_reduction):
    pred_values, teacher_values = [0.5, -0.3, 1.2], [1.0, 0.2, -0.4]
    pred = torch.tensor([pred_values], requires_grad=True)
    teacher = torch.tensor([teacher_values], requires_grad=True)
    target = softmax([v / temperature for v in teacher_values])
    student = softmax([v / temperature for v in pred_values])
    kl = target * (np.log(target) - np.log(student))
    reduced = kl.sum() if class_reduction == "sum" else kl.mean()
    loss = kl_div_loss(pred, teacher, T=temperature, class_reduction=class_reduction)
    np.testing.assert_allclose(loss.detach().numpy(), [reduced * temperature**2], atol=TOL)
    loss.sum().backward()
    assert pred.grad is not None and teacher.grad is None


def test_kl_div_loss_is_zero_for_identical_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    np.testing.assert_allclose(kl_div_loss(logits, logits.clone()).numpy(), [0.0], atol=TOL)


def test_channel_standardize_hand_value():
    feat = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 30.0]).view(2, 2, 1, 2)  # channel 0: 1,2,10,10
    channel0 = np.array([1.0, 2.0, 10.0, 10.0])
    expected0 = (channel0 - channel0.mean()) / (channel0.std(ddof=1) + 1e-6)
    out = channel_standardize(feat)
    np.testing.assert_allclose(out[:, 0].flatten().numpy(), expected0, atol=1e-5)
    np.testing.assert_allclose(out[:, 1].std().item(), 1.0, atol=1e-5)


def test_pkd_loss_hand_value():
    generator = np.random.default_rng(0)
    student_np = generator.normal(size=(2, 3, 2, 2))
    teacher_np = generator.normal(size=(2, 3, 2, 2)) * 5 + 1

    def standardise(x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        return (x - mean) / (x.std(axis=(0, 2, 3), ddof=1, keepdims=True) + 1e-6)

    expected = ((standardise(student_np) - standardise(teacher_np)) ** 2).mean() / 2
    student = torch.tensor(student_np, dtype=torch.float32, requires_grad=True)
    teacher = torch.tensor(teacher_np, dtype=torch.float32, requires_grad=True)
    loss = pkd_loss(student, teacher)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert pkd_loss(student, student.detach() * 3 + 2).item() == pytest.approx(0.0, abs=1e-6)
