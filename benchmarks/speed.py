"""How fast crosskd is next to what users would otherwise run, measured side by side in one process.

    python benchmarks/speed.py                                # every section; CPU, and CUDA too when present
    python benchmarks/speed.py --sections a b --repeats 5     # some sections, merged into the existing JSON
    python benchmarks/speed.py --quick                        # CI smoke: tiny models, one iteration, seconds

Sections (each compares two sides called alternately, so machine noise falls on both; the ratios are the result):
  a  FCOS-R50 / RetinaNet-R50 train step and inference vs torchvision's fcos_resnet50_fpn / retinanet_resnet50_fpn
     (80 classes, random weights, every backbone stage trainable with BatchNorm in train mode on both sides,
     torchvision's transform pinned to the input size)
  b  a distillation step per `kd` (GFL R18 student, GFL R50 teacher) vs its floor: the student's plain train step
     plus a teacher eval forward under no_grad; time and peak memory (CPU: peak RSS growth, CUDA: max allocated)
  c  the exported student (crosskd.engine.deployment.exporter) in ONNX Runtime, and OpenVINO when installed, float32
     and INT8 (calibrated on generated digits), vs eager PyTorch float32, the three alternated, at batch 1 and 8, same
     thread count on every side; for the GFL R18 student at --size and the demo student (the reproduce benchmark's
     quarter-width GFL) at 128 px
  d  images/s through the real loader (build_dataloader, its workers, digits data, demo settings) vs images/s of
     training steps at the same batch and size
  e  validation images/s including COCO evaluation (the Validator) vs the model's predictions alone
  roi  Faster R-CNN on CPU: crosskd's RoIAlign (torchvision's forward, its own separable backward) vs torchvision's
     roi_align forward + backward on one level (4096 RoIs), and a faster_rcnn_r18s train step (batch 8, 128 px) with
     either inside; CPU only (CUDA runs torchvision's op on both sides)
  compile  a train step with and without `compile=True` (crosskd.engine.training.compile), plus the first call's cost
  loader  the training loader at COCO image size (640, mosaic 1.0, Ultralytics' default augmentation) with workers 1
     and 2 and cache none/ram/disk, vs Ultralytics' own loader on the same images when a Python with ultralytics is
     found (--ultralytics-python; see loader_bench.py), and the demo student's training images/s beside it

On CUDA every side runs under AMP with channels_last. Results: benchmarks/results/speed/<cpu|cuda>.json (written after
each section, so an interrupted run keeps what it finished; --sections reruns only those and merges).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torchvision
from loader_bench import LoaderPlan, run_loader_benchmark  # benchmarks/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table
from step_cost import synthetic_batch
from torchvision.models import detection
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from crosskd.config import get_args
from crosskd.data import DetectionDataset, build_dataloader, generate_digits, load_data_yaml
from crosskd.distill import KD_METHODS, Distiller
from crosskd.engine.deployment import exporter
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.training.compile import compile_detector
from crosskd.errors import UserError
from crosskd.models import DenseDetector, build_detector, load_model_yaml
from crosskd.ops import roi as roi_module
from crosskd.ops.roi_align import roi_align as crosskd_roi_align
from crosskd.utils import LOGGER

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "speed"
SECTIONS = ("a", "b", "c", "d", "e", "roi", "compile", "loader")
NUM_CLASSES = 80
CONF, IOU, MAX_DET, NMS_PRE = 0.05, 0.5, 100, 1000  # the same post-processing on both sides of section a
LR = 1e-5  # small enough that random-init models stay finite over the timed steps
DEMO = {"model": "gfl_r18t.yaml", "imgsz": 128, "batch": 16, "workers": 4, "train": 256, "val": 64}
DEMO_SCRIPT_BATCH = 8  # scripts/demo.py trains the student at DEMO's imgsz with batch 8
VAL_CONF = 0.001  # section e: random weights score ~0.01 everywhere, so every image keeps max_det boxes to evaluate


@dataclass(frozen=True)
class Plan:
    """What one run measures: models and sizes (full, or tiny for --quick)."""

    size: int
    batch: int
    repeats: int
    warmup: int
    threads: int
    fcos: str = "fcos_r50.yaml"
    retinanet: str = "retinanet_r50.yaml"
    depth: int = 50  # section a's ResNet depth on both sides (18 for --quick)
    student: str = "gfl_r18.yaml"
    teacher: str = "gfl_r50.yaml"
    demo_train: int = DEMO["train"]
    demo_val: int = DEMO["val"]
    export_batches: tuple[int, ...] = (1, 8)
    demo_student: str = str(Path(__file__).resolve().parent / "configs" / "gfl_r18q_student.yaml")  # section c
    calibration_images: int = 32  # section c's INT8 calibration (speed does not depend on the ranges)
    kds: tuple[str, ...] = tuple(k for k in KD_METHODS if k != "none")
    loader: LoaderPlan = field(default_factory=LoaderPlan)
    quick: bool = False


@dataclass
class Measure:
    """Median seconds of the timed calls and, when asked, the median peak memory growth in MB."""

    seconds: float
    peak_mb: float | None = None


# ---------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory growth of one call: CUDA max_memory_allocated, or on Linux CPUs the peak RSS (VmHWM, reset
    through /proc/self/clear_refs) above the RSS at the start, with freed heap returned to the system first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = _libc()
        self.works = device.type == "cuda" or self._reset_hwm()

    def _reset_hwm(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        return 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Yields a list that holds the peak growth in MB after the block (empty when unsupported)."""
        result: list[float] = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield result
            result.append((torch.cuda.max_memory_allocated(self.device) - start) / 2**20)
            return
        if not self.works:
            yield result
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self._reset_hwm()
        start = self._status_kb("VmRSS:")
        yield result
        result.append((self._status_kb("VmHWM:") - start) / 1024)


def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def alternate(
    sides: dict[str, Callable[[], object]], plan: Plan, device: torch.device, memory: bool = False
) -> dict[str, Measure]:
    """Call every side `plan.warmup` times, then `plan.repeats` rounds of one call each in turn; medians per side."""
    for _ in range(plan.warmup):
        for fn in sides.values():
            fn()
    probe = PeakMemory(device) if memory else None
    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(plan.repeats):
        for name, fn in sides.items():
            with probe.measure() if probe else contextlib.nullcontext([]) as peak:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
            peaks[name].extend(peak)
    return {name: Measure(statistics.median(times[name]), statistics.median(peaks[name]) if peaks[name] else None)
            for name in sides}


def train_step(loss_fn: Callable[[], dict], params: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    """One SGD step on the summed losses of `loss_fn()` (AMP on CUDA)."""
    amp = device.type == "cuda"
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        with torch.autocast(device.type, enabled=amp):
            losses = loss_fn()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn` under inference_mode (and AMP on CUDA)."""
    def call() -> None:
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            fn()

    return call


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device`, channels_last on CUDA."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def our_detector(name: str, num_classes: int, trainable: bool = False, depth: int | None = None) -> DenseDetector:
    """A crosskd detector from a model YAML with random weights; `trainable`: every backbone stage trains with
    BatchNorm in train mode (what torchvision builds without weights); `depth` replaces the ResNet depth."""
    cfg, _ = load_model_yaml(name)
    backbone = {**cfg["backbone"], "pretrained": False}
    if trainable:
        backbone.update(frozen_stages=-1, norm_eval=False)
    if depth is not None:
        backbone["depth"] = depth
    return build_detector({**cfg, "backbone": backbone}, num_classes)


def ratio(ours: float, reference: float) -> float:
    return ours / reference if reference > 0 else math.nan


# ---------------------------------------------------------------------------------------------- section a
def torchvision_detector(name: str, size: int, depth: int = 50) -> torch.nn.Module:
    """torchvision's `name` (fcos_resnet50_fpn, retinanet_resnet50_fpn) with random weights, every backbone stage
    trainable (BatchNorm2d, as torchvision builds it without weights), the transform pinned to `size`; another
    `depth` builds the same detector class on that ResNet (--quick)."""
    kwargs = {"num_classes": NUM_CLASSES, "min_size": size, "max_size": size, "fixed_size": (size, size),
              "score_thresh": CONF, "nms_thresh": IOU, "detections_per_img": MAX_DET, "topk_candidates": NMS_PRE}
    if depth == 50:
        with warnings.catch_warnings():  # "trainable_backbone_layers has no effect": all 5 train without weights
            warnings.simplefilter("ignore", UserWarning)
            return getattr(detection, name)(weights=None, weights_backbone=None, trainable_backbone_layers=5, **kwargs)
    backbone = detection.backbone_utils.resnet_fpn_backbone(
        backbone_name=f"resnet{depth}", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5,
        returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return (detection.FCOS if name.startswith("fcos") else detection.RetinaNet)(backbone, **kwargs)


def section_a(plan: Plan, device: torch.device) -> list[dict]:
    """Train step and inference of crosskd's FCOS/RetinaNet R50 vs torchvision's, alternately."""
    batch = synthetic_batch(plan.batch, plan.size, NUM_CLASSES).to(device)
    images = list(batch.images)  # torchvision takes a list of [3, H, W]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch.gt_boxes, batch.gt_labels, strict=True)]
    rows = []
    for ours_yaml, theirs_name in ((plan.fcos, "fcos_resnet50_fpn"), (plan.retinanet, "retinanet_resnet50_fpn")):
        ours = on_device(our_detector(ours_yaml, NUM_CLASSES, trainable=True, depth=plan.depth), device).train()
        theirs = on_device(torchvision_detector(theirs_name, plan.size, plan.depth), device).train()
        train = alternate({
            "ours": train_step(lambda m=ours: m.loss(batch), list(ours.parameters()), device),
            "torchvision": train_step(lambda m=theirs: m(images, targets), list(theirs.parameters()), device),
        }, plan, device)
        ours.eval(), theirs.eval()
        infer = alternate({
            "ours": inference(lambda m=ours: m.predict(batch.images, CONF, IOU, MAX_DET, NMS_PRE), device),
            "torchvision": inference(lambda m=theirs: m(images), device),
        }, plan, device)
        suffix = "" if plan.depth == 50 else f" (R{plan.depth})"
        for what, result in (("train step", train), ("inference", infer)):
            ours_s, theirs_s = result["ours"].seconds, result["torchvision"].seconds
            rows.append({"model": ours_yaml + suffix, "reference": theirs_name + suffix, "what": what,
                         "ours_ms": 1000 * ours_s, "torchvision_ms": 1000 * theirs_s, "ratio": ratio(ours_s, theirs_s)})
        del ours, theirs
    return rows


# ---------------------------------------------------------------------------------------------- section b
def section_b(plan: Plan, device: torch.device) -> list[dict]:
    """Distillation step per kd method vs its floor (student step + teacher eval forward), time and peak memory."""
    batch = synthetic_batch(plan.batch, plan.size, NUM_CLASSES).to(device)
    student = on_device(our_detector(plan.student, NUM_CLASSES), device).train()
    teacher = on_device(our_detector(plan.teacher, NUM_CLASSES), device).eval().requires_grad_(False)
    plain = train_step(lambda: student.loss(batch), [p for p in student.parameters() if p.requires_grad], device)

    def floor() -> None:
        plain()
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            teacher(batch.images)

    rows = []
    for kd in plan.kds:
        try:
            distiller = Distiller(student, teacher, kd=kd).train()
        except UserError as error:
            rows.append({"kd": kd, "skipped": str(error)})
            continue
        step = train_step(lambda d=distiller: d(batch), [p for p in distiller.parameters() if p.requires_grad],
                          device)
        result = alternate({"distill": step, "floor": floor}, plan, device, memory=True)
        d, f = result["distill"], result["floor"]
        rows.append({"kd": kd, "distill_ms": 1000 * d.seconds, "floor_ms": 1000 * f.seconds,
                     "time_ratio": ratio(d.seconds, f.seconds), "distill_peak_mb": d.peak_mb,
                     "floor_peak_mb": f.peak_mb,
                     "memory_ratio": ratio(d.peak_mb, f.peak_mb) if d.peak_mb and f.peak_mb else None})
    return rows


# ---------------------------------------------------------------------------------------------- section c
def export_student(
    detector: DenseDetector, fmt: str, batch: int, size: int, folder: Path, calibration: dict | None = None
) -> Path:
    """Export through engine.deployment.exporter at a static batch and size, INT8 when `calibration` gives data= and
    fraction=; returns the file (or OpenVINO folder)."""
    settings = {"model": str(folder / f"student_b{batch}.pt"), "format": fmt, "imgsz": size, "batch": batch,
                "device": "cpu", **({"int8": True, **calibration} if calibration else {})}
    return exporter.export(detector, get_args(settings, "export"))


def onnx_runner(path: Path, threads: int, device: torch.device) -> Callable[[np.ndarray], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name
    return lambda array: session.run(None, {name: array})


def openvino_runner(folder: Path, threads: int) -> Callable[[np.ndarray], object]:
    """OpenVINO at f32, as crosskd's own OpenVinoDetector runs it (its CPU default may be bf16)."""
    from crosskd.engine.deployment.runtimes.openvino import shared_core

    core = shared_core()
    compiled = core.compile_model(core.read_model(next(folder.glob("*.xml"))), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda array: request.infer([array])


def runtimes_available(device: torch.device) -> list[str]:
    """onnx (with the CUDA provider on CUDA) and openvino (CPU only) when importable."""
    found = []
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        if device.type == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("onnx")
    with contextlib.suppress(ImportError):
        import openvino  # noqa: F401

        if device.type == "cpu":
            found.append("openvino")
    return found


def section_c(plan: Plan, device: torch.device, data_yaml: Path) -> list[dict]:
    """Exported students (raw decoded graph) in ONNX Runtime / OpenVINO, float32 and INT8, vs eager PyTorch float32,
    the three sides alternated, at each export batch: the GFL R18 student at plan.size and the demo student at its
    128 px."""
    calibration = {"data": str(data_yaml), "fraction": min(1.0, plan.calibration_images / plan.demo_train)}
    rows = []
    for name, size, classes in ((plan.student, plan.size, NUM_CLASSES), (plan.demo_student, DEMO["imgsz"], 10)):
        detector = our_detector(name, classes).eval()
        size = exporter.export_imgsz(size, max(detector.strides))[0]  # exports round up to the largest stride
        eager = on_device(exporter.ExportModel(copy.deepcopy(detector)), device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            model_rows = [row for fmt in runtimes_available(device) for batch in plan.export_batches
                          for row in runtime_rows(plan, device, detector, eager, fmt, batch, size, Path(tmp),
                                                  calibration)]
        rows += [{"model": f"{Path(name).stem} {size}px", **row} for row in model_rows]
    return rows


def runtime_rows(
    plan: Plan, device: torch.device, detector: DenseDetector, eager: torch.nn.Module, fmt: str, batch: int,
    size: int, folder: Path, calibration: dict,
) -> list[dict]:
    """One runtime at one batch: its float32 and INT8 exports and eager PyTorch, alternated; a row per precision."""
    runners = {}
    for precision, calibrated in (("fp32", None), ("int8", calibration)):
        path = export_student(detector, fmt, batch, size, folder / precision, calibrated)
        runners[precision] = onnx_runner(path, plan.threads, device) if fmt == "onnx" else \
            openvino_runner(path, plan.threads)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    array, on = images.numpy(), images.to(device)
    if device.type == "cuda":
        on = on.to(memory_format=torch.channels_last)
    sides = {**{precision: (lambda r=run: r(array)) for precision, run in runners.items()},
             "eager": inference(lambda x=on: eager(x), device)}
    result = alternate(sides, plan, device)
    eager_s = result["eager"].seconds
    return [{"runtime": fmt, "precision": precision, "batch": batch, "runtime_ms": 1000 * result[precision].seconds,
             "eager_ms": 1000 * eager_s, "speedup": ratio(eager_s, result[precision].seconds)}
            for precision in runners]


# ---------------------------------------------------------------------------------------------- sections d, e
def digits_data(root: Path, plan: Plan) -> Path:
    """Generate the digits demo data under `root` and write its data YAML; returns the YAML path."""
    generate_digits(root, num_train=plan.demo_train, num_val=plan.demo_val, imgsz=DEMO["imgsz"])
    yaml_file = root / "digits.yaml"
    names = "\n".join(f"  {i}: '{i}'" for i in range(10))
    yaml_file.write_text(f"path: {root}\ntrain: annotations/instances_train.json\n"
                         f"val: annotations/instances_val.json\nnames:\n{names}\n")
    return yaml_file


def demo_loader(data_yaml: Path, split: str, stride: int, batch: int, augment: bool):
    info = load_data_yaml(str(data_yaml), data_yaml.parent)
    dataset = DetectionDataset(info, split, DEMO["imgsz"], augment=augment, pad_multiple=stride)
    return build_dataloader(dataset, batch, DEMO["workers"], shuffle=augment, seed=0)


def section_d(plan: Plan, device: torch.device, data_yaml: Path) -> list[dict]:
    """Images/s of a pass through the train loader (workers, augmentation) vs images/s of training steps."""
    batch_size = min(DEMO["batch"], plan.demo_train)
    model = on_device(our_detector(DEMO["model"], 10), device).train()
    loader = demo_loader(data_yaml, "train", max(model.strides), batch_size, augment=True)
    start = time.perf_counter()
    batches = [b.to(device) for b in loader]  # the first pass also starts the workers
    first_pass = time.perf_counter() - start
    step_fns = [train_step(lambda b=b: model.loss(b), list(model.parameters()), device) for b in batches[:1]]
    result = alternate({"loader": lambda: [None for _ in loader], "train": step_fns[0]}, plan, device)
    images = len(loader.dataset)
    loader_ips, train_ips = images / result["loader"].seconds, batch_size / result["train"].seconds
    return [{"model": DEMO["model"], "imgsz": DEMO["imgsz"], "batch": batch_size, "workers": loader.num_workers,
             "images": images, "loader_first_pass_ips": images / first_pass, "loader_ips": loader_ips,
             "train_ips": train_ips, "ratio": ratio(loader_ips, train_ips)}]


def section_e(plan: Plan, device: torch.device, data_yaml: Path) -> list[dict]:
    """Validator images/s (predictions, COCO evaluation, PR curves) vs the model's predictions over the loader."""
    batch_size = min(DEMO["batch"], plan.demo_val)
    model = on_device(our_detector(DEMO["model"], 10), device).eval()
    loader = demo_loader(data_yaml, "val", max(model.strides), batch_size, augment=False)
    args = get_args({"data": str(data_yaml), "imgsz": DEMO["imgsz"], "batch": batch_size, "conf": VAL_CONF,
                     "plots": False, "device": str(device)}, "val")
    model.names = {i: str(i) for i in range(10)}
    with tempfile.TemporaryDirectory() as tmp:
        validator = Validator(args, model=model, dataloader=loader, save_dir=tmp)

        def predict_only() -> None:
            for batch in loader:
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    model.predict(batch.to(device).images, VAL_CONF, args.iou, args.max_det, args.nms_pre)

        result = alternate({"val": lambda: validator.run(plots=False, per_class=False),
                            "predict": inference(predict_only, device)}, plan, device)
    images = len(loader.dataset)
    val_ips, predict_ips = images / result["val"].seconds, images / result["predict"].seconds
    return [{"model": DEMO["model"], "imgsz": DEMO["imgsz"], "batch": batch_size, "images": images,
             "val_ips": val_ips, "predict_ips": predict_ips, "ratio": ratio(val_ips, predict_ips)}]


# ---------------------------------------------------------------------------------------------- output
TABLES = {  # section -> (title, columns: (JSON key, header, format))
    "a": ("a. train step and inference vs torchvision", [
        ("model", "ours", "{}"), ("reference", "torchvision", "{}"), ("what", "", "{}"),
        ("ours_ms", "ours ms", "{:.1f}"), ("torchvision_ms", "tv ms", "{:.1f}"), ("ratio", "ours/tv", "{:.2f}")]),
    "b": ("b. distill step vs its floor (student step + teacher eval forward)", [
        ("kd", "kd", "{}"), ("distill_ms", "distill ms", "{:.1f}"), ("floor_ms", "floor ms", "{:.1f}"),
        ("time_ratio", "time ratio", "{:.2f}"), ("distill_peak_mb", "distill peak MB", "{:.0f}"),
        ("floor_peak_mb", "floor peak MB", "{:.0f}"), ("memory_ratio", "memory ratio", "{:.2f}")]),
    "c": ("c. exported student (float32, INT8) vs eager PyTorch float32", [
        ("model", "model", "{}"), ("runtime", "runtime", "{}"), ("precision", "precision", "{}"),
        ("batch", "batch", "{}"), ("runtime_ms", "runtime ms", "{:.1f}"), ("eager_ms", "eager ms", "{:.1f}"),
        ("speedup", "eager/runtime", "{:.2f}")]),
    "d": ("d. data loading vs training throughput", [
        ("model", "model", "{}"), ("batch", "batch", "{}"), ("workers", "workers", "{}"),
        ("loader_first_pass_ips", "loader img/s (1st pass)", "{:.0f}"), ("loader_ips", "loader img/s", "{:.0f}"),
        ("train_ips", "train img/s", "{:.1f}"), ("ratio", "loader/train", "{:.1f}")]),
    "roi": ("roi. Faster R-CNN on CPU: crosskd's RoIAlign backward vs torchvision's", [
        ("what", "", "{}"), ("ours_ms", "ours ms", "{:.1f}"), ("torchvision_ms", "tv ms", "{:.1f}"),
        ("ratio", "ours/tv", "{:.2f}")]),
    "e": ("e. validation incl. COCO evaluation vs predictions alone", [
        ("model", "model", "{}"), ("images", "images", "{}"), ("val_ips", "val img/s", "{:.1f}"),
        ("predict_ips", "predict img/s", "{:.1f}"), ("ratio", "val/predict", "{:.2f}")]),
    "loader": ("loader. training loader images/s at COCO size (mosaic), crosskd vs Ultralytics; training beside it", [
        ("cache", "cache", "{}"), ("workers", "workers", "{}"), ("crosskd_ips", "crosskd img/s", "{:.1f}"),
        ("ultralytics_ips", "ultralytics img/s", "{:.1f}"), ("ratio", "crosskd/ultra", "{:.2f}"),
        ("ultralytics_infinite_ips", "ultra infinite img/s", "{:.1f}"),
        ("crosskd_build_s", "crosskd build s", "{:.1f}"), ("ultralytics_build_s", "ultra build s", "{:.1f}"),
        ("train_ips_demo", "train img/s demo", "{:.1f}"),
        ("train_ips_loader_size", "train img/s at loader size", "{:.2f}")]),
    "compile": ("compile=True vs eager train step", [
        ("model", "model", "{}"), ("status", "status", "{}"), ("eager_ms", "eager ms", "{:.1f}"),
        ("compiled_ms", "compiled ms", "{:.1f}"), ("speedup", "eager/compiled", "{:.2f}"),
        ("first_call_s", "first call s", "{:.1f}")]),
}


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value) if not isinstance(value, float) or math.isfinite(value) else "nan"


def print_tables(results: dict, console: Console) -> None:
    meta = results["meta"]
    console.print(f"[bold]crosskd speed[/bold] on {meta['device_name']}: {meta['threads']} threads, batch "
                  f"{meta['batch']}, {meta['size']} px, median of {meta['repeats']} (torch {meta['torch']}, "
                  f"load average {meta.get('load_average')})")
    for section in SECTIONS:
        rows = results.get("sections", {}).get(section)
        if rows is None:
            continue
        title, columns = TABLES[section]
        table = Table(title=title, title_justify="left")
        for _, header, _ in columns:
            table.add_column(header, justify="left" if header in ("ours", "torchvision", "kd", "runtime") else "right")
        for row in rows:
            if "skipped" in row:
                table.add_row(row.get("kd", row.get("model", "")), f"skipped: {row['skipped']}",
                              *[""] * (len(columns) - 2))
                continue
            table.add_row(*[cell(row, key, fmt) for key, _, fmt in columns])
        console.print(table)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages when the run started: above the core count, the timings are noisy."""
    return [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_sections(plan: Plan, device: torch.device, sections: list[str], out: Path, console: Console) -> dict:
    """Measure `sections` on `device`, merging into (and rewriting after each section) `out`."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["meta"] = {**asdict(plan), "device": device.type, "device_name": device_name(device),
                       "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": load_average()}
    results.setdefault("sections", {})
    with tempfile.TemporaryDirectory() as tmp:
        data_yaml = digits_data(Path(tmp) / "digits", plan) if {"c", "d", "e"} & set(sections) else None
        for section in sections:
            start = time.perf_counter()
            # meta describes the last run; when and under which load each section was measured stays per section
            results.setdefault("measured", {})[section] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                                                           "load_average": load_average()}
            data = out.parent / "data" / "loader" if section == "loader" else data_yaml
            results["sections"][section] = run_section(section, plan, device, data)
            results.setdefault("seconds", {})[section] = round(time.perf_counter() - start, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            console.print(f"section {section}: {results['seconds'][section]} s")
    return results


def run_section(section: str, plan: Plan, device: torch.device, data: Path | None) -> list[dict]:
    """Section `section`; `data` is the digits YAML of sections c, d and e, the data folder of section loader."""
    if section == "loader":
        return section_loader(plan, device, data)
    if section in ("c", "d", "e"):
        return {"c": section_c, "d": section_d, "e": section_e}[section](plan, device, data)
    if section == "compile":
        return section_compile(plan, device)
    if section == "roi":
        return section_roi(plan, device)
    return {"a": section_a, "b": section_b}[section](plan, device)


def section_roi(plan: Plan, device: torch.device) -> list[dict]:
    """RoIAlign forward + backward and a Faster R-CNN train step with crosskd's backward vs torchvision's (CPU)."""
    if device.type != "cpu":
        return [{"skipped": "CUDA runs torchvision's roi_align on both sides"}]
    generator = torch.Generator().manual_seed(0)
    images, channels, side, count = (2, 16, 16, 256) if plan.quick else (8, 64, 32, 4096)
    feat = torch.randn(images, channels, side, side, generator=generator, requires_grad=True)
    corner = torch.rand(count, 2, generator=generator) * side * 4
    rois = torch.cat([torch.randint(images, (count, 1), generator=generator).float(), corner,
                      corner + 4 + torch.rand(count, 2, generator=generator) * side * 2], dim=1)
    upstream = torch.randn(count, channels, 7, 7, generator=generator)

    def op(fn: Callable) -> Callable[[], None]:
        return lambda: torch.autograd.grad(fn(feat, rois, 7, 0.25, 0, True), feat, upstream)

    timed = alternate({"ours": op(crosskd_roi_align), "torchvision": op(torchvision.ops.roi_align)}, plan, device)
    rows = [{"what": f"RoIAlign fwd+bwd, {count} RoIs", "ours_ms": timed["ours"].seconds * 1e3,
             "torchvision_ms": timed["torchvision"].seconds * 1e3}]
    torch.manual_seed(0)
    model = build_detector("faster_rcnn_r18s.yaml", 10).train()
    size, batch = (64, 2) if plan.quick else (128, 8)
    sample = synthetic_batch(batch, size, 10)
    step = train_step(lambda: model.loss(sample), list(model.parameters()), device)

    def step_with(fn: Callable) -> Callable[[], None]:
        def call() -> None:
            with mock.patch.object(roi_module, "roi_align", fn):
                step()
        return call

    timed = alternate({"ours": step_with(crosskd_roi_align), "torchvision": step_with(torchvision.ops.roi_align)},
                      plan, device)
    rows.append({"what": f"faster_rcnn_r18s train step, batch {batch}, {size} px",
                 "ours_ms": timed["ours"].seconds * 1e3, "torchvision_ms": timed["torchvision"].seconds * 1e3})
    return [{**row, "ratio": ratio(row["ours_ms"], row["torchvision_ms"])} for row in rows]


def section_compile(plan: Plan, device: torch.device) -> list[dict]:
    """The demo model's train step with compile=True (inductor; --quick: the eager backend, tracing only) vs without,
    and the first compiled call (where compilation happens)."""
    backend = "eager" if plan.quick else "inductor"
    batch = synthetic_batch(plan.batch, plan.size, NUM_CLASSES).to(device)
    eager = on_device(our_detector(DEMO["model"], NUM_CLASSES), device).train()
    compiled = compile_detector(copy.deepcopy(eager), True, backend=backend)
    steps = {name: train_step(lambda m=model: m.loss(batch), list(model.parameters()), device)
             for name, model in (("eager", eager), ("compiled", compiled))}
    start = time.perf_counter()
    steps["compiled"]()
    first_call = time.perf_counter() - start
    failed = compiled.backbone.forward.failed
    result = alternate(steps, plan, device)
    return [{"model": DEMO["model"], "status": f"fell back to eager ({backend})" if failed else backend,
             "eager_ms": 1000 * result["eager"].seconds, "compiled_ms": 1000 * result["compiled"].seconds,
             "speedup": ratio(result["eager"].seconds, result["compiled"].seconds), "first_call_s": first_call}]


# ---------------------------------------------------------------------------------------------- section loader
def section_loader(plan: Plan, device: torch.device, folder: Path) -> list[dict]:
    """The training loader at COCO size, crosskd vs Ultralytics (loader_bench.py), with training images/s beside it."""
    rows = run_loader_benchmark(plan.loader, folder)
    training = train_throughput(plan, device)
    for row in rows:
        row.update(training)
        row["loader_over_train_demo"] = ratio(row["crosskd_ips"], training["train_ips_demo"])
        row["loader_over_train_loader_size"] = ratio(row["crosskd_ips"], training["train_ips_loader_size"])
    return rows


def train_throughput(plan: Plan, device: torch.device) -> dict:
    """Images/s of the demo student's train step at the demo's imgsz and batch (scripts/demo.py) and at the loader's
    imgsz, with one torch thread per core as a demo run has (synthetic batches: the step does not depend on pixels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        result = {"train_model": DEMO["model"], "train_batch": DEMO_SCRIPT_BATCH,
                  "train_threads": torch.get_num_threads()}
        for key, size in (("train_ips_demo", DEMO["imgsz"]), ("train_ips_loader_size", plan.loader.imgsz)):
            model = on_device(our_detector(DEMO["model"], 10), device).train()
            batch = synthetic_batch(DEMO_SCRIPT_BATCH, size, 10).to(device)
            step = train_step(lambda m=model, b=batch: m.loss(b), list(model.parameters()), device)
            result[key] = DEMO_SCRIPT_BATCH / alternate({"train": step}, plan, device)["train"].seconds
    finally:
        torch.set_num_threads(threads)
    return result


def make_plan(opts: argparse.Namespace) -> Plan:
    if opts.quick:  # the loader on 8 images of 64 px, 2 batches; Ultralytics only when its Python is given
        loader = LoaderPlan(images=8, imgsz=64, batch=4, workers=(1,), rounds=1, warmup=0, objects=(1, 3),
                            ultralytics=None if opts.ultralytics_python == "auto" else opts.ultralytics_python,
                            infinite_epochs=1)
        return Plan(size=64, batch=opts.batch or 2, repeats=1, warmup=0, threads=opts.threads, depth=18,
                    student="gfl_r18t.yaml", teacher="gfl_r18t.yaml", demo_train=8, demo_val=4,
                    demo_student="gfl_r18t.yaml", calibration_images=2,
                    export_batches=(1,), kds=("crosskd", "crosskd+pkd"), loader=loader, quick=True)
    loader = LoaderPlan(images=opts.loader_images, rounds=opts.repeats, ultralytics=opts.ultralytics_python)
    return Plan(size=opts.size, batch=opts.batch or 2, repeats=opts.repeats, warmup=1, threads=opts.threads,
                export_batches=tuple(opts.export_batches), loader=loader)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny models, one iteration, no warm-up (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch (and runtime) threads")
    parser.add_argument("--size", type=int, default=256, help="input size in pixels (square)")
    parser.add_argument("--batch", type=int, default=None, help="batch of sections a and b (default 2)")
    parser.add_argument("--export-batches", nargs="+", type=int, default=[1, 8], help="batches of section c")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (the median is reported)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, then CUDA when present")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON files")
    parser.add_argument("--loader-images", type=int, default=1024,
                        help="section loader: images of 640 px (well above Ultralytics' 128-image buffer at batch 16)")
    parser.add_argument("--ultralytics-python", default="auto",
                        help="section loader: a Python that imports ultralytics (auto: $ULTRALYTICS_PYTHON, then this "
                             "one; --quick only when given)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the benchmark; returns {device kind: results}."""
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    plan = make_plan(opts)
    console = Console(width=140)
    kinds = ["cpu", "cuda"] if opts.device == "auto" else [opts.device]
    kinds = [k for k in kinds if k == "cpu" or torch.cuda.is_available()]
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        everything = {}
        for kind in kinds:
            out = opts.out / f"{kind}{'_quick' if plan.quick else ''}.json"
            everything[kind] = run_sections(plan, torch.device(kind), opts.sections, out, console)
            print_tables(everything[kind], console)
            console.print(f"written {out}")
    finally:
        LOGGER.setLevel(level)
    return everything


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
