"""Model summaries: layer and parameter counts, GFLOPs, and the `crosskd info` mode."""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from crosskd.config import imgsz_hw
from crosskd.data import read_dataset_names
from crosskd.engine.deployment.loader import load_runtime
from crosskd.errors import ConfigError
from crosskd.models import DenseDetector
from crosskd.utils import console

DEFAULT_NC = 80


CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def count_layers(model: nn.Module) -> int:
    """Number of leaf modules (layers without children); an empty container (e.g. a Faster R-CNN's `rpn.extra_convs`
    with one RPN conv) holds no layer."""
    return sum(1 for m in model.modules() if not any(m.children()) and not isinstance(m, CONTAINERS))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """Forward GFLOPs (2 per multiply-add) of one image at `imgsz`, counted with torch's FlopCounterMode.

    A two-stage detector's R-CNN stage costs per RoI, and how many proposals survive depends on the image, so it is
    counted at a fixed `rcnn_rois(model)` RoIs (the test setting's proposals per image), not on a blank image's.
    """
    param = next(model.parameters())
    images = torch.zeros(1, 3, *imgsz_hw(imgsz), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if getattr(model, "two_stage", False):
            _two_stage_pass(model, images)
        else:
            model(images)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def rcnn_rois(model: nn.Module) -> int | None:
    """The RoIs a two-stage detector's GFLOPs count its R-CNN stage at (`rpn_test_post_nms`); None if dense."""
    return model.head.rpn.test_proposals.post_nms if getattr(model, "two_stage", False) else None


def _two_stage_pass(model: nn.Module, images: Tensor) -> None:
    """Backbone, FPN, RPN and the R-CNN stage on `rcnn_rois(model)` whole-image RoIs [K, 5] (image 0)."""
    feats = model.extract_features(images)
    model.head.rpn(feats)
    height, width = images.shape[-2:]
    rois = images.new_tensor([0.0, 0.0, 0.0, width, height]).expand(rcnn_rois(model), 5)  # [K, 5]
    roi_head = model.head.roi_head
    roi_head(roi_head.pool(feats, rois))


def model_info(detector: DenseDetector, imgsz: int | tuple[int, int] = 640) -> str:
    """One summary line: `name summary: N layers, P parameters, G GFLOPs at WxH`."""
    height, width = imgsz_hw(imgsz)
    name = detector.yaml.get("name", detector.head_type)
    flops, num_rois = gflops(detector, (height, width)), rcnn_rois(detector)
    layers, params = count_layers(detector), count_params(detector)
    rois = "" if num_rois is None else f" (R-CNN stage at {num_rois} RoIs)"
    return f"{name} summary: {layers} layers, {params:,} parameters, {flops:.1f} GFLOPs at {width}x{height}{rois}"


def module_table(detector: DenseDetector) -> Table:
    """A rich table of the detector's parts two levels deep (name, type, parameters)."""
    table = Table(title=str(detector.yaml.get("name", "model")))
    for column, justify in (("name", "left"), ("type", "left"), ("params", "right")):
        table.add_column(column, justify=justify)
    for part_name, part in detector.named_children():
        table.add_row(part_name, type(part).__name__, f"{count_params(part):,}", style="bold")
        for child_name, child in _part_children(part):
            table.add_row(f"  {part_name}.{child_name}", type(child).__name__, f"{count_params(child):,}")
    return table


def _part_children(part: nn.Module) -> list[tuple[str, nn.Module]]:
    """A part's children, with a YOLO body's layer list (`layers`, Ultralytics' numbering) one row per layer."""
    children = []
    for name, child in part.named_children():
        is_layer_list = name == "layers" and isinstance(child, nn.ModuleList)
        children += [(f"layers.{i}", layer) for i, layer in enumerate(child)] if is_layer_list else [(name, child)]
    return children


def _num_classes(args: Any) -> int:
    """Classes named in the `data=` dataset YAML when given, else 80 (COCO)."""
    return len(read_dataset_names(args.data)) if getattr(args, "data", None) else DEFAULT_NC


def run(args: Any) -> str:
    """`crosskd info model=gfl_r50.yaml imgsz=640 [data=...]`: print the module table and the summary line.

    Any PyTorch model source works (a crosskd .pt uses its own classes; a YAML takes them from data=, else 80).
    """
    if not getattr(args, "model", None):
        raise ConfigError("info needs model=: a model YAML (e.g. model=gfl_r50.yaml) or a crosskd .pt checkpoint")
    model_cfg = getattr(args, "model_cfg", None)
    detector = load_runtime(args.model, nc=_num_classes(args), model_cfg=model_cfg).detector("info")
    summary = model_info(detector, args.imgsz)
    console.print(module_table(detector))
    console.print(summary)
    return summary
