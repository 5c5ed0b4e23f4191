"""torchvision COCO detectors as crosskd models: raw outputs and detections equal torchvision's own.

The equivalence test builds torchvision's model with weights=None from a fixed seed, writes its state dict under the
exact real file name into a temporary TORCH_HOME (in the real checkpoint's key layout), loads it by name with the
network cut off, and feeds both models the same image.
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from crosskd.errors import CheckpointError, ConfigError
from crosskd.models.foreign.torchvision_detection import (
    COCO80_NAMES,
    COCO80_TO_91,
    COCO91_TO_80,
    coco80_rows,
    load_torchvision_detector,
    torchvision_name,
    torchvision_state_dict,
    weights_file_name,
)
from crosskd.models.heads import FCOSHead, RetinaHead
from crosskd.models.heads.base import FlatOutputs
from crosskd.ops.boxes import delta_xywh_decode, make_anchors

HEIGHT, WIDTH = 128, 256  # non-square, a multiple of the largest stride as crosskd pads inputs
REAL_FILES = {
    "retinanet_resnet50_fpn": "retinanet_resnet50_fpn_coco-eeacb38b.pth",
    "retinanet_resnet50_fpn_v2": "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    "fcos_resnet50_fpn": "fcos_resnet50_fpn_coco-99b0c9b7.pth",
}
FROZEN_BN = {"retinanet_resnet50_fpn", "fcos_resnet50_fpn"}  # their COCO files hold FrozenBatchNorm2d tensors
POST = {"conf": 0.05, "iou": 0.5, "max_det": 100, "nms_pre": 1000}
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)



def randomised_torchvision(name: str) -> nn.Module:
    """torchvision's model (91 slots) from seed 0 with non-trivial norms and heads; unused COCO slots never fire."""
    torch.manual_seed(0)
    model = getattr(tv_detection, name)(weights=None, weights_backbone=None, num_classes=91)
    head_std = 0.01 if name == "retinanet_resnet50_fpn" else 0.03  # plain (no-norm) towers grow faster
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.eps = 0.0 if name == "retinanet_resnet50_fpn" else module.eps  # as torchvision's COCO_V1 load
        for param in model.head.parameters():
            param.normal_(0, head_std if param.dim() == 4 else 0.1)
        unused = torch.ones(91, dtype=torch.bool)
        unused[list(COCO80_TO_91)] = False
        model.head.classification_head.cls_logits.bias.view(-1, 91)[:, unused] = -20.0  # as trained weights
    return model.eval()


def real_layout(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key set of the real COCO file: no BN counters under FrozenBN, v1's pre-0.13 head keys (conv.{2i})."""
    out = OrderedDict()
    for key, tensor in state.items():
        if name in FROZEN_BN and key.endswith("num_batches_tracked"):
            continue
        if name == "retinanet_resnet50_fpn" and ".conv." in key and key.startswith("head."):
            prefix, step, _, param = key.rsplit(".", 3)
            key = f"{prefix}.{2 * int(step)}.{param}"
        out[key] = tensor
    return out


def torchvision_raw(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's head outputs [B, HWA, K] on our normalisation, bypassing its resizing transform."""
    features = list(model.backbone((images - MEAN) / STD).values())
    return model.head(features), features


def canonical(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Detections as rows [score, label, x1, y1, x2, y2] sorted by score, then label and box (ties in any order)."""
    rows = torch.cat([scores[:, None], labels[:, None].float(), boxes], dim=1)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i, 0].item(), *rows[i, 1:].tolist()))
    return rows[order]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_FILES))
def test_outputs_and_detections_equal_torchvision(name, offline_torch_home):
    tv_model = randomised_torchvision(name)
    offline_torch_home.mkdir(parents=True)
    torch.save(real_layout(name, tv_model.state_dict()), offline_torch_home / REAL_FILES[name])
    ours = load_torchvision_detector(name)
    assert ours.names == COCO80_NAMES and ours.nc == 80

    images = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw, features = torchvision_raw(tv_model, images)
        outputs = ours(images)
        flat = ours.head.flatten_outputs(outputs)
        tv_anchors = tv_model.anchor_generator(ImageList(images, [(HEIGHT, WIDTH)]), features)[0]
    used = list(COCO80_TO_91)
    assert (flat.cls - raw["cls_logits"][..., used]).abs().max() <= 1e-5
    assert (flat.reg - raw["bbox_regression"]).abs().max() <= 1e-5
    if "bbox_ctrness" in raw:
        assert (flat.ctr - raw["bbox_ctrness"][..., 0]).abs().max() <= 1e-5
    priors = ours.priors_for(outputs)
    if name.startswith("retinanet"):
        assert torch.equal(priors.boxes, tv_anchors)
    else:  # FCOS points are the centres of torchvision's stride-sized anchors
        assert torch.equal(priors.points, (tv_anchors[:, :2] + tv_anchors[:, 2:]) / 2)

    tv_model.score_thresh, tv_model.nms_thresh = POST["conf"], POST["iou"]
    tv_model.detections_per_img, tv_model.topk_candidates = POST["max_det"], POST["nms_pre"]
    tv_model.transform.min_size, tv_model.transform.max_size = (HEIGHT,), WIDTH  # no resizing
    with torch.no_grad():
        expected = tv_model(list(images))[0]
    dets = ours.predict(images, **POST)[0]
    assert len(dets.boxes) > 10 and len(dets.boxes) == len(expected["boxes"])
    expected_labels = torch.tensor(COCO91_TO_80)[expected["labels"]]
    assert (expected_labels >= 0).all()
    ours_rows = canonical(dets.boxes, dets.scores, dets.labels)
    tv_rows = canonical(expected["boxes"], expected["scores"], expected_labels)
    assert torch.equal(ours_rows[:, 1], tv_rows[:, 1])
    assert (ours_rows - tv_rows).abs().max() <= 1e-3


def test_offline_and_not_cached_is_one_line_naming_file_and_folder(offline_torch_home):
    with pytest.raises(CheckpointError) as error:
        torchvision_state_dict("retinanet_resnet50_fpn_v2")
    message = str(error.value)
    assert "\n" not in message
    assert "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth" in message
    assert str(offline_torch_home) in message


def test_cached_file_is_read_without_network(offline_torch_home):
    offline_torch_home.mkdir(parents=True)
    state = {"head.classification_head.cls_logits.bias": torch.arange(9 * 91.0)}
    torch.save(state, offline_torch_home / REAL_FILES["fcos_resnet50_fpn"])
    loaded = torchvision_state_dict("fcos_resnet50_fpn")
    assert torch.equal(loaded["head.classification_head.cls_logits.bias"], state[next(iter(state))])


def test_unreadable_cached_file_is_one_line(offline_torch_home):
    offline_torch_home.mkdir(parents=True)
    (offline_torch_home / REAL_FILES["retinanet_resnet50_fpn"]).write_bytes(b"truncated download")
    with pytest.raises(CheckpointError, match="cannot read cached .*retinanet_resnet50_fpn_coco-eeacb38b.pth") as error:
        torchvision_state_dict("retinanet_resnet50_fpn")
    assert "\n" not in str(error.value)


def test_local_file_plain_or_reference_checkpoint(tmp_path):
    state = {"backbone.body.conv1.weight": torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(0))}
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state, "epoch": 25}, tmp_path / "checkpoint.pth")  # torchvision references' train.py
    for file in ("plain.pth", "checkpoint.pth"):
        loaded = torchvision_state_dict("fcos_resnet50_fpn", tmp_path / file)
        assert torch.equal(loaded["backbone.body.conv1.weight"], state["backbone.body.conv1.weight"])
    with pytest.raises(CheckpointError, match="missing.pth' not found"):
        torchvision_state_dict("fcos_resnet50_fpn", tmp_path / "missing.pth")


def test_names_and_real_file_names():
    assert torchvision_name("torchvision:retinanet_resnet50_fpn_v2") == "retinanet_resnet50_fpn_v2"
    assert torchvision_name("/weights/fcos_resnet50_fpn_coco-99b0c9b7.pth") == "fcos_resnet50_fpn"
    assert torchvision_name("runs/train/weights/best.pt") is None
    assert {name: weights_file_name(name) for name in REAL_FILES} == REAL_FILES
    with pytest.raises(ConfigError, match="unknown torchvision detector 'retinanet_r50'; valid: retinanet_resnet50"):
        torchvision_name("torchvision:retinanet_r50")


def test_coco_91_slots_map_to_80_contiguous_classes():
    assert len(COCO80_TO_91) == 80 and len(COCO91_TO_80) == 91
    assert (COCO80_NAMES[0], COCO80_NAMES[11], COCO80_NAMES[79]) == ("person", "stop sign", "toothbrush")
    assert (COCO80_TO_91[0], COCO80_TO_91[11], COCO80_TO_91[79]) == (1, 13, 90)  # COCO category ids
    assert COCO91_TO_80[0] == COCO91_TO_80[12] == -1 and COCO91_TO_80[13] == 11
    assert all(COCO91_TO_80[slot] == i for i, slot in enumerate(COCO80_TO_91))


def test_classifier_rows_keep_the_80_used_slots_per_anchor():
    rows = coco80_rows(torch.arange(9 * 91.0)[:, None])  # row = anchor * 91 + slot
    assert rows.shape == (9 * 80, 1)
    assert rows[80, 0] == 91 + 1 and rows[11, 0] == 13 and rows[-1, 0] == 8 * 91 + 90
    assert coco80_rows(torch.zeros(9 * 80, 1)).shape == (9 * 80, 1)  # not 91 slots: left for the shape check


def test_rounded_per_level_anchors_equal_torchvision_anchor_generator():
    sizes = [[32, 40, 50], [64, 80, 101]]
    generator = AnchorGenerator(tuple(tuple(s) for s in sizes), ((0.5, 1.0, 2.0),) * 2)
    images = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
    expected = torch.cat(generator(images, [torch.zeros(1, 1, 8, 12), torch.zeros(1, 1, 4, 6)]))
    ours = make_anchors([(8, 12), (4, 6)], [8, 16], [1.0, 1.0], sizes, [0.5, 1.0, 2.0], "cpu", round_corners=True)
    assert torch.equal(ours, expected)
    assert not torch.equal(make_anchors([(8, 12), (4, 6)], [8, 16], [1.0, 1.0], sizes, [0.5, 1.0, 2.0], "cpu"), ours)


def test_torchvision_fcos_head_options():
    options = {"norm_on_bbox": True, "conv_bias": True, "use_scale": False, "point_offset": 0.0, "sqrt_scores": True}
    head = FCOSHead(
        3, 8, 8, 1, num_groups=4, strides=(8, 16), regress_ranges=((0, 64),) * 2, **options
    )
    assert head.scales is None and head.cls_convs[0].conv.bias is not None
    assert "scales.0.scale" not in head.state_dict()
    priors = head.priors([(2, 2), (1, 1)], "cpu")
    assert priors.points.tolist() == [[0, 0], [8, 0], [0, 8], [8, 8], [0, 0]]  # index × stride
    flat = FlatOutputs(torch.tensor([[[0.0, 2.0, -1.0]]]), torch.zeros(1, 1, 4), torch.tensor([[1.0]]))
    assert torch.allclose(head.scores(flat), (flat.cls.sigmoid() * torch.tensor(1.0).sigmoid()).sqrt())
    outputs = head([torch.randn(1, 8, 2, 2), torch.randn(1, 8, 1, 1)])
    assert (outputs.bbox_preds[0] >= 0).all()  # relu distances in stride units


def test_explicit_anchor_sizes_set_the_anchors_per_location():
    sizes = [[32, 40, 50], [64, 80, 101]]
    head = RetinaHead(2, 8, feat_channels=8, stacked_convs=1, strides=(8, 16), anchor_sizes=sizes, round_anchors=True)
    assert head.num_anchors == 9 and head.retina_cls.out_channels == 9 * 2
    expected = make_anchors([(1, 1), (1, 1)], [8, 16], [1.0, 1.0], sizes, [0.5, 1.0, 2.0], "cpu", round_corners=True)
    assert torch.equal(head.priors([(1, 1), (1, 1)], "cpu").boxes, expected)
    with pytest.raises(ConfigError, match="head.anchor_sizes .* one equally long, non-empty list per stride"):
        RetinaHead(2, 8, feat_channels=8, stacked_convs=1, strides=(8, 16), anchor_sizes=[[32, 40], [64]])


def test_delta_decode_clamps_like_torchvision_box_coder():
    anchors = torch.tensor([[10.0, 20.0, 42.0, 84.0]] * 3)
    deltas = torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.0, 0.0, 6.0, 5.0], [0.5, 0.5, -6.0, -7.0]])  # beyond ±log(62.5)
    expected = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchors)
    assert torch.allclose(delta_xywh_decode(anchors, deltas, clamp_below=False), expected, atol=1e-4)
    assert not torch.allclose(delta_xywh_decode(anchors, deltas), expected, atol=1e-4)  # MMDet clamps both ways
