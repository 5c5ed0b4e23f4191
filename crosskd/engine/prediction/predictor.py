"""`crosskd predict` and `Detector.predict`: run a .pt, .onnx or .torchscript detector on any source
(engine/prediction/sources.py), one batch of frames at a time, yielding a `Results` per image or frame."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from crosskd.config import Args, imgsz_hw, setting_or_model_default
from crosskd.engine.deployment.loader import Runtime, load_runtime
from crosskd.engine.deployment.preprocess import letterbox
from crosskd.engine.deployment.runtimes.exported import ExportedDetector
from crosskd.engine.prediction.results import Boxes, Results
from crosskd.engine.prediction.sources import Frame, batched, describe_frame, load_frames
from crosskd.errors import UserError
from crosskd.paths import make_save_dir, newest_best
from crosskd.utils import LOGGER, colorstr, select_device

PREDICT_CONF = 0.25  # score threshold when conf is empty


def preprocess(
    images: Sequence[np.ndarray], imgsz: tuple[int, int], pad_multiple: int, device: torch.device, pad_value: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """BGR uint8 images [H, W, 3] -> model input [B, 3, H', W'] 0..1 RGB and resize ratios [B] (`letterbox`)."""
    images, ratios, _ = letterbox(images, imgsz, pad_multiple, device, pad_value)
    return images, ratios


def to_results(frame: Frame, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               names: dict[int, str], classes: list[int] | None) -> Results:
    """Detections [K, 4] / [K] / [K] clipped to the original image, optionally only `classes`, as Results."""
    height, width = frame.image.shape[:2]
    data = torch.cat([boxes.float(), scores.float()[:, None], labels.float()[:, None]], 1).cpu()  # [K, 6]
    data[:, 0:4:2] = data[:, 0:4:2].clamp(0, width)
    data[:, 1:4:2] = data[:, 1:4:2].clamp(0, height)
    if classes:
        data = data[torch.isin(data[:, 5].long(), torch.tensor(classes))]
    return Results(frame.image, frame.path, names, Boxes(data, (height, width)), frame.frame)


class Predictor:
    """Loads a model once (or takes a loaded Runtime); `stream(source)` yields Results, `run()` is `crosskd predict`."""

    def __init__(self, args: Args, runtime: Runtime | None = None) -> None:
        self.args = args
        self.device = select_device(args.device)
        self.runtime = runtime or load_runtime(
            args.model or newest_best("predicting with"), model_cfg=args.model_cfg, device=self.device
        )
        self.model = self.runtime.model
        self.names: dict[int, str] = dict(self.runtime.names)
        self.stride = self.runtime.stride
        self.imgsz = self.resolve_imgsz(self.runtime.imgsz)
        self.conf = PREDICT_CONF if args.conf is None else args.conf
        self.multi_label = bool(args.multi_label)  # empty = False: one class per box
        self.batch = setting_or_model_default(args, "batch", 1)
        self.save_dir: Path | None = None
        self.speed = Counter()  # total ms per stage
        self.count = 0  # frames predicted
        self.shape: tuple[int, ...] | None = None  # input shape of the latest batch

    def resolve_imgsz(self, model_imgsz: tuple[int, int] | None) -> tuple[int, int]:
        """A static exported graph forces its size; otherwise imgsz= when given, else the model's own size."""
        if isinstance(self.model, ExportedDetector) and not self.model.dynamic_size:
            if self.args.typed("imgsz") and imgsz_hw(self.args.imgsz) != self.model.imgsz:
                LOGGER.warning(f"imgsz={self.args.imgsz} ignored: the static graph takes {self.model.imgsz}")
            return self.model.imgsz
        return imgsz_hw(setting_or_model_default(self.args, "imgsz", model_imgsz))

    def predict(self, frames: Sequence[Frame]) -> list[Results]:
        """Detect in one batch of frames; per-image stage times (ms) go to each Results.speed."""
        args = self.args
        times = [time.perf_counter()]
        pad_value = self.runtime.input_convention.pad_value
        images, ratios, sizes = letterbox([f.image for f in frames], self.imgsz, self.stride, self.device, pad_value)
        times.append(self.synchronized_time())
        detections = self.model.predict(images, self.conf, args.iou, args.max_det, args.nms_pre, ratios=ratios,
                                        multi_label=self.multi_label, img_sizes=sizes)
        times.append(self.synchronized_time())
        results = [to_results(f, *d, self.names, args.classes) for f, d in zip(frames, detections, strict=True)]
        times.append(time.perf_counter())
        stages = ("preprocess", "inference", "postprocess")
        speed = {stage: (end - start) * 1000 / len(frames) for stage, start, end in zip(stages, times, times[1:])}
        for result in results:
            result.speed = speed
        self.speed.update({stage: ms * len(frames) for stage, ms in speed.items()})
        self.count += len(frames)
        self.shape = tuple(images.shape)
        return results

    def synchronized_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def stream(self, source: Any = None) -> Iterator[Results]:
        """Results of every frame of `source` (default `args.source`), one batch decoded at a time; logs a line per
        frame when verbose and saves what `save`, `save_txt` and `save_json` ask for."""
        args = self.args
        frames = load_frames(args.source if source is None else source, args.vid_stride)
        if args.save or args.save_txt or args.save_json:
            self.save_dir = make_save_dir(args, "predict")
        writer = ResultWriter(self.save_dir, args) if self.save_dir else None
        try:
            for batch in batched(frames, self.batch):
                for frame, result in zip(batch, self.predict(batch), strict=True):
                    if args.verbose:
                        LOGGER.info(describe(frame, result, self.shape))
                    if writer:
                        writer.add(frame, result)
                    if args.show:
                        show(result, args.line_width)
                    yield result
        finally:
            if writer:
                writer.close()
        self.log_summary(writer)

    def run(self) -> Path | None:
        """Predict every frame of `args.source`, log one line each, save what was asked; returns the save dir."""
        for _ in self.stream():
            pass
        return self.save_dir

    def log_summary(self, writer: ResultWriter | None) -> None:
        speed = ", ".join(f"{self.speed[stage] / max(self.count, 1):.1f}ms {stage}"
                          for stage in ("preprocess", "inference", "postprocess"))
        LOGGER.info(f"Speed: {speed} per image at shape {self.shape}")
        if writer:
            LOGGER.info(f"Results saved to {colorstr('bold', str(self.save_dir.resolve()))}")
            if self.args.save_txt:
                LOGGER.info(f"{writer.num_labels} labels saved to {self.save_dir.resolve() / 'labels'}")


def describe(frame: Frame, result: Results, shape: tuple[int, ...]) -> str:
    """'image 1/4 path: 128x96 2 3s, 1 7, 12.3ms' (video: 'video 1/1 (frame 3/10) path: ...')."""
    return f"{describe_frame(frame)}: {shape[2]}x{shape[3]} {result.verbose()}, {result.speed['inference']:.1f}ms"


def show(result: Results, line_width: int | None) -> None:
    """Display the annotated frame (needs an OpenCV build with GUI support)."""
    try:
        cv2.imshow(result.path, result.plot(line_width))
        cv2.waitKey(1)
    except cv2.error:
        raise UserError("show=True needs OpenCV with GUI support (pip install opencv-python); "
                        "use save=True and open the saved files instead") from None


class ResultWriter:
    """Saves annotated images/videos, YOLO label files and COCO JSON records into a run directory."""

    def __init__(self, save_dir: Path, args: Args) -> None:
        self.save_dir, self.args = save_dir, args
        self.videos: dict[str, cv2.VideoWriter] = {}
        self.records: list[dict[str, Any]] = []
        self.num_labels = 0

    def add(self, frame: Frame, result: Results) -> None:
        if self.args.save:
            self.save_media(frame, result)
        if self.args.save_txt and len(result):
            self.save_labels(frame, result)
        if self.args.save_json:
            self.records.extend(result.coco_records())

    def save_media(self, frame: Frame, result: Results) -> None:
        """Annotated image under its file name; video frames into `<stem>.mp4` (mp4v)."""
        canvas = result.plot(self.args.line_width)  # BGR
        path = Path(frame.path)
        if frame.frame is None:
            cv2.imwrite(str(self.save_dir / path.name), canvas)
            return
        if frame.path not in self.videos:
            fps = frame.fps / self.args.vid_stride
            size = (canvas.shape[1], canvas.shape[0])
            target = str(self.save_dir / f"{path.stem}.mp4")
            self.videos[frame.path] = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        self.videos[frame.path].write(canvas)

    def save_labels(self, frame: Frame, result: Results) -> None:
        """labels/<stem>.txt (video: <stem>_<frame>.txt) with YOLO 'cls xc yc w h [conf]' lines."""
        stem = Path(frame.path).stem + (f"_{frame.frame}" if frame.frame is not None else "")
        path = self.save_dir / "labels" / f"{stem}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(result.yolo_lines(self.args.save_conf)) + "\n")
        self.num_labels += 1

    def close(self) -> None:
        for video in self.videos.values():
            video.release()
        if self.args.save_json:
            (self.save_dir / "predictions.json").write_text(json.dumps(self.records))


def run(args: Args) -> Path | None:
    """`crosskd predict`: the CLI entry."""
    return Predictor(args).run()
