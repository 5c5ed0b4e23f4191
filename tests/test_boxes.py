"""Priors, box coders and box geometry in crosskd.ops.boxes against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from crosskd.ops.boxes import (
    aligned_box_iou,
    anchors_per_level,
    batched_box_iou,
    centerness_target,
    clip_boxes,
    delta_xywh_decode,
    delta_xywh_encode,
    distance_decode,
    distance_encode,
    integral_distribution,
    make_anchors,
    make_points,
)


def random_boxes(num: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(num, 2, generator=generator) * 100
    wh = torch.rand(num, 2, generator=generator) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_make_anchors_values_on_2x2_map():
    stride, base, scales, ratios = 8, 16.0, [1.0, 2.0], [0.5, 1.0]
    anchors = make_anchors([(2, 2)], [stride], [base], scales, ratios, "cpu")
    expected = []
    for y in range(2):
        for x in range(2):
            for ratio in ratios:
                for scale in scales:
                    w, h = base * scale / math.sqrt(ratio), base * scale * math.sqrt(ratio)
                    cx, cy = x * stride, y * stride
                    expected.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert anchors.shape == (16, 4)
    np.testing.assert_allclose(anchors.numpy(), np.array(expected), atol=1e-5)


def test_make_anchors_retinanet_base_anchor_matches_mmdet():
    octave_scales = [2 ** (i / 3) for i in range(3)]
    anchors = make_anchors([(3, 5)], [8], [8 * 4.0], octave_scales, [0.5, 1.0, 2.0], "cpu")
    assert anchors.shape == (3 * 5 * 9, 4)
    # MMDet's first RetinaNet anchor at stride 8 (ratio 0.5, scale 4): 45.25 wide, 22.63 high, centred on (0, 0)
    np.testing.assert_allclose(anchors[0].numpy(), [-22.6274, -11.3137, 22.6274, 11.3137], atol=1e-4)


def test_make_anchors_levels_are_concatenated_in_order():
    sizes, strides = [(4, 3), (2, 2)], [8, 16]
    anchors = make_anchors(sizes, strides, [32.0, 64.0], [1.0], [1.0, 2.0], "cpu", dtype=torch.float64)
    counts = anchors_per_level(sizes, num_base_anchors=2)
    assert counts == [24, 8]
    assert anchors.dtype == torch.float64 and anchors.shape == (32, 4)
    level1 = anchors[counts[0] :]
    centres = (level1[:, :2] + level1[:, 2:]) / 2
    # level 1 locations in y-major order: (0,0), (16,0), (0,16), (16,16), two anchors each
    expected_centres = [[0, 0], [0, 0], [16, 0], [16, 0], [0, 16], [0, 16], [16, 16], [16, 16]]
    np.testing.assert_allclose(centres.numpy(), expected_centres, atol=1e-9)
    np.testing.assert_allclose((level1[0, 2:] - level1[0, :2]).numpy(), [64, 64], atol=1e-9)


def test_make_points_values_and_strides():
    points, strides = make_points([(2, 2), (1, 1)], [8, 16], "cpu")
    np.testing.assert_allclose(points.numpy(), [[4, 4], [12, 4], [4, 12], [12, 12], [8, 8]])
    np.testing.assert_allclose(strides.numpy(), [8, 8, 8, 8, 16])
    points_no_offset, _ = make_points([(1, 2)], [8], "cpu", offset=0.0)
    np.testing.assert_allclose(points_no_offset.numpy(), [[0, 0], [8, 0]])


def test_priors_and_decoders_export_with_symbolic_height_and_width():
    class Decode(torch.nn.Module):
        def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            size = [(feat.shape[2], feat.shape[3])]
            anchors = make_anchors(size, [8], [32.0], [1.0], [1.0], feat.device)  # [H*W, 4]
            points, strides = make_points(size, [8], feat.device)  # [H*W, 2], [H*W]
            logits = feat.flatten(2).transpose(1, 2)  # [1, H*W, 12]: DFL logits with reg_max 2
            ltrb = integral_distribution(logits, reg_max=2) * strides[:, None]  # [1, H*W, 4]
            boxes = delta_xywh_decode(anchors, ltrb / 8, max_shape=(feat.shape[2] * 8, feat.shape[3] * 8))
            return anchors, distance_decode(points, ltrb), boxes

    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    example = torch.randn(1, 12, 4, 6, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(Decode(), (example,), dynamic_shapes={"feat": {2: height, 3: width}})
    feat = torch.randn(1, 12, 5, 3, generator=torch.Generator().manual_seed(1))
    for exported, eager in zip(program.module()(feat), Decode()(feat), strict=True):
        assert exported.shape == eager.shape and eager.shape[-2] == 15
        torch.testing.assert_close(exported, eager)


def test_delta_xywh_encode_hand_value_and_round_trip():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 5.0, 15.0, 25.0]])
    stds = (0.1, 0.1, 0.2, 0.2)
    # centre moves by (5, 5) on a 10 x 20 anchor: dx = 0.5, dy = 0.25, same size: dw = dh = 0
    np.testing.assert_allclose(delta_xywh_encode(anchors, gt, stds=stds).numpy(), [[5.0, 2.5, 0.0, 0.0]], atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    anchors, gt = random_boxes(64, generator), random_boxes(64, generator)
    means = (0.1, -0.2, 0.05, 0.0)
    deltas = delta_xywh_encode(anchors, gt, means, stds)
    torch.testing.assert_close(delta_xywh_decode(anchors, deltas, means, stds), gt, atol=1e-4, rtol=1e-5)


def test_delta_xywh_decode_clamps_size_and_clips_to_image():
    anchor = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    boxes = delta_xywh_decode(anchor, torch.tensor([[0.0, 0.0, 10.0, 0.0]]))
    max_width = 10 * math.exp(abs(math.log(16 / 1000)))  # dw clamped to |log(0.016)|: width 625
    np.testing.assert_allclose((boxes[0, 2] - boxes[0, 0]).item(), max_width, rtol=1e-5)
    clipped = delta_xywh_decode(anchor, torch.tensor([[0.0, 0.0, 10.0, 0.0]]), max_shape=(30, 40))
    np.testing.assert_allclose(clipped.numpy(), [[0.0, 10.0, 40.0, 20.0]], atol=1e-4)
    per_image = clip_boxes(
        torch.tensor([[[-5.0, -5.0, 50.0, 50.0]], [[-5.0, -5.0, 50.0, 50.0]]]), torch.tensor([[30, 40], [20, 10]])
    )
    np.testing.assert_allclose(per_image.numpy(), [[[0, 0, 40, 30]], [[0, 0, 10, 20]]])


def test_distance_encode_decode_round_trip_and_clamp():
    points = torch.tensor([[5.0, 5.0]])
    boxes = torch.tensor([[0.0, 2.0, 9.0, 20.0]])
    np.testing.assert_allclose(distance_encode(points, boxes).numpy(), [[5, 3, 4, 15]])
    np.testing.assert_allclose(distance_encode(points, boxes, max_dis=10).numpy(), [[5, 3, 4, 9.9]], atol=1e-6)
    generator = torch.Generator().manual_seed(1)
    boxes = random_boxes(32, generator)
    points = boxes[:, :2] + torch.rand(32, 2, generator=generator) * (boxes[:, 2:] - boxes[:, :2])
    torch.testing.assert_close(distance_decode(points, distance_encode(points, boxes)), boxes)
    clipped = distance_decode(torch.tensor([[5.0, 5.0]]), torch.tensor([[10.0, 1.0, 30.0, 1.0]]), max_shape=(8, 20))
    np.testing.assert_allclose(clipped.numpy(), [[0, 4, 20, 6]])


def test_integral_distribution_hand_value():
    logits = torch.zeros(1, 12)  # reg_max 2: three bins for each of 4 sides
    logits[0, :3] = torch.tensor([0.0, math.log(2.0), math.log(3.0)])  # probabilities 1/6, 2/6, 3/6
    expected = [(0 * 1 + 1 * 2 + 2 * 3) / 6, 1.0, 1.0, 1.0]  # uniform bins average to 1
    np.testing.assert_allclose(integral_distribution(logits, reg_max=2).numpy(), [expected], atol=1e-6)


def test_centerness_target_hand_value_and_outside_points():
    ltrb = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    values = centerness_target(ltrb)
    np.testing.assert_allclose(values.numpy(), [math.sqrt(1 / 3 * 2 / 4), 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    ("box1", "box2", "iou"),
    [([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7), ([0, 0, 2, 2], [0, 0, 2, 2], 1.0), ([0, 0, 1, 1], [2, 2, 3, 3], 0.0)],
)
def test_aligned_and_batched_iou_hand_values(box1, box2, iou):
    a, b = torch.tensor([box1], dtype=torch.float32), torch.tensor([box2], dtype=torch.float32)
    np.testing.assert_allclose(aligned_box_iou(a, b).numpy(), [iou], atol=1e-6)
    batched = batched_box_iou(a, torch.stack([b, torch.zeros_like(b)]))  # image 1 holds a zero-size box
    assert batched.shape == (2, 1, 1)
    np.testing.assert_allclose(batched.flatten().numpy(), [iou, 0.0], atol=1e-6)
