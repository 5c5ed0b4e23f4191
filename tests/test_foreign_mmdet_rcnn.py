"""MMDetection 2.x/3.x Faster R-CNN checkpoints: state dicts written with MMDetection's own key names and shapes
(RPNHead `rpn_conv/rpn_cls/rpn_reg`, Shared2FCBBoxHead `shared_fcs.{0,1}`, `fc_cls` with the background last,
`fc_reg` 4 per class), never by inverting crosskd's key map; loaded directly, as `teacher=` of a distillation and as
`model=` of val. The R50 layout's parameter count is checked against MMDetection's, derived from its layer shapes.
"""

import math
from pathlib import Path

import pytest
import torch
from test_foreign_mmdet import expected_target, make_source, mmdet_ckpt, mmdet_fpn, mmdet_resnet

from crosskd.config import get_args
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.errors import CheckpointError
from crosskd.models.foreign.mmdet import is_mmdet_checkpoint, load_mmdet, mmdet_model_cfg
from crosskd.models.two_stage import FasterRCNN

Shapes = dict[str, tuple[int, ...]]
SMALL = {"base": 32, "out": 64, "rpn": 64, "fc": 256}  # faster_rcnn_r18s.yaml
FULL = {"base": 64, "out": 256, "rpn": 256, "fc": 1024}  # faster-rcnn_r50_fpn_1x_coco
OURS = {  # MMDetection's module -> crosskd's, written out (mmdet_rcnn.py's table)
    "rpn_head.rpn_conv": "head.rpn.conv",
    "rpn_head.rpn_cls": "head.rpn.cls",
    "rpn_head.rpn_reg": "head.rpn.reg",
    "roi_head.bbox_head.shared_fcs.0": "head.roi_head.fcs.0",
    "roi_head.bbox_head.shared_fcs.1": "head.roi_head.fcs.1",
    "roi_head.bbox_head.fc_cls": "head.roi_head.cls",
    "roi_head.bbox_head.fc_reg": "head.roi_head.reg",
}


def mmdet_faster_rcnn(depth: int, nc: int, base: int, out: int, rpn: int, fc: int) -> Shapes:
    """MMDetection FasterRCNN: ResNet, FPN (P2–P5 + max-pooled P6: no extra convs), RPNHead with 3 anchors (sigmoid:
    one objectness row each), Shared2FCBBoxHead on 7×7 RoIs with fc_cls C+1 and fc_reg 4·C rows."""
    keys, widths = mmdet_resnet(depth, base)
    keys |= mmdet_fpn(widths, out, 4, on_input=False)
    keys |= {"rpn_head.rpn_conv.weight": (rpn, out, 3, 3), "rpn_head.rpn_conv.bias": (rpn,)}
    keys |= {"rpn_head.rpn_cls.weight": (3, rpn, 1, 1), "rpn_head.rpn_cls.bias": (3,)}
    keys |= {"rpn_head.rpn_reg.weight": (12, rpn, 1, 1), "rpn_head.rpn_reg.bias": (12,)}
    box = "roi_head.bbox_head"
    for name, rows, inputs in (("shared_fcs.0", fc, out * 7 * 7), ("shared_fcs.1", fc, fc), ("fc_cls", nc + 1, fc),
                               ("fc_reg", 4 * nc, fc)):
        keys |= {f"{box}.{name}.weight": (rows, inputs), f"{box}.{name}.bias": (rows,)}
    return keys


def target_of(key: str) -> str:
    module, _, param = key.rpartition(".")
    if module in OURS:
        return f"{OURS[module]}.{param}"
    return expected_target(key, num_levels=4)


def check_every_tensor_lands(detector: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    ours = detector.state_dict()
    for key, tensor in source.items():
        assert torch.equal(ours[target_of(key)], tensor.to(ours[target_of(key)].dtype)), key
    assert len(ours) == len(source)  # nothing of ours kept its initial value


# faster-rcnn_r50_fpn_1x_coco's model section as MMDetection 2.x stores it in meta['config'] (Config.pretty_text)
FRCNN_R50_CONFIG = """
model = dict(
    type='FasterRCNN',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100)))
dataset_type = 'CocoDataset'
"""
SMALL_CONFIG = (  # the same model at faster_rcnn_r18s.yaml's widths, as a user's config would write it
    FRCNN_R50_CONFIG.replace("depth=50,", "depth=18, base_channels=32,")
    .replace("frozen_stages=1", "frozen_stages=-1")
    .replace("norm_eval=True", "norm_eval=False")
    .replace("[256, 512, 1024, 2048]", "[32, 64, 128, 256]")
    .replace("out_channels=256", "out_channels=64")
    .replace("in_channels=256", "in_channels=64")
    .replace("feat_channels=256", "feat_channels=64")
    .replace("fc_out_channels=1024", "fc_out_channels=256")
    .replace("num_classes=80", "num_classes=3")
)
NAMES = ("person", "bicycle", "car")


def small_source(nc: int = 3) -> dict[str, torch.Tensor]:
    """The small model's tensors, seeded; BatchNorm variances positive so that the model computes finite outputs."""
    source = make_source(mmdet_faster_rcnn(18, nc, **SMALL))
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in source.items()}


def test_small_checkpoint_every_tensor_lands_and_nc_is_fc_cls_rows_minus_one():
    source = small_source()
    ckpt = mmdet_ckpt(source, {"mmdet_version": "2.28.2", "CLASSES": NAMES})
    assert is_mmdet_checkpoint(ckpt) and is_mmdet_checkpoint({"state_dict": source, "meta": {}})  # 3.x: by keys
    detector = load_mmdet(ckpt, "faster_rcnn_r18s.yaml", "frcnn_small.pth")
    assert isinstance(detector, FasterRCNN) and detector.nc == 3
    assert detector.names == {0: "person", 1: "bicycle", 2: "car"}
    check_every_tensor_lands(detector, source)


def test_config_text_gives_the_faster_rcnn_yaml():
    cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"config": FRCNN_R50_CONFIG}})
    assert cfg["name"] == "faster_rcnn_r50" and cfg["head"]["type"] == "faster_rcnn"
    assert cfg["neck"]["add_extra_convs"] == "max_pool" and cfg["backbone"]["out_indices"] == [0, 1, 2, 3]
    head = cfg["head"]
    assert (head["rpn_train_pre_nms"], head["rpn_train_post_nms"], head["rpn_nms_iou"]) == (2000, 1000, 0.7)
    assert (head["rcnn_num_samples"], head["rcnn_pos_fraction"], head["box_stds"]) == (512, 0.25, [0.1, 0.1, 0.2, 0.2])
    assert (head["roi_levels"], head["roi_size"], head["fc_channels"], head["num_fcs"]) == (4, 7, 1024, 2)
    altered = FRCNN_R50_CONFIG.replace("fc_out_channels=1024", "fc_out_channels=512")
    altered = altered.replace("scales=[8]", "scales=[4]")
    v3 = mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": altered, "mmengine_version": "0.7.3"}})
    assert (v3["head"]["fc_channels"], v3["head"]["rpn_anchor_scales"]) == (512, [4])


def test_small_checkpoint_loads_from_its_embedded_config_alone():
    source = small_source()
    meta = {"mmengine_version": "0.7.3", "cfg": SMALL_CONFIG, "dataset_meta": {"classes": NAMES}}
    detector = load_mmdet(mmdet_ckpt(source, meta), None, "frcnn_small.pth")
    assert detector.head.roi_head.fcs[0].in_features == 64 * 49 and detector.backbone.pretrained is None
    check_every_tensor_lands(detector, source)
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    assert len(detector.eval().predict(images, conf=0.0)) == 1


@pytest.mark.parametrize("change, message", [
    ("type='StandardRoIHead'", "RoI head 'CascadeRoIHead'"),
    ("reg_class_agnostic=False", "class-agnostic R-CNN box predictor"),
])
def test_what_crosskd_cannot_build_is_one_line(change, message):
    replacement = {"type='StandardRoIHead'": "type='CascadeRoIHead'",
                   "reg_class_agnostic=False": "reg_class_agnostic=True"}[change]
    text = SMALL_CONFIG.replace(change, replacement)
    with pytest.raises(CheckpointError, match=message) as error:
        load_mmdet(mmdet_ckpt(small_source(), {"config": text}), None, "other.pth")
    assert "\n" not in str(error.value)


def test_a_dense_yaml_for_a_faster_rcnn_checkpoint_is_one_line():
    with pytest.raises(CheckpointError, match="no bbox_head.gfl_cls.weight") as error:
        load_mmdet(mmdet_ckpt(small_source()), "gfl_r18s.yaml", "frcnn.pth")
    assert "\n" not in str(error.value)


def test_r50_layout_every_tensor_lands_and_parameter_count_is_mmdetections():
    """faster-rcnn_r50_fpn_1x at its real shapes. MMDetection's count, from its layer shapes: ResNet-50 without fc
    23,508,032 (BN affine included) + FPN 4 lateral 1×1 (256+512+1024+2048)·256+4·256 = 984,064 and 4 output 3×3
    4·(256·256·9+256) = 2,360,320 + RPN 590,080 + 771 + 3,084 + shared FCs 12,544·1024+1024 = 12,846,080 and
    1,049,600 + fc_cls 81·1024+81 = 83,025 + fc_reg 320·1024+320 = 328,000 = 41,753,056; with frozen_stages=1 the
    stem and layer1 (225,344) do not train, leaving 41,527,712 (the 41.53 M mmdet's get_flops prints)."""
    shapes = mmdet_faster_rcnn(50, 80, **FULL)
    assert sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("num_batches_tracked") and
               "running_" not in k) == 41_753_056
    source = make_source(shapes)
    assert len(source) == 348
    detector = load_mmdet(mmdet_ckpt(source), "faster_rcnn_r50.yaml", "faster_rcnn_r50_fpn_1x_coco.pth")
    check_every_tensor_lands(detector, source)
    assert sum(p.numel() for p in detector.parameters()) == 41_753_056
    assert sum(p.numel() for p in detector.parameters() if p.requires_grad) == 41_527_712


@pytest.mark.parametrize("depth, tensors, parameters", [(18, 150, 28_684_256), (101, 654, 60_745_184)])
def test_r18_and_r101_layouts_every_tensor_lands(depth, tensors, parameters):
    source = make_source(mmdet_faster_rcnn(depth, 80, **FULL))
    detector = load_mmdet(mmdet_ckpt(source), f"faster_rcnn_r{depth}.yaml", f"faster_rcnn_r{depth}.pth")
    check_every_tensor_lands(detector, source)
    assert len(source) == tensors and sum(p.numel() for p in detector.parameters()) == parameters


# ----- through the engine: teacher= of distill, model= of val -------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml) -> Path:
    """Digits (4 train, 2 val images of 64 px) and a small MMDetection 2.x Faster R-CNN checkpoint for its 10
    classes, with its embedded config."""
    root = tmp_path_factory.mktemp("mmdet_frcnn")
    write_digits_yaml(root, num_train=4, num_val=2)
    text = SMALL_CONFIG.replace("num_classes=3", "num_classes=10")
    meta = {"mmdet_version": "2.28.2", "CLASSES": [f"digit{i}" for i in range(10)], "config": text}
    torch.save(mmdet_ckpt(small_source(10), meta), root / "faster_rcnn_small_mmdet.pth")
    return root


def test_teacher_of_a_distillation(work):
    teacher = work / "faster_rcnn_small_mmdet.pth"
    args = get_args({"data": str(work / "data.yaml"), "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0,
                     "device": "cpu", "project": str(work / "runs"), "name": "kd", "plots": False, "val": False,
                     "exist_ok": True, "teacher": str(teacher), "model": "faster_rcnn_r18s.yaml", "kd": "crosskd"},
                    mode="distill")
    trainer = DistillTrainer(args)
    trainer.train()
    assert isinstance(trainer.teacher, FasterRCNN) and trainer.teacher.names[9] == "digit9"
    source = torch.load(teacher, weights_only=True)["state_dict"]
    assert torch.equal(trainer.teacher.head.roi_head.cls.weight, source["roi_head.bbox_head.fc_cls.weight"])
    assert {"kd_cls", "kd_reg"} <= set(trainer.epoch_losses)
    assert all(math.isfinite(v) and v > 0 for k, v in trainer.epoch_losses.items() if k.startswith("kd_"))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(trainer.teacher(images).rcnn.cls_score).all()


def test_model_of_val(work):
    args = get_args({"data": str(work / "data.yaml"), "imgsz": 64, "batch": 2, "workers": 0, "device": "cpu",
                     "model": str(work / "faster_rcnn_small_mmdet.pth"), "plots": False,
                     "project": str(work / "val"), "name": "val"}, mode="val")
    metrics = Validator(args).run()
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["AP50"] <= 1.0
