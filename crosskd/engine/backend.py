"""Inference backends for exported crosskd models (ONNX Runtime, TorchScript, OpenVINO) with DenseDetector.predict()."""

from __future__ import annotations

import ast
import json
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torchvision.ops import box_convert

from crosskd.config import imgsz_hw
from crosskd.engine.checkpoint import (
    check_checkpoint,
    detector_from_checkpoint,
    is_crosskd_checkpoint,
    load_checkpoint,
)
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import DenseDetector, build_detector
from crosskd.models.foreign.mapping import load_mapped
from crosskd.models.foreign.mmdet import is_mmdet_checkpoint, load_mmdet
from crosskd.models.foreign.torchvision_detection import (
    TORCHVISION_DETECTORS,
    TORCHVISION_PREFIX,
    load_torchvision_detector,
    torchvision_name,
)
from crosskd.models.postprocess import Detections, postprocess, unpad
from crosskd.models.pretrained import transfer_matching
from crosskd.paths import resolve_cfg_file
from crosskd.utils import LOGGER, read_torch_file

YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
REQUIRED_METADATA = ("names", "stride", "strides", "imgsz", "batch", "num_anchors", "args")
TORCHSCRIPT_METADATA = "config.txt"
OPENVINO_SUFFIX = "_openvino_model"  # an OpenVINO export is the folder <weights stem>_openvino_model (Ultralytics')
OPENVINO_METADATA = "metadata.yaml"


@dataclass(frozen=True)
class InputConvention:
    """How an image becomes the model input: the `input` metadata of an exported file, which predict follows.

    crosskd's convention is the training loader's: keep-ratio resize so the long side is imgsz (an h,w imgsz: fit
    inside it), pad bottom/right with `pad_value` (0..255) to a multiple of the largest stride (a static graph: to
    its size), RGB, pixels / 255 (0..1), ImageNet mean/std subtracted inside the graph. Ultralytics clients instead
    centre the image on grey 114 ("letterbox"); see docs/deploy.md.
    """

    resize: str = "keep-ratio long side"
    pad: str = "bottom-right"
    pad_value: int = 0
    channels: str = "RGB"
    scale: str = "0..1"
    normalize: str = "in-graph"

    def to_metadata(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_metadata(cls, text: str | None, path: Path) -> InputConvention:
        """The convention of an exported file (crosskd's own for files exported before the `input` key)."""
        if text is None:
            return cls()
        given = json.loads(text)
        convention = cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})
        differs = {f.name: getattr(convention, f.name) for f in fields(cls)
                   if f.name != "pad_value" and getattr(convention, f.name) != getattr(CROSSKD_INPUT, f.name)}
        if differs or not 0 <= int(convention.pad_value) <= 255:
            raise CheckpointError(f"'{path.name}' expects input {given}, which crosskd's predictor does not produce; "
                                  "re-export it with 'crosskd export'")
        return convention


CROSSKD_INPUT = InputConvention()


def parse_metadata(metadata: dict[str, str], path: Path) -> dict:
    """Turn the exporter's string-valued metadata back into Python values; CheckpointError if it is not ours."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointError(
            f"'{path}' has no crosskd export metadata (missing {missing}); "
            "export it with 'crosskd export model=best.pt'"
        )
    values = {key: ast.literal_eval(metadata[key]) for key in ("names", "strides", "imgsz", "args")}
    values.update({key: int(metadata[key]) for key in ("stride", "batch", "num_anchors")})
    values["names"] = {int(k): str(v) for k, v in values["names"].items()}
    values["head_type"] = metadata.get("head_type", "")
    return values


def num_per_level(height: int, width: int, strides: list[int], num_anchors: int) -> list[int]:
    """Priors per FPN level for an input of height x width (stride-2 convs round up)."""
    return [math.ceil(height / s) * math.ceil(width / s) * num_anchors for s in strides]


class ExportedDetector(ABC):
    """Metadata, input shaping and post-processing shared by the ONNX and TorchScript backends.

    Subclasses set `input_shape` (B, 3, H, W with None for dynamic axes) and implement `forward`.
    """

    input_shape: tuple[int | None, ...]

    def __init__(self, path: Path, metadata: dict[str, str], device: torch.device) -> None:
        meta = parse_metadata(metadata, path)
        self.path = path
        self.device = device
        self.names: dict[int, str] = meta["names"]
        self.nc = len(self.names)
        self.stride: int = meta["stride"]
        self.strides: list[int] = list(meta["strides"])
        self.imgsz: tuple[int, int] = tuple(meta["imgsz"])
        self.batch: int = meta["batch"]
        self.num_anchors: int = meta["num_anchors"]
        self.head_type: str = meta["head_type"]
        self.args: dict = meta["args"]
        self.nms = bool(self.args.get("nms", False))
        self.input_convention = InputConvention.from_metadata(metadata.get("input"), path)

    def eval(self) -> ExportedDetector:
        """No-op, so engines can treat every model alike."""
        return self

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Run the graph on images already shaped for it; returns output0 as float32 on `images.device`."""

    @property
    def dynamic_size(self) -> bool:
        return self.input_shape[2] is None or self.input_shape[3] is None

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] is None

    def fit_input(self, images: torch.Tensor) -> torch.Tensor:
        """Pad images bottom/right with the convention's value to the static graph size; dynamic graphs pass through."""
        if self.dynamic_size:
            return images
        height, width = self.input_shape[2:]
        if images.shape[2] > height or images.shape[3] > width:
            raise CheckpointError(
                f"images of {images.shape[2]}x{images.shape[3]} do not fit the static input {height}x{width} of "
                f"'{self.path.name}'; use imgsz={max(height, width)} or re-export with dynamic=True"
            )
        pad = (0, width - images.shape[3], 0, height - images.shape[2])
        return F.pad(images, pad, value=self.input_convention.pad_value / 255)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """output0 for any batch size: a static batch is run in chunks, the last one zero-padded."""
        images = self.fit_input(images)
        if self.dynamic_batch:
            return self.forward(images)
        size = self.input_shape[0]
        outputs = []
        for chunk in images.split(size):
            padded = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, size - len(chunk)))
            outputs.append(self.forward(padded)[: len(chunk)])
        return torch.cat(outputs)

    def predict(
        self,
        images: torch.Tensor,
        conf: float,
        iou: float,
        max_det: int,
        nms_pre: int,
        ratios: torch.Tensor | None = None,
        multi_label: bool = True,
    ) -> list[Detections]:
        """Detections per image for images [B,3,H,W] (0..1 RGB); boxes divided by `ratios` when given.

        `multi_label` as in `DenseDetector.predict`; an NMS-embedded graph keeps the choice made at export.
        """
        output = self.run(images)
        if self.nms:
            detections = self.filter_embedded(output, conf, max_det)
        else:
            hw = self.input_hw(images)
            detections = self.postprocess_raw(output, conf, iou, max_det, nms_pre, hw, multi_label)
        if ratios is None:
            return detections
        return [Detections(d.boxes / r, d.scores, d.labels) for d, r in zip(detections, ratios.tolist(), strict=True)]

    def input_hw(self, images: torch.Tensor) -> tuple[int, int]:
        """The (H, W) the graph actually ran at for these images."""
        return tuple(images.shape[2:]) if self.dynamic_size else tuple(self.input_shape[2:])

    def postprocess_raw(
        self, output: torch.Tensor, conf: float, iou: float, max_det: int, nms_pre: int, hw: tuple[int, int],
        multi_label: bool = True,
    ) -> list[Detections]:
        """Ultralytics layout output0 [B,4+C,N] (xywh, scores) -> per-level top-k, NMS, max_det."""
        preds = output.transpose(1, 2)  # [B, N, 4+C]
        counts = num_per_level(*hw, self.strides, self.num_anchors)
        if sum(counts) != preds.shape[1]:
            raise CheckpointError(
                f"'{self.path.name}' returned {preds.shape[1]} priors, expected {sum(counts)} for input {hw}; "
                "the metadata does not match the graph, re-export the model"
            )
        boxes = box_convert(preds[..., :4], "cxcywh", "xyxy")  # [B, N, 4]
        return postprocess(boxes, preds[..., 4:], counts, conf, iou, max_det, nms_pre, multi_label)

    def filter_embedded(self, output: torch.Tensor, conf: float, max_det: int) -> list[Detections]:
        """NMS-embedded output [B,max_det,6] (x1,y1,x2,y2,score,class), score-descending: keep rows above `conf`."""
        return unpad(output, (output[..., 4] > conf).sum(1).clamp(max=max_det))


class OnnxDetector(ExportedDetector):
    """An ONNX Runtime session behind the DenseDetector predict() interface (CUDA EP when `device` is CUDA)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model not found: '{path}'; export one with 'crosskd export model=best.pt'")
        device = torch.device(device)
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if cuda else []
        LOGGER.info(f"Loading {path} for ONNX Runtime inference...")
        errors = ort.capi.onnxruntime_pybind11_state
        try:
            self.session = ort.InferenceSession(str(path), providers=[*providers, "CPUExecutionProvider"])
        except (errors.InvalidProtobuf, errors.InvalidGraph, errors.Fail) as error:
            raise CheckpointError(f"cannot load '{path}' with ONNX Runtime (corrupt or not ONNX): {error}") from None
        LOGGER.info(f"Using ONNX Runtime {ort.__version__} with {self.session.get_providers()[0]}")
        super().__init__(path, self.session.get_modelmeta().custom_metadata_map, device)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.fp16 = graph_input.type == "tensor(float16)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float16 if self.fp16 else torch.float32).numpy()
        output = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(output).float().to(images.device)


class TorchScriptDetector(ExportedDetector):
    """A traced crosskd ExportModel (metadata in the archive's config.txt) behind DenseDetector.predict()."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"TorchScript model not found: '{path}'; export one with format=torchscript")
        device = torch.device(device)
        extra_files = {TORCHSCRIPT_METADATA: ""}
        LOGGER.info(f"Loading {path} for TorchScript inference...")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*")  # TorchScript still loads in torch 2.14
            try:
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[0]
                raise CheckpointError(f"cannot load '{path}' as TorchScript (corrupt?): {reason}") from None
        metadata = json.loads(extra_files[TORCHSCRIPT_METADATA] or "{}")
        super().__init__(path, metadata, traced_device(path, metadata, device))
        self.module = module.to(self.device).eval()
        dynamic = bool(self.args.get("dynamic"))
        height, width = (None, None) if dynamic and not self.nms else self.imgsz
        self.input_shape = (None if dynamic else self.batch, 3, height, width)
        self.dtype = torch.float16 if self.args.get("half") else torch.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = self.module(images.to(self.device, self.dtype))
        return output.float().to(images.device)


def traced_device(path: Path, metadata: dict[str, str], requested: torch.device) -> torch.device:
    """Where a TorchScript trace can run: the device it was traced on (its factory calls are pinned there)."""
    traced = torch.device(ast.literal_eval(metadata.get("args", "{}")).get("device", "cpu"))
    if traced.type == requested.type:
        return traced
    if traced.type == "cpu":
        LOGGER.warning(f"'{path.name}' was traced on the CPU and runs there; re-export it with device={requested} "
                       "to run on that device")
        return traced
    raise CheckpointError(f"'{path.name}' was traced on {traced} and cannot run on {requested}; "
                          f"re-export it with device={requested.type}")


def import_openvino():
    """The openvino module, or a one-line ConfigError with the command that installs it."""
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO export and inference need the openvino package; install it with: "
                          "pip install 'crosskd[openvino]'") from None
    return openvino


class OpenVinoDetector(ExportedDetector):
    """An OpenVINO IR folder (<name>.xml + .bin, metadata.yaml) compiled for the CPU behind DenseDetector.predict().

    Compiled at f32 precision: on processors with bf16 support OpenVINO's CPU default is bf16, which moves scores by
    ~0.2 on a tiny model and breaks parity with PyTorch.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        openvino = import_openvino()
        folder = Path(path).parent if Path(path).suffix.lower() == ".xml" else Path(path)
        xml = min(folder.glob("*.xml"), default=None) if folder.is_dir() else None
        if xml is None or not (folder / OPENVINO_METADATA).is_file():
            raise CheckpointError(f"OpenVINO model not found: '{folder}' needs a .xml/.bin pair and "
                                  f"{OPENVINO_METADATA}; export one with 'crosskd export format=openvino'")
        if torch.device(device).type != "cpu":
            LOGGER.warning(f"OpenVINO runs '{folder.name}' on the CPU, not on {device}")
        LOGGER.info(f"Loading {folder} for OpenVINO inference...")
        core = openvino.Core()
        try:
            model = core.read_model(str(xml))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"cannot load '{xml}' with OpenVINO (corrupt?): {reason}") from None
        metadata = yaml.safe_load((folder / OPENVINO_METADATA).read_text()) or {}
        super().__init__(folder, {str(k): str(v) for k, v in metadata.items()}, torch.device("cpu"))
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        LOGGER.info(f"Using OpenVINO {openvino.__version__.split('-')[0]} on the CPU")
        shape = model.input(0).get_partial_shape()  # B, 3, H, W; dynamic axes are None
        self.input_shape = tuple(dim.get_length() if dim.is_static else None for dim in shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.compiled(images.detach().to("cpu", torch.float32).numpy())[0]
        return torch.from_numpy(output).to(images.device)


EXPORTED_BACKENDS: dict[str, type[ExportedDetector]] = {
    "onnx": OnnxDetector, "torchscript": TorchScriptDetector, "openvino": OpenVinoDetector,
}
EXPORTED_SOURCES = (".onnx", ".torchscript", f"a *{OPENVINO_SUFFIX} folder")


def exported_kind(source: str | Path) -> str | None:
    """'onnx', 'torchscript' or 'openvino' (a *_openvino_model folder or its .xml) for an exported model, else None."""
    text = str(source).rstrip("/\\")
    suffix = Path(text).suffix.lower()
    if text.endswith(OPENVINO_SUFFIX) or suffix == ".xml":
        return "openvino"
    return suffix[1:] if suffix in (".onnx", ".torchscript") else None


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
    kind: str  # "checkpoint", "yaml", "mmdetection", "torchvision", "onnx", "torchscript" or "openvino"
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

    Sources: a crosskd .pt; an MMDetection .pth (2.x/3.x); a torchvision detector (`torchvision:NAME`, or its state
    dict file with `model_cfg` naming the matching *_tv.yaml); an exported .onnx / .torchscript / *_openvino_model
    folder; a model YAML (+ `weights`, a crosskd .pt of that architecture). `model_cfg` is the YAML a foreign
    checkpoint maps onto (inferred from an MMDetection checkpoint's embedded config when absent). `nc` is the class
    count of a YAML built without weights; with `adapt_nc` a model with other classes gets a new head for `nc`
    (fine-tuning). Every unusable source ends in one ConfigError/CheckpointError line naming the setting it came
    from (`role`, e.g. teacher).
    """
    text, suffix = str(source), Path(source).suffix.lower()
    if weights is not None and not is_yaml(source):
        raise ConfigError(f"weights are only for a model YAML, and '{source}' already holds weights; drop them")
    if text.startswith(TORCHVISION_PREFIX):
        runtime = _foreign_runtime(load_torchvision_detector(torchvision_name(text)), text, "torchvision")
    elif is_yaml(source):
        runtime = _from_yaml(source, nc, weights)
    elif (kind := exported_kind(source)) is not None:
        model = EXPORTED_BACKENDS[kind](source, device)
        return Runtime(model, str(model.path.resolve()), kind, dict(model.names), tuple(model.imgsz))
    elif suffix in CHECKPOINT_SUFFIXES:
        if not Path(source).is_file():
            raise CheckpointError(f"{role} '{source}' not found: pass {role}=path/to/best.pt (a crosskd checkpoint)")
        runtime = _from_torch_file(Path(source), model_cfg, role)
    else:
        expected = ", ".join((".yaml", *CHECKPOINT_SUFFIXES, *EXPORTED_SOURCES, f"{TORCHVISION_PREFIX}NAME"))
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
    """A crosskd checkpoint, an MMDetection checkpoint or a torchvision detector state dict, told apart by content."""
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


def is_detector_checkpoint(source: str | Path) -> bool:
    """A whole detector's weights (crosskd, MMDetection with a head, torchvision), not just a backbone's."""
    if str(source).startswith(TORCHVISION_PREFIX) or torchvision_name(source) is not None:
        return True
    if Path(source).suffix.lower() not in CHECKPOINT_SUFFIXES or not Path(source).is_file():
        return False
    obj = read_torch_file(source)
    return is_crosskd_checkpoint(obj) or (
        is_mmdet_checkpoint(obj) and any(key.startswith("bbox_head.") for key in obj["state_dict"])
    )


def _torchvision_name_of_yaml(model_cfg: str | Path | None) -> str | None:
    """The torchvision detector whose shipped YAML is `model_cfg`, if any."""
    stem = Path(str(model_cfg)).stem if model_cfg else None
    return next((name for name, spec in TORCHVISION_DETECTORS.items() if Path(spec.yaml).stem == stem), None)


def _foreign_runtime(detector: DenseDetector, source: str, kind: str) -> Runtime:
    return Runtime(detector, source, kind, dict(detector.names), None)


def _from_yaml(source: str | Path, nc: int | None, weights: str | Path | None) -> Runtime:
    path = resolve_cfg_file(source, "models")
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
