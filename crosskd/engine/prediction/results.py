"""`Results`: the detections of one image or video frame, as `Detector.predict` and `crosskd predict` give them.

The Ultralytics layout: `r.boxes.xyxy / .xywh / .xyxyn / .xywhn / .conf / .cls` (CPU tensors, original-image pixels),
`r.names`, `r.orig_img` (BGR uint8, as OpenCV reads it), `r.speed`, `r.plot()`, `r.save()`, `r.to_json()`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

from crosskd.engine.evaluation.plotting import draw_boxes


class Boxes:
    """The detections of one image: `data` [K, 6] = x1, y1, x2, y2, conf, cls in original-image pixels."""

    def __init__(self, data: Tensor, orig_shape: tuple[int, int]) -> None:
        self.data = data  # [K, 6] float32, score-descending
        self.orig_shape = orig_shape  # (h, w) of the original image

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Boxes(xyxy={self.xyxy.tolist()}, conf={self.conf.tolist()}, cls={self.cls.tolist()})"

    @property
    def xyxy(self) -> Tensor:
        """[K, 4] corners x1, y1, x2, y2 in pixels."""
        return self.data[:, :4]

    @property
    def xywh(self) -> Tensor:
        """[K, 4] centre x, centre y, width, height in pixels."""
        return box_convert(self.xyxy, "xyxy", "cxcywh")

    @property
    def xyxyn(self) -> Tensor:
        """[K, 4] corners divided by the image width and height (0..1)."""
        return self.xyxy / self.scale

    @property
    def xywhn(self) -> Tensor:
        """[K, 4] centre and size divided by the image width and height (0..1)."""
        return self.xywh / self.scale

    @property
    def conf(self) -> Tensor:
        """[K] scores."""
        return self.data[:, 4]

    @property
    def cls(self) -> Tensor:
        """[K] class ids (float, like Ultralytics; `.long()` for indexing)."""
        return self.data[:, 5]

    @property
    def scale(self) -> Tensor:
        height, width = self.orig_shape
        return self.data.new_tensor([width, height, width, height])


@dataclass
class Results:
    """The detections of one image or video frame, with the image they were found in."""

    orig_img: np.ndarray  # [H, W, 3] BGR uint8
    path: str  # the file or URL; image<i>.jpg for in-memory images
    names: dict[int, str]
    boxes: Boxes
    frame: int | None = None  # 1-based video or camera frame, None for images
    speed: dict[str, float] = field(default_factory=dict)  # ms per image: preprocess, inference, postprocess

    def __len__(self) -> int:
        return len(self.boxes)

    def verbose(self) -> str:
        """'2 3s, 1 7' (per-class counts, plural 's' like Ultralytics) or '(no detections)'."""
        counts = Counter(self.boxes.cls.long().tolist())
        parts = [f"{n} {self.names.get(c, c)}{'s' * (n > 1)}" for c, n in sorted(counts.items())]
        return ", ".join(parts) if parts else "(no detections)"

    def summary(self) -> list[dict[str, Any]]:
        """One dict per detection: name, class, confidence and box (x1, y1, x2, y2 in pixels), as Ultralytics."""
        rows = []
        for (x1, y1, x2, y2), conf, cls in zip(self.boxes.xyxy.tolist(), self.boxes.conf.tolist(),
                                                self.boxes.cls.long().tolist(), strict=True):
            box = {"x1": round(x1, 5), "y1": round(y1, 5), "x2": round(x2, 5), "y2": round(y2, 5)}
            rows.append({"name": self.names.get(cls, str(cls)), "class": cls, "confidence": round(conf, 5),
                         "box": box})
        return rows

    def to_json(self) -> str:
        """`summary()` as a JSON string."""
        return json.dumps(self.summary(), indent=2)

    def plot(self, line_width: int | None = None) -> np.ndarray:
        """A BGR copy of the image with boxes, class names and scores drawn (`cv2.imshow`/`cv2.imwrite` ready)."""
        canvas = self.orig_img.copy()
        return draw_boxes(canvas, self.boxes.xyxy.numpy(), self.boxes.cls.long().numpy(), self.names,
                          self.boxes.conf.numpy(), line_width)

    def save(self, filename: str | Path, line_width: int | None = None) -> Path:
        """Write `plot()` to an image file; returns its path."""
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), self.plot(line_width))
        return path

    def yolo_lines(self, save_conf: bool = False) -> list[str]:
        """'cls xc yc w h [conf]' lines normalised by the original image size."""
        data = self.boxes.data.double()  # [K, 6]: float64 keeps the printed digits exact
        xywhn = box_convert(data[:, :4], "xyxy", "cxcywh") / self.boxes.scale.double()  # [K, 4]
        rows = torch.cat([data[:, 5:6], xywhn, data[:, 4:5]] if save_conf else [data[:, 5:6], xywhn], 1)
        return [f"{int(row[0])} " + " ".join(f"{v:.6g}" for v in row[1:]) for row in rows.tolist()]

    def coco_records(self) -> list[dict[str, Any]]:
        """COCO results records: bbox as x, y, w, h in original pixels; image_id the numeric stem, else the stem."""
        stem = Path(self.path).stem + (f"_{self.frame}" if self.frame is not None else "")
        image_id: int | str = int(stem) if stem.isdigit() else stem
        xywh = box_convert(self.boxes.xyxy, "xyxy", "xywh").tolist()
        return [
            {"image_id": image_id, "file_name": Path(self.path).name, "category_id": int(cls),
             "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
            for box, score, cls in zip(xywh, self.boxes.conf.tolist(), self.boxes.cls.tolist(), strict=True)
        ]
