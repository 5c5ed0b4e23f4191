"""Model summaries: layer and parameter counts, GFLOPs, and the `crosskd info` mode."""

from pathlib import Path
from typing import Any

import torch
import yaml
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from crosskd.errors import CheckpointError, ConfigError, DataError
from crosskd.paths import resolve_cfg_file
from crosskd.utils import console

from .build import build_detector, load_model_yaml
from .dense_detector import DenseDetector

DEFAULT_NC = 80


def _hw(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) from an int or an (h, w) pair."""
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[-1]))


def count_layers(model: nn.Module) -> int:
    """Number of leaf modules (layers without children)."""
    return sum(1 for m in model.modules() if not any(m.children()))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """Forward GFLOPs (2 per multiply-add) of one image at `imgsz`, counted with torch's FlopCounterMode."""
    param = next(model.parameters())
    images = torch.zeros(1, 3, *_hw(imgsz), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def model_info(detector: DenseDetector, imgsz: int | tuple[int, int] = 640) -> str:
    """One summary line: `name summary: N layers, P parameters, G GFLOPs at WxH`."""
    height, width = _hw(imgsz)
    name = detector.yaml.get("name", detector.head_type)
    flops = gflops(detector, (height, width))
    layers, params = count_layers(detector), count_params(detector)
    return f"{name} summary: {layers} layers, {params:,} parameters, {flops:.1f} GFLOPs at {width}x{height}"


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
    """Classes named in the `data=` dataset YAML when given (read only, nothing generated), else 80 (COCO)."""
    if not getattr(args, "data", None):
        return DEFAULT_NC
    path = resolve_cfg_file(args.data, "datasets")
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if not isinstance(names, (list, dict)) or not names:
        raise DataError(
            f"{path.name}: 'names:' is missing; list the class names (cfg/datasets/coco.yaml is an example)"
        )
    return len(names)


def _checkpoint_yaml(path: Path) -> dict:
    """The model dict (with `nc`) stored in a crosskd .pt checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"model={path} is not a readable crosskd checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_yaml"), dict):
        raise CheckpointError(f"model={path} has no 'model_yaml'; give a crosskd .pt or a model YAML")
    return ckpt["model_yaml"]


def run(args: Any) -> str:
    """`crosskd info model=cfg/models/gfl_r50.yaml imgsz=640 [data=...]`: print the module table and summary.

    A crosskd .pt checkpoint works too (its stored model YAML and class count are used).
    """
    if not getattr(args, "model", None):
        raise ConfigError("info needs model=: a model YAML (e.g. model=gfl_r50.yaml) or a crosskd .pt checkpoint")
    path = Path(str(args.model))
    if path.suffix == ".pt":
        cfg = _checkpoint_yaml(path)
        detector = build_detector(cfg, int(cfg["nc"]))
    else:
        cfg, _ = load_model_yaml(path)
        detector = build_detector(cfg, _num_classes(args))
    summary = model_info(detector, args.imgsz)
    console.print(module_table(detector))
    console.print(summary)
    return summary


def markdown_table(names: list[str], imgsz: int = 640, nc: int = DEFAULT_NC) -> str:
    """A markdown table (model, head, backbone, parameters, GFLOPs) of shipped model YAMLs for docs/models.md."""
    rows = ["| model | head | backbone | parameters | GFLOPs |", "|---|---|---|---:|---:|"]
    for name in names:
        detector = build_detector(name, nc)
        backbone = detector.yaml["backbone"]
        depth = f"-{backbone['depth']}" if "depth" in backbone else ""
        width = f" ×{backbone['width']}" if backbone.get("width", 1.0) != 1.0 else ""
        cells = [name, detector.head_type, f"{backbone['type']}{depth}{width}"]
        cells += [f"{count_params(detector) / 1e6:.1f} M", f"{gflops(detector, imgsz):.1f}"]
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows)
