"""Model summaries: layer and parameter counts, GFLOPs, and the `crosskd info` mode."""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from crosskd.config import imgsz_hw
from crosskd.data import read_dataset_names
from crosskd.engine.deployment.loader import load_runtime
from crosskd.errors import ConfigError
from crosskd.models import DenseDetector
from crosskd.utils import console

DEFAULT_NC = 80


def count_layers(model: nn.Module) -> int:
    """Number of leaf modules (layers without children)."""
    return sum(1 for m in model.modules() if not any(m.children()))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """Forward GFLOPs (2 per multiply-add) of one image at `imgsz`, counted with torch's FlopCounterMode.

    A two-stage detector's R-CNN stage costs per proposal, so its count depends on the image: a blank one, as here,
    gives the test settings' full `rpn_test_post_nms` proposals (1000) from about 320 px up (`blank_proposals`).
    """
    return _blank_pass(model, imgsz)[0]


def blank_proposals(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> int | None:
    """The proposals a two-stage detector's R-CNN stage runs on for the blank image of `gflops`; None if dense."""
    return _blank_pass(model, imgsz)[1] if getattr(model, "two_stage", False) else None


def _blank_pass(model: nn.Module, imgsz: int | tuple[int, int]) -> tuple[float, int | None]:
    """GFLOPs of one blank image at `imgsz` and, for a two-stage detector, its number of proposals."""
    param = next(model.parameters())
    images = torch.zeros(1, 3, *imgsz_hw(imgsz), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        outputs = model(images)
    model.train(was_training)
    proposals = getattr(outputs, "proposals", None)
    return counter.get_total_flops() / 1e9, None if proposals is None else int(proposals.counts.sum())


def model_info(detector: DenseDetector, imgsz: int | tuple[int, int] = 640) -> str:
    """One summary line: `name summary: N layers, P parameters, G GFLOPs at WxH`."""
    height, width = imgsz_hw(imgsz)
    name = detector.yaml.get("name", detector.head_type)
    flops, proposals = _blank_pass(detector, (height, width))
    layers, params = count_layers(detector), count_params(detector)
    rois = "" if proposals is None else f" (R-CNN stage on the {proposals} proposals of a blank image)"
    return f"{name} summary: {layers} layers, {params:,} parameters, {flops:.1f} GFLOPs at {width}x{height}{rois}"


def module_table(detector: DenseDetector) -> Table:
    """A rich table of the detector's parts two levels deep (name, type, parameters)."""
    table = Table(title=str(detector.yaml.get("name", "model")))
    for column, justify in (("name", "left"), ("type", "left"), ("params", "right")):
        table.add_column(column, justify=justify)
    for part_name, part in detector.named_children():
        table.add_row(part_name, type(part).__name__, f"{count_params(part):,}", style="bold")
        for child_name, child in part.named_children():
            table.add_row(f"  {part_name}.{child_name}", type(child).__name__, f"{count_params(child):,}")
    return table


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
