"""Faster R-CNN: the YAMLs build through the one builder, torchvision's parameter count, sampling and RoI pooling
against hand-made cases and torchvision's pooler, training on a fixed batch, detections in image coordinates, and
torchvision's checkpoints (ResNet-50 v1/v2, MobileNetV3-Large and its 320 variant): proposals, R-CNN outputs and
detections equal torchvision's own on the same weights."""

import re
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, roi_align

from crosskd.assigners.sampler import random_sample
from crosskd.distill.two_stage import frcnn_cross_head, frcnn_crosskd_losses
from crosskd.engine.deployment.loader import load_teacher
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector
from crosskd.models.build import load_model_yaml
from crosskd.models.foreign.torchvision_detection import (
    COCO80_NAMES,
    COCO80_TO_91,
    COCO91_TO_80,
    frcnn_rows,
    load_torchvision_detector,
    torchvision_key_map,
    torchvision_name,
    weights_file_name,
)
from crosskd.models.two_stage import FasterRCNN, Proposals, RoIHead
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


def test_torchvision_v2_layout_parameter_count_and_key_map():
    """fasterrcnn_resnet50_fpn_v2 (BN FPN, 2-conv RPN, 4-conv + 1-FC box head): torchvision's documented 43,712,278
    parameters, and its key map pairs every tensor of both state dicts with one of the same shape (class rows aside)."""
    torchvision_model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    ours = build_detector("faster_rcnn_r50_tv_v2.yaml", 90)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in torchvision_model.parameters()) == 43_712_278
    theirs, own = torchvision_model.state_dict(), ours.state_dict()
    key_map = torchvision_key_map(ours, TV_V2_NAME)
    assert set(key_map) == set(theirs) and sorted(key_map.values()) == sorted(own)
    assert all(theirs[k].shape == own[v].shape for k, v in key_map.items() if "box_predictor" not in k)
    assert key_map["roi_heads.box_head.3.1.running_var"] == "head.roi_head.convs.3.norm.running_var"
    assert key_map["rpn.head.conv.1.0.weight"] == "head.rpn.extra_convs.0.weight"
    assert key_map["backbone.fpn.layer_blocks.2.1.weight"] == "neck.fpn.layer_blocks.2.1.weight"


def test_torchvision_mobilenet_v3_layout_parameter_count_and_key_map():
    """fasterrcnn_mobilenet_v3_large_fpn and _320_fpn (one network): 19,410,754 parameters with weights=None (regular
    BatchNorm; the documented 19,386,354 is the pretrained model, whose FrozenBatchNorm2d holds the 24,400 BatchNorm
    affine values as buffers), as either YAML at nc 90; its key map pairs every tensor of both state dicts."""
    torchvision_model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    theirs = torchvision_model.state_dict()
    assert sum(p.numel() for p in torchvision_model.parameters()) == 19_410_754
    for name, yaml_name in ((MNV3_NAME, "faster_rcnn_mnv3_tv.yaml"), (MNV3_320_NAME, "faster_rcnn_mnv3_320_tv.yaml")):
        ours = build_detector(yaml_name, 90)
        assert sum(p.numel() for p in ours.parameters()) == 19_410_754
        own = ours.state_dict()
        key_map = torchvision_key_map(ours, name)
        assert set(key_map) == set(theirs) and sorted(key_map.values()) == sorted(own)
        assert all(theirs[k].shape == own[v].shape for k, v in key_map.items() if "box_predictor" not in k)
    assert key_map["backbone.body.13.block.2.fc1.weight"] == "backbone.features.13.block.2.fc1.weight"
    assert key_map["backbone.fpn.inner_blocks.1.0.weight"] == "neck.fpn.inner_blocks.1.0.weight"
    head = ours.head  # the 320 variant's
    assert ours.strides == [32, 32, 64] and head.num_anchors == 15 and head.roi_head.strides == [32]
    assert head.rpn.test_proposals.score_thr == 0.05 and head.rpn.test_proposals.pre_nms == 150


def test_rpn_score_threshold_drops_unlikely_proposals():
    torch.manual_seed(0)
    rpn = build_detector(SMALL, 3).eval().head.rpn
    feats = [torch.randn(1, 64, 64 // s, 64 // s) for s in rpn.strides]
    with torch.no_grad():
        outputs = rpn(feats)
    priors = rpn.priors([tuple(f.shape[-2:]) for f in feats], "cpu")
    every = rpn.proposals(outputs, priors, (64, 64), rpn.test_proposals)
    likely = rpn.proposals(outputs, priors, (64, 64), rpn.test_proposals._replace(score_thr=0.5))
    assert 0 < int(likely.counts[0]) < int(every.counts[0])
    assert likely.scores[likely.valid].min() >= 0.5
    torch.testing.assert_close(likely.boxes[likely.valid], every.boxes[every.valid & (every.scores >= 0.5)])


def test_rpn_anchor_sizes_need_as_many_on_every_level():
    cfg, _ = load_model_yaml(SMALL)
    cfg["head"] |= {"rpn_anchor_sizes": [[32, 64], [64], [128], [256], [512]]}
    with pytest.raises(ConfigError, match="rpn_anchor_sizes needs as many sizes on every level"):
        build_detector(cfg, 3)


def v2_style_small() -> dict:
    """faster_rcnn_r18s.yaml with torchvision v2's layout: BN FPN, 2-conv RPN, 2 conv-BN-ReLU + 1 FC box head."""
    cfg, _ = load_model_yaml(SMALL)
    cfg["neck"]["norm"] = "bn"
    cfg["head"] |= {"rpn_num_convs": 2, "num_convs": 2, "conv_channels": 32, "conv_norm": "bn", "num_fcs": 1}
    return cfg


def test_conv_fc_box_head_layout_trains_and_predicts():
    torch.manual_seed(0)
    detector = build_detector(v2_style_small(), 3)
    head = detector.head
    assert len(head.rpn.extra_convs) == 1 and [type(m).__name__ for m in head.roi_head.convs] == ["ConvBlock"] * 2
    assert head.roi_head.convs[0].conv.bias is None and head.roi_head.fcs[0].in_features == 32 * 7 * 7
    assert "neck.fpn.layer_blocks.0.1.running_var" in detector.state_dict()
    batch = tiny_batch()
    losses = detector.train().loss(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    sum(losses.values()).backward()
    assert head.rpn.extra_convs[0].weight.grad.abs().sum() > 0 and head.roi_head.convs[1].norm.weight.grad is not None
    dets = detector.eval().predict(batch.images, conf=0.0, img_sizes=batch.img_sizes)
    assert all(0 < len(d.boxes) <= 100 for d in dets)


@pytest.mark.parametrize("num_convs", [0, 2])
def test_roi_tower_split_is_forward_at_every_step(num_convs):
    """forward_from(forward_tower(x, i), i) == forward(x) for every step i of convs then FCs (the CrossKD seam)."""
    torch.manual_seed(0)
    head = RoIHead(3, 8, fc_channels=16, num_fcs=2, num_convs=num_convs, conv_channels=8, conv_norm="bn").eval()
    pooled = torch.randn(5, 8, 7, 7)
    expected = head(pooled)
    for step in range(num_convs + 3):
        feat = head.forward_tower(pooled, step)
        assert feat.dim() == (4 if step < num_convs else 2)
        for ours, theirs in zip(head.forward_from(feat, step), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "section,key,value,message",
    [("neck", "norm", "gn", "neck.norm 'gn' is not one of none, bn"),
     ("head", "rpn_num_convs", 0, "head.rpn_num_convs 0 must be >= 1"),
     ("head", "conv_norm", "batch", "head.conv_norm 'batch' is not one of gn, bn, none")],
)
def test_layout_keys_reject_bad_values(section, key, value, message):
    cfg = v2_style_small()
    cfg[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_detector(cfg, 3)


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


# ----- torchvision checkpoints ---------------------------------------------------------------------------------------
TV_NAME = "fasterrcnn_resnet50_fpn"
TV_V2_NAME = "fasterrcnn_resnet50_fpn_v2"
MNV3_NAME = "fasterrcnn_mobilenet_v3_large_fpn"
MNV3_320_NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
TV_BUILDERS = {TV_NAME: fasterrcnn_resnet50_fpn, TV_V2_NAME: fasterrcnn_resnet50_fpn_v2,
               MNV3_NAME: fasterrcnn_mobilenet_v3_large_fpn, MNV3_320_NAME: fasterrcnn_mobilenet_v3_large_320_fpn}
FPN_OUTPUT_SCALE = {TV_NAME: 0.02, TV_V2_NAME: 0.02, MNV3_NAME: 10.0, MNV3_320_NAME: 10.0}  # outputs of a few units
RPN_BIAS_MEAN = {MNV3_NAME: -1.5, MNV3_320_NAME: -1.5}  # some objectness below their rpn_score_thresh 0.05
FROZEN_BN_FILES = (TV_NAME, MNV3_NAME, MNV3_320_NAME)  # their COCO files hold FrozenBatchNorm2d: no BN counters
FROM_HUB = (TV_V2_NAME, MNV3_NAME)  # loaded by name from torch hub's cache; the others from a local file
TV_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
TV_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def randomised_torchvision_frcnn(name: str = TV_NAME) -> torch.nn.Module:
    """torchvision's Faster R-CNN `name` (91 slots) from seed 0 in a realistic regime: non-trivial BN statistics (v1:
    eps 0, as torchvision sets for its COCO_V1 weights; the others: their BatchNorm's 1e-5), FPN outputs of a few
    units, objectness logits and deltas of trained size, unused COCO slots that never fire."""
    torch.manual_seed(0)
    model = TV_BUILDERS[name](weights=None, weights_backbone=None, num_classes=91)
    rpn, predictor = model.rpn.head, model.roi_heads.box_predictor
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.eps = 0.0 if name == TV_NAME else module.eps
        for block in model.backbone.fpn.layer_blocks:  # v1: [conv]; v2: [conv without bias, BatchNorm]
            block[-1].weight.mul_(FPN_OUTPUT_SCALE[name])
            block[-1].bias.mul_(FPN_OUTPUT_SCALE[name])
        for layer, weight_std, bias_std in ((rpn.cls_logits, 0.1, 0.5), (rpn.bbox_pred, 0.01, 0.1),
                                            (predictor.cls_score, 0.2, 0.5), (predictor.bbox_pred, 0.01, 0.1)):
            layer.weight.normal_(0, weight_std)
            layer.bias.normal_(0, bias_std)
        rpn.cls_logits.bias.add_(RPN_BIAS_MEAN.get(name, 0.0))
        unused = torch.ones(91, dtype=torch.bool)
        unused[[0, *COCO80_TO_91]] = False
        predictor.cls_score.bias[unused] = -20.0  # as trained weights: the 'N/A' slots never win
    return model.eval()


def test_torchvision_frcnn_names_and_rows():
    assert weights_file_name(TV_NAME) == "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert torchvision_name("torchvision:fasterrcnn_resnet50_fpn") == TV_NAME
    assert weights_file_name(TV_V2_NAME) == "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"
    assert torchvision_name("torchvision:fasterrcnn_resnet50_fpn_v2") == TV_V2_NAME
    assert torchvision_name("/any/dir/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth") == TV_V2_NAME
    assert weights_file_name(MNV3_NAME) == "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
    assert weights_file_name(MNV3_320_NAME) == "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    assert torchvision_name(f"torchvision:{MNV3_320_NAME}") == MNV3_320_NAME
    assert torchvision_name("/any/dir/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth") == MNV3_NAME
    rows = torch.arange(91 * 4).view(-1, 1)  # box rows: 4 per slot, background slot 0 first
    moved = frcnn_rows(rows).view(81, 4)
    assert moved[-1].tolist() == [0, 1, 2, 3] and moved[0].tolist() == [4, 5, 6, 7]  # person (slot 1) first
    assert moved[:, 0].tolist() == [4 * s for s in (*COCO80_TO_91, 0)]


def torchvision_frcnn_by_name(name: str, tv_model: torch.nn.Module, tmp_path, hub_dir) -> FasterRCNN:
    """The state dict in the layout of `name`'s real COCO file (FrozenBN files: no BN counters) under its real file
    name: in torch hub's cache and loaded by name as `teacher=` reads it (FROM_HUB), else from a local file."""
    state = tv_model.state_dict()
    if name in FROZEN_BN_FILES:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if name in FROM_HUB:
        hub_dir.mkdir(parents=True)
        torch.save(state, hub_dir / weights_file_name(name))
        return load_teacher(f"torchvision:{name}", None).model
    path = tmp_path / weights_file_name(name)
    torch.save(state, path)
    return load_torchvision_detector(name, path)


def test_v2_state_dict_loads_with_teacher_cfg(tmp_path):
    """A v2 state dict under any file name: teacher_cfg= names its YAML; without it, or with v1's, one error line."""
    torch.manual_seed(0)
    state = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "my_frcnn_v2.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pass teacher_cfg= with its YAML"):
        load_teacher(str(path), None)
    with pytest.raises(CheckpointError, match="does not fit this model: .*unexpected.*missing"):
        load_teacher(str(path), None, "faster_rcnn_r50_tv.yaml")
    teacher = load_teacher(str(path), None, "faster_rcnn_r50_tv_v2.yaml").model
    assert isinstance(teacher, FasterRCNN) and teacher.names == COCO80_NAMES and not teacher.training
    roi_head = teacher.head.roi_head
    assert torch.equal(roi_head.convs[3].norm.running_var, state["roi_heads.box_head.3.1.running_var"])
    assert torch.equal(roi_head.fcs[0].weight, state["roi_heads.box_head.5.weight"])
    assert torch.equal(teacher.head.rpn.extra_convs[0].bias, state["rpn.head.conv.1.0.bias"])
    assert torch.equal(roi_head.cls.weight, frcnn_rows(state["roi_heads.box_predictor.cls_score.weight"]))


@pytest.mark.parametrize("name", [pytest.param(TV_NAME, marks=pytest.mark.slow),  # ResNet-50: 15-60 s
                                  pytest.param(TV_V2_NAME, marks=pytest.mark.slow), MNV3_NAME, MNV3_320_NAME])
def test_proposals_scores_boxes_and_detections_equal_torchvision(name, tmp_path, offline_torch_home):
    """Same weights, same 128×256 images: RPN proposals, R-CNN class logits and deltas, and final detections."""
    tv_model = randomised_torchvision_frcnn(name)
    ours = torchvision_frcnn_by_name(name, tv_model, tmp_path, offline_torch_home)
    assert isinstance(ours, FasterRCNN) and ours.names == COCO80_NAMES
    tv_rpn = tv_model.rpn
    for mode, settings in (("training", ours.head.rpn.train_proposals), ("testing", ours.head.rpn.test_proposals)):
        assert settings == (tv_rpn._pre_nms_top_n[mode], tv_rpn._post_nms_top_n[mode], tv_rpn.nms_thresh,
                            tv_rpn.min_size, tv_rpn.score_thresh)  # the YAML's proposal settings are torchvision's
    # Both keep every anchor before NMS (torchvision's is 1000 per level, 150 for _320_fpn): a per-level top-k cut
    # between two logits 1e-6 apart would compare float rounding (which anchor wins the last place), not the two
    # implementations.
    tv_model.rpn._pre_nms_top_n["testing"] = 10_000
    ours.head.rpn.test_proposals = ours.head.rpn.test_proposals._replace(pre_nms=10_000)

    height, width = 128, 256
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        normalised = (images - TV_MEAN) / TV_STD
        image_list = ImageList(normalised, [(height, width)] * 2)
        feats = tv_model.backbone(normalised)
        objectness = torch.cat([o.flatten() for o in tv_rpn.head(list(feats.values()))[0]]).sigmoid()
        proposals, _ = tv_model.rpn(image_list, feats)  # eval: NMS 0.7 per level, 1000 (320: 150) per image
        pooled = tv_model.roi_heads.box_roi_pool(feats, proposals, image_list.image_sizes)
        logits, deltas = tv_model.roi_heads.box_predictor(tv_model.roi_heads.box_head(pooled))
        expected, _ = tv_model.roi_heads(feats, proposals, image_list.image_sizes)  # 0.05, NMS 0.5, 100
        outputs = ours(images)
        dets = ours.predict(images, conf=0.05, iou=0.5, max_det=100)
    assert (objectness < tv_rpn.score_thresh).any() == (tv_rpn.score_thresh > 0)  # MobileNetV3: the threshold bites
    ours_rois = []
    for i, tv_boxes in enumerate(proposals):
        assert len(tv_boxes) == int(outputs.proposals.counts[i]) >= 150
        order = matching(outputs.proposals.boxes[i, : len(tv_boxes)], tv_boxes)  # near-tied scores may swap places
        torch.testing.assert_close(outputs.proposals.boxes[i, order], tv_boxes, atol=1e-4, rtol=1e-6)
        ours_rois.append(order + sum(len(b) for b in proposals[:i]))
    order = torch.cat(ours_rois)  # our RoI row of each torchvision RoI
    slots = [*COCO80_TO_91, 0]
    torch.testing.assert_close(outputs.rcnn.cls_score[order], logits[:, slots], atol=1e-4, rtol=0)
    ours_deltas = outputs.rcnn.bbox_pred.unflatten(1, (-1, 4))[order]
    torch.testing.assert_close(ours_deltas, deltas.unflatten(1, (-1, 4))[:, slots], atol=1e-4, rtol=0)
    for found, wanted in zip(dets, expected, strict=True):
        assert len(found.boxes) == len(wanted["boxes"]) > 10
        order = matching(found.boxes, wanted["boxes"])
        torch.testing.assert_close(found.boxes[order], wanted["boxes"], atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(found.scores[order], wanted["scores"], atol=1e-4, rtol=0)
        assert torch.equal(found.labels[order], torch.tensor(COCO91_TO_80)[wanted["labels"]])


def matching(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Index [N] of the row of `ours` [N, 4] nearest each row of `theirs` [N, 4], each row of `ours` taken once: a
    permutation. Rows may repeat a box (NMS runs per FPN level, so two levels can keep the same clipped box); the
    copies are interchangeable, so a repeated row takes the nearest copy still free."""
    distances = torch.cdist(theirs, ours, p=float("inf"))  # [N, N]
    order, taken = [], set()
    for row in distances:
        order.append(next(j for j in row.argsort().tolist() if j not in taken))
        taken.add(order[-1])
    return torch.tensor(order)


# ----- CrossKD cross-head pass ---------------------------------------------------------------------------------------
def reference_cross_head_losses(teacher, student_feats, teacher_feats, rois):
    """The authors' Faster R-CNN cross-head pass rewritten in plain torch (facts: crosskd-reference-facts.md):
    torchvision's roi_align per level, the teacher's FC weights applied by hand, KL at T = 3 and the weighted L1."""
    head = teacher.head.roi_head

    def rcnn(feats):
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()  # MMDetection's SingleRoIExtractor
        pooled = torch.zeros(len(rois), feats[0].shape[1], 7, 7)
        for lvl, stride in enumerate((4, 8, 16, 32)):
            pick = level == lvl
            pooled[pick] = roi_align(feats[lvl], rois[pick], 7, 1 / stride, 0, True)
        x = pooled.flatten(1)
        for fc in head.fcs:
            x = F.relu(x @ fc.weight.T + fc.bias)
        return x @ head.cls.weight.T + head.cls.bias, x @ head.reg.weight.T + head.reg.bias

    cross_cls, cross_reg = rcnn(student_feats)
    with torch.no_grad():
        t_cls, t_reg = rcnn(teacher_feats)
    T = 3.0
    kl = F.kl_div(F.log_softmax(cross_cls / T, 1), F.softmax(t_cls / T, 1), reduction="none").sum(1) * T * T
    eps = torch.finfo(torch.float32).eps
    kd_cls = 0.5 * kl.sum() / (len(rois) + eps)
    weight, best = F.softmax(t_cls, 1)[:, :-1].max(1)
    rows = torch.arange(len(rois))
    diff = (cross_reg.view(len(rois), -1, 4)[rows, best] - t_reg.view(len(rois), -1, 4)[rows, best]).abs()
    kd_reg = 1.0 * (diff * weight[:, None]).sum() / (4 * weight.sum() + eps)
    return {"kd_cls": kd_cls, "kd_reg": kd_reg}


def test_crosskd_cross_head_pass_matches_plain_torch_rewrite():
    batch = tiny_batch()
    torch.manual_seed(0)
    student = build_detector(SMALL, 3).train()
    teacher = build_detector(SMALL, 3).eval()  # same FPN width: no adapter needed, as R18 → R50 at 256
    with torch.no_grad():
        for p in teacher.head.roi_head.cls.parameters():
            p.normal_(0, 0.5)  # a confident teacher
    torch.manual_seed(1)
    expected_losses = student.loss(batch)
    torch.manual_seed(1)
    student_pass = student.loss_and_rois(batch)  # the student's own losses are unchanged by the KD hook
    for key, value in expected_losses.items():
        torch.testing.assert_close(student_pass.losses[key], value, atol=0, rtol=0)
    assert student_pass.rois.shape[0] > 100
    with torch.no_grad():
        teacher_feats = teacher.extract_features(batch.images)
    cross = frcnn_cross_head(teacher.head.roi_head, student_pass.feats, teacher_feats, student_pass.rois)
    ours = frcnn_crosskd_losses(teacher.head.roi_head, cross)
    reference = reference_cross_head_losses(teacher, student_pass.feats, teacher_feats, student_pass.rois)
    for key in ("kd_cls", "kd_reg"):
        assert ours[key].item() > 0
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)
    grads = torch.autograd.grad(ours["kd_cls"] + ours["kd_reg"], student.neck.parameters(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the KD reaches the student
    assert all(p.grad is None for p in teacher.parameters())


def test_cross_head_pass_runs_a_conv_fc_teacher_head():
    """A v2-style teacher (conv-BN-ReLU box head): the cross-head pass runs its convs and FC on the student's RoI
    features, in eval (running BN statistics), and its KD reaches the student."""
    batch = tiny_batch()
    torch.manual_seed(0)
    student = build_detector(SMALL, 3).train()
    teacher = build_detector(v2_style_small(), 3).eval()
    student_pass = student.loss_and_rois(batch)
    with torch.no_grad():
        teacher_feats = teacher.extract_features(batch.images)
    roi_head = teacher.head.roi_head
    cross = frcnn_cross_head(roi_head, student_pass.feats, teacher_feats, student_pass.rois)
    pooled = roi_head.pool(student_pass.feats, student_pass.rois)
    split = roi_head.forward_from(roi_head.forward_tower(pooled, 2), 2)  # after the two conv steps
    torch.testing.assert_close(cross.cross.cls_score, split.cls_score, atol=1e-6, rtol=0)
    losses = frcnn_crosskd_losses(roi_head, cross)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    grads = torch.autograd.grad(sum(losses.values()), student.neck.parameters(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert not roi_head.convs[0].norm.training and all(p.grad is None for p in teacher.parameters())
