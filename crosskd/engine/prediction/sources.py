"""Prediction sources as a lazy stream of BGR frames (one decoded image or video frame at a time).

Paths (image, video, directory, glob, .txt list), http(s) image URLs, video URLs and rtsp/rtmp streams, camera
indices, and in-memory images: PIL images (RGB), numpy arrays (BGR, as cv2.imread and Ultralytics), torch tensors
(RGB, 0..1, [B, 3, H, W] or [3, H, W]), or a list of any of these.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import URLError
from urllib.request import urlopen

import cv2
import numpy as np
import torch
from PIL import Image

from crosskd.data.transforms import IMREAD_FLAGS
from crosskd.errors import DataError

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv"}
URL_PREFIXES = ("http://", "https://", "rtsp://", "rtmp://")
URL_TIMEOUT = 10.0  # seconds to wait for an image URL
SOURCE_KINDS = "an image, video, directory, glob, .txt list, URL, camera index or in-memory image"


class Frame(NamedTuple):
    """One decoded input: an image, or a frame of a video, stream or camera."""

    path: str  # file or URL; 'image<i>.jpg' for in-memory images; the camera index as text
    image: np.ndarray  # [H, W, 3] BGR uint8
    index: int  # 1-based position among the source's items
    total: int  # number of items in the source
    frame: int | None = None  # 1-based video frame, None for images
    num_frames: int = 0  # frames in the video (0 for images, cameras and live streams)
    fps: float = 0.0  # video frame rate (0 for images)


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_PREFIXES)


def is_media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def source_files(source: str | Path) -> list[Path]:
    """Image and video files named by an image/video file, a directory, a glob or a .txt list of paths."""
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
        raise DataError(f"source={source} does not exist; pass {SOURCE_KINDS}")
    media = [p for p in files if is_media(p)]
    if not media:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        raise DataError(f"source={source} holds no images or videos; supported suffixes: {kinds}")
    return media


def source_items(source: Any) -> list[Any]:
    """The source as a flat list of items to decode one at a time: Paths, URLs, camera indices, in-memory images."""
    if isinstance(source, list | tuple):
        return [item for part in source for item in source_items(part)]
    if isinstance(source, torch.Tensor) and source.ndim == 4:
        return list(source)  # [3, H, W] each
    if isinstance(source, str | Path) and not is_url(str(source)):
        return list(source_files(source))
    if isinstance(source, bool) or source is None:
        raise DataError(f"source={source} is not a source; pass {SOURCE_KINDS}")
    return [source]


def load_frames(source: Any, vid_stride: int = 1) -> Iterator[Frame]:
    """Frames of any source, decoded lazily: a video, camera or stream is never held in memory."""
    items = source_items(source)
    for index, item in enumerate(items, 1):
        if isinstance(item, Path):
            yield from read_file(item, index, len(items), vid_stride)
        elif isinstance(item, str):
            yield from read_url(item, index, len(items), vid_stride)
        elif isinstance(item, int):
            yield from read_camera(item, index, len(items), vid_stride)
        else:
            yield Frame(f"image{index - 1}.jpg", in_memory_image(item), index, len(items))


def read_file(path: Path, index: int, total: int, vid_stride: int) -> Iterator[Frame]:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        yield from read_video(path, index, total, vid_stride)
    else:
        yield read_image(path, index, total)


def read_image(path: Path, index: int, total: int = 1) -> Frame:
    image = cv2.imread(str(path), IMREAD_FLAGS)
    if image is None:
        raise DataError(f"cannot read image '{path}' (corrupt or not an image); remove it from source=")
    return Frame(str(path), image, index, total)


def read_video(path: Path | str, index: int, total: int, vid_stride: int) -> Iterator[Frame]:
    """Every `vid_stride`-th frame of a video file or stream URL, as BGR."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        what = "stream (offline or unreachable?)" if is_url(str(path)) else "video (corrupt or unsupported codec)"
        raise DataError(f"cannot open {what} '{path}'; check it or remove it from source=")
    yield from capture_frames(capture, str(path), index, total, vid_stride)


def read_camera(camera: int, index: int, total: int, vid_stride: int) -> Iterator[Frame]:
    capture = cv2.VideoCapture(camera)
    if not capture.isOpened():
        raise DataError(f"source={camera}: no camera {camera} found on this machine; pass another camera index or "
                        f"{SOURCE_KINDS}")
    yield from capture_frames(capture, str(camera), index, total, vid_stride)


def capture_frames(capture: cv2.VideoCapture, path: str, index: int, total: int, vid_stride: int) -> Iterator[Frame]:
    """Read an opened capture until it ends, one frame at a time; releases it when done or abandoned."""
    num_frames = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    number = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            number += 1
            if (number - 1) % vid_stride == 0:
                yield Frame(path, image, index, total, number, num_frames, fps)
    finally:
        capture.release()
    if number == 0:
        raise DataError(f"cannot read any frame of '{path}'; remove it from source=")


def read_url(url: str, index: int, total: int, vid_stride: int) -> Iterator[Frame]:
    """An image URL is downloaded and decoded; a video URL or rtsp/rtmp stream is read frame by frame."""
    suffix = Path(url.split("?")[0]).suffix.lower()
    if suffix in VIDEO_SUFFIXES or not url.lower().startswith(("http://", "https://")):
        yield from read_video(url, index, total, vid_stride)
        return
    try:
        with urlopen(url, timeout=URL_TIMEOUT) as response:
            data = response.read()
    except (URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(f"cannot download source={url} ({reason}); check the address and the network, or download "
                        "the file and pass its path") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), IMREAD_FLAGS)
    if image is None:
        raise DataError(f"source={url} is not an image OpenCV can decode; pass an image URL")
    yield Frame(url, image, index, total)


def in_memory_image(item: Any) -> np.ndarray:
    """A PIL image (RGB), numpy array (BGR) or torch tensor (RGB 0..1, [3, H, W]) as a BGR uint8 [H, W, 3] array."""
    if isinstance(item, Image.Image):
        return np.ascontiguousarray(np.asarray(item.convert("RGB"))[:, :, ::-1])
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DataError(f"numpy images must be BGR uint8 arrays of shape [H, W, 3] (as cv2.imread returns), "
                            f"not {item.dtype} {item.shape}")
        return np.ascontiguousarray(item)
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3 or not item.is_floating_point() or item.min() < 0 or item.max() > 1:
            raise DataError(f"torch images must be RGB floats in 0..1 of shape [B, 3, H, W], not {item.dtype} "
                            f"{tuple(item.shape)}; divide uint8 pixels by 255")
        rgb = (item.detach().float().cpu() * 255).round().byte().permute(1, 2, 0).numpy()  # [H, W, 3]
        return np.ascontiguousarray(rgb[:, :, ::-1])
    raise DataError(f"source of type {type(item).__name__} is not supported; pass {SOURCE_KINDS}")


def batched(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    """Lists of up to `size` consecutive frames."""
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def describe_frame(frame: Frame) -> str:
    """'image 1/4 path' or 'video 1/1 (frame 3/10) path' (cameras and live streams: '(frame 3)')."""
    if frame.frame is None:
        return f"image {frame.index}/{frame.total} {frame.path}"
    count = f"/{frame.num_frames}" if frame.num_frames else ""
    return f"video {frame.index}/{frame.total} (frame {frame.frame}{count}) {frame.path}"
