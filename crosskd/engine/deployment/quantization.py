"""INT8 exports: the calibration set (images of a dataset's train split through predict's preprocessing, placed as
the file's input convention says) and the rule for which nodes of the graph stay in float. The runtimes'
`export_int8` (runtimes/onnx.py, runtimes/openvino.py) use both, so ONNX Runtime and NNCF quantize the same nodes on
the same images.

What stays float: every node after the last convolutions, i.e. the decode. The graph ends in one tensor holding
boxes in pixels (0..imgsz) and scores in 0..1 side by side; one 8-bit scale for both leaves scores in steps of
imgsz/255 (measured on the demo student: AP 19.0 -> 4.5 when the decode is quantized too). The DFL softmax and its
integral, the per-level Scale, the priors and the box arithmetic lose precision the same way. The convolutions
(backbone, FPN, head towers and predictors) carry nearly all the FLOPs and are quantized.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from crosskd.data import load_data_yaml
from crosskd.data.cache import load_labels
from crosskd.engine.deployment.preprocess import letterbox
from crosskd.engine.deployment.runtimes.exported import CROSSKD_INPUT, InputConvention
from crosskd.errors import ConfigError, DataError, UserError
from crosskd.utils import LOGGER

MAX_CALIBRATION_IMAGES = 300  # NNCF's default subset size; more rarely moves the ranges of a detector


def export_precision(int8: bool, half: bool) -> str:
    """The precision of an export: fp32, fp16 (half=True) or int8 (int8=True)."""
    return "int8" if int8 else "fp16" if half else "fp32"


def calibration_data(data: str, data_given: bool, train_args: dict, datasets_dir: str | None) -> str:
    """The dataset YAML INT8 calibrates on: `data` when the user gave it, else the checkpoint's training data when it
    can still be found; otherwise one line naming the fix."""
    if data_given:
        return data
    trained_on = train_args.get("data")
    if not trained_on:
        reason = "the checkpoint does not say which data it was trained on"
    else:
        try:
            load_data_yaml(trained_on, datasets_dir)
            return str(trained_on)
        except UserError as error:
            reason = f"the checkpoint's training data data={trained_on} is not found here ({error})"
    raise ConfigError(f"int8=True calibrates on training images, and {reason}; pass data=path/to/data.yaml "
                      "(its train split is used)")


@dataclass(frozen=True)
class CalibrationSet:
    """The images an INT8 export is calibrated on: `paths` of the train split of `data`, fed to the float graph as
    predict feeds the exported file (keep-ratio resize into `imgsz`, placed and padded as `convention` says: zero
    padding bottom/right, or centred on grey 114 for a YOLO file; 0..1 RGB)."""

    data: str  # the dataset YAML
    paths: tuple[Path, ...]  # the calibration images, evenly spaced over the split
    available: int  # images in the split
    method: str  # calib_method: minmax, percentile or entropy
    imgsz: tuple[int, int]  # (h, w) of the graph input the images are padded to
    stride: int  # the model's largest stride
    convention: InputConvention = CROSSKD_INPUT  # the exported file's input convention
    split: str = "train"

    def inputs(self, batch: int) -> CalibrationInputs:
        """The images as graph inputs of `batch` images, as often as a quantizer iterates over them."""
        return CalibrationInputs(self, batch)

    def describe(self) -> str:
        return (f"{len(self.paths)} of {self.available} {self.split} images of {Path(self.data).name}, "
                f"calib_method={self.method}")

    def metadata(self) -> str:
        """What the written file records about its calibration (JSON)."""
        return json.dumps({"data": self.data, "split": self.split, "images": len(self.paths),
                           "available": self.available, "method": self.method})


class CalibrationInputs:
    """Re-iterable graph inputs [batch, 3, H, W] float32 of a CalibrationSet; the last batch is filled up with the
    first images (a static graph takes only full batches)."""

    def __init__(self, calibration: CalibrationSet, batch: int) -> None:
        self.calibration, self.batch = calibration, batch

    def __len__(self) -> int:
        return -(-len(self.calibration.paths) // self.batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        paths = list(self.calibration.paths)
        paths += paths[: len(self) * self.batch - len(paths)]
        for start in range(0, len(paths), self.batch):
            yield graph_input([read_image(path) for path in paths[start : start + self.batch]], self.calibration)


def graph_input(images: list[np.ndarray], calibration: CalibrationSet) -> np.ndarray:
    """BGR uint8 images -> the graph input [B, 3, *imgsz] float32 that predict gives the exported file: predict's
    letterbox, then the images placed in the input by the file's convention."""
    convention = calibration.convention
    batch, _, sizes = letterbox(images, calibration.imgsz, calibration.stride, torch.device("cpu"),
                                convention.pad_value)
    return convention.place(batch, sizes, calibration.imgsz)[0].numpy()


def read_image(path: Path) -> np.ndarray:
    """A calibration image, BGR uint8 [H, W, 3]; one line when it cannot be read any more."""
    image = cv2.imread(str(path))
    if image is None:
        raise DataError(f"INT8 calibration cannot read '{path}' (deleted or corrupt since it was indexed)")
    return image


def calibration_set(
    data: str, datasets_dir: str | None, fraction: float, method: str, imgsz: tuple[int, int], stride: int,
    convention: InputConvention = CROSSKD_INPUT,
) -> CalibrationSet:
    """`fraction` of the train split of `data` (at most MAX_CALIBRATION_IMAGES, evenly spaced), fed as `convention`
    says."""
    info = load_data_yaml(data, datasets_dir)
    index = load_labels(info.source("train"), info.nc).index
    count = min(MAX_CALIBRATION_IMAGES, max(1, round(len(index) * fraction)))
    picks = np.linspace(0, len(index) - 1, count).round().astype(int)
    paths = tuple(Path(index[int(i)].path) for i in picks)
    calibration = CalibrationSet(str(data), paths, len(index), method, tuple(imgsz), stride, convention)
    LOGGER.info(f"INT8 calibration: {calibration.describe()} (fraction={fraction:g}, "
                f"at most {MAX_CALIBRATION_IMAGES})")
    return calibration


def float_nodes(order: Sequence[str], successors: Mapping[str, Sequence[str]], convolutions: set[str]) -> list[str]:
    """The nodes that stay float: those from which no convolution can be reached, the convolutions excepted.

    `order` is the graph's nodes in topological order, `successors` the nodes that read each node's outputs and
    `convolutions` the convolution nodes. What remains is the decode after the last convolutions (module docstring).
    """
    reaches: dict[str, bool] = {}  # whether a convolution can be reached from the node
    for name in reversed(order):
        reaches[name] = any(s in convolutions or reaches.get(s, False) for s in successors.get(name, ()))
    return [name for name in order if not reaches[name] and name not in convolutions]
