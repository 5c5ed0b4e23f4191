"""What every exported model shares: its metadata, the input convention it was exported with, input shaping for
static graphs and the post-processing of its raw output (`ExportedDetector`, the base of each runtime module)."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from crosskd.errors import CheckpointError
from crosskd.models.postprocess import Detections, postprocess, reclip_detections, unpad
from crosskd.ops.boxes import clip_boxes

REQUIRED_METADATA = ("names", "stride", "strides", "imgsz", "batch", "num_anchors", "args")

@dataclass(frozen=True)
class InputConvention:
    """How an image becomes the model input: the `input` metadata of an exported file, which predict follows.

    crosskd's convention is the training loader's: keep-ratio resize so the long side is imgsz (an h,w imgsz: fit
    inside it), pad bottom/right with `pad_value` (0..255) to a multiple of the largest stride (a static graph: to
    its size), RGB, pixels / 255 (0..1), the model's mean/std subtracted inside the graph. A YOLO export records
    Ultralytics' letterbox instead (`ULTRALYTICS_INPUT`: the image centred on grey 114), which every Ultralytics client
    applies; crosskd's runtimes then centre the image the same way (`centre_images`); see docs/deploy.md.
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
        differs = {f.name: getattr(convention, f.name) for f in fields(cls) if f.name not in ("pad", "pad_value")
                   and getattr(convention, f.name) != getattr(CROSSKD_INPUT, f.name)}
        if convention.pad not in PADS:
            differs["pad"] = convention.pad
        if differs or not 0 <= int(convention.pad_value) <= 255:
            raise CheckpointError(f"'{path.name}' expects input {given}, which crosskd's predictor does not produce; "
                                  "re-export it with 'crosskd export'")
        return convention

    @property
    def centred(self) -> bool:
        return self.pad == "center"

    def place(
        self, images: torch.Tensor, img_sizes: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Letterboxed images [B, 3, H, W] whose (h, w) `img_sizes` [B, 2] sit top-left -> the graph input
        [B, 3, *size], each image centred (`pad: center`) or kept top-left on `pad_value`, and the (left, top)
        offsets [B, 2] added to its pixels: the placement predict and val give a file, and INT8 calibration its
        graph."""
        if self.centred:
            return centre_images(images, img_sizes, size, self.pad_value / 255)
        return pad_to(images, size, self.pad_value / 255), torch.zeros_like(img_sizes)


PADS = ("bottom-right", "center")  # where the image sits in the padded input: top-left, or centred (Ultralytics)
CROSSKD_INPUT = InputConvention()
ULTRALYTICS_INPUT = InputConvention(pad="center", pad_value=114)  # Ultralytics' LetterBox, what its clients feed


def centre_offsets(img_sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(left, top) [B, 2] of each (h, w) image of `img_sizes` [B, 2] centred in a height x width input, rounded as
    Ultralytics' LetterBox rounds them (an odd padding puts the extra pixel bottom/right)."""
    spare = torch.tensor([width, height], device=img_sizes.device) - img_sizes.flip(1)  # [B, 2] (w, h) padding
    return torch.round(spare / 2 - 0.1).long()


def pad_to(images: torch.Tensor, size: tuple[int, int], pad_value: float) -> torch.Tensor:
    """Images [B, 3, H, W] padded bottom/right with `pad_value` (0..1) to [B, 3, *size]."""
    return F.pad(images, (0, size[1] - images.shape[3], 0, size[0] - images.shape[2]), value=pad_value)


def centre_images(
    images: torch.Tensor, img_sizes: torch.Tensor, size: tuple[int, int], pad_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] whose (h, w) `img_sizes` [B, 2] sit top-left -> [B, 3, *size] with each image centred on
    `pad_value` (0..1), and the (left, top) offsets [B, 2] added to its pixels."""
    offsets = centre_offsets(img_sizes, *size)
    canvas = images.new_full((len(images), images.shape[1], *size), pad_value)
    for image, out, (h, w), (left, top) in zip(images, canvas, img_sizes.tolist(), offsets.tolist(), strict=True):
        out[:, top: top + h, left: left + w] = image[:, :h, :w]
    return canvas, offsets


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
    values["min_bbox_size"] = ast.literal_eval(metadata.get("min_bbox_size", "0.0"))  # files before the key: 0
    values["precision"] = metadata.get("precision", "fp16" if values["args"].get("half") else "fp32")
    values["calibration"] = json.loads(metadata["calibration"]) if "calibration" in metadata else None
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
        self.min_bbox_size: float | None = meta["min_bbox_size"]
        self.args: dict = meta["args"]
        self.nms = bool(self.args.get("nms", False))
        self.precision: str = meta["precision"]  # fp32, fp16 or int8
        self.calibration: dict | None = meta["calibration"]  # an INT8 file's calibration set (data, images, method)
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
        return pad_to(images, (height, width), self.input_convention.pad_value / 255)

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
        img_sizes: torch.Tensor | None = None,
    ) -> list[Detections]:
        """Detections per image for images [B,3,H,W] (0..1 RGB); boxes divided by `ratios` when given.

        `multi_label` as in `DenseDetector.predict`; an NMS-embedded graph keeps the choice made at export.
        `img_sizes` [B, 2] (h, w) of each image inside the padded input: boxes are clipped to it before NMS here; an
        NMS-embedded graph only knows its padded input, so its rows are clipped and suppressed again on the host.
        A file with a centred input convention is run as Ultralytics runs it (`predict_centred`).
        """
        hw = self.input_hw(images)
        if self.input_convention.centred:
            detections = self.predict_centred(images, conf, iou, max_det, nms_pre, hw, multi_label, img_sizes)
        elif self.nms:
            detections = self.filter_embedded(self.run(images), conf, max_det, img_sizes, iou)
        else:
            detections = self.postprocess_raw(self.run(images), conf, iou, max_det, nms_pre, hw, multi_label,
                                              img_sizes)
        if ratios is None:
            return detections
        return [Detections(d.boxes / r, d.scores, d.labels) for d, r in zip(detections, ratios.tolist(), strict=True)]

    def predict_centred(
        self, images: torch.Tensor, conf: float, iou: float, max_det: int, nms_pre: int, hw: tuple[int, int],
        multi_label: bool, img_sizes: torch.Tensor | None,
    ) -> list[Detections]:
        """Detections in the top-left frame of `images` for a file fed as Ultralytics feeds it: each (h, w) image of
        `img_sizes` [B, 2] (without them, all of `images`) centred in the (H, W) input `hw`; NMS on the boxes as the
        graph clipped them to that input, then the boxes moved back and clipped to each image (Ultralytics' order)."""
        if img_sizes is None:
            img_sizes = torch.tensor(images.shape[2:], device=images.device).expand(len(images), 2)
        img_sizes = img_sizes.to(images.device)
        canvas, offsets = self.input_convention.place(images, img_sizes, hw)
        output = uncentre(self.run(canvas), offsets.to(torch.float32), self.nms)
        if self.nms:
            detections = self.filter_embedded(output, conf, max_det)
        else:
            detections = self.postprocess_raw(output, conf, iou, max_det, nms_pre, hw, multi_label)
        return [Detections(clip_boxes(d.boxes[None], size[None])[0], d.scores, d.labels)
                for d, size in zip(detections, img_sizes, strict=True)]

    def input_hw(self, images: torch.Tensor) -> tuple[int, int]:
        """The (H, W) the graph actually ran at for these images."""
        return tuple(images.shape[2:]) if self.dynamic_size else tuple(self.input_shape[2:])

    def postprocess_raw(
        self, output: torch.Tensor, conf: float, iou: float, max_det: int, nms_pre: int, hw: tuple[int, int],
        multi_label: bool = True, img_sizes: torch.Tensor | None = None,
    ) -> list[Detections]:
        """Ultralytics layout output0 [B,4+C,N] (xywh, scores) -> boxes clipped to `img_sizes` [B, 2] (h, w) when
        given, per-level top-k, NMS, max_det."""
        preds = output.transpose(1, 2)  # [B, N, 4+C]
        counts = num_per_level(*hw, self.strides, self.num_anchors)
        if sum(counts) != preds.shape[1]:
            raise CheckpointError(
                f"'{self.path.name}' returned {preds.shape[1]} priors, expected {sum(counts)} for input {hw}; "
                "the metadata does not match the graph, re-export the model"
            )
        boxes = box_convert(preds[..., :4], "cxcywh", "xyxy")  # [B, N, 4]
        return postprocess(boxes, preds[..., 4:], counts, conf, iou, max_det, nms_pre, multi_label, img_sizes,
                           self.min_bbox_size)

    def filter_embedded(
        self, output: torch.Tensor, conf: float, max_det: int, img_sizes: torch.Tensor | None = None,
        iou: float = 0.6,
    ) -> list[Detections]:
        """NMS-embedded output [B,max_det,6] (x1,y1,x2,y2,score,class), score-descending: keep rows above `conf`;
        with `img_sizes` [B, 2] (h, w) clip them to each image and suppress again with the graph's IoU threshold
        (`iou` if the metadata lacks it): two rows that differed only inside the padding become one."""
        counts = (output[..., 4] > conf).sum(1).clamp(max=max_det)
        if img_sizes is not None:
            iou = float(self.args.get("iou", iou))
            output, counts = reclip_detections(output[:, :max_det], counts, img_sizes.to(output.device), self.nc, iou,
                                               self.min_bbox_size)
        return unpad(output, counts)


def uncentre(output: torch.Tensor, offsets: torch.Tensor, nms: bool) -> torch.Tensor:
    """Boxes of output0 moved by -(left, top) `offsets` [B, 2]: raw [B, 4+C, N] (centre x, y first) or NMS rows
    [B, K, 6] (x1, y1, x2, y2 first)."""
    if nms:
        return torch.cat([output[..., :4] - offsets.repeat(1, 2)[:, None], output[..., 4:]], dim=-1)
    return torch.cat([output[:, :2] - offsets[..., None], output[:, 2:]], dim=1)


@contextlib.contextmanager
def quiet_export_warnings() -> Iterator[None]:
    """Silence tracer and legacy-exporter deprecation chatter (the exporter choice is deliberate)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|deprecated|will be removed).*")
        yield
