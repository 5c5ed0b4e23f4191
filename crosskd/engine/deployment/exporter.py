"""Export a trained student DenseDetector in any format of the format table, with embedded metadata and a parity check.

Every graph starts from `ExportModel`, which holds the student only. The format's row (deployment/formats.py) says
where the file goes, on which device it is traced and what it supports (FP16, INT8); its runtime module writes the
file and loads it back for the parity check against PyTorch. An INT8 file is calibrated on a dataset's train images
(deployment/quantization.py); its accuracy check is AP on the val split (engine/tools/export.py), not parity.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from crosskd import __version__
from crosskd.config import Args, imgsz_hw, setting_or_model_default
from crosskd.engine.deployment.formats import export_format, export_formats
from crosskd.engine.deployment.loader import is_yaml, load_runtime
from crosskd.engine.deployment.quantization import (
    CalibrationSet,
    calibration_data,
    calibration_set,
    export_precision,
)
from crosskd.engine.deployment.runtimes.exported import (
    CROSSKD_INPUT,
    ULTRALYTICS_INPUT,
    ExportedDetector,
    InputConvention,
)
from crosskd.errors import ConfigError
from crosskd.models import DenseDetector
from crosskd.models.postprocess import select_detections
from crosskd.paths import newest_best, writable_dir, writable_file
from crosskd.utils import LOGGER, colorstr, select_device

DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 11, 20
LATENCY_SECONDS = 1.5  # each side of the latency line is timed for at least this long in all ...
LATENCY_MIN_RUNS, LATENCY_MAX_RUNS = 6, 300  # ... and for at least (at most) this many calls ...
LATENCY_ROUNDS = 3  # ... in this many turns per side, the sides taking turns
SETTLE_SECONDS = 0.1  # pause before each turn: the other runtime's worker threads stop spinning
PARITY_TOL = 1e-3  # max abs difference allowed between the exported graph and PyTorch (float32)
HALF_PARITY_TOL = 1e-2  # relative to the output's largest magnitude, for float16 graphs
EXPORT_CONF = 0.05  # score threshold baked into an nms=True graph when conf= is empty (the val default)


class ExportModel(nn.Module):
    """The student DenseDetector plus decoding (and optionally NMS) as one graph: images [B,3,H,W] 0..1 RGB -> output0.

    Without NMS output0 is the Ultralytics layout [B, 4+C, N]: centre x, centre y, width, height in input pixels,
    then the final class scores. With `nms=True` it is [B, max_det, 6] = x1, y1, x2, y2, score, class. A two-stage
    detector (Faster R-CNN) has only the latter: proposals, RoIAlign, the R-CNN stage and NMS all in the graph
    (`FasterRCNN.detection_rows`, the path eager `predict` takes).
    """

    def __init__(
        self,
        detector: DenseDetector,
        nms: bool = False,
        conf: float = EXPORT_CONF,
        iou: float = 0.6,
        max_det: int = 100,
        nms_pre: int = 1000,
        multi_label: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(detector, DenseDetector):
            raise TypeError(f"ExportModel takes a student DenseDetector, not {type(detector).__name__}")
        if detector.two_stage and not nms:
            raise ValueError("a two-stage detector exports with NMS in the graph (nms=True)")
        self.detector = detector
        self.nms, self.conf, self.iou, self.max_det, self.nms_pre = nms, conf, iou, max_det, nms_pre
        self.multi_label = multi_label

    def forward(self, images: Tensor) -> Tensor:
        if self.detector.two_stage:
            return self.detector.detection_rows(images, self.conf, self.iou, self.max_det, self.multi_label)[0]
        boxes, scores, num_per_level = self.detector.decode(images)  # [B, N, 4] xyxy, [B, N, C]
        if self.nms:
            return select_detections(boxes, scores, num_per_level, self.conf, self.iou, self.max_det, self.nms_pre,
                                     self.multi_label, self.detector.head.min_bbox_size)[0]
        return torch.cat([box_convert(boxes, "xyxy", "cxcywh"), scores], dim=-1).transpose(1, 2)  # [B, 4+C, N]


def export_imgsz(imgsz: int | list[int], stride: int) -> tuple[int, int]:
    """(h, w) of the export input, each rounded up to a multiple of the largest stride."""
    height, width = imgsz_hw(imgsz)
    size = tuple(-(-side // stride) * stride for side in (height, width))
    if size != (height, width):
        LOGGER.warning(f"imgsz={imgsz} is not a multiple of the largest stride {stride}; "
                       f"exporting at {size[0]}x{size[1]}")
    return size


def export_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset={opset} is not supported by the ONNX exporter; "
                          f"use {MIN_OPSET}..{MAX_OPSET}, e.g. opset={DEFAULT_OPSET}")
    return opset


def export_metadata(
    detector: DenseDetector, settings: dict, train_args: dict, calibration: CalibrationSet | None = None
) -> dict[str, str]:
    """String metadata stored in the exported file (Ultralytics keys plus what crosskd backends need); an INT8 file
    also records its calibration set."""
    names = getattr(detector, "names", None) or {i: str(i) for i in range(detector.head.num_classes)}
    calibrated = {"calibration": calibration.metadata()} if calibration is not None else {}
    return {
        "description": f"crosskd {detector.head_type} detector",
        "author": "crosskd",
        "date": datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "task": "detect",
        "stride": str(max(detector.strides)),
        "strides": str(list(detector.strides)),
        "imgsz": str(list(settings["imgsz"])),
        "batch": str(settings["batch"]),
        "channels": "3",
        "names": str({int(k): str(v) for k, v in names.items()}),
        "end2end": "False",
        "input": input_convention(detector).to_metadata(),
        "head_type": detector.head_type,
        "num_anchors": str(detector.head.num_anchors),
        "min_bbox_size": str(detector.head.min_bbox_size),
        "precision": settings["precision"],
        **calibrated,
        "args": str(settings),
        "model_yaml": json.dumps(detector.yaml),
        "train_args": json.dumps(train_args, default=str),
    }


def input_convention(detector: DenseDetector) -> InputConvention:
    """What the exported graph is fed: Ultralytics' letterbox for a YOLO model, so that Ultralytics clients and
    crosskd's runtimes give it the same input; crosskd's own convention for every other head."""
    return ULTRALYTICS_INPUT if detector.head_type == "yolo" else CROSSKD_INPUT


def latency_ms(
    functions: dict[str, Callable[[Tensor], object]], images: Tensor, seconds: float | None = None,
    rounds: int | None = None,
) -> dict[str, float]:
    """Median wall time in ms of each `function(images)` (CUDA synchronised), each timed alone; `seconds` and `rounds`
    default to LATENCY_SECONDS and LATENCY_ROUNDS.

    In each of `rounds` rounds every function takes its turn: a pause that lets the worker threads of whatever ran
    before go idle, warm-up calls (two in the first round, one after), then calls back to back for at least
    seconds / rounds and LATENCY_MIN_RUNS / rounds calls. The median is over every round's calls, so a function
    is never timed while another's threads compete, and a change in the machine's load falls on all of them.
    """
    seconds = LATENCY_SECONDS if seconds is None else seconds
    rounds = LATENCY_ROUNDS if rounds is None else rounds
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(rounds):
        for name, function in functions.items():
            time.sleep(SETTLE_SECONDS)
            for _ in range(2 if round_ == 0 else 1):
                function(images)
            turn: list[float] = []
            while len(turn) < LATENCY_MAX_RUNS // rounds and (
                    len(turn) < -(-LATENCY_MIN_RUNS // rounds) or sum(turn) < seconds / rounds):
                sync()
                start = time.perf_counter()
                function(images)
                sync()
                turn.append(time.perf_counter() - start)
            times[name] += turn
    return {name: float(np.median(values)) * 1000 for name, values in times.items()}


def median_ms(function: Callable[[Tensor], object], images: Tensor, seconds: float | None = None) -> float:
    """`latency_ms` of one function."""
    return latency_ms({"function": function}, images, seconds)["function"]


def check_parity(
    prefix: str, model: ExportModel, backend: ExportedDetector, images: Tensor, reference: Tensor, precision: str
) -> float:
    """Compare output0 of the written file, run by its inference `backend`, with PyTorch's `reference` [B, ...].

    Logs the largest difference and both latencies; raises when the difference exceeds the tolerance (an INT8 graph
    has none: its check is AP on the val split; an FP16 graph with NMS inside only warns, since rounding can change
    NMS's choice among overlapping boxes). Warns when an NMS graph's reference holds no detection (a trained
    model on the random check images): then equal outputs prove nothing.
    """
    reference = reference.float().cpu()
    output = backend.run(images).float().cpu()
    if output.shape != reference.shape:
        raise RuntimeError(f"{prefix} output shape {tuple(output.shape)} != PyTorch {tuple(reference.shape)}")
    diff = output_diff(output, reference, model.nms)
    tolerances = {"fp32": PARITY_TOL, "fp16": HALF_PARITY_TOL * max(1.0, reference.abs().max().item()),
                  "int8": math.inf}
    with torch.no_grad():
        ours, torch_ms = latency_ms({"runtime": backend.run, "pytorch": model}, images).values()
    checked = "; INT8: checked by AP instead" if precision == "int8" else ""
    LOGGER.info(f"{prefix} max abs diff {diff:.2e} vs PyTorch{checked}; {ours:.1f} ms vs PyTorch {torch_ms:.1f} ms "
                f"per batch {tuple(images.shape)} (medians, each timed alone; PyTorch on {torch.get_num_threads()} "
                "threads)")
    if model.nms and not (reference[..., 4] > 0).any():  # rows [B, max_det, 6], score in column 4
        LOGGER.warning(f"{prefix} parity compared empty outputs: no detection on the random check images scores above "
                       f"conf={model.conf}; compare AP instead (crosskd val or crosskd benchmark)")
    if diff > tolerances[precision]:
        message = f"{prefix} exported graph differs from PyTorch by {diff:.2e} (tolerance {tolerances[precision]:.1e})"
        if not (precision == "fp16" and model.nms):
            raise RuntimeError(message)
        LOGGER.warning(f"{message}: FP16 moves scores by ~1e-3, enough for NMS inside the graph to keep another of "
                       "two overlapping boxes; compare AP instead (crosskd val or crosskd benchmark)")
    return diff


def output_diff(output: Tensor, reference: Tensor, nms: bool) -> float:
    """Largest difference between two output0 tensors: element-wise for raw outputs, as sets of rows with NMS."""
    if not output.numel():
        return 0.0
    return rows_diff(output, reference) if nms else (output - reference).abs().max().item()


def rows_diff(output: Tensor, reference: Tensor) -> float:
    """Largest difference between two NMS outputs [B, max_det, 6] as sets of rows: each row against its nearest row
    of the same image in the other output (max abs over x1, y1, x2, y2, score, class). Two detections whose scores
    differ by float rounding may come out in either order, which a position-by-position difference would count as a
    whole box."""
    nearest = torch.cdist(output.double(), reference.double(), p=float("inf"))  # [B, M, M]
    return max(nearest.amin(dim=2).max().item(), nearest.amin(dim=1).max().item())


def export_settings(args: Args, detector: DenseDetector, train_args: dict, device: torch.device) -> dict:
    """The resolved export settings (also stored as the `args` metadata)."""
    imgsz = setting_or_model_default(args, "imgsz", train_args.get("imgsz"))
    return {
        "format": args.format,
        "device": str(device),
        "imgsz": list(export_imgsz(imgsz, max(detector.strides))),
        "batch": setting_or_model_default(args, "batch", 1),
        "dynamic": args.dynamic,
        "simplify": args.simplify,
        "opset": export_opset(args.opset) if export_format(args.format).opset else None,
        "half": args.half,
        "int8": args.int8,
        "calib_method": args.calib_method,
        "precision": export_precision(args.int8, args.half),
        "nms": export_nms(args, detector),
        "conf": EXPORT_CONF if args.conf is None else args.conf,
        "iou": args.iou,
        "max_det": args.max_det,
        "nms_pre": args.nms_pre,
        "multi_label": True if args.multi_label is None else args.multi_label,
    }


def export_nms(args: Args, detector: DenseDetector) -> bool:
    """nms=; always True for a two-stage detector, whose per-class boxes exist only after its R-CNN stage."""
    if detector.two_stage and not args.nms:
        LOGGER.info(f"{detector.head_type}: exporting with proposals and NMS in the graph (nms=True)")
        return True
    return bool(args.nms)


def export_path(model: str | Path | None, fmt: str, precision: str = "fp32") -> Path:
    """Next to the .pt with the same stem (`_int8` added for INT8); `model<suffix>` in the current directory for
    anything else."""
    weights = Path(model or "model.pt")
    path = export_format(fmt).path_for(weights, precision)
    return path if weights.suffix == ".pt" else Path(path.name)


def export_device(args: Args) -> torch.device:
    """Where the graph is traced and checked: the CPU for a CPU-only format (where its runtime runs), else device=.
    What the format's row cannot write (FP16 on this device, INT8) ends here in one line, before any work."""
    fmt = export_format(args.format)
    fmt.check_installed(int8=args.int8)
    if args.int8 and args.half:
        raise ConfigError("int8=True and half=True exclude each other; keep one")
    if args.int8 and not fmt.int8:
        int8_formats = " or ".join(f"format={row.name}" for row in export_formats() if row.int8)
        raise ConfigError(f"format={fmt.name} has no INT8 export; use {int8_formats}, or drop int8=True")
    device = torch.device("cpu") if fmt.cpu_only else select_device(args.device)
    if fmt.gpu and device.type != "cuda":
        raise ConfigError(f"format={fmt.name} needs a CUDA device; pass device=0")
    if args.half and device.type not in fmt.half:
        raise ConfigError(half_refusal(fmt.name))
    return device


def half_refusal(name: str) -> str:
    """Why half=True cannot be written for format=`name` here, and what can."""
    fmt = export_format(name)
    on_cpu = " or ".join(f"format={row.name}" for row in export_formats() if "cpu" in row.half)
    if "cuda" in fmt.half:
        return f"half=True needs a CUDA device for format={name} (FP16 runs there); pass device=0, use {on_cpu} " \
               "for FP16 on the CPU, or drop half=True"
    return f"format={name} has no FP16 export; drop half=True"


def file_size_mb(path: Path) -> float:
    """Size of an exported file, or of every file in an export folder, in MB."""
    files = [file for file in path.rglob("*") if file.is_file()] if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files) / 1e6


def write_export(
    model: ExportModel, images: Tensor, path: Path, settings: dict, metadata: dict, device: torch.device,
    calibration: CalibrationSet | None = None,
) -> tuple[str, ExportedDetector]:
    """Write `model` to `path` in settings['format'] (INT8 when `calibration` is given) and load it back; returns
    (log prefix, inference backend)."""
    fmt = export_format(settings["format"])
    runtime = fmt.runtime_module()
    if calibration is None:
        runtime.export(model, images, path, settings, metadata)
    else:
        runtime.export_int8(model, images, path, settings, metadata, calibration)
    title = fmt.title + ("" if settings["precision"] == "fp32" else f" {settings['precision'].upper()}")
    return colorstr(f"{title}:"), runtime.load(path, device)


def int8_calibration(args: Args, settings: dict, train_args: dict, detector: DenseDetector) -> CalibrationSet | None:
    """The calibration set of an int8=True export (None otherwise): `fraction` of the train split of data= or, when
    data= is not given, of the checkpoint's training data, fed as the file will be (`input_convention`)."""
    if not settings["int8"]:
        return None
    given = "data" in (getattr(args, "explicit", None) or ())
    data = calibration_data(args.data, given, train_args, args.datasets_dir)
    return calibration_set(data, args.datasets_dir, args.fraction, args.calib_method, settings["imgsz"],
                           max(detector.strides), input_convention(detector))


def export(detector: DenseDetector, args: Args, train_args: dict | None = None) -> Path:
    """Export the student `detector` as `args.format` next to `args.model`; returns the written file.

    `train_args` (the checkpoint's) give the default imgsz and are embedded in the metadata.
    """
    train_args = train_args or {}
    device = export_device(args)
    settings = export_settings(args, detector, train_args, device)
    dtype = torch.float16 if settings["half"] and device.type == "cuda" else torch.float32  # OpenVINO: FP16 at save
    model = ExportModel(copy.deepcopy(detector), settings["nms"], settings["conf"], settings["iou"],
                        settings["max_det"], settings["nms_pre"], settings["multi_label"])
    model = model.to(device, dtype).eval()  # eval on the wrapper too: exporters restore the wrapper's mode
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(settings["batch"], 3, *settings["imgsz"], generator=generator).to(device, dtype)
    writable = writable_dir if export_format(settings["format"]).folder else writable_file
    path = writable(export_path(args.model, settings["format"], settings["precision"]),
                    "the export is written beside model=: copy the .pt to a folder you can write to")
    calibration = int8_calibration(args, settings, train_args, detector)
    with torch.no_grad():
        reference = model(images)
    size_mb = sum(p.numel() * p.element_size() for p in detector.state_dict().values()) / 1e6
    LOGGER.info(f"{colorstr('PyTorch:')} starting from '{args.model}' with input shape {tuple(images.shape)} BCHW "
                f"and output shape(s) {tuple(reference.shape)} ({size_mb:.1f} MB)")
    metadata = export_metadata(detector, settings, train_args, calibration)
    start = time.perf_counter()
    prefix, backend = write_export(model, images, path, settings, metadata, device, calibration)
    check_parity(prefix, model, backend, images, reference, settings["precision"])
    LOGGER.info(f"{prefix} export success ✅ {time.perf_counter() - start:.1f}s, saved as '{path}' "
                f"({file_size_mb(path):.1f} MB)")
    log_usage(path, settings, train_args.get("data"))
    return path


def log_usage(path: Path, settings: dict, data: str | None) -> None:
    """Where the file went and ready-to-paste predict/val commands."""
    height, width = settings["imgsz"]
    imgsz = str(height) if height == width else f"{height},{width}"
    LOGGER.info(f"\nExport complete\nResults saved to {path.resolve()}")
    LOGGER.info(f"Predict:  crosskd predict model={path} imgsz={imgsz} source=path/to/images")
    LOGGER.info(f"Validate: crosskd val model={path} imgsz={imgsz}" + (f" data={data}" if data else ""))


def run(args: Args) -> Path:
    """Load the student from `model=` (or the newest best.pt) and write its export (`crosskd export` is
    engine/tools/export.run: this, then the AP check of an INT8 file)."""
    source = args.model or newest_best("exporting")
    if is_yaml(source):
        raise ConfigError(f"export needs trained weights, not the bare model YAML model={source}; e.g. model=best.pt")
    runtime = load_runtime(source, model_cfg=args.model_cfg)
    return export(runtime.detector("export"), Args(**{**vars(args), "model": str(source)}), runtime.train_args)
