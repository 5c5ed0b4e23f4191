"""Export a trained student DenseDetector to ONNX, TorchScript or OpenVINO with embedded metadata and a parity check.

ONNX uses torch's TorchScript-based exporter (`dynamo=False`) on purpose: on this project's CPUs it takes under a
second against 4.5-7 s for the torch.export-based one, writes one self-contained file, supports opsets 11-20 and
exports torchvision's NMS. Every graph starts from `ExportModel`, which holds the student only; OpenVINO converts
the ONNX graph (its direct PyTorch conversion took 13 s here against 5 s for ONNX + conversion).
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torchvision.ops import box_convert

from crosskd import __version__
from crosskd.config import Args, imgsz_hw, setting_or_model_default
from crosskd.engine.deployment.loader import is_yaml, load_runtime
from crosskd.engine.deployment.runtimes.exported import CROSSKD_INPUT, ExportedDetector
from crosskd.engine.deployment.runtimes.onnx import OnnxDetector
from crosskd.engine.deployment.runtimes.openvino import (
    OPENVINO_METADATA,
    OPENVINO_SUFFIX,
    OpenVinoDetector,
    import_openvino,
)
from crosskd.engine.deployment.runtimes.torchscript import TORCHSCRIPT_METADATA, TorchScriptDetector
from crosskd.errors import ConfigError
from crosskd.models import DenseDetector
from crosskd.models.postprocess import select_detections
from crosskd.paths import newest_best, writable_dir, writable_file
from crosskd.utils import LOGGER, colorstr, select_device

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "openvino": OPENVINO_SUFFIX}
DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 11, 20
LATENCY_RUNS = 3  # timed runs (after one warm-up) for the latency comparison
PARITY_TOL = 1e-3  # max abs difference allowed between the exported graph and PyTorch (float32)
HALF_PARITY_TOL = 1e-2  # relative to the output's largest magnitude, for float16 graphs
EXPORT_CONF = 0.05  # score threshold baked into an nms=True graph when conf= is empty (the val default)


class ExportModel(nn.Module):
    """The student DenseDetector plus decoding (and optionally NMS) as one graph: images [B,3,H,W] 0..1 RGB -> output0.

    Without NMS output0 is the Ultralytics layout [B, 4+C, N]: centre x, centre y, width, height in input pixels,
    then the final class scores. With `nms=True` it is [B, max_det, 6] = x1, y1, x2, y2, score, class.
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
        self.detector = detector
        self.nms, self.conf, self.iou, self.max_det, self.nms_pre = nms, conf, iou, max_det, nms_pre
        self.multi_label = multi_label

    def forward(self, images: Tensor) -> Tensor:
        boxes, scores, num_per_level = self.detector.decode(images)  # [B, N, 4] xyxy, [B, N, C]
        if self.nms:
            return select_detections(boxes, scores, num_per_level, self.conf, self.iou, self.max_det, self.nms_pre,
                                     self.multi_label)[0]
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


def export_metadata(detector: DenseDetector, settings: dict, train_args: dict) -> dict[str, str]:
    """String metadata stored in the exported file (Ultralytics keys plus what crosskd backends need)."""
    names = getattr(detector, "names", None) or {i: str(i) for i in range(detector.head.num_classes)}
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
        "input": CROSSKD_INPUT.to_metadata(),
        "head_type": detector.head_type,
        "num_anchors": str(detector.head.num_anchors),
        "args": str(settings),
        "model_yaml": json.dumps(detector.yaml),
        "train_args": json.dumps(train_args, default=str),
    }


@contextlib.contextmanager
def quiet_export_warnings() -> Iterator[None]:
    """Silence tracer and legacy-exporter deprecation chatter (the exporter choice is deliberate)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|deprecated|will be removed).*")
        yield


def dynamic_axes(nms: bool) -> dict[str, dict[int, str]]:
    """Batch, height and width of `images` (only batch with NMS inside, whose top-k sizes are fixed)."""
    if nms:
        return {"images": {0: "batch"}, "output0": {0: "batch"}}
    return {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}}


def export_onnx(model: ExportModel, images: Tensor, path: Path, opset: int, settings: dict, metadata: dict) -> None:
    """Trace `model` to a self-contained .onnx with metadata, optionally slimmed, and check it."""
    import onnx

    LOGGER.info(f"{colorstr('ONNX:')} starting export with onnx {onnx.__version__} opset {opset}...")
    with quiet_export_warnings(), torch.no_grad():
        torch.onnx.export(
            model, (images,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
            output_names=["output0"], dynamic_axes=dynamic_axes(model.nms) if settings["dynamic"] else None,
        )
    proto = onnx.load(str(path))
    if settings["simplify"]:
        proto = slim(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def slim(proto):
    """Simplify an ONNX graph with onnxslim; on failure warn and keep the original."""
    import onnxslim

    LOGGER.info(f"{colorstr('ONNX:')} slimming with onnxslim {onnxslim.__version__}...")
    try:
        return onnxslim.slim(proto)
    except Exception as error:  # any onnxslim failure must not lose a valid export
        LOGGER.warning(f"onnxslim failed ({error}); keeping the unsimplified graph")
        return proto


def export_openvino(model: ExportModel, images: Tensor, path: Path, settings: dict, metadata: dict) -> None:
    """The ONNX graph of format=onnx converted by OpenVINO into the folder `path`: <stem>.xml/.bin + metadata.yaml.

    Going through ONNX keeps one traced graph for both formats (dynamic axes and embedded NMS included).
    """
    openvino = import_openvino()
    LOGGER.info(f"{colorstr('OpenVINO:')} starting export with openvino {openvino.__version__.split('-')[0]}...")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, images, onnx_path, settings["opset"], settings, metadata)
        ov_model = openvino.convert_model(str(onnx_path))
        xml = path / f"{path.name.removesuffix(OPENVINO_SUFFIX)}.xml"
        openvino.save_model(ov_model, str(xml), compress_to_fp16=False)  # FP32 weights: parity within 1e-3
    (path / OPENVINO_METADATA).write_text(yaml.safe_dump(metadata, sort_keys=False))


def export_torchscript(model: ExportModel, images: Tensor, path: Path, metadata: dict) -> None:
    """torch.jit.trace `model`; the metadata goes into the archive as config.txt (JSON)."""
    LOGGER.info(f"{colorstr('TorchScript:')} starting export with torch {torch.__version__}...")
    with quiet_export_warnings(), torch.no_grad():
        traced = torch.jit.trace(model, images, strict=False)
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


def median_ms(function, images: Tensor, runs: int = LATENCY_RUNS) -> float:
    """Median wall time of `function(images)` in ms after one warm-up call (CUDA synchronised)."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    function(images)
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        function(images)
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def check_parity(
    prefix: str, model: ExportModel, backend: ExportedDetector, images: Tensor, reference: Tensor, half: bool
) -> float:
    """Compare output0 of the written file, run by its inference `backend`, with PyTorch's `reference` [B, ...].

    Logs the largest difference and both latencies; raises when the difference exceeds the tolerance.
    """
    reference = reference.float().cpu()
    output = backend.run(images).float().cpu()
    if output.shape != reference.shape:
        raise RuntimeError(f"{prefix} output shape {tuple(output.shape)} != PyTorch {tuple(reference.shape)}")
    diff = (output - reference).abs().max().item() if output.numel() else 0.0
    tolerance = HALF_PARITY_TOL * max(1.0, reference.abs().max().item()) if half else PARITY_TOL
    with torch.no_grad():
        ours, torch_ms = median_ms(backend.run, images), median_ms(model, images)
    LOGGER.info(f"{prefix} max abs diff {diff:.2e} vs PyTorch; {ours:.1f} ms vs PyTorch {torch_ms:.1f} ms "
                f"per batch {tuple(images.shape)}")
    if diff > tolerance:
        raise RuntimeError(f"{prefix} exported graph differs from PyTorch by {diff:.2e} (tolerance {tolerance:.1e})")
    return diff


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
        "opset": export_opset(args.opset) if args.format in ("onnx", "openvino") else None,
        "half": args.half,
        "nms": args.nms,
        "conf": EXPORT_CONF if args.conf is None else args.conf,
        "iou": args.iou,
        "max_det": args.max_det,
        "nms_pre": args.nms_pre,
        "multi_label": True if args.multi_label is None else args.multi_label,
    }


def export_path(model: str | Path | None, fmt: str) -> Path:
    """Next to the .pt with the same stem; `model<suffix>` in the current directory for anything else."""
    weights = Path(model or "model.pt")
    name = weights.stem + SUFFIXES[fmt]
    return weights.with_name(name) if weights.suffix == ".pt" else Path(name)


def export_device(args: Args) -> torch.device:
    """Where the graph is traced and checked: the CPU for OpenVINO (where its runtime runs), else device=."""
    if args.format == "openvino":
        import_openvino()  # a missing package ends here, before any work
        if args.half:
            raise ConfigError("format=openvino writes an FP32 model for the CPU; drop half=True")
        return torch.device("cpu")
    device = select_device(args.device)
    if args.half and device.type != "cuda":
        raise ConfigError("half=True needs a CUDA device (fp16 export is GPU-only); pass device=0 or half=False")
    return device


def file_size_mb(path: Path) -> float:
    """Size of an exported file, or of every file in an export folder, in MB."""
    files = [file for file in path.rglob("*") if file.is_file()] if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files) / 1e6


def write_export(
    model: ExportModel, images: Tensor, path: Path, settings: dict, metadata: dict, device: torch.device
) -> tuple[str, ExportedDetector]:
    """Write `model` to `path` in settings['format'] and load it back; returns (log prefix, inference backend)."""
    fmt = settings["format"]
    if fmt == "onnx":
        export_onnx(model, images, path, settings["opset"], settings, metadata)
        return colorstr("ONNX:"), OnnxDetector(path, device)
    if fmt == "openvino":
        export_openvino(model, images, path, settings, metadata)
        return colorstr("OpenVINO:"), OpenVinoDetector(path, device)
    export_torchscript(model, images, path, metadata)
    return colorstr("TorchScript:"), TorchScriptDetector(path, device)


def export(detector: DenseDetector, args: Args, train_args: dict | None = None) -> Path:
    """Export the student `detector` as `args.format` next to `args.model`; returns the written file.

    `train_args` (the checkpoint's) give the default imgsz and are embedded in the metadata.
    """
    train_args = train_args or {}
    device = export_device(args)
    settings = export_settings(args, detector, train_args, device)
    dtype = torch.float16 if settings["half"] else torch.float32
    model = ExportModel(copy.deepcopy(detector), settings["nms"], settings["conf"], settings["iou"],
                        settings["max_det"], settings["nms_pre"], settings["multi_label"])
    model = model.to(device, dtype).eval()  # eval on the wrapper too: exporters restore the wrapper's mode
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(settings["batch"], 3, *settings["imgsz"], generator=generator).to(device, dtype)
    writable = writable_dir if settings["format"] == "openvino" else writable_file
    path = writable(export_path(args.model, settings["format"]),
                    "the export is written beside model=: copy the .pt to a folder you can write to")
    with torch.no_grad():
        reference = model(images)
    size_mb = sum(p.numel() * p.element_size() for p in detector.state_dict().values()) / 1e6
    LOGGER.info(f"{colorstr('PyTorch:')} starting from '{args.model}' with input shape {tuple(images.shape)} BCHW "
                f"and output shape(s) {tuple(reference.shape)} ({size_mb:.1f} MB)")
    metadata = export_metadata(detector, settings, train_args)
    start = time.perf_counter()
    prefix, backend = write_export(model, images, path, settings, metadata, device)
    check_parity(prefix, model, backend, images, reference, settings["half"])
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
    """`crosskd export`: load the student from `model=` (or the newest best.pt) and export it."""
    source = args.model or newest_best("exporting")
    if is_yaml(source):
        raise ConfigError(f"export needs trained weights, not the bare model YAML model={source}; e.g. model=best.pt")
    runtime = load_runtime(source, model_cfg=args.model_cfg)
    return export(runtime.detector("export"), Args(**{**vars(args), "model": str(source)}), runtime.train_args)
