"""The Python predictor API: `from crosskd import Detector; results = Detector("best.pt")("img.jpg")`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from crosskd.config import get_args, imgsz_hw
from crosskd.engine.backend import ExportedDetector
from crosskd.engine.predictor import Frame, Predictor, Result, batched, iter_frames, source_files
from crosskd.errors import DataError

__all__ = ["Detector", "Result"]

Source = str | Path | np.ndarray


def array_frame(image: np.ndarray, index: int) -> Frame:
    """A numpy RGB HWC uint8 image as a Frame named image<index>.jpg."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"numpy images must be RGB uint8 arrays of shape [H, W, 3], not {image.dtype} {image.shape}")
    return Frame(f"image{index}.jpg", np.ascontiguousarray(image), index, None, 0, 0.0)


def to_frames(source: Source | Sequence[Source]) -> Iterator[Frame]:
    """Frames of a path (image, video, directory, glob, .txt list), a numpy image, or a list of these."""
    items = list(source) if isinstance(source, list | tuple) else [source]
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray):
            yield array_frame(item, index)
        else:
            yield from iter_frames(source_files(item))


class Detector:
    """A trained crosskd detector (.pt, .onnx or .torchscript) as a callable: images in, a Result per image out.

    `device` is cpu, a CUDA index such as 0, or None for auto; `batch` images run together.
    """

    def __init__(self, model: str | Path, device: str | int | None = None, batch: int = 1) -> None:
        overrides = {"model": str(model), "device": None if device is None else str(device), "batch": batch}
        self.predictor = Predictor(get_args(overrides, "predict"))

    @property
    def names(self) -> dict[int, str]:
        return self.predictor.names

    @property
    def imgsz(self) -> tuple[int, int]:
        """The default input size (h, w): the training size of a .pt, the export size of an exported file."""
        return self.predictor.imgsz

    def __call__(
        self,
        source: Source | Sequence[Source],
        conf: float = 0.25,
        iou: float = 0.6,
        max_det: int = 100,
        imgsz: int | Sequence[int] | None = None,
    ) -> list[Result]:
        """Detect objects in `source`: a path, a list of paths, or numpy RGB HWC uint8 images.

        Results hold boxes (xyxy, original-image pixels), scores, labels, names and path; `.plot()` draws them.
        """
        static = isinstance(self.predictor.model, ExportedDetector) and not self.predictor.model.dynamic_size
        size = None if imgsz is None or static else imgsz_hw(imgsz)
        results: list[Result] = []
        for frames in batched(to_frames(source), self.predictor.batch):
            results.extend(self.predictor.predict(frames, conf, iou, max_det, size))
        return results

    def __repr__(self) -> str:
        return f"Detector({self.predictor.args.model!r}, names={self.names})"
