"""`crosskd predict`: run a .pt, .onnx or .torchscript detector on images, folders, globs, videos or .txt lists."""

from __future__ import annotations

import glob
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from crosskd.config import Args, imgsz_hw, load_defaults, setting_or_model_default
from crosskd.data.transforms import load_image, resize_long_side
from crosskd.engine.backend import ExportedDetector, load_runtime
from crosskd.engine.plotting import draw_boxes
from crosskd.errors import DataError, UserError
from crosskd.paths import make_save_dir, newest_best
from crosskd.utils import LOGGER, colorstr, select_device

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv"}
PREDICT_CONF = 0.25  # score threshold when conf is empty


@dataclass
class Result:
    """Detections of one image or video frame, in original-image pixels."""

    path: str
    orig_img: np.ndarray  # [H, W, 3] RGB uint8
    boxes: np.ndarray  # [K, 4] xyxy float32
    scores: np.ndarray  # [K] float32
    labels: np.ndarray  # [K] int64
    names: dict[int, str]
    frame: int | None = None  # 1-based video frame, None for images
    speed: dict[str, float] = field(default_factory=dict)  # ms per image: preprocess, inference, postprocess

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        """'2 3s, 1 7' (per-class counts, plural 's' like Ultralytics) or '(no detections)'."""
        counts = Counter(self.labels.tolist())
        parts = [f"{n} {self.names.get(c, c)}{'s' * (n > 1)}" for c, n in sorted(counts.items())]
        return ", ".join(parts) if parts else "(no detections)"

    def plot(self, line_width: int | None = None) -> np.ndarray:
        """A copy of the image (RGB) with boxes, class names and scores drawn."""
        return annotate(self.orig_img, self.boxes, self.scores, self.labels, self.names, line_width)

    def yolo_lines(self, save_conf: bool = False) -> list[str]:
        """'cls xc yc w h [conf]' lines normalised by the original image size."""
        height, width = self.orig_img.shape[:2]
        xyxy = self.boxes.astype(np.float64)
        centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2 / (width, height)  # [K, 2]
        size = (xyxy[:, 2:] - xyxy[:, :2]) / (width, height)  # [K, 2]
        rows = np.concatenate([self.labels[:, None], centre, size], 1)  # [K, 5]
        if save_conf:
            rows = np.concatenate([rows, self.scores[:, None]], 1)
        return [f"{int(row[0])} " + " ".join(f"{v:.6g}" for v in row[1:]) for row in rows]

    def coco_records(self) -> list[dict[str, Any]]:
        """COCO results records: bbox as x, y, w, h in original pixels."""
        stem = Path(self.path).stem + (f"_{self.frame}" if self.frame is not None else "")
        image_id: int | str = int(stem) if stem.isdigit() else stem
        return [
            {"image_id": image_id, "file_name": Path(self.path).name, "category_id": int(label),
             "bbox": [round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(float(score), 5)}
            for (x1, y1, x2, y2), score, label in zip(self.boxes, self.scores, self.labels, strict=True)
        ]


def annotate(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    line_width: int | None = None,
) -> np.ndarray:
    """Draw xyxy boxes with 'name score' captions (plotting.draw_boxes) on a copy of an RGB uint8 image."""
    canvas = np.ascontiguousarray(image[:, :, ::-1])  # BGR copy for OpenCV
    draw_boxes(canvas, boxes, labels, names, scores, line_width)
    return np.ascontiguousarray(canvas[:, :, ::-1])


# Sources -------------------------------------------------------------------------------------------------------------


class Frame(NamedTuple):
    """One decoded input: an image file, or a frame of a video file."""

    path: str
    image: np.ndarray  # [H, W, 3] RGB uint8
    index: int  # 1-based position of the file among the source files
    frame: int | None  # 1-based video frame, None for images
    num_frames: int  # frames in the video (0 for images)
    fps: float  # video frame rate (0 for images)


def is_media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def source_files(source: str | Path | int) -> list[Path]:
    """Image and video files named by an image/video file, a directory, a glob or a .txt list of paths."""
    if isinstance(source, int):
        raise DataError(f"source={source} looks like a camera index; cameras are not supported, pass an image, "
                        "video, directory, glob or .txt list")
    text = str(source)
    path = Path(text)
    if any(char in text for char in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.suffix.lower() == ".txt" and path.is_file():
        lines = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        files = [p if p.is_file() else path.parent / p for p in lines]  # relative to the cwd, else to the list
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DataError(f"source={source} lists {len(missing)} missing file(s), e.g. '{missing[0]}'; fix the list")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"source={source} does not exist; pass an image, video, directory, glob or .txt list")
    media = [p for p in files if is_media(p)]
    if not media:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        raise DataError(f"source={source} holds no images or videos; supported suffixes: {kinds}")
    return media


def read_image(path: Path, index: int) -> Frame:
    image = load_image(path)
    if image is None:
        raise DataError(f"cannot read image '{path}' (corrupt or not an image); remove it from source=")
    return Frame(str(path), image, index, None, 0, 0.0)


def read_video(path: Path, index: int, vid_stride: int) -> Iterator[Frame]:
    """Every `vid_stride`-th frame of a video file, as RGB."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"cannot open video '{path}' (corrupt or unsupported codec); remove it from source=")
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    number = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            number += 1
            if (number - 1) % vid_stride == 0:
                yield Frame(str(path), cv2.cvtColor(image, cv2.COLOR_BGR2RGB), index, number, num_frames, fps)
    finally:
        capture.release()
    if number == 0:
        raise DataError(f"cannot read any frame of video '{path}'; remove it from source=")


def iter_frames(files: Sequence[Path], vid_stride: int = 1) -> Iterator[Frame]:
    for index, path in enumerate(files, 1):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            yield from read_video(path, index, vid_stride)
        else:
            yield read_image(path, index)


def batched(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# Model, preprocessing and prediction ---------------------------------------------------------------------------------


def resize_to_fit(image: np.ndarray, imgsz: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Keep-ratio resize into h x w: the validation resize (long side = imgsz) when square."""
    height, width = imgsz
    if height == width:
        return resize_long_side(image, height)
    ratio = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, round(image.shape[1] * ratio)), max(1, round(image.shape[0] * ratio)))  # cv2 takes (w, h)
    if size != (image.shape[1], image.shape[0]):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image, ratio


def preprocess(
    images: Sequence[np.ndarray], imgsz: tuple[int, int], pad_multiple: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] 0..1 RGB, zero-padded bottom/right to a multiple of `pad_multiple`, and ratios [B]."""
    resized = [resize_to_fit(image, imgsz) for image in images]
    height = -(-max(image.shape[0] for image, _ in resized) // pad_multiple) * pad_multiple
    width = -(-max(image.shape[1] for image, _ in resized) // pad_multiple) * pad_multiple
    batch = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    for i, (image, _) in enumerate(resized):
        batch[i, :, : image.shape[0], : image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)  # HWC -> CHW
    ratios = torch.tensor([ratio for _, ratio in resized], dtype=torch.float32)
    return batch.to(device).float().div_(255), ratios.to(device)


def to_result(frame: Frame, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              names: dict[int, str], classes: list[int] | None) -> Result:
    """Numpy detections clipped to the original image, optionally only `classes`."""
    height, width = frame.image.shape[:2]
    boxes = boxes.float().cpu().numpy().copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    scores, labels = scores.float().cpu().numpy(), labels.long().cpu().numpy()
    keep = np.isin(labels, classes) if classes else np.ones(len(labels), bool)
    return Result(frame.path, frame.image, boxes[keep], scores[keep], labels[keep], names, frame.frame)


class Predictor:
    """Loads a model once; `predict(frames)` returns Results, `run()` drives `crosskd predict` over `args.source`."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.device = select_device(args.device)
        self.runtime = load_runtime(
            args.model or newest_best("predicting with"), model_cfg=args.model_cfg, device=self.device
        )
        self.model = self.runtime.model
        self.names: dict[int, str] = dict(self.runtime.names)
        self.stride = self.runtime.stride
        self.imgsz = self.resolve_imgsz(self.runtime.imgsz)
        self.conf = PREDICT_CONF if args.conf is None else args.conf
        self.batch = setting_or_model_default(args, "batch", 1)
        self.save_dir: Path | None = None
        self.speed = Counter()  # total ms per stage
        self.shape: tuple[int, ...] | None = None  # input shape of the latest batch

    def resolve_imgsz(self, model_imgsz: tuple[int, int] | None) -> tuple[int, int]:
        """A static exported graph forces its size; otherwise imgsz=, defaulting to the model's own size."""
        if isinstance(self.model, ExportedDetector) and not self.model.dynamic_size:
            if imgsz_hw(self.args.imgsz) != self.model.imgsz and self.args.imgsz != load_defaults()["imgsz"]:
                LOGGER.warning(f"imgsz={self.args.imgsz} ignored: the static graph takes {self.model.imgsz}")
            return self.model.imgsz
        return imgsz_hw(setting_or_model_default(self.args, "imgsz", model_imgsz))

    def predict(
        self, frames: Sequence[Frame], conf: float | None = None, iou: float | None = None,
        max_det: int | None = None, imgsz: tuple[int, int] | None = None,
    ) -> list[Result]:
        """Detect in one batch of frames; per-image stage times (ms) go to each Result.speed."""
        args = self.args
        times = [time.perf_counter()]
        images, ratios = preprocess([f.image for f in frames], imgsz or self.imgsz, self.stride, self.device)
        times.append(self.synchronized_time())
        detections = self.model.predict(
            images, self.conf if conf is None else conf, args.iou if iou is None else iou,
            args.max_det if max_det is None else max_det, args.nms_pre, ratios=ratios,
        )
        times.append(self.synchronized_time())
        results = [to_result(f, *d, self.names, args.classes) for f, d in zip(frames, detections, strict=True)]
        times.append(time.perf_counter())
        stages = ("preprocess", "inference", "postprocess")
        speed = {stage: (end - start) * 1000 / len(frames) for stage, start, end in zip(stages, times, times[1:])}
        for result in results:
            result.speed = speed
        self.speed.update({stage: ms * len(frames) for stage, ms in speed.items()})
        self.shape = tuple(images.shape)
        return results

    def synchronized_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self) -> Path | None:
        """Predict every frame of `args.source`, log one line each, save what was asked; returns the save dir."""
        args = self.args
        files = source_files(args.source)
        if args.save or args.save_txt or args.save_json:
            self.save_dir = make_save_dir(args, "predict")
        writer = ResultWriter(self.save_dir, args) if self.save_dir else None
        count = 0
        try:
            for batch in batched(iter_frames(files, args.vid_stride), self.batch):
                for frame, result in zip(batch, self.predict(batch), strict=True):
                    LOGGER.info(describe(frame, result, len(files), self.shape))
                    if writer:
                        writer.add(frame, result)
                    if args.show:
                        show(result, args.line_width)
                    count += 1
        finally:
            if writer:
                writer.close()
        self.log_summary(count, writer)
        return self.save_dir

    def log_summary(self, count: int, writer: ResultWriter | None) -> None:
        speed = ", ".join(f"{self.speed[stage] / max(count, 1):.1f}ms {stage}"
                          for stage in ("preprocess", "inference", "postprocess"))
        LOGGER.info(f"Speed: {speed} per image at shape {self.shape}")
        if writer:
            LOGGER.info(f"Results saved to {colorstr('bold', str(self.save_dir.resolve()))}")
            if self.args.save_txt:
                LOGGER.info(f"{writer.num_labels} labels saved to {self.save_dir.resolve() / 'labels'}")


def describe(frame: Frame, result: Result, num_files: int, shape: tuple[int, ...]) -> str:
    """'image 1/4 path: 128x96 2 3s, 1 7, 12.3ms' (video: 'video 1/1 (frame 3/10) path: ...')."""
    where = (f"video {frame.index}/{num_files} (frame {frame.frame}/{frame.num_frames})" if frame.frame
             else f"image {frame.index}/{num_files}")
    return f"{where} {frame.path}: {shape[2]}x{shape[3]} {result.summary()}, {result.speed['inference']:.1f}ms"


def show(result: Result, line_width: int | None) -> None:
    """Display the annotated frame (needs an OpenCV build with GUI support)."""
    try:
        cv2.imshow(result.path, result.plot(line_width)[:, :, ::-1])
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

    def add(self, frame: Frame, result: Result) -> None:
        if self.args.save:
            self.save_media(frame, result)
        if self.args.save_txt and len(result):
            self.save_labels(frame, result)
        if self.args.save_json:
            self.records.extend(result.coco_records())

    def save_media(self, frame: Frame, result: Result) -> None:
        """Annotated image under its file name; video frames into `<stem>.mp4` (mp4v)."""
        canvas = result.plot(self.args.line_width)[:, :, ::-1]  # BGR for OpenCV
        path = Path(frame.path)
        if frame.frame is None:
            cv2.imwrite(str(self.save_dir / path.name), canvas)
            return
        if frame.path not in self.videos:
            fps = frame.fps / self.args.vid_stride
            size = (canvas.shape[1], canvas.shape[0])
            target = str(self.save_dir / f"{path.stem}.mp4")
            self.videos[frame.path] = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        self.videos[frame.path].write(np.ascontiguousarray(canvas))

    def save_labels(self, frame: Frame, result: Result) -> None:
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
