"""Distil crosskd students from foreign teachers saved in their native formats: a torchvision RetinaNet (a local
state-dict file with teacher_cfg=, and torchvision:NAME from torch hub's cache with the network cut off) and an
MMDetection GFL checkpoint. Teachers are built from seeded random weights; these tests check mechanics, not accuracy.
Every best.pt holds the student alone and exports to an ONNX graph holding the student alone.
"""

import os
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from torch import nn
from torchvision.models import detection as tv_detection

from crosskd.config import get_args
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.deployment.exporter import run as export_run
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.models import DenseDetector, build_detector
from crosskd.models.foreign.mmdet import mmdet_key_map
from crosskd.models.foreign.torchvision_detection import COCO80_NAMES, coco80_rows, weights_file_name

TV_NAME = "retinanet_resnet50_fpn"
DIGITS = {"num_train": 8, "num_val": 4, "imgsz": 64, "objects": [1, 2], "seed": 0}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Generated digits (8 train, 4 val images of 64 px) under two dataset YAMLs: digits10.yaml (names '0'..'9',
    COCO JSON labels) and coco80.yaml (the 80 COCO names over the YOLO labels; digit d is COCO class d)."""
    root = tmp_path_factory.mktemp("distill_foreign")
    digits = str(root / "digits")
    data10 = {"path": digits, "train": "annotations/instances_train.json", "val": "annotations/instances_val.json",
              "names": {i: str(i) for i in range(10)}, "fliplr": 0, "generate": DIGITS}
    data80 = {"path": digits, "train": "images/train", "val": "images/val", "names": dict(COCO80_NAMES),
              "fliplr": 0, "generate": DIGITS}
    (root / "digits10.yaml").write_text(yaml.safe_dump(data10))
    (root / "coco80.yaml").write_text(yaml.safe_dump(data80))
    return root


@pytest.fixture(scope="module")
def torchvision_retinanet(work) -> tuple[nn.Module, Path]:
    """torchvision's RetinaNet (91 slots, seed 0, weights=None) and its state dict saved as a local .pth."""
    torch.manual_seed(0)
    model = tv_detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    path = work / "my_retinanet.pth"
    torch.save(model.state_dict(), path)
    return model, path



def distil(work: Path, name: str, data: str, **overrides) -> DistillTrainer:
    """One epoch (2 iterations of batch 4) at 64 px on the CPU, val=False; returns the finished trainer."""
    settings = {"data": str(work / data), "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0, "device": "cpu",
                "project": str(work / "runs"), "name": name, "plots": False, "val": False, "exist_ok": True,
                **overrides}
    trainer = DistillTrainer(get_args(settings, mode="distill"))
    trainer.train()
    return trainer


def holds_tensor(value: object) -> bool:
    """Whether a checkpoint entry holds a tensor anywhere inside."""
    if isinstance(value, dict):
        return any(map(holds_tensor, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(holds_tensor, value))
    return isinstance(value, torch.Tensor)


def check_student_only(trainer: DistillTrainer, student_yaml: str, nc: int, teacher: str, teacher_cfg: str | None):
    """best.pt holds exactly a fresh student's tensors and records the teacher; its ONNX graph holds the student."""
    best = trainer.weights_dir / "best.pt"
    ckpt = load_checkpoint(best)
    student = build_detector(student_yaml, nc)
    assert set(ckpt["model"]) == set(student.state_dict())
    assert not [key for key, value in ckpt.items() if key != "model" and holds_tensor(value)]  # no adapter, no EMA
    assert ckpt["teacher"] == teacher and ckpt["kd_args"]["teacher_cfg"] == teacher_cfg
    path = export_run(get_args({"model": str(best), "format": "onnx", "imgsz": 64, "device": "cpu"}, mode="export"))
    initializers = onnx.load(str(path)).graph.initializer
    named = {init.name.removeprefix("detector.") for init in initializers if init.name.startswith("detector.")}
    assert named and named <= set(student.state_dict())
    student_elements = sum(v.numel() for v in student.state_dict().values())
    teacher_elements = sum(v.numel() for v in trainer.teacher.state_dict().values())
    graph_elements = sum(onnx.numpy_helper.to_array(init).size for init in initializers)
    assert graph_elements <= student_elements < teacher_elements


def check_torchvision_teacher(teacher: DenseDetector, model: nn.Module) -> None:
    """The teacher holds the torchvision model's tensors (the classifier keeps 80 of its 91 slots per anchor)."""
    assert teacher.head_type == "retinanet" and teacher.nc == 80 and teacher.names == COCO80_NAMES
    source = model.state_dict()
    assert torch.equal(teacher.backbone.layer4[2].conv3.weight, source["backbone.body.layer4.2.conv3.weight"])
    assert torch.equal(teacher.head.retina_reg.weight, source["head.regression_head.bbox_reg.weight"])
    classifier = coco80_rows(source["head.classification_head.cls_logits.weight"])  # [9*80, 256, 3, 3]
    assert torch.equal(teacher.head.retina_cls.weight, classifier)


@pytest.mark.slow  # builds and distils from a full-size R50 RetinaNet
def test_torchvision_state_dict_file_with_teacher_cfg(work, torchvision_retinanet):
    model, path = torchvision_retinanet
    trainer = distil(work, "tv_file", "coco80.yaml", model="retinanet_r18s.yaml", teacher=str(path),
                     teacher_cfg="retinanet_r50_tv.yaml")
    check_torchvision_teacher(trainer.teacher, model)
    assert {"kd_cls", "kd_reg"} <= set(trainer.epoch_losses)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in trainer.epoch_losses.values())
    check_student_only(trainer, "retinanet_r18s.yaml", 80, str(path.resolve()), "retinanet_r50_tv.yaml")


@pytest.mark.slow  # builds and distils from a full-size R50 RetinaNet
def test_torchvision_name_from_hub_cache_offline(work, torchvision_retinanet, offline_torch_home):
    model, path = torchvision_retinanet
    offline_torch_home.mkdir(parents=True)
    os.link(path, offline_torch_home / weights_file_name(TV_NAME))  # the real file name, as torch hub caches it
    trainer = distil(work, "tv_name", "coco80.yaml", model="gfl_r18t.yaml", teacher=f"torchvision:{TV_NAME}")
    check_torchvision_teacher(trainer.teacher, model)
    assert {"loss_dfl", "kd_cls", "kd_reg"} <= set(trainer.epoch_losses)
    check_student_only(trainer, "gfl_r18t.yaml", 80, f"torchvision:{TV_NAME}", None)


def test_mmdetection_gfl_checkpoint(work):
    torch.manual_seed(0)
    source = build_detector("gfl_r18s.yaml", 10).eval()
    ours_to_mmdet = {ours: theirs for theirs, ours in mmdet_key_map(source).items()}
    state = {ours_to_mmdet[key]: tensor for key, tensor in source.state_dict().items()}
    state["bbox_head.integral.project"] = torch.linspace(0, 16, 17)  # GFL's constant buffer, saved by MMDetection
    meta = {"mmdet_version": "2.28.2", "CLASSES": [f"digit{i}" for i in range(10)]}
    torch.save({"state_dict": state, "meta": meta}, work / "teacher.pth")
    trainer = distil(work, "mmdet", "digits10.yaml", model="gfl_r18t.yaml", teacher=str(work / "teacher.pth"),
                     teacher_cfg="gfl_r18s.yaml")
    teacher = trainer.teacher
    assert teacher.names == dict(enumerate(meta["CLASSES"])) and not teacher.training
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, outputs = source(images), teacher(images)
    assert outputs.centerness is None and expected.centerness is None
    for ours, theirs in zip(outputs.cls_scores + outputs.bbox_preds, expected.cls_scores + expected.bbox_preds):
        assert torch.equal(ours, theirs)
    assert {"loss_dfl", "kd_cls", "kd_reg"} <= set(trainer.epoch_losses)
    check_student_only(trainer, "gfl_r18t.yaml", 10, str((work / "teacher.pth").resolve()), "gfl_r18s.yaml")
