"""Prediction sources: PIL (RGB), numpy (BGR), torch (RGB 0..1), lists, cameras and URLs (both faked: no device or
network is touched), lazy frame-by-frame reading, and one-line errors."""

import itertools
from urllib.error import URLError

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from crosskd.engine.prediction import sources
from crosskd.engine.prediction.sources import load_frames
from crosskd.errors import DataError


def bgr_image(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_pil_numpy_and_tensor_images_become_the_same_bgr_frames():
    bgr = bgr_image()
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # [3, H, W] RGB 0..1
    frames = list(load_frames([Image.fromarray(rgb), bgr, tensor[None].expand(2, -1, -1, -1)]))
    assert len(frames) == 4 and [f.index for f in frames] == [1, 2, 3, 4] and frames[0].total == 4
    for frame in frames:
        np.testing.assert_array_equal(frame.image, bgr)
    assert [f.path for f in frames] == ["image0.jpg", "image1.jpg", "image2.jpg", "image3.jpg"]


def test_files_and_in_memory_images_mix_in_one_list(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), bgr_image(seed=1))
    frames = list(load_frames([path, bgr_image(seed=2)]))
    assert [f.path for f in frames] == [str(path), "image1.jpg"]
    np.testing.assert_array_equal(frames[0].image, bgr_image(seed=1))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8), np.uint8), "BGR uint8 arrays of shape"),
    (np.zeros((8, 8, 3), np.float32), "BGR uint8 arrays of shape"),
    (torch.full((1, 3, 8, 8), 255.0), "RGB floats in 0..1"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "RGB floats in 0..1"),
    ({"not": "an image"}, "type dict is not supported"),
    (True, "is not a source"),
])
def test_bad_in_memory_sources_are_one_line_errors(bad, match):
    with pytest.raises(DataError, match=match) as error:
        list(load_frames(bad))
    assert "\n" not in str(error.value)


class FakeCapture:
    """A cv2.VideoCapture stand-in: `frames` frames (None = endless, like a camera), counting reads."""

    def __init__(self, source, opened: bool = True, frames: int | None = None):
        self.source, self.opened, self.frames, self.reads, self.released = source, opened, frames, 0, False

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return self.opened

    def get(self, prop):
        return 0.0

    def read(self):
        if self.frames is not None and self.reads >= self.frames:
            return False, None
        self.reads += 1
        return True, np.full((16, 16, 3), self.reads, np.uint8)

    def release(self):
        self.released = True


def test_camera_frames_stream_one_at_a_time(monkeypatch):
    captures = []
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda source: captures.append(FakeCapture(source)) or
                        captures[-1])
    frames = load_frames(0)
    first_three = list(itertools.islice(frames, 3))
    capture = captures[0]
    assert capture.source == 0 and capture.reads == 3  # an endless camera is read lazily
    assert [f.frame for f in first_three] == [1, 2, 3] and first_three[2].image[0, 0, 0] == 3
    frames.close()
    assert capture.released


def test_missing_camera_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda source: FakeCapture(source, opened=False))
    with pytest.raises(DataError, match=r"^source=0: no camera 0 found on this machine; pass another camera index"):
        list(load_frames(0))


def test_offline_url_is_one_clear_line(monkeypatch):
    def offline(url, timeout):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources, "urlopen", offline)
    with pytest.raises(DataError, match=r"^cannot download source=https://example.com/a.jpg \(\[Errno -3\]") as error:
        list(load_frames("https://example.com/a.jpg"))
    assert "\n" not in str(error.value)


def test_image_url_is_downloaded_and_decoded(monkeypatch):
    image = bgr_image(seed=3)
    png = cv2.imencode(".png", image)[1].tobytes()

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return png

    monkeypatch.setattr(sources, "urlopen", lambda url, timeout: Response())
    (frame,) = load_frames("https://example.com/img.png?size=large")
    assert frame.path == "https://example.com/img.png?size=large"
    np.testing.assert_array_equal(frame.image, image)


def test_video_url_is_read_as_a_stream(monkeypatch):
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda source: FakeCapture(source, frames=2))
    frames = list(load_frames("rtsp://camera.local/live"))
    assert [f.frame for f in frames] == [1, 2] and frames[0].path == "rtsp://camera.local/live"
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda source: FakeCapture(source, opened=False))
    with pytest.raises(DataError, match="cannot open stream"):
        list(load_frames("https://example.com/clip.mp4"))
