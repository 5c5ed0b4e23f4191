"""The YOLO head: Ultralytics' Detect widths, the per-level CrossKD seam, the decode, and the detection loss against
hand-computed values and Ultralytics 8.4's v8DetectionLoss (run by the peer in a subprocess)."""

import math
from types import SimpleNamespace

import pytest
import torch
from ultralytics_peer import run_peer

from crosskd.models.heads import YOLOHead

WIDTHS = [16, 32, 64]
SIZES = [(8, 12), (4, 6), (2, 3)]  # a 64 x 96 input


def head(cls_branch: str = "dwconv", num_classes: int = 3) -> YOLOHead:
    torch.manual_seed(0)
    return YOLOHead(num_classes, WIDTHS, cls_branch=cls_branch)


def features(batch: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(WIDTHS, SIZES)]


@pytest.mark.parametrize(("cls_branch", "params"), [("conv", 897_664), ("dwconv", 464_912)])
def test_detect_head_of_a_nano_model_has_ultralytics_parameter_count(cls_branch, params):
    # YOLOv8n's and YOLO11n's Detect at 80 classes on the (64, 128, 256) neck, 16 frozen DFL weights included
    detect = YOLOHead(80, [64, 128, 256], cls_branch=cls_branch)
    assert sum(p.numel() for p in detect.parameters()) == params
    assert detect.reg_channels == 64 and detect.cls_channels == 80 and not detect.dfl_bins.requires_grad


def test_biases_start_as_ultralytics_bias_init():
    h = head(num_classes=80)
    assert torch.all(h.reg_preds[0].bias == 2.0)
    assert h.cls_preds[2].bias[0].item() == pytest.approx(math.log(5 / 80 / (640 / 32) ** 2))


@pytest.mark.parametrize("cls_branch", ["conv", "dwconv"])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_split_forward_equals_forward_on_every_level(cls_branch, step):
    h, feats = head(cls_branch).eval(), features()
    whole = h(feats)
    for level, x in enumerate(feats):
        cls_feat, reg_feat = h.forward_tower(x, step, level)
        assert (cls_feat.shape[1], reg_feat.shape[1]) == h.hold_channels(step, level)
        pre = h.forward_from(cls_feat, reg_feat, level, step)
        post = h.forward_from(*h.activate_hold(cls_feat, reg_feat, step, level), level, step, activated=True)
        for out in (pre, post):
            torch.testing.assert_close(out.cls_score, whole.cls_scores[level])
            torch.testing.assert_close(out.bbox_pred, whole.bbox_preds[level])


def test_hold_is_pre_activation_of_the_pointwise_conv():
    h, x = head("dwconv").eval(), features()[0]
    cls_feat, _ = h.forward_tower(x, 1, 0)
    depthwise, pointwise = h.cls_branches[0][0]
    torch.testing.assert_close(cls_feat, pointwise.bn(pointwise.conv(depthwise(x))))
    assert (cls_feat < 0).any()  # not yet through SiLU


def test_decode_is_the_expected_distance_times_stride_around_cell_centres():
    h = head()
    priors = h.priors(SIZES, "cpu")
    reg = torch.full((1, priors.points.shape[0], 64), -30.0)
    reg[..., 3::16] = 30.0  # every side's mass on bin 3
    boxes = h.decode_boxes(reg, priors)
    expected = torch.cat([priors.points - 3 * priors.strides[:, None], priors.points + 3 * priors.strides[:, None]], 1)
    torch.testing.assert_close(boxes[0], expected)
    assert priors.points[0].tolist() == [4.0, 4.0]  # cell (0, 0) of stride 8: its centre


def batch_of(boxes: list[list[list[float]]], labels: list[list[int]]) -> SimpleNamespace:
    return SimpleNamespace(gt_boxes=torch.tensor(boxes), gt_labels=torch.tensor(labels),
                           img_sizes=torch.tensor([[64, 96]] * len(boxes)), images=torch.zeros(len(boxes), 3, 64, 96))


def test_loss_of_a_single_positive_by_hand():
    h = head(num_classes=2)
    priors = h.priors(SIZES, "cpu")
    n = priors.points.shape[0]
    outputs_flat_cls = torch.zeros(1, n, 2)
    reg = torch.zeros(1, n, 64)  # uniform bins: every side's expected distance 7.5 strides
    targets = SimpleNamespace(pos_mask=torch.zeros(1, n, dtype=torch.bool), labels=torch.full((1, n), -1),
                              label_weights=torch.ones(1, n), box_targets=torch.zeros(1, n, 4),
                              label_scores=torch.zeros(1, n))
    targets.pos_mask[0, 0] = True
    targets.labels[0, 0] = 1
    targets.label_scores[0, 0] = 0.5
    targets.box_targets[0, 0] = torch.tensor([0.0, 0.0, 8.0, 8.0])  # cell (0,0): ltrb 0.5 stride each side
    outputs = SimpleNamespace()
    h.flatten_outputs = lambda _: SimpleNamespace(cls=outputs_flat_cls, reg=reg)
    losses = h.loss(outputs, priors, targets)
    # BCE(0, t) = log 2 for every class of every prior, the one target 0.5 included; / max(Σ scores, 1) = 1
    assert losses["loss_cls"].item() == pytest.approx(0.5 * n * 2 * math.log(2), rel=1e-5)
    # predicted box ltrb 7.5 strides around (0.5, 0.5): [-7, -7, 8, 8] vs target [0, 0, 1, 1] (stride units); the
    # centres and aspect ratios agree, so CIoU = IoU = 1 / 225; weighted by the target score 0.5
    assert losses["loss_box"].item() == pytest.approx(7.5 * 0.5 * (1 - 1 / 225), rel=1e-5)
    # DFL: target 0.5 bins per side, uniform logits: −log(1/16) for both neighbours
    assert losses["loss_dfl"].item() == pytest.approx(1.5 * 0.5 * math.log(16), rel=1e-5)


PEER_LOSS = """
import sys, torch
from types import SimpleNamespace
from ultralytics.utils.loss import v8DetectionLoss
data = torch.load(sys.argv[1])
detect = torch.nn.Conv2d(1, 1, 1)
detect.stride, detect.nc, detect.reg_max = torch.tensor([8., 16., 32.]), data["nc"], 16
model = SimpleNamespace(args=SimpleNamespace(box=7.5, cls=0.5, dfl=1.5), model=[detect], parameters=detect.parameters)
loss = v8DetectionLoss(model)
preds = {"boxes": data["boxes"], "scores": data["scores"], "feats": data["feats"]}
batch = {"batch_idx": data["batch_idx"], "cls": data["cls"], "bboxes": data["bboxes"]}
total, items = loss(preds, batch)
torch.save({"items": torch.stack([items["box_loss"], items["cls_loss"], items["dfl_loss"]]), "total": total},
           sys.argv[2])
"""


def test_loss_equals_ultralytics_v8_detection_loss(tmp_path):
    h, feats = head(num_classes=3), features(batch=2)
    with torch.no_grad():
        for pred in h.reg_preds:
            pred.weight.mul_(50)  # spread the bins so the boxes (and the assignment) are not all alike
    outputs = h(feats)
    boxes = [[[8.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0], [0.0, 0.0, 0.0, 0.0]],
             [[20.0, 20.0, 36.0, 44.0], [60.0, 30.0, 95.0, 63.0], [2.0, 40.0, 30.0, 62.0]]]
    labels = [[0, 2, -1], [1, 1, 0]]
    batch = batch_of(boxes, labels)
    priors = h.priors(SIZES, "cpu")
    ours = h.loss(outputs, priors, h.get_targets(priors, batch, outputs))

    real = torch.tensor(labels) >= 0
    xyxy = torch.tensor(boxes)[real]
    xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / torch.tensor([96, 64, 96, 64])
    flat = [torch.cat([b, c], 1).flatten(2) for b, c in zip(outputs.bbox_preds, outputs.cls_scores)]
    data = {"nc": 3, "boxes": torch.cat([f[:, :64] for f in flat], 2).detach(),
            "scores": torch.cat([f[:, 64:] for f in flat], 2).detach(), "feats": [f.detach() for f in feats],
            "batch_idx": real.nonzero()[:, 0].float(), "cls": torch.tensor(labels)[real].float(), "bboxes": xywh}
    torch.save(data, tmp_path / "in.pt")
    run_peer(PEER_LOSS, tmp_path / "in.pt", tmp_path / "out.pt")
    peer = torch.load(tmp_path / "out.pt")
    mine = torch.stack([ours["loss_box"], ours["loss_cls"], ours["loss_dfl"]]).detach()
    torch.testing.assert_close(mine, peer["items"], rtol=1e-5, atol=1e-6)
    assert peer["total"].sum().item() == pytest.approx(2 * mine.sum().item(), rel=1e-5)  # × batch size
