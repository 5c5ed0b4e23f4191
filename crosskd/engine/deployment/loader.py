"""The one model loader: `load_runtime` turns every model source crosskd accepts into a ready `Runtime`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from crosskd.config import imgsz_hw
from crosskd.engine.deployment.checkpoint import (
    check_checkpoint,
    detector_from_checkpoint,
    is_crosskd_checkpoint,
    load_checkpoint,
)
from crosskd.engine.deployment.formats import exported_sources, format_of_path
from crosskd.engine.deployment.runtimes.exported import CROSSKD_INPUT, ExportedDetector, InputConvention
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import DenseDetector, build_detector
from crosskd.models.build import resolve_model_file
from crosskd.models.foreign.mapping import load_mapped
from crosskd.models.foreign.mmdet import is_mmdet_checkpoint, load_mmdet
from crosskd.models.foreign.torchvision_detection import (
    TORCHVISION_DETECTORS,
    TORCHVISION_PREFIX,
    load_torchvision_detector,
    torchvision_name,
)
from crosskd.models.foreign.ultralytics import (
    is_ultralytics_checkpoint,
    read_ultralytics,
    ultralytics_detector,
)
from crosskd.models.pretrained import transfer_matching
from crosskd.utils import LOGGER, read_torch_file

YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
def exported_kind(source: str | Path) -> str | None:
    """The export format's name (its row in the format table) for a path that names an exported model, else None."""
    fmt = format_of_path(source)
    return None if fmt is None else fmt.name


def is_yaml(source: str | Path) -> bool:
    """A model YAML, given as a path or as a shipped model's bare name (gfl_r18t)."""
    text = str(source)
    return (Path(text).suffix.lower() in (*YAML_SUFFIXES, "") and not text.startswith(TORCHVISION_PREFIX)
            and exported_kind(text) is None)


@dataclass(frozen=True)
class Runtime:
    """A model ready to run, whatever it was loaded from, with what every mode needs to know about it."""

    model: DenseDetector | ExportedDetector  # eval mode, on the requested device
    source: str  # the resolved file the model came from
    kind: str  # "checkpoint", "yaml", "mmdetection", "torchvision", "ultralytics", or an export format's name ("onnx")
    names: dict[int, str]
    imgsz: tuple[int, int] | None  # the model's own input size (h, w): training or export size; None for a YAML
    checkpoint: dict = field(default_factory=dict)  # the crosskd checkpoint dict, empty for other kinds

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def strides(self) -> list[int]:
        return list(self.model.strides)

    @property
    def stride(self) -> int:
        """The largest stride: inputs are padded to a multiple of it."""
        return max(self.model.strides)

    @property
    def train_args(self) -> dict:
        return self.checkpoint.get("train_args") or {}

    @property
    def input_convention(self) -> InputConvention:
        """What the model expects as input: an exported file's metadata, else crosskd's own convention."""
        return self.model.input_convention if isinstance(self.model, ExportedDetector) else CROSSKD_INPUT

    def detector(self, purpose: str) -> DenseDetector:
        """The PyTorch model, or a one-line error saying `purpose` needs one (e.g. purpose='export')."""
        if not isinstance(self.model, DenseDetector):
            raise CheckpointError(
                f"{purpose} needs a PyTorch model, not the exported {self.kind} file '{self.source}'; "
                "pass the crosskd .pt it was exported from"
            )
        return self.model


def load_runtime(
    source: str | Path,
    *,
    nc: int | None = None,
    weights: str | Path | None = None,
    model_cfg: str | Path | None = None,
    adapt_nc: bool = False,
    device: str | torch.device = "cpu",
    role: str = "model",
) -> Runtime:
    """The one model loader: every model source crosskd accepts, as a ready Runtime.

    Sources: a crosskd .pt; an Ultralytics YOLOv8/YOLO11 .pt (read without running its pickled code); an MMDetection
    .pth (2.x/3.x); a torchvision detector (`torchvision:NAME`, or its state dict file with `model_cfg` naming the
    matching *_tv.yaml); an exported .onnx / .torchscript / *_openvino_model folder; a model YAML (+ `weights`, a
    crosskd .pt of that architecture). `model_cfg` is the YAML a foreign checkpoint maps onto (inferred from an
    MMDetection checkpoint's embedded config when absent). `nc` is the class count of a YAML built without weights;
    with `adapt_nc` a model with other classes gets a new head for `nc` (fine-tuning). Every unusable source ends in
    one ConfigError/CheckpointError line naming the setting it came from (`role`, e.g. teacher).
    """
    text, suffix = str(source), Path(source).suffix.lower()
    if weights is not None and not is_yaml(source):
        raise ConfigError(f"weights are only for a model YAML, and '{source}' already holds weights; drop them")
    if text.startswith(TORCHVISION_PREFIX):
        runtime = _foreign_runtime(load_torchvision_detector(torchvision_name(text)), text, "torchvision")
    elif is_yaml(source):
        runtime = _from_yaml(source, nc, weights)
    elif (fmt := format_of_path(source)) is not None:
        model = fmt.runtime_module().load(source, device)
        return Runtime(model, str(model.path.resolve()), fmt.name, dict(model.names), tuple(model.imgsz))
    elif suffix in CHECKPOINT_SUFFIXES:
        if not Path(source).is_file():
            raise CheckpointError(f"{role} '{source}' not found: pass {role}=path/to/best.pt (a crosskd checkpoint)")
        runtime = _from_torch_file(Path(source), model_cfg, role)
    else:
        expected = ", ".join((".yaml", *CHECKPOINT_SUFFIXES, *exported_sources(), f"{TORCHVISION_PREFIX}NAME"))
        raise CheckpointError(f"cannot load {role} '{source}': expected one of {expected}")
    if adapt_nc and nc is not None and nc != runtime.nc:
        detector = with_classes(runtime.detector("fine-tuning"), nc, text)
        runtime = replace(runtime, model=detector, names=detector.names)
    runtime.model.to(device).eval()
    return runtime


def with_classes(detector: DenseDetector, nc: int, source: str) -> DenseDetector:
    """`detector` rebuilt with a head for `nc` classes, every tensor of matching name and shape transferred."""
    rebuilt = build_detector(detector.yaml, nc)
    done, total = transfer_matching(rebuilt, detector.state_dict())
    LOGGER.info(f"Rebuilt the head of '{source}' for nc={nc} (was {detector.nc}); transferred {done}/{total} weights")
    rebuilt.names = {i: str(i) for i in range(nc)}
    return rebuilt


def _from_torch_file(path: Path, model_cfg: str | Path | None, role: str) -> Runtime:
    """A crosskd, Ultralytics or MMDetection checkpoint or a torchvision detector state dict, told apart by content."""
    if is_ultralytics_checkpoint(path):
        return _ultralytics_runtime(path)
    obj = read_torch_file(path)
    if is_crosskd_checkpoint(obj):
        ckpt = check_checkpoint(obj, path)
        detector = detector_from_checkpoint(ckpt)
        imgsz = (ckpt.get("train_args") or {}).get("imgsz")
        return Runtime(detector, str(path.resolve()), "checkpoint", detector.names, _hw_or_none(imgsz), ckpt)
    if is_mmdet_checkpoint(obj):
        return _foreign_runtime(load_mmdet(obj, model_cfg, str(path)), str(path.resolve()), "mmdetection")
    name = torchvision_name(path) or _torchvision_name_of_yaml(model_cfg)
    if name is not None:
        return _foreign_runtime(load_torchvision_detector(name, path), str(path.resolve()), "torchvision")
    raise CheckpointError(
        f"'{path}' is neither a crosskd checkpoint nor an MMDetection one; for a torchvision detector state dict pass "
        f"{role}_cfg= with its YAML ({', '.join(spec.yaml for spec in TORCHVISION_DETECTORS.values())})"
    )


def _ultralytics_runtime(path: Path) -> Runtime:
    """An Ultralytics YOLOv8/YOLO11 .pt as crosskd's YOLO detector (read without running its pickled code)."""
    ckpt = read_ultralytics(path)
    detector = ultralytics_detector(ckpt, str(path))
    imgsz = _hw_or_none(ckpt.train_args.get("imgsz"))
    return Runtime(detector, str(path.resolve()), "ultralytics", detector.names, imgsz)


def is_detector_checkpoint(source: str | Path) -> bool:
    """A whole detector's weights (crosskd, Ultralytics, MMDetection with a head, torchvision), not a backbone's."""
    if str(source).startswith(TORCHVISION_PREFIX) or torchvision_name(source) is not None:
        return True
    if Path(source).suffix.lower() not in CHECKPOINT_SUFFIXES or not Path(source).is_file():
        return False
    if is_ultralytics_checkpoint(source):
        return True
    obj = read_torch_file(source)
    return is_crosskd_checkpoint(obj) or (
        is_mmdet_checkpoint(obj) and any(key.startswith(("bbox_head.", "roi_head.")) for key in obj["state_dict"])
    )


def _torchvision_name_of_yaml(model_cfg: str | Path | None) -> str | None:
    """The torchvision detector whose shipped YAML is `model_cfg`, if any."""
    stem = Path(str(model_cfg)).stem if model_cfg else None
    return next((name for name, spec in TORCHVISION_DETECTORS.items() if Path(spec.yaml).stem == stem), None)


def _foreign_runtime(detector: DenseDetector, source: str, kind: str) -> Runtime:
    return Runtime(detector, source, kind, dict(detector.names), None)


def _from_yaml(source: str | Path, nc: int | None, weights: str | Path | None) -> Runtime:
    path, scale = resolve_model_file(source)
    if scale is not None:  # yolo11n.yaml: yolo11.yaml at scale n, still named yolo11n.yaml (a source that rebuilds it)
        path = path.with_name(f"{path.stem}{scale}{path.suffix}")
    if weights is None:
        if nc is None:
            raise ConfigError(f"building '{source}' needs the number of classes; pass data= with the dataset")
        detector = build_detector(path, nc)
        detector.names = {i: str(i) for i in range(nc)}
        return Runtime(detector, str(path.resolve()), "yaml", detector.names, None)
    ckpt = load_checkpoint(weights)
    detector = build_detector(path, int(ckpt["nc"]))
    load_mapped(detector, ckpt["model"], {name: name for name in ckpt["model"]}, str(weights))
    detector.names = detector_from_checkpoint(ckpt).names
    imgsz = _hw_or_none((ckpt.get("train_args") or {}).get("imgsz"))
    return Runtime(detector, str(path.resolve()), "yaml", detector.names, imgsz, ckpt)


def _hw_or_none(imgsz: int | list[int] | None) -> tuple[int, int] | None:
    return None if imgsz is None else imgsz_hw(imgsz)


def load_teacher(teacher: str, teacher_weights: str | None, teacher_cfg: str | None = None) -> Runtime:
    """The trained teacher: any PyTorch model source of the loader (a crosskd .pt, an MMDetection .pth or a torchvision
    detector, mapped onto `teacher_cfg` when given), or a model YAML with `teacher_weights=` (a crosskd .pt of it)."""
    if is_yaml(teacher) and not teacher_weights:
        raise ConfigError(
            f"teacher={teacher} is a model YAML without weights: add teacher_weights=path/to/teacher.pt "
            "or pass the trained checkpoint as teacher="
        )
    if not is_yaml(teacher) and teacher_weights:
        raise ConfigError(f"teacher_weights= is only for a YAML teacher; teacher={teacher} already holds weights")
    runtime = load_runtime(teacher, weights=teacher_weights, model_cfg=teacher_cfg, role="teacher")
    runtime.detector("the distillation teacher")
    return runtime
