"""Backbone weights: torchvision ImageNet weights from torch hub's cache (never the network), local .pth, crosskd .pt.

The cached files carry torchvision's exact file names and key sets, written from seeded, randomly initialised
torchvision models into a temporary TORCH_HOME.
"""

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    Swin_T_Weights,
    mobilenet_v2,
    mobilenet_v3_large,
    resnet18,
    resnet34,
    resnet50,
    swin_t,
)

from crosskd.cli import parse_cli_args
from crosskd.config import get_args
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.trainer import Trainer, load_pretrained
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector
from crosskd.models.backbones import MobileNetV2, MobileNetV3Large, ResNet, SwinT
from crosskd.models.pretrained import (
    cached_file,
    load_backbone_weights,
    load_pretrained_weights,
    resolve_backbone_weights,
)
from crosskd.paths import CFG_DIR

FULL_SIZE = ["gfl_r18", "gfl_r34", "gfl_r50", "gfl_r101", "retinanet_r18", "retinanet_r50", "retinanet_r101",
             "fcos_r50", "fcos_r101", "atss_r50", "atss_r101", "retinanet_swint", "gfl_mobilenetv2"]
SMALL = ["gfl_r18s", "gfl_r18t", "gfl_r34s", "retinanet_r18s", "fcos_r18s", "atss_r18s"]


@pytest.fixture
def offline(tmp_path, monkeypatch) -> list[str]:
    """An empty TORCH_HOME and no network: every download attempt is recorded and fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list[str] = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return attempts


def torch_home() -> Path:
    return Path(os.environ["TORCH_HOME"])


def cache(weights, build: Callable[..., nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a seeded random `build(weights=None)` state_dict where torch hub caches `weights`; returns it."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in build(weights=None).state_dict().items()}
    for name, tensor in state.items():  # non-trivial BN statistics, so a skipped buffer would show
        if "running" in name:
            tensor.uniform_(0.5, 1.5)
    path = cached_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def tiny_full_width_yaml(pretrained) -> dict:
    """A width-1.0 ResNet-18 backbone (every torchvision tensor) under a tiny FPN and GFL head."""
    return {
        "backbone": {"type": "resnet", "depth": 18, "width": 1.0, "pretrained": pretrained},
        "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5},
        "head": {"type": "gfl", "stacked_convs": 1, "feat_channels": 16, "num_groups": 4},
    }


def assert_backbone_equals(backbone: nn.Module, state: dict[str, torch.Tensor], key_map=lambda k: k) -> int:
    own = backbone.state_dict()
    checked = 0
    for name, tensor in state.items():
        if key_map(name) in own:
            assert torch.equal(own[key_map(name)], tensor.to(own[key_map(name)].dtype)), name
            checked += 1
    return checked


# ----- spec parsing ---------------------------------------------------------------------------------------------
def test_specs_resolve_to_torchvision_weights_with_their_exact_file_names(offline):
    r18, r50 = ResNet(depth=18, width=0.25), ResNet(depth=50, width=0.25)
    assert resolve_backbone_weights(True, ResNet(depth=18)).weights is ResNet18_Weights.IMAGENET1K_V1
    assert resolve_backbone_weights("imagenet", ResNet(depth=50)).weights is ResNet50_Weights.IMAGENET1K_V1
    assert resolve_backbone_weights("IMAGENET1K_V2", ResNet(depth=50)).weights is ResNet50_Weights.IMAGENET1K_V2
    named = resolve_backbone_weights("ResNet50_Weights.IMAGENET1K_V2", ResNet(depth=50)).weights
    assert cached_file(named).name == "resnet50-11ad3fa6.pth"
    assert cached_file(ResNet50_Weights.IMAGENET1K_V1).name == "resnet50-0676ba61.pth"
    assert cached_file(ResNet18_Weights.IMAGENET1K_V1) == (
        torch_home() / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert resolve_backbone_weights("true", MobileNetV2()).weights is MobileNet_V2_Weights.IMAGENET1K_V1
    assert resolve_backbone_weights("imagenet", SwinT()).weights is Swin_T_Weights.IMAGENET1K_V1
    for off in (None, False, "false", "", "None"):
        assert resolve_backbone_weights(off, r18) is None
    assert resolve_backbone_weights("weights/r50.pth", r50).path.name == "r50.pth"
    assert offline == []


def test_unknown_or_wrong_backbone_names_are_one_line_config_errors():
    with pytest.raises(ConfigError) as unknown:
        resolve_backbone_weights("IMAGENET1K_V3", ResNet(depth=50))
    message = str(unknown.value)
    assert "\n" not in message and "'IMAGENET1K_V3' is not a known weights name" in message
    assert "ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2" in message
    with pytest.raises(ConfigError, match="'ResNet101_Weights.IMAGENET1K_V1' are weights of another architecture"):
        resolve_backbone_weights("ResNet101_Weights.IMAGENET1K_V1", ResNet(depth=50))
    with pytest.raises(ConfigError, match="not a known weights name"):
        resolve_backbone_weights("Foo_Weights.IMAGENET1K_V1", ResNet(depth=50))
    with pytest.raises(ConfigError, match="fits backbone width 1.0, not 0.5; set backbone.width: 1.0 or pretrained"):
        resolve_backbone_weights("imagenet", ResNet(depth=18, width=0.5))


# ----- named weights through torch hub's cache ------------------------------------------------------------------
def test_building_reads_nothing_and_training_start_loads_every_backbone_tensor(offline, caplog):
    state = cache(ResNet18_Weights.IMAGENET1K_V1, resnet18)
    torch.manual_seed(1)
    detector = build_detector(tiny_full_width_yaml("imagenet"), nc=3)
    assert not torch.equal(detector.backbone.conv1.weight, state["conv1.weight"])  # building loaded nothing
    with caplog.at_level(logging.INFO, logger="crosskd"):
        copied = load_pretrained_weights(detector)
    backbone_keys = set(detector.backbone.state_dict())
    assert backbone_keys == {k for k in state if not k.startswith("fc.")}
    assert copied == len(backbone_keys)
    assert assert_backbone_equals(detector.backbone, state) == len(backbone_keys)
    tensors = sum(not k.endswith("num_batches_tracked") for k in backbone_keys)
    assert f"Transferred {tensors}/{tensors} backbone tensors from ResNet18_Weights.IMAGENET1K_V1" in caplog.text
    assert offline == []


def test_offline_and_not_cached_names_the_file_and_folder(offline):
    detector = build_detector(tiny_full_width_yaml("imagenet"), nc=3)
    with pytest.raises(CheckpointError) as error:
        load_pretrained_weights(detector)
    message = str(error.value)
    folder = torch_home() / "hub" / "checkpoints"
    assert "\n" not in message
    assert "'resnet18-f37072fd.pth'" in message and f"in {folder} " in message and "pretrained=false" in message
    assert offline == [ResNet18_Weights.IMAGENET1K_V1.url]  # one attempt, through torch hub only


def test_pretrained_false_turns_the_yaml_default_off(offline):
    words = ["pretrained=false", "pretrained=true", "pretrained=ResNet50_Weights.IMAGENET1K_V2"]
    assert [get_args(parse_cli_args([w])).pretrained for w in words] == [False, True, words[2].split("=")[1]]
    detector = build_detector(tiny_full_width_yaml("imagenet"), nc=3)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    assert load_pretrained_weights(detector, False) == 0
    assert load_pretrained_weights(detector, "false") == 0
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in before.items())
    assert offline == []


def test_pretrained_key_overrides_the_yaml_with_an_explicit_name(offline):
    state = cache(ResNet18_Weights.IMAGENET1K_V1, resnet18, seed=3)
    detector = build_detector(tiny_full_width_yaml(None), nc=3)
    assert load_pretrained_weights(detector) == 0  # from scratch in the YAML
    load_pretrained_weights(detector, "ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(detector.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_mobilenet_v2_imagenet_loads_every_backbone_tensor(offline):
    state = cache(MobileNet_V2_Weights.IMAGENET1K_V1, mobilenet_v2)
    backbone = MobileNetV2(pretrained="imagenet")
    assert load_backbone_weights(backbone, backbone.pretrained) == len(backbone.state_dict())
    assert assert_backbone_equals(backbone, state) == len(backbone.state_dict())
    assert offline == []


def test_mobilenet_v3_large_imagenet_loads_every_backbone_tensor(offline):
    """torchvision's detection backbone weights (mobilenet_v3_large IMAGENET1K_V1): every features tensor, no
    classifier."""
    state = cache(MobileNet_V3_Large_Weights.IMAGENET1K_V1, mobilenet_v3_large)
    assert cached_file(MobileNet_V3_Large_Weights.IMAGENET1K_V1).name == "mobilenet_v3_large-8738ca79.pth"
    backbone = MobileNetV3Large(pretrained="imagenet")
    assert load_backbone_weights(backbone, backbone.pretrained) == len(backbone.state_dict())
    assert assert_backbone_equals(backbone, state) == len(backbone.state_dict())
    assert offline == []


@pytest.mark.slow
def test_swin_t_imagenet_loads_every_backbone_tensor(offline):
    state = cache(Swin_T_Weights.IMAGENET1K_V1, swin_t)
    backbone = SwinT(pretrained=True)
    copied = load_backbone_weights(backbone, backbone.pretrained)
    assert copied == len(state) - 2  # all but the classifier head

    def to_ours(name: str) -> str:
        return "norms.2." + name.removeprefix("norm.") if name.startswith("norm.") else name

    assert assert_backbone_equals(backbone, state, to_ours) == copied
    assert torch.equal(backbone.norms[2].weight, state["norm.weight"])  # the final norm is the last output norm
    assert offline == []


@pytest.mark.slow
def test_resnet50_imagenet1k_v2_by_name(offline):
    state = cache(ResNet50_Weights.IMAGENET1K_V2, resnet50)
    backbone = ResNet(depth=50)
    assert load_backbone_weights(backbone, "IMAGENET1K_V2") == len(backbone.state_dict())
    assert assert_backbone_equals(backbone, state) == len(backbone.state_dict())
    assert offline == []


def save_crosskd_pt(detector: nn.Module, path: Path) -> Path:
    names = {i: str(i) for i in range(detector.nc)}
    save_checkpoint(make_checkpoint(detector, epoch=1, best_fitness=None, names=names, train_args={}), path)
    return path


def test_training_start_loads_the_student_backbone_and_never_the_teacher(offline, tmp_path):
    state = cache(ResNet18_Weights.IMAGENET1K_V1, resnet18)
    student_yaml = tmp_path / "student.yaml"
    student_yaml.write_text(yaml.safe_dump(tiny_full_width_yaml("imagenet")))
    torch.manual_seed(1)
    teacher = build_detector(tiny_full_width_yaml("imagenet"), nc=3)  # its YAML says imagenet too
    teacher_pt = save_crosskd_pt(teacher, tmp_path / "teacher.pt")

    def build_model(trainer_class: type[Trainer], **overrides) -> Trainer:
        trainer = trainer_class(get_args({"model": str(student_yaml), **overrides}, trainer_class.mode))
        trainer.data_info, trainer.names = SimpleNamespace(nc=3), {0: "a", 1: "b", 2: "c"}
        trainer.model = trainer.build_model()
        return trainer

    distill = build_model(DistillTrainer, teacher=str(teacher_pt))
    assert assert_backbone_equals(distill.model.backbone, state) == len(distill.model.backbone.state_dict())
    assert all(torch.equal(v, distill.teacher.state_dict()[k]) for k, v in teacher.state_dict().items())
    scratch = build_model(Trainer, pretrained=False)
    assert not torch.equal(scratch.model.backbone.conv1.weight, state["conv1.weight"])
    assert offline == []


# ----- local files --------------------------------------------------------------------------------------------
def test_local_torchvision_and_mmdetection_pth(tmp_path):
    source = resnet18(weights=None).state_dict()
    plain = tmp_path / "resnet18.pth"
    torch.save(source, plain)
    backbone = ResNet(depth=18)
    assert load_backbone_weights(backbone, str(plain)) == len(backbone.state_dict())
    assert assert_backbone_equals(backbone, source) == len(backbone.state_dict())
    mmdet = tmp_path / "gfl_mmdet.pth"  # a whole MMDetection detector: its backbone.* tensors are taken
    torch.save({"meta": {"epoch": 24}, "state_dict": {
        **{f"backbone.{k}": v + 1 for k, v in source.items() if not k.startswith("fc.")},
        "neck.fpn_convs.0.conv.weight": torch.zeros(1), "bbox_head.gfl_cls.weight": torch.zeros(1)}}, mmdet)
    load_backbone_weights(backbone, str(mmdet))
    assert torch.equal(backbone.conv1.weight, source["conv1.weight"] + 1)


def test_wrong_or_missing_local_files_are_one_line_errors(tmp_path):
    wrong = tmp_path / "resnet34.pth"
    torch.save(resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError) as error:
        load_backbone_weights(ResNet(depth=18), str(wrong))
    assert "\n" not in str(error.value) and "unexpected (layer1.2." in str(error.value)
    with pytest.raises(CheckpointError, match="pretrained .* not found"):
        load_backbone_weights(ResNet(depth=18), str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read pretrained .*corrupt"):
        load_backbone_weights(ResNet(depth=18), str(bad))


def test_crosskd_pt_backbone_spec_and_pretrained_key(tmp_path):
    cfg = yaml.safe_load((CFG_DIR / "models" / "gfl_r18t.yaml").read_text())
    torch.manual_seed(0)
    trained = build_detector(cfg, nc=3)
    path = save_crosskd_pt(trained, tmp_path / "trained.pt")
    torch.manual_seed(1)
    backbone_only = build_detector({**cfg, "backbone": {**cfg["backbone"], "pretrained": str(path)}}, nc=3)
    head_before = backbone_only.head.state_dict()["gfl_cls.weight"].clone()
    load_pretrained_weights(backbone_only)  # YAML backbone.pretrained: the checkpoint's backbone.* tensors
    assert assert_backbone_equals(backbone_only.backbone, trained.backbone.state_dict()) == len(
        trained.backbone.state_dict())
    assert torch.equal(backbone_only.head.state_dict()["gfl_cls.weight"], head_before)
    torch.manual_seed(2)
    whole = build_detector(cfg, nc=3)
    load_pretrained(whole, str(path))  # pretrained= key: every matching detector tensor
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in trained.state_dict().items())


# ----- shipped YAMLs ------------------------------------------------------------------------------------------
def test_full_size_yamls_default_to_imagenet_and_small_ones_train_from_scratch():
    for name in FULL_SIZE:
        backbone = yaml.safe_load((CFG_DIR / "models" / f"{name}.yaml").read_text())["backbone"]
        assert backbone["pretrained"] == "imagenet", name
        recipe = (-1, None) if backbone["type"] == "swin_t" else (1, True)  # MMDet: Swin-T trains every stage
        if backbone["type"] == "mobilenetv2":
            recipe = (-1, False)
        assert (backbone["frozen_stages"], backbone.get("norm_eval")) == recipe, name
    for name in SMALL:
        backbone = yaml.safe_load((CFG_DIR / "models" / f"{name}.yaml").read_text())["backbone"]
        assert not backbone.get("pretrained"), name
