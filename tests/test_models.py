"""Backbones, FPN, the YAML builder, the DenseDetector, post-processing and model info."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.models.detection.backbone_utils import _mobilenet_extractor

from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.tools.info import gflops, model_info, run
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import Detections, build_detector, postprocess, scale_boxes
from crosskd.models.backbones import MobileNetV2, MobileNetV3Large, ResNet, SwinT
from crosskd.models.neck import FPN
from crosskd.paths import CFG_DIR

MODELS_DIR = CFG_DIR / "models"
SHIPPED = sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
SMALL = ["gfl_r18s", "gfl_r18t", "gfl_r34s", "retinanet_r18s", "fcos_r18s", "atss_r18s"]
FULL_SIZE = ("_r50", "_r101", "_swin")  # name parts of the full-size models, whose tests are marked slow
DENSE = [n for n in SHIPPED if not n.startswith(("faster_rcnn", "yolo"))]  # see test_faster_rcnn, test_yolo_models
SHIPPED_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if any(k in n for k in FULL_SIZE) else n for n in DENSE]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_yaml(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def small_cfg() -> dict:
    return yaml.safe_load((MODELS_DIR / "gfl_r18t.yaml").read_text())


# ----- shipped models ----------------------------------------------------------------------------------------------
def test_every_required_model_is_shipped():
    required = {"gfl_r18", "gfl_r34", "gfl_r50", "gfl_r101", "retinanet_r18", "retinanet_r50", "retinanet_r101"}
    required |= {"fcos_r50", "fcos_r101", "atss_r50", "atss_r101", "retinanet_swint", "gfl_mobilenetv2", *SMALL}
    assert required <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED_PARAMS)
def test_shipped_yaml_builds_and_runs_forward(name):
    detector = build_detector(name, nc=5).eval()
    assert detector.yaml["nc"] == 5 and detector.yaml["name"] == name
    assert detector.strides == [8, 16, 32, 64, 128] and detector.nc == 5
    assert detector.head_type == name.split("_")[0]
    with torch.no_grad():
        out = detector(torch.rand(1, 3, 64, 64))
    sizes = [tuple(m.shape[-2:]) for m in out.cls_scores]
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert out.cls_scores[0].shape[1] == detector.head.num_anchors * 5
    assert all(torch.isfinite(m).all() for m in out.cls_scores + out.bbox_preds)


@pytest.mark.parametrize("name", ["gfl_r18s", "retinanet_r18s", "fcos_r18s", "atss_r18s"])
def test_small_model_train_step(name):
    detector = build_detector(name, nc=3).train()
    batch = SimpleNamespace(
        images=torch.rand(2, 3, 128, 128),
        gt_boxes=torch.tensor([[[10.0, 12.0, 50.0, 60.0], [0, 0, 0, 0]], [[30.0, 40.0, 100.0, 120.0], [4, 4, 30, 28]]]),
        gt_labels=torch.tensor([[0, -1], [1, 2]]),
    )
    losses = detector.loss(batch)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in detector.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    outputs = detector(batch.images)  # loss() is the thin composition of the head's pieces
    priors = detector.priors_for(outputs)
    pieces = detector.head.loss(outputs, priors, detector.head.get_targets(priors, batch))
    assert pieces.keys() == losses.keys()


def test_detector_weights_are_channels_last_and_match_nchw():
    detector = build_detector("gfl_r18s", nc=3).eval()
    convs = [m.weight for m in detector.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    nchw = build_detector("gfl_r18s", nc=3).eval()
    nchw.load_state_dict(detector.state_dict())
    nchw.to(memory_format=torch.contiguous_format)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ours, plain = detector(images), nchw(images)
    for a, b in zip(ours.cls_scores + ours.bbox_preds, plain.cls_scores + plain.bbox_preds):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----- backbones ---------------------------------------------------------------------------------------------------
def test_resnet_keys_equal_torchvision_and_width_multiplier():
    ours = set(ResNet(depth=18).state_dict())
    theirs = {k for k in resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert ours == theirs
    assert ResNet(depth=50).out_channels == [512, 1024, 2048]
    half = ResNet(depth=18, width=0.5, out_indices=(0, 1, 2, 3))
    assert half.out_channels == [32, 64, 128, 256]
    feats = half(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_resnet_frozen_stages_and_norm_eval():
    net = ResNet(depth=18, width=0.25, frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    assert not net.layer1.training and not net.layer2[0].bn1.training  # norm_eval: every BN stays in eval
    assert net.layer2[0].conv1.training
    free = ResNet(depth=18, width=0.25, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in free.parameters()) and free.bn1.training


@pytest.mark.slow
def test_mobilenet_and_swin_outputs():
    mobile = MobileNetV2(width=1.0)
    assert mobile.out_channels == [32, 96, 320]
    assert [f.shape[-1] for f in mobile(torch.rand(1, 3, 64, 64))] == [8, 4, 2]
    swin = SwinT(drop_path_rate=0.0).eval()
    assert swin.out_channels == [192, 384, 768]
    feats = swin(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(192, 8, 8), (384, 4, 4), (768, 2, 2)]


@pytest.mark.parametrize("trainable_layers", [0, 3, 6])
def test_mobilenet_v3_stages_and_frozen_layers_are_torchvision_extractors(trainable_layers):
    """Stage k is torchvision's returned layer k (_mobilenet_extractor) and frozen_stages 5 − t freezes what its
    trainable_layers t does."""
    torch.manual_seed(0)
    ours = MobileNetV3Large(out_indices=range(6), frozen_stages=5 - trainable_layers).eval()
    theirs = _mobilenet_extractor(mobilenet_v3_large(norm_layer=nn.BatchNorm2d), True, trainable_layers,
                                  returned_layers=list(range(6))).body.eval()
    theirs.load_state_dict(ours.features.state_dict())
    images = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        feats, expected = ours(images), list(theirs(images).values())
    assert ours.out_channels == [f.shape[1] for f in expected] == [16, 24, 40, 80, 160, 960]
    assert ours.strides == [2, 4, 8, 16, 32, 32] == [64 // f.shape[-2] for f in expected]
    for feat, wanted in zip(feats, expected, strict=True):
        torch.testing.assert_close(feat, wanted, atol=0, rtol=0)
    trainable = [[p.requires_grad for p in layer.parameters()] for layer in ours.features]
    assert trainable == [[p.requires_grad for p in layer.parameters()] for layer in theirs.children()]


# ----- neck ----------------------------------------------------------------------------------------------------------
def test_fpn_extra_levels_and_relu_placement():
    feats = [torch.randn(1, c, s, s) for c, s in ((8, 8), (16, 4), (32, 2))]
    fpn = FPN([8, 16, 32], out_channels=12, add_extra_convs="on_output", relu_before_extra_convs=True)
    outs = fpn(feats)
    assert [tuple(o.shape[1:]) for o in outs] == [(12, 8, 8), (12, 4, 4), (12, 2, 2), (12, 1, 1), (12, 1, 1)]
    p6_conv, p7_conv = fpn.fpn.extra_blocks.convs
    assert torch.allclose(outs[3], p6_conv(outs[2]))  # no ReLU before the first extra conv (MMDet)
    assert torch.allclose(outs[4], p7_conv(F.relu(outs[3])))
    on_input = FPN([8, 16, 32], out_channels=12, add_extra_convs="on_input")
    assert on_input.fpn.extra_blocks.convs[0].in_channels == 32
    assert torch.allclose(on_input(feats)[3], on_input.fpn.extra_blocks.convs[0](feats[2]))


# ----- builder errors ------------------------------------------------------------------------------------------------
def test_bad_head_type_names_the_field(tmp_path):
    cfg = small_cfg()
    cfg["head"]["type"] = "gfll"
    with pytest.raises(ConfigError) as e:
        build_detector(write_yaml(tmp_path, "gfl_bad.yaml", cfg), nc=3)
    assert str(e.value) == "gfl_bad.yaml: head.type 'gfll' is not one of gfl, retinanet, fcos, atss, faster_rcnn, yolo"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("head", "stacked_conv", 2, r"head.stacked_conv is not an argument of gfl; did you mean 'stacked_convs'\?"),
        ("head", "stacked_convs", "two", r"head.stacked_convs 'two' must be int"),
        ("head", "num_groups", 5, r"head.num_groups 5 must divide head.feat_channels 32"),
        ("backbone", "depth", 19, r"backbone.depth 19 is not one of 18, 34, 50, 101"),
        ("backbone", "norm_eval", "yes", r"backbone.norm_eval 'yes' must be bool"),
        ("backbone", "style", "coffee", r"backbone.style 'coffee' is not one of pytorch, caffe"),
        ("neck", "add_extra_convs", "on_top", r"neck.add_extra_convs 'on_top' is not one of on_input, on_output"),
        ("head", "strides", [8, 16, 32, 64, 256], r"head.strides \[8, 16, 32, 64, 256\] must be"),
    ],
)
def test_bad_field_is_one_line_config_error(tmp_path, section, key, value, message):
    cfg = small_cfg()
    cfg[section][key] = value
    with pytest.raises(ConfigError, match=rf"^m.yaml: {message}") as e:
        build_detector(write_yaml(tmp_path, "m.yaml", cfg), nc=3)
    assert "\n" not in str(e.value)


def test_missing_section_unknown_section_and_missing_file(tmp_path):
    cfg = small_cfg()
    del cfg["neck"]
    with pytest.raises(ConfigError, match="missing 'neck' section"):
        build_detector(write_yaml(tmp_path, "a.yaml", cfg), nc=3)
    cfg = {**small_cfg(), "heads": {}}
    with pytest.raises(ConfigError, match="unknown section 'heads'; did you mean 'head'"):
        build_detector(write_yaml(tmp_path, "b.yaml", cfg), nc=3)
    with pytest.raises(ConfigError, match="'.*nope.yaml' is neither a file nor a YAML in .*gfl_r50.yaml"):
        build_detector(tmp_path / "nope.yaml", nc=3)
    with pytest.raises(ConfigError, match="number of classes 0"):
        build_detector("gfl_r18t", nc=0)


def test_build_from_dict_round_trips():
    detector = build_detector("gfl_r18t", nc=4)
    again = build_detector(detector.yaml, nc=4)
    assert again.yaml == detector.yaml
    again.load_state_dict(detector.state_dict())
    assert "mean" not in detector.state_dict()  # normalisation buffers are not persistent


# ----- post-processing -----------------------------------------------------------------------------------------------
def test_postprocess_threshold_nms_classes_and_images():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.zeros(2, 4, 2)
    scores[0, :, 0] = torch.tensor([0.9, 0.8, 0.0, 0.04])  # box 1 overlaps box 0 (same class): suppressed
    scores[0, 2, 1] = 0.7  # same place, other class: kept
    scores[0, 3, 1] = 0.04  # below conf: dropped
    scores[1, 1, 0] = 0.6  # other image: not suppressed by image 0
    dets = postprocess(boxes.expand(2, -1, -1), scores, [4], conf=0.05, iou=0.5)
    assert isinstance(dets[0], Detections)
    assert dets[0].scores.tolist() == pytest.approx([0.9, 0.7]) and dets[0].labels.tolist() == [0, 1]
    assert dets[1].boxes.tolist() == [[1, 1, 11, 11]] and dets[1].labels.tolist() == [0]


def test_postprocess_topk_per_level_and_max_det():
    num = 20
    boxes = torch.stack([torch.tensor([i * 20.0, 0, i * 20 + 10, 10]) for i in range(num)])[None]  # disjoint
    scores = torch.linspace(0.1, 0.9, num).view(1, num, 1)
    dets = postprocess(boxes, scores, [10, 10], conf=0.05, nms_pre=2)  # 2 best of each level
    kept = sorted(round(s, 4) for s in dets[0].scores.tolist())
    expected = sorted(round(s, 4) for s in scores[0, [8, 9, 18, 19], 0].tolist())
    assert kept == expected
    capped = postprocess(boxes.expand(2, -1, -1), scores.expand(2, -1, -1), [10, 10], conf=0.05, max_det=3)
    assert [len(d.scores) for d in capped] == [3, 3]
    assert capped[1].scores.tolist() == pytest.approx(scores[0, -3:, 0].flip(0).tolist())
    empty = postprocess(boxes, scores, [10, 10], conf=0.95)
    assert empty[0].boxes.shape == (0, 4) and empty[0].labels.dtype == torch.int64


def test_scale_boxes_and_predict_in_original_pixels():
    assert scale_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), 0.5).tolist() == [[20, 40, 60, 80]]
    detector = build_detector("gfl_r18t", nc=2).eval()
    images = torch.rand(2, 3, 64, 64)
    plain = detector.predict(images, conf=0.0, iou=1.0, max_det=5)  # at init all boxes overlap: no NMS
    scaled = detector.predict(images, conf=0.0, iou=1.0, max_det=5, ratios=torch.tensor([0.5, 2.0]))
    assert torch.allclose(scaled[0].boxes, plain[0].boxes * 2) and torch.allclose(scaled[1].boxes, plain[1].boxes / 2)
    assert all(len(d.scores) == 5 for d in plain)  # max_det
    assert all((d.boxes >= 0).all() and (d.boxes <= 64).all() for d in plain)  # clipped to the input


# ----- info ----------------------------------------------------------------------------------------------------------
def test_gflops_counts_two_per_multiply_add():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert gflops(conv, 16) == pytest.approx(2 * 8 * 3 * 9 * 16 * 16 / 1e9)


def test_model_info_summary_line():
    detector = build_detector("gfl_r18t", nc=80)
    line = model_info(detector, 640)
    params = sum(p.numel() for p in detector.parameters())
    assert line.startswith("gfl_r18t summary: ") and f"{params:,} parameters" in line and line.endswith("at 640x640")
    reported = float(line.split(", ")[-1].split(" ")[0])
    assert reported == pytest.approx(gflops(detector, 640), abs=0.05)
    assert 2 * 16 * 3 * 7 * 7 * 320 * 320 / 1e9 < reported < 10  # more than the stem conv alone
    assert detector.training  # restored


def test_info_run_prints_table_and_reads_checkpoints(tmp_path, capsys):
    args = SimpleNamespace(model="gfl_r18t.yaml", imgsz=64, data=None, datasets_dir=str(tmp_path))
    summary = run(args)
    assert "gfl_r18t summary:" in summary and "head.gfl_cls" in capsys.readouterr().out
    detector = build_detector("gfl_r18t", nc=7)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(make_checkpoint(detector, epoch=-1, best_fitness=None, names={}, train_args={}), ckpt)
    params = sum(p.numel() for p in detector.parameters())
    assert f"{params:,} parameters" in run(SimpleNamespace(model=str(ckpt), imgsz=64, data=None))
    torch.save({"model_yaml": detector.yaml, "model": detector.state_dict()}, ckpt)  # what val would reject too
    with pytest.raises(CheckpointError, match="neither a crosskd checkpoint"):
        run(SimpleNamespace(model=str(ckpt), imgsz=64, data=None))
    data = write_yaml(tmp_path, "three.yaml", {"path": "nowhere", "train": "t", "val": "v", "names": ["a", "b", "c"]})
    three = sum(p.numel() for p in build_detector("gfl_r18t", nc=3).parameters())
    assert f"{three:,} parameters" in run(SimpleNamespace(model="gfl_r18t", imgsz=64, data=str(data)))
    with pytest.raises(ConfigError, match="info needs model="):
        run(SimpleNamespace(model=None, imgsz=64, data=None))
