"""`crosskd benchmark`: export a checkpoint to every format, then size, COCO AP and speed per format.

Ultralytics' benchmark table: one row per format (the PyTorch checkpoint itself, TorchScript, ONNX, OpenVINO) and
precision (FP32; FP16 where the format writes it on the device; INT8 where it has it, calibrated on the train split of
data=), each validated through its own runtime by the one Validator and timed on random images at the run's batch
and imgsz (graph plus post-processing, as predict runs it). A format that fails (openvino not installed, an export
error) shows its error in its row and the other formats still run. The exports, benchmark.csv and benchmark.json go to
runs/benchmark/<name>.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from rich.table import Table

from crosskd.config import Args, setting_or_model_default
from crosskd.data import load_data_yaml
from crosskd.engine.deployment import exporter, formats
from crosskd.engine.deployment.loader import Runtime, exported_kind, is_yaml, load_runtime
from crosskd.engine.deployment.runtimes.exported import ExportedDetector
from crosskd.engine.evaluation.validator import VAL_CONF, Validator
from crosskd.errors import ConfigError, DataError
from crosskd.models import DenseDetector
from crosskd.paths import make_save_dir, newest_best
from crosskd.utils import LOGGER, colorstr, console, select_device


@dataclass(frozen=True)
class BenchmarkRow:
    """One format's line of the table; the measurements are None when the format failed."""

    format: str
    status: str  # "ok" or the error that stopped this format, one line
    file: str = ""
    size_mb: float | None = None
    ap: float | None = None
    ap50: float | None = None
    ms_per_image: float | None = None


def run(args: Args) -> list[BenchmarkRow]:
    """Entry for `crosskd benchmark`: every format of `args.model` (or the newest best.pt) on `args.data`."""
    source = str(args.model or newest_best("benchmarking"))
    if is_yaml(source) or exported_kind(source) is not None:
        raise ConfigError(f"benchmark exports a trained crosskd checkpoint, not model={source}; e.g. model=best.pt")
    info = load_data_yaml(args.data, args.datasets_dir)
    device = select_device(args.device)
    runtime = load_runtime(source, model_cfg=args.model_cfg, device=device)
    if runtime.nc != info.nc:
        raise DataError(f"the model has {runtime.nc} classes but data={args.data} has {info.nc}; "
                        "benchmark on the dataset the model was trained on")
    args = benchmark_args(args, runtime)
    save_dir = make_save_dir(args, "benchmark")
    rows = [benchmark_format(fmt, precision, runtime, args, save_dir, device)
            for fmt, precision in variants(device)]
    height, width = args.imgsz
    size = height if height == width else f"{height},{width}"
    console.print(benchmark_table(rows, f"Benchmarks: {Path(source).name} on {Path(args.data).name} ({args.split}) "
                                        f"imgsz={size} batch={args.batch} {device}"))
    write_rows(rows, save_dir)
    LOGGER.info(f"Results saved to {colorstr('bold', str(save_dir))}")
    return rows


def benchmark_args(args: Args, runtime: Runtime) -> Args:
    """`args` with imgsz resolved (typed, else the checkpoint's; rounded up to the largest stride as exports are) and
    imgsz/batch/data marked typed, so every format is exported, validated and timed at the same size and batch, and
    INT8 calibrates on the benchmark's data."""
    imgsz = setting_or_model_default(args, "imgsz", runtime.train_args.get("imgsz"))
    imgsz = list(exporter.export_imgsz(imgsz, runtime.stride))  # [h, w]
    explicit = vars(args).get("explicit") or frozenset()
    return Args(**{**vars(args), "imgsz": imgsz, "explicit": frozenset(explicit | {"imgsz", "batch", "data"})})


def variants(device: torch.device) -> list[tuple[formats.ExportFormat, str]]:
    """(format, precision) of every row: each format in FP32, then in FP16 where it writes FP16 on the device it
    runs on, and in INT8 where it has an INT8 export."""
    rows = []
    for fmt in formats.FORMATS:
        rows.append((fmt, "fp32"))
        if ("cpu" if fmt.cpu_only else device.type) in fmt.half:
            rows.append((fmt, "fp16"))
        if fmt.int8:
            rows.append((fmt, "int8"))
    return rows


def benchmark_format(
    fmt: formats.ExportFormat, precision: str, runtime: Runtime, args: Args, save_dir: Path, device: torch.device
) -> BenchmarkRow:
    """Export (unless pytorch), validate and time one format at one precision; its error, in one line, when any
    step fails."""
    title = fmt.title + ("" if precision == "fp32" else f" {precision.upper()}")
    try:
        model, path = format_model(fmt, precision, runtime, args, save_dir, device)
        metrics = Validator(args, model=model, save_dir=save_dir).run(plots=False, per_class=False)
        speed = ms_per_image(model, args)
    except Exception as error:  # any failure of one format belongs in its row, not in a crash of the benchmark
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        LOGGER.warning(f"benchmark {title} failed: {reason}")
        return BenchmarkRow(title, reason)
    return BenchmarkRow(title, "ok", str(path), exporter.file_size_mb(path), metrics["AP"], metrics["AP50"], speed)


def format_model(
    fmt: formats.ExportFormat, precision: str, runtime: Runtime, args: Args, save_dir: Path, device: torch.device
) -> tuple[DenseDetector | ExportedDetector, Path]:
    """The model to validate in format `fmt` at `precision` and the file it comes from (exported into `save_dir`;
    FP16 into save_dir/fp16, as it has the FP32 file's name)."""
    if fmt.module is None:  # the PyTorch checkpoint itself
        return runtime.model, Path(runtime.source)
    folder = save_dir / "fp16" if precision == "fp16" else save_dir
    folder.mkdir(exist_ok=True)
    export_args = Args(**{**vars(args), "format": fmt.name, "model": str(folder / Path(runtime.source).name),
                          "half": precision == "fp16", "int8": precision == "int8"})
    path = exporter.export(runtime.detector("benchmark"), export_args, runtime.train_args)
    return load_runtime(path, device=device).model, path


def ms_per_image(model: DenseDetector | ExportedDetector, args: Args) -> float:
    """Median ms per image of `model.predict` (graph + NMS) on random images [batch, 3, H, W] at imgsz."""
    height, width = exporter.export_imgsz(args.imgsz, max(model.strides))
    device = model.device if isinstance(model, ExportedDetector) else next(model.parameters()).device
    images = torch.rand(args.batch, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    conf = VAL_CONF if args.conf is None else args.conf

    def predict(batch: torch.Tensor) -> list:
        return model.predict(batch, conf, args.iou, args.max_det, args.nms_pre)

    with torch.inference_mode():
        return exporter.median_ms(predict, images) / args.batch


def benchmark_table(rows: list[BenchmarkRow], title: str) -> Table:
    """The rich table: format, status, size, AP, AP50, ms per image."""
    table = Table(title=title)
    for column in ("Format", "Status", "Size (MB)", "AP", "AP50", "ms/img"):
        table.add_column(column, justify="left" if column in ("Format", "Status") else "right")
    for row in rows:
        status = "✅" if row.status == "ok" else f"❌ {row.status}"
        numbers = (row.size_mb, row.ap, row.ap50, row.ms_per_image)
        table.add_row(row.format, status, *(f"{value:.{digits}f}" if value is not None else "-"
                                            for value, digits in zip(numbers, (1, 4, 4, 2))))
    return table


def write_rows(rows: list[BenchmarkRow], save_dir: Path) -> None:
    """benchmark.csv and benchmark.json: one record per format (empty / null measurements for a failed one)."""
    with (save_dir / "benchmark.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in fields(BenchmarkRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    (save_dir / "benchmark.json").write_text(json.dumps([asdict(row) for row in rows], indent=2))
