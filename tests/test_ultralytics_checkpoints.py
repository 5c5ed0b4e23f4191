"""Ultralytics YOLOv8/YOLO11 .pt files read without running their pickled code, and their keys mapped onto crosskd's.

The files here are written without Ultralytics: throwaway nn.Module classes registered under Ultralytics' class paths
only while torch.save runs, nested with Ultralytics' attribute names (tiny widths), saved in half precision with
'ema' and 'model' as Ultralytics' trainer does. The peer test reads files Ultralytics itself wrote.
"""

import copy
import logging
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.ops import box_convert
from ultralytics_peer import ultralytics_python

from crosskd import cli
from crosskd.api import Detector
from crosskd.config import get_args
from crosskd.distill import Distiller
from crosskd.engine.deployment import converter
from crosskd.engine.deployment.loader import is_detector_checkpoint, load_runtime
from crosskd.engine.training import launch
from crosskd.engine.training.trainer import load_pretrained
from crosskd.errors import CheckpointError
from crosskd.models import build_detector
from crosskd.models.foreign.inert_pickle import InertObject, RefusedGlobal, pickle_globals, resolve_global
from crosskd.models.foreign.ultralytics import (
    FAMILIES,
    is_ultralytics_checkpoint,
    key_transforms,
    read_ultralytics,
    ultralytics_key_map,
)
from crosskd.models.postprocess import postprocess
from crosskd.ops.boxes import clip_boxes

FAKE_CLASSES = {
    "ultralytics.nn.tasks": ("DetectionModel", "SegmentationModel"),
    "ultralytics.nn.modules.conv": ("Conv", "DWConv", "Concat"),
    "ultralytics.nn.modules.block": ("C2f", "C3k2", "Bottleneck", "SPPF", "C2PSA", "PSABlock", "Attention", "DFL"),
    "ultralytics.nn.modules.head": ("Detect",),
}
PAN_HEAD = ["nn.Upsample", "Concat", "{b}", "nn.Upsample", "Concat", "{b}", "Conv", "Concat", "{b}", "Conv", "Concat",
            "{b}", "Detect"]
YAML_LAYERS = {  # the layer types of Ultralytics' yolov8.yaml / yolo11.yaml, backbone then head
    "yolov8": (["Conv", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "SPPF"],
               [t.format(b="C2f") for t in PAN_HEAD]),
    "yolo11": (["Conv", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "SPPF", "C2PSA"],
               [t.format(b="C3k2") for t in PAN_HEAD]),
}
WIDTH, NC, REG_MAX = 4, 3, 16
NAMES = {0: "cat", 1: "dog", 2: "bird"}


# ----- throwaway Ultralytics-named classes and files --------------------------------------------------------
@contextmanager
def ultralytics_classes():
    """{short name: class} of nn.Module subclasses importable under Ultralytics' paths only inside the block."""
    modules = {name: types.ModuleType(name) for name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.modules")}
    classes = {}
    for module_name, class_names in FAKE_CLASSES.items():
        module = modules.setdefault(module_name, types.ModuleType(module_name))
        for name in class_names:
            attributes = {"__module__": module_name, "forward_fuse": lambda self, x: x}
            classes[name] = type(name, (nn.Module,), attributes)
            setattr(module, name, classes[name])
    assert not set(modules) & set(sys.modules), "a real ultralytics is importable in crosskd's tests"
    sys.modules.update(modules)
    try:
        yield classes
    finally:
        for name in modules:
            sys.modules.pop(name)


def make(cls: type, **attributes) -> nn.Module:
    module = cls()
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def conv(c, kind: str = "Conv", groups: int = 1) -> nn.Module:
    return make(c[kind], conv=nn.Conv2d(WIDTH, WIDTH, 1, groups=groups, bias=False), bn=nn.BatchNorm2d(WIDTH, eps=1e-3),
                act=nn.SiLU())


def block(c, kind: str) -> nn.Module:
    """A tiny layer of `kind` with Ultralytics' child names."""
    bottleneck = make(c["Bottleneck"], cv1=conv(c), cv2=conv(c))
    if kind in ("C2f", "C3k2"):
        return make(c[kind], cv1=conv(c), cv2=conv(c), m=nn.ModuleList([bottleneck]))
    if kind == "SPPF":
        return make(c[kind], cv1=conv(c), cv2=conv(c), m=nn.MaxPool2d(5, 1, 2))
    if kind == "C2PSA":
        attention = make(c["Attention"], qkv=conv(c), proj=conv(c), pe=conv(c, groups=WIDTH))
        psa = make(c["PSABlock"], attn=attention, ffn=nn.Sequential(conv(c), conv(c)))
        return make(c[kind], cv1=conv(c), cv2=conv(c), m=nn.Sequential(psa))
    if kind == "nn.Upsample":
        return nn.Upsample(scale_factor=2.0)
    return make(c[kind], d=1) if kind == "Concat" else conv(c)


def detect(c, family: str) -> nn.Module:
    """Detect with box branches cv2, class branches cv3 (YOLO11: DWConv+Conv pairs) and the DFL conv."""
    def cls_step():
        return conv(c) if family == "yolov8" else nn.Sequential(conv(c, "DWConv", groups=WIDTH), conv(c))

    dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
    dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float).view(1, REG_MAX, 1, 1)
    return make(
        c["Detect"], nc=NC, reg_max=REG_MAX, stride=torch.tensor([8.0, 16.0, 32.0]),
        cv2=nn.ModuleList(nn.Sequential(conv(c), conv(c), nn.Conv2d(WIDTH, 4 * REG_MAX, 1)) for _ in range(3)),
        cv3=nn.ModuleList(nn.Sequential(cls_step(), cls_step(), nn.Conv2d(WIDTH, NC, 1)) for _ in range(3)),
        dfl=make(c["DFL"], conv=dfl),
    )


def detection_model(c, family: str, model_class: str = "DetectionModel") -> nn.Module:
    backbone, head = YAML_LAYERS[family]
    layers = [block(c, kind) for kind in backbone + head[:-1]] + [detect(c, family)]
    for index, (layer, kind) in enumerate(zip(layers, backbone + head)):
        layer.f, layer.i, layer.type, layer.np = -1, index, kind, sum(p.numel() for p in layer.parameters())
    yaml = {"nc": NC, "scale": "s", "yaml_file": f"{family}s.yaml", "channels": 3,
            "backbone": [[-1, 1, kind, []] for kind in backbone], "head": [[-1, 1, kind, []] for kind in head]}
    model = make(c[model_class], model=nn.Sequential(*layers), yaml=yaml, names=dict(NAMES),
                 stride=torch.tensor([8.0, 16.0, 32.0]), args={"imgsz": 64}, task="detect", save=[4, 6])
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.numel() != REG_MAX:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def trainer_checkpoint(ema: nn.Module, **extra) -> dict:
    """A checkpoint laid out as Ultralytics' trainer writes it: the half-precision EMA under 'ema', 'model' beside."""
    model = copy.deepcopy(ema)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(1)  # tells 'model' from 'ema'
    return {"date": "2025-01-01T00:00:00", "version": "8.4.190", "license": "AGPL-3.0", "docs": "docs", "epoch": 3,
            "best_fitness": 0.5, "model": model.half(), "ema": copy.deepcopy(ema).half(), "updates": 12,
            "optimizer": None, "train_args": {"imgsz": 64, "epochs": 10}, "train_metrics": {"fitness": 0.5},
            "train_results": {"epoch": [1.0]}, "git": {"branch": "main"}, **extra}


def write_checkpoint(path: Path, family: str = "yolo11", model_class: str = "DetectionModel", **extra) -> dict:
    """Write an Ultralytics-style file; returns the float32 state dict Ultralytics' EMA model.state_dict() gives."""
    with ultralytics_classes() as c:
        ema = detection_model(c, family, model_class)
        ckpt = trainer_checkpoint(ema, **extra)
        torch.save(ckpt, path)
    return {k: v.float() if v.is_floating_point() else v for k, v in ckpt["ema"].state_dict().items()}


class Exploit:
    """Unpickled, it would run a shell command creating `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----- reading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_reads_ema_weights_names_and_family_without_ultralytics(tmp_path, family):
    path = tmp_path / "best.pt"
    expected = write_checkpoint(path, family)
    ckpt = read_ultralytics(path)
    assert "ultralytics" not in sys.modules
    assert ckpt.state.keys() == expected.keys()
    assert all(torch.equal(ckpt.state[k], expected[k]) for k in expected)  # the EMA's, not 'model' (+1)
    assert all(t.dtype in (torch.float32, torch.int64) for t in ckpt.state.values())
    assert f"model.{FAMILIES[family].detect_index}.dfl.conv.weight" in ckpt.state
    assert (ckpt.family.name, ckpt.scale, ckpt.nc, ckpt.names) == (family, "s", NC, NAMES)
    assert ckpt.model_yaml == f"{family}s.yaml"
    assert (ckpt.train_args["imgsz"], ckpt.version) == (64, "8.4.190")


def test_model_is_read_when_ema_is_none(tmp_path):
    path = tmp_path / "saved.pt"
    with ultralytics_classes() as c:
        model = detection_model(c, "yolo11").half()
        torch.save({"ema": None, "model": model, "version": "8.4.190"}, path)
        expected = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state = read_ultralytics(path).state
    assert all(torch.equal(state[k], expected[k]) for k in expected) and state.keys() == expected.keys()


def test_nothing_is_real_module(tmp_path):
    path = tmp_path / "best.pt"
    write_checkpoint(path)
    globals_ = pickle_globals(path)
    assert {"ultralytics.nn.tasks.DetectionModel", "ultralytics.nn.modules.head.Detect",
            "torch._utils._rebuild_tensor_v2"} <= globals_
    assert is_ultralytics_checkpoint(path) and is_detector_checkpoint(path)
    assert isinstance(resolve_global("ultralytics.nn.modules.conv", "Conv")(), InertObject)
    assert not issubclass(resolve_global("torch.nn.modules.conv", "Conv2d"), nn.Module)


def test_crosskd_checkpoint_is_not_taken_for_ultralytics(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    assert not is_ultralytics_checkpoint(path)
    assert not is_ultralytics_checkpoint(tmp_path / "missing.pt")


def test_fused_convs_get_their_batchnorm_back_exactly(tmp_path):
    """Ultralytics' fuse() folds each Conv's BatchNorm into a conv bias and sets forward to a bound method."""
    path = tmp_path / "fused.pt"
    with ultralytics_classes() as c:
        model = detection_model(c, "yolov8")
        layer = model.model[0]
        layer.bn.eval()
        x = torch.rand(2, WIDTH, 5, 5)
        expected = layer.bn(layer.conv(x))
        scale = layer.bn.weight / (layer.bn.running_var + layer.bn.eps).sqrt()
        folded = nn.Conv2d(WIDTH, WIDTH, 1)
        folded.weight.data = layer.conv.weight.data * scale.view(-1, 1, 1, 1)
        folded.bias.data = layer.bn.bias.data - layer.bn.running_mean.data * scale
        layer.conv = folded
        del layer.bn
        layer.forward = layer.forward_fuse
        torch.save({"model": model, "ema": None}, path)
    assert "__builtin__.getattr" in pickle_globals(path)
    state = read_ultralytics(path).state
    assert "model.0.conv.bias" not in state
    conv, bn = nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH, eps=1e-3).eval()
    conv.load_state_dict({"weight": state["model.0.conv.weight"]})
    bn.load_state_dict({k.removeprefix("model.0.bn."): v for k, v in state.items() if k.startswith("model.0.bn.")})
    torch.testing.assert_close(bn(conv(x)), expected, rtol=1e-5, atol=1e-5)


# ----- refusals: one line each ----------------------------------------------------------------------------------
def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    write_checkpoint(path, git=Exploit(marker))
    with pytest.raises(CheckpointError) as error:
        load_runtime(path)
    message = one_line(error)
    assert "posix.system" in message and str(path) in message
    assert not marker.exists()


@pytest.mark.parametrize("payload, named", [
    (lambda marker: Exploit(marker), "posix.system"),
    (lambda marker: types.SimpleNamespace(a=1), "types.SimpleNamespace"),
])
def test_other_globals_are_refused(tmp_path, payload, named):
    path = tmp_path / "evil.pt"
    torch.save({"ema": None, "model": payload(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError) as error:
        read_ultralytics(path)
    assert named in one_line(error) and not (tmp_path / "pwned").exists()


def test_getattr_only_names_methods_of_inert_objects():
    getattr_ = resolve_global("__builtin__", "getattr")
    with pytest.raises(RefusedGlobal, match="getattr on dict"):
        getattr_({}, "clear")
    for module, name in (("builtins", "eval"), ("torch", "load"), ("torch.nn.functional", "relu"), ("os", "system")):
        with pytest.raises(RefusedGlobal, match=f"{module}.{name}"):
            resolve_global(module, name)


def test_truncated_file_is_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    write_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for read in (read_ultralytics, load_runtime):
        with pytest.raises(CheckpointError) as error:
            read(path)
        message = one_line(error)
        assert str(path) in message and "corrupt" in message


def test_segmentation_model_is_refused(tmp_path):
    path = tmp_path / "seg.pt"
    write_checkpoint(path, model_class="SegmentationModel")
    with pytest.raises(CheckpointError) as error:
        read_ultralytics(path)
    assert "SegmentationModel" in one_line(error)


def write_yolov5u_checkpoint(path: Path) -> None:
    """A YOLOv5su-like file: YOLOv8's layers but a C3 block, a family crosskd does not map."""
    with ultralytics_classes() as c:
        model = detection_model(c, "yolov8")
        model.yaml["backbone"][2][2] = "C3"
        model.yaml["yaml_file"] = "yolov5su.yaml"
        torch.save({"ema": model.half(), "model": None}, path)


def test_unknown_layers_are_refused(tmp_path):
    path = tmp_path / "v5.pt"
    write_yolov5u_checkpoint(path)
    with pytest.raises(CheckpointError) as error:
        read_ultralytics(path)
    message = one_line(error)
    assert "yolov5su.yaml" in message and "YOLO11" in message


# ----- key map --------------------------------------------------------------------------------------------------
KEY_MAPS = {
    "yolov8": {
        "model.0.conv.weight": "backbone.layers.0.conv.weight",
        "model.9.cv2.bn.running_var": "backbone.layers.9.cv2.bn.running_var",
        "model.12.m.0.cv1.bn.num_batches_tracked": "neck.layers.2.m.0.cv1.bn.num_batches_tracked",
        "model.21.cv2.conv.weight": "neck.layers.11.cv2.conv.weight",
        "model.22.cv2.1.0.bn.weight": "head.reg_branches.1.0.bn.weight",
        "model.22.cv2.2.2.bias": "head.reg_preds.2.bias",
        "model.22.cv3.0.1.bn.num_batches_tracked": "head.cls_branches.0.1.bn.num_batches_tracked",
        "model.22.cv3.2.2.weight": "head.cls_preds.2.weight",
        "model.22.dfl.conv.weight": "head.dfl_bins",
    },
    "yolo11": {
        "model.10.m.0.attn.qkv.conv.weight": "backbone.layers.10.m.0.attn.qkv.conv.weight",
        "model.10.m.0.ffn.1.bn.bias": "backbone.layers.10.m.0.ffn.1.bn.bias",
        "model.13.m.0.cv1.conv.weight": "neck.layers.2.m.0.cv1.conv.weight",
        "model.22.m.0.m.0.cv1.conv.weight": "neck.layers.11.m.0.m.0.cv1.conv.weight",
        "model.23.cv2.0.0.conv.weight": "head.reg_branches.0.0.conv.weight",
        "model.23.cv3.1.0.0.conv.weight": "head.cls_branches.1.0.0.conv.weight",
        "model.23.cv3.2.1.1.bn.running_mean": "head.cls_branches.2.1.1.bn.running_mean",
        "model.23.cv3.0.2.bias": "head.cls_preds.0.bias",
        "model.23.dfl.conv.weight": "head.dfl_bins",
    },
}


@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_key_map(family):
    unmapped = ["model.24.cv2.0.0.conv.weight", f"model.{FAMILIES[family].detect_index}.one2one_cv2.0.0.conv.weight",
                "stride"]
    key_map = ultralytics_key_map([*KEY_MAPS[family], *unmapped], FAMILIES[family])
    assert key_map == KEY_MAPS[family]
    bins = torch.arange(16.0).view(1, 16, 1, 1)
    dfl_key = f"model.{FAMILIES[family].detect_index}.dfl.conv.weight"
    assert torch.equal(key_transforms(key_map)[dfl_key](bins), torch.arange(16.0))


# ----- the Ultralytics peer -------------------------------------------------------------------------------------
PEER_DUMP = Path(__file__).with_name("ultralytics_peer_dump.py")
PEER_MODELS = [("yolov8n", "yolov8"), ("yolo11n", "yolo11")]
PEER_NAMES = {0: "cat", 1: "dog", 2: "bird"}  # ultralytics_peer_dump.NAMES


@pytest.fixture(scope="module")
def peer_files(tmp_path_factory):
    """YOLOv8n, YOLO11n and YOLO11s files written by Ultralytics itself, with what it computes from the first two."""
    out = tmp_path_factory.mktemp("peer")
    env = {**os.environ, "YOLO_CONFIG_DIR": str(out / "config"), "YOLO_OFFLINE": "1"}
    subprocess.run([*ultralytics_python(), str(PEER_DUMP), str(out)], check=True, env=env, cwd=out,
                   capture_output=True, timeout=300)
    return out


def peer_expected(peer_files: Path, name: str) -> dict:
    return torch.load(peer_files / f"{name}_expected.pt", weights_only=True)


def peer_boxes_and_scores(decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ultralytics' decoded output [1, 4 + nc, N] (xywh pixels, class scores) as boxes [N, 4] xyxy, scores [N, nc]."""
    rows = decoded[0].T  # [N, 4 + nc]
    centre, size = rows[:, :2], rows[:, 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], dim=1), rows[:, 4:]


@pytest.mark.parametrize("name, family", PEER_MODELS)
def test_reader_matches_ultralytics_state_dict(peer_files, name, family):
    expected = peer_expected(peer_files, name)
    ckpt = read_ultralytics(peer_files / f"{name}.pt")
    assert ckpt.state.keys() == expected["state"].keys()
    assert all(torch.equal(ckpt.state[k], expected["state"][k]) for k in ckpt.state)
    assert (ckpt.family.name, ckpt.scale, ckpt.names) == (family, "n", expected["names"])
    key_map = ultralytics_key_map(list(ckpt.state), ckpt.family)
    assert key_map.keys() == ckpt.state.keys()
    assert len(set(key_map.values())) == len(key_map)


@pytest.mark.parametrize("name, family", PEER_MODELS)
def test_peer_file_fills_every_tensor_of_the_scaled_model(peer_files, name, family):
    expected = peer_expected(peer_files, name)["state"]
    runtime = load_runtime(peer_files / f"{name}.pt")
    detector = runtime.model
    assert (runtime.kind, runtime.names, runtime.nc) == ("ultralytics", PEER_NAMES, len(PEER_NAMES))
    assert (detector.yaml["name"], detector.yaml["scale"]) == (name, "n")
    own = detector.state_dict()
    key_map = ultralytics_key_map(list(expected), FAMILIES[family])
    assert sorted(key_map.values()) == sorted(own)  # every crosskd tensor filled, nothing left over
    assert all(torch.equal(own[key_map[k]], v.reshape(own[key_map[k]].shape)) for k, v in expected.items())
    assert torch.equal(detector.head.dfl_bins, torch.arange(16.0)) and not detector.head.dfl_bins.requires_grad


def test_new_classes_rebuild_the_same_scale(peer_files):
    """adapt_nc rebuilds from detector.yaml, which keeps scale n: only the class predictors change shape."""
    original = load_runtime(peer_files / "yolo11n.pt").model.state_dict()
    rebuilt = load_runtime(peer_files / "yolo11n.pt", nc=5, adapt_nc=True).model.state_dict()
    assert rebuilt.keys() == original.keys()
    changed = {k for k in original if rebuilt[k].shape != original[k].shape}
    assert changed == {f"head.cls_preds.{level}.{p}" for level in range(3) for p in ("weight", "bias")}
    assert all(torch.equal(rebuilt[k], original[k]) for k in original if k not in changed)


@pytest.mark.parametrize("name", [name for name, _ in PEER_MODELS])
def test_head_outputs_equal_ultralytics(peer_files, name):
    """Per level bbox_pred = Detect's cv2 output and cls_score = its cv3 output, for the same input tensor: the
    peer's model input is the image already divided by 255, which is what crosskd's YOLO takes (0..1 RGB, nothing
    divided further). Equal to 1e-9 in float64; in float32 (two convolution stacks rounding differently) to 1e-4 of
    each output's largest magnitude."""
    expected = peer_expected(peer_files, name)
    detector = load_runtime(peer_files / f"{name}.pt").model
    with torch.no_grad():
        outputs32 = detector(expected["input"])
        outputs64 = detector.double()(expected["input"].double())
    for outputs, suffix, tolerance in ((outputs64, "", 1e-9), (outputs32, "32", 1e-4)):
        for ours, theirs in zip([*outputs.bbox_preds, *outputs.cls_scores],
                                [*expected[f"box{suffix}"], *expected[f"cls{suffix}"]], strict=True):
            assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max()


@pytest.mark.parametrize("name", [name for name, _ in PEER_MODELS])
def test_decoded_boxes_and_scores_equal_ultralytics(peer_files, name):
    """crosskd's decoded boxes are Ultralytics' (xywh -> xyxy) clamped to the input; Ultralytics clips only after
    NMS, so the head's own decode (before the clamp) equals them unclipped. crosskd decodes in float32 (here from
    float64 head outputs), so boxes of up to ~700 px agree to 1e-4 px and scores to 1e-6."""
    expected = peer_expected(peer_files, name)
    detector = load_runtime(peer_files / f"{name}.pt").model.double()
    image = expected["input"].double()
    boxes, scores = peer_boxes_and_scores(expected["decoded"])
    with torch.no_grad():
        outputs = detector(image)
        unclipped = detector.head.decode_boxes(detector.head.flatten_outputs(outputs).reg, detector.priors_for(outputs))
        decoded = detector.decode(image)
    torch.testing.assert_close(unclipped[0], boxes.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(decoded.boxes[0], clip_boxes(boxes.float(), image.shape[-2:]), rtol=0, atol=1e-4)
    torch.testing.assert_close(decoded.scores[0], scores.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [name for name, _ in PEER_MODELS])
def test_detections_equal_ultralytics_nms(peer_files, name):
    """crosskd's post-processing with Ultralytics' predict semantics (the best class per box, the same conf, iou and
    max_det, class-aware NMS, no minimum box size) keeps exactly the detections of Ultralytics' non_max_suppression.

    What differs, so the comparison starts from boxes not clipped to the image: crosskd's predict clips boxes to the
    image before NMS and Ultralytics after it, so boxes reaching past an edge (here all: random DFL logits give sides
    of ~7.5 strides) overlap differently in NMS; and crosskd first keeps the nms_pre best priors per level where
    Ultralytics keeps max_nms (30,000) over all levels (the same here: 252 priors). Boxes agree to 1e-4 px, scores
    to 1e-6 (crosskd decodes in float32).
    """
    expected = peer_expected(peer_files, name)
    detector = load_runtime(peer_files / f"{name}.pt").model.double()
    assert detector.head.min_bbox_size is None
    with torch.no_grad():
        outputs = detector(expected["input"].double())
        priors = detector.priors_for(outputs)
        flat = detector.head.flatten_outputs(outputs)
        boxes, scores = detector.head.decode_boxes(flat.reg, priors), detector.head.scores(flat)
    detections = postprocess(boxes, scores, priors.num_per_level, expected["conf"], expected["iou"],
                             expected["max_det"], nms_pre=1000, multi_label=False, min_bbox_size=None)[0]
    theirs = expected["detections"]  # [K, 6] xyxy, score, class
    assert 20 < len(theirs) < int((scores.amax(-1) > expected["conf"]).sum())  # NMS removed some
    assert len(detections.boxes) == len(theirs)
    assert torch.equal(detections.labels, theirs[:, 5].long())
    torch.testing.assert_close(detections.boxes, theirs[:, :4].float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(detections.scores, theirs[:, 4].float(), rtol=0, atol=1e-6)


# ----- every mode takes a file Ultralytics wrote ------------------------------------------------------------------
@pytest.fixture(scope="module")
def self_labelled(peer_files, tmp_path_factory):
    """Four seeded noise images labelled with YOLO11n's own predictions (`Detector` on the Ultralytics file), so that
    validating the file on them must score AP 1; returns the dataset YAML."""
    root = tmp_path_factory.mktemp("self_labelled")
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for result in Detector(str(peer_files / "yolo11n.pt"), device="cpu").predict(str(images), imgsz=64, conf=0.25):
        assert len(result) > 0 and result.names == PEER_NAMES
        rows = [f"{int(c)} {' '.join(f'{v:.6f}' for v in box)}"
                for c, box in zip(result.boxes.cls, result.boxes.xywhn.tolist(), strict=True)]
        (labels / f"{Path(result.path).stem}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train",
                                    "names": list(PEER_NAMES.values())}))
    return data


def run_cli(*words: str) -> None:
    cli.main([*words, "device=cpu"])


def test_val_on_its_own_predictions_scores_ap_1(self_labelled, peer_files, tmp_path, capsys):
    """`crosskd val model=yolo11n.pt` sees the model `Detector(...).predict` ran: same weights, names, input."""
    run_cli("val", f"model={peer_files / 'yolo11n.pt'}", f"data={self_labelled}", "imgsz=64", "batch=4", "workers=0",
            "plots=False", f"project={tmp_path}")
    out = capsys.readouterr().out
    assert "AP 1.0000  AP50 1.0000" in out
    assert all(name in out for name in PEER_NAMES.values())


def test_predict_and_info_take_the_ultralytics_file(self_labelled, peer_files, tmp_path, capsys):
    run_cli("predict", f"model={peer_files / 'yolo11n.pt'}", f"source={self_labelled.parent / 'images' / 'train'}",
            "imgsz=64", f"project={tmp_path}", "name=predict")
    assert sorted(path.name for path in (tmp_path / "predict").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert "1 cat" in capsys.readouterr().out
    run_cli("info", f"model={peer_files / 'yolo11n.pt'}")
    assert "yolo11n summary: " in capsys.readouterr().out


def test_convert_writes_a_crosskd_file_with_identical_outputs(peer_files, tmp_path):
    converted = converter.run(get_args({"model": str(peer_files / "yolo11n.pt"), "save_dir": str(tmp_path)},
                                       "convert"))
    assert converted == tmp_path / "yolo11n.pt"
    original, reloaded = load_runtime(peer_files / "yolo11n.pt"), load_runtime(converted)
    assert (reloaded.kind, reloaded.names, reloaded.model.yaml["scale"]) == ("checkpoint", PEER_NAMES, "n")
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ours, theirs in zip(reloaded.model(image), original.model(image), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours or [], theirs or [], strict=True))


def test_pretrained_transfers_every_tensor(peer_files, caplog):
    torch.manual_seed(0)
    student = build_detector("yolo11n.yaml", nc=3)
    with caplog.at_level(logging.INFO, logger="crosskd"):
        load_pretrained(student, str(peer_files / "yolo11n.pt"))
    total = len(student.state_dict())
    assert f"Transferred {total}/{total} items from pretrained weights" in caplog.text
    source = load_runtime(peer_files / "yolo11n.pt").model.state_dict()
    assert all(torch.equal(tensor, source[key]) for key, tensor in student.state_dict().items())


@pytest.mark.slow  # ONNX export of YOLO11n with its parity and speed check, ~10 s
def test_onnx_export_of_the_ultralytics_file(peer_files, tmp_path):
    weights = tmp_path / "yolo11n.pt"
    weights.write_bytes((peer_files / "yolo11n.pt").read_bytes())
    run_cli("export", f"model={weights}", "format=onnx", "imgsz=64")
    exported = load_runtime(tmp_path / "yolo11n.onnx")
    assert (exported.kind, exported.names, exported.imgsz) == ("onnx", PEER_NAMES, (64, 64))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours, theirs = (Detector(str(source)).predict(image, imgsz=64) for source in (exported.source, weights))
    assert len(ours[0]) == len(theirs[0]) > 0
    torch.testing.assert_close(ours[0].boxes.xyxy, theirs[0].boxes.xyxy, rtol=0, atol=1e-2)


def test_distill_from_an_ultralytics_teacher(self_labelled, peer_files, tmp_path):
    args = get_args({"teacher": str(peer_files / "yolo11s.pt"), "model": "yolo11n.yaml", "data": str(self_labelled),
                     "imgsz": 64, "batch": 4, "workers": 0, "epochs": 1, "plots": False, "device": "cpu",
                     "project": str(tmp_path)}, "distill")
    teacher_state = load_runtime(peer_files / "yolo11s.pt").model.state_dict()
    trainer = launch.fit(args)
    assert trainer.teacher.yaml["scale"] == "s" and trainer.teacher.head.reg_branches[0][0].conv.out_channels == 64
    assert all(torch.equal(tensor, teacher_state[key]) for key, tensor in trainer.teacher.state_dict().items())
    results = (trainer.save_dir / "results.csv").read_text().splitlines()
    row = dict(zip(results[0].split(","), results[1].split(","), strict=True))
    assert all(0 < float(row[f"train/{key}_loss"]) < float("inf") for key in ("kd_cls", "kd_reg"))
    assert load_runtime(trainer.weights_dir / "best.pt").names == PEER_NAMES


def ultralytics_labels_as_batch(expected: dict) -> types.SimpleNamespace:
    """The peer's images and Ultralytics-style labels (batch_idx, cls, normalised xywh) as crosskd's padded batch."""
    images = expected["images"]
    height, width = images.shape[-2:]
    xyxy = box_convert(expected["bboxes"] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
    image_index = expected["batch_idx"].long()  # sorted, as Ultralytics collates
    slot = torch.arange(len(image_index)) - torch.searchsorted(image_index, image_index)  # the box's place in its image
    gt_boxes = torch.zeros(len(images), int(slot.max()) + 1, 4)
    gt_labels = torch.full(gt_boxes.shape[:2], -1)
    gt_boxes[image_index, slot] = xyxy
    gt_labels[image_index, slot] = expected["cls"][:, 0].long()
    return types.SimpleNamespace(images=images, gt_boxes=gt_boxes, gt_labels=gt_labels)


def test_sl2_equals_ultralytics_feature_distillation(peer_files):
    """kd=sl2 on the same two files, projectors and batch gives Ultralytics' DistillationModel loss (dis 6.0)."""
    expected = torch.load(peer_files / "sl2_expected.pt", weights_only=True)
    student, teacher = (load_runtime(peer_files / f"{name}.pt").model for name in ("yolo11n", "yolo11s"))
    distiller = Distiller(student, teacher, kd="sl2").train()
    distiller.methods["sl2"].projectors.load_state_dict(expected["projector"])
    losses = distiller.loss(ultralytics_labels_as_batch(expected))
    assert distiller.weights.feat == expected["dis"] == 6.0
    torch.testing.assert_close(losses["kd_feat"], expected["dis_loss"], rtol=1e-4, atol=0)
