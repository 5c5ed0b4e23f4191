"""Faster R-CNN: the YAMLs build through the one builder, torchvision's parameter count, sampling and RoI pooling
against hand-made cases and torchvision's pooler, training on a fixed batch, detections in image coordinates."""

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops import MultiScaleRoIAlign

from crosskd.assigners.sampler import random_sample
from crosskd.models import build_detector
from crosskd.models.two_stage import FasterRCNN, Proposals
from crosskd.models.two_stage.roi_head import rois_from_proposals
from crosskd.ops.roi import multilevel_roi_align, roi_levels

SMALL = "faster_rcnn_r18s.yaml"


def tiny_batch(height: int = 64, width: int = 64) -> SimpleNamespace:
    """Two images, the second smaller than the padded input and with one padded GT row."""
    torch.manual_seed(0)
    gt = torch.tensor([[[4, 6, 30, 40], [34, 20, 62, 60]], [[8, 8, 36, 30], [0, 0, 0, 0]]], dtype=torch.float32)
    return SimpleNamespace(
        images=torch.rand(2, 3, height, width),
        gt_boxes=gt,
        gt_labels=torch.tensor([[0, 2], [1, -1]]),
        img_sizes=torch.tensor([[height, width], [48, 40]]),
        ratios=torch.tensor([0.5, 2.0]),
    )


@pytest.mark.parametrize("name", ["faster_rcnn_r18.yaml", "faster_rcnn_r50.yaml", "faster_rcnn_r101.yaml", SMALL])
def test_yamls_build(name):
    torch.manual_seed(0)
    detector = build_detector(name, 80)
    assert isinstance(detector, FasterRCNN)
    assert detector.strides == [4, 8, 16, 32, 64] and detector.head_type == "faster_rcnn"
    assert detector.head.num_anchors == 3 and detector.head.roi_head.strides == [4, 8, 16, 32]
    assert detector.head.roi_head.reg.out_features == 80 * 4  # class-specific, no background slot (MMDetection)
    assert detector.head.roi_head.cls.out_features == 81


def test_torchvision_layout_parameter_count():
    """nc 90 + background = torchvision's 91 slots; every tensor of its model has its twin."""
    torchvision_model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = build_detector("faster_rcnn_r50_tv.yaml", 90)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in torchvision_model.parameters()) == 41_808_406


def test_random_sample_limits_and_ignores():
    torch.manual_seed(0)
    assigned = torch.tensor([[0, 1, 1, 0, -1, -1, -1, -2, -2, -1], [-1, -1, -2, -1, -1, -1, -1, -1, -1, -1]])
    pos, neg = random_sample(assigned, num=4, pos_fraction=0.5)
    assert pos.sum(1).tolist() == [2, 0] and neg.sum(1).tolist() == [2, 4]
    assert not (pos & neg).any()
    assert (assigned[pos] >= 0).all() and (assigned[neg] == -1).all()  # ignored (−2) never sampled


def test_random_sample_takes_all_when_few():
    torch.manual_seed(1)
    assigned = torch.tensor([[0, -1, -2]])
    pos, neg = random_sample(assigned, num=512, pos_fraction=0.25)
    assert pos.tolist() == [[True, False, False]] and neg.tolist() == [[False, True, False]]


def test_roi_levels_by_scale():
    boxes = torch.tensor([[0, 0, 32, 32], [0, 0, 56, 56], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 900, 900.0]])
    assert roi_levels(boxes, 4).tolist() == [0, 0, 1, 2, 3]


def test_multilevel_roi_align_equals_torchvision_pooler():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    xy = torch.rand(2, 12, 2) * torch.tensor([60.0, 40.0])
    wh = torch.rand(2, 12, 2) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=-1)  # [2, 12, 4]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=2)
    expected = pooler(OrderedDict((str(i), f) for i, f in enumerate(feats)), list(boxes), [(64, 96)] * 2)
    proposals = Proposals(boxes, torch.ones(2, 12), torch.tensor([12, 12]))
    ours = multilevel_roi_align(feats, rois_from_proposals(proposals), (4, 8, 16, 32), 7, 2, aligned=False)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_loss_goes_down_on_a_fixed_batch():
    batch = tiny_batch()
    torch.manual_seed(0)
    detector = build_detector(SMALL, 3).train()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for _ in range(6):
        losses = detector.loss(batch)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.7 * totals[0], totals


def test_empty_ground_truth_gives_finite_losses_with_graph():
    batch = tiny_batch()
    batch.gt_boxes, batch.gt_labels = torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long)
    torch.manual_seed(0)
    losses = build_detector(SMALL, 3).train().loss(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"].item() == 0 and losses["loss_rpn_box"].item() == 0
    sum(losses.values()).backward()  # keeps the graph


def test_predict_boxes_in_image_coordinates():
    batch = tiny_batch()
    torch.manual_seed(0)
    detector = build_detector(SMALL, 3).eval()
    in_input = detector.predict(batch.images, conf=0.0, img_sizes=batch.img_sizes)
    in_original = detector.predict(batch.images, conf=0.0, img_sizes=batch.img_sizes, ratios=batch.ratios)
    for dets, dets_orig, (height, width), ratio in zip(in_input, in_original, batch.img_sizes, batch.ratios):
        assert 0 < dets.boxes.shape[0] <= 100
        assert (dets.boxes >= 0).all()
        assert (dets.boxes[:, 0::2] <= width).all() and (dets.boxes[:, 1::2] <= height).all()
        assert (dets.boxes[:, 2:] >= dets.boxes[:, :2]).all()
        torch.testing.assert_close(dets_orig.boxes, dets.boxes / ratio)
        assert (dets.scores[:-1] >= dets.scores[1:]).all() and dets.labels.max() < 3
    dets, losses = detector.predict_with_loss(batch, conf=0.0)
    torch.testing.assert_close(dets[1].boxes, in_original[1].boxes)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
