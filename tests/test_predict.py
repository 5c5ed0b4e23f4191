"""`crosskd predict` and Detector.predict: sources (image, directory, glob, .txt, video, numpy BGR), saved
images/videos/labels/JSON, console lines, .onnx models, and one-line errors for bad sources."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crosskd import cli
from crosskd.api import Detector
from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.prediction import predictor
from crosskd.engine.prediction.predictor import preprocess
from crosskd.engine.prediction.results import Boxes, Results
from crosskd.engine.prediction.sources import source_files
from crosskd.errors import DataError

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def weights(tmp_path):
    from test_export import write_checkpoint  # tests/ is on sys.path (pytest rootdir-relative import)

    return write_checkpoint(tmp_path / "best.pt", "gfl")


def write_image(path: Path, height: int = 96, width: int = 128, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return path


def write_video(path: Path, frames: int = 4, height: int = 64, width: int = 96) -> Path:
    rng = np.random.default_rng(1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (width, height))
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    writer.release()
    return path


def predict_args(model: Path, source, save_dir: Path, **overrides):
    return get_args({"model": str(model), "source": str(source), "device": "cpu", "project": str(save_dir),
                     "name": "predict", **overrides}, "predict")


def test_yolo_lines_are_normalised_by_the_original_image():
    image = np.zeros((200, 100, 3), np.uint8)  # h=200, w=100
    result = Results(image, "a.jpg", {2: "bird"}, Boxes(torch.tensor([[10.0, 20, 30, 60, 0.9, 2]]), (200, 100)))
    # centre (20, 40) -> (0.2, 0.2); size (20, 40) -> (0.2, 0.2)
    assert result.yolo_lines() == ["2 0.2 0.2 0.2 0.2"]
    assert result.yolo_lines(save_conf=True) == ["2 0.2 0.2 0.2 0.2 0.9"]
    assert result.verbose() == "1 bird"
    assert result.coco_records()[0]["bbox"] == [10.0, 20.0, 20.0, 40.0]


def test_preprocess_matches_the_validation_pipeline():
    image = np.full((60, 90, 3), 255, np.uint8)
    images, ratios = preprocess([image], (128, 128), 128, torch.device("cpu"))
    assert images.shape == (1, 3, 128, 128) and ratios.tolist() == [pytest.approx(128 / 90)]
    assert images[0, :, :85].min() == 1.0 and images[0, :, 86:].max() == 0.0  # 60*128/90 = 85.3 rows, zero pad


def test_predict_image_saves_annotated_image_labels_and_json(tmp_path, weights, capsys):
    image = write_image(tmp_path / "img" / "7.jpg")
    save_dir = predictor.run(predict_args(weights, image, tmp_path / "out", save_txt=True, save_json=True))
    assert save_dir == tmp_path / "out" / "predict"
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("image 1/1"))
    assert f"{image}: 128x128 " in line and line.endswith("ms")
    assert "Speed: " in out and "per image at shape (1, 3, 128, 128)" in out and "Results saved to" in out
    saved = cv2.imread(str(save_dir / "7.jpg"))
    assert saved.shape == (96, 128, 3) and not np.array_equal(saved, cv2.imread(str(image)))
    expected = Detector(weights)(str(image), conf=0.25)[0]
    assert len(expected) > 0
    lines = (save_dir / "labels" / "7.txt").read_text().splitlines()
    assert lines == expected.yolo_lines()
    cls, xc, yc, w, h = lines[0].split()
    x1, y1, x2, y2 = expected.boxes.xyxy[0].tolist()
    assert int(cls) == int(expected.boxes.cls[0]) and float(xc) == pytest.approx((x1 + x2) / 2 / 128, abs=1e-5)
    assert float(h) == pytest.approx((y2 - y1) / 96, abs=1e-5)
    records = json.loads((save_dir / "predictions.json").read_text())
    assert len(records) == len(expected) and records[0]["image_id"] == 7


def test_predict_directory_glob_and_txt_list(tmp_path, weights, capsys, monkeypatch):
    folder = tmp_path / "images"
    for i in range(3):
        write_image(folder / f"{i}.png", seed=i)
    (folder / "notes.md").write_text("not an image")
    listing = tmp_path / "lists" / "list.txt"
    listing.parent.mkdir()
    listing.write_text("../images/0.png\nimages/2.png\n")  # relative to the list's folder, then to the cwd
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in source_files(folder)] == ["0.png", "1.png", "2.png"]
    assert [p.name for p in source_files(str(folder / "*.png"))] == ["0.png", "1.png", "2.png"]
    assert [p.name for p in source_files(listing)] == ["0.png", "2.png"]
    listing.write_text("images/9.png\n")
    with pytest.raises(DataError, match="missing file"):
        source_files(listing)
    save_dir = predictor.run(predict_args(weights, folder, tmp_path / "out", batch=2, classes=[1], save_txt=True))
    out = capsys.readouterr().out
    assert "image 3/3 " in out and "per image at shape (1, 3, 128, 128)" in out  # last batch holds one image
    assert sorted(p.name for p in save_dir.iterdir()) == ["0.png", "1.png", "2.png", "labels"]
    lines = [line for f in (save_dir / "labels").iterdir() for line in f.read_text().splitlines()]
    assert lines and all(line.startswith("1 ") for line in lines)  # classes=[1] keeps only class 1


def test_predict_video_writes_video_and_per_frame_labels(tmp_path, weights, capsys):
    video = write_video(tmp_path / "clip.mp4", frames=4)
    save_dir = predictor.run(predict_args(weights, video, tmp_path / "out", save_txt=True, conf=0.05))
    out = capsys.readouterr().out
    assert "video 1/1 (frame 4/4) " in out
    capture = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4 and int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 96
    capture.release()
    assert sorted(p.name for p in (save_dir / "labels").iterdir()) == [f"clip_{i}.txt" for i in range(1, 5)]


def test_onnx_model_predicts_like_the_checkpoint(tmp_path, weights):
    onnx_path = exporter.run(get_args({"model": str(weights), "device": "cpu"}, "export"))
    image = cv2.imread(str(write_image(tmp_path / "a.jpg", 128, 128)))
    ours, theirs = Detector(onnx_path)(image)[0], Detector(weights)(image)[0]
    assert len(theirs) > 0 and ours.names == theirs.names
    torch.testing.assert_close(ours.boxes.xyxy, theirs.boxes.xyxy, atol=1e-3, rtol=0)
    assert ours.boxes.cls.tolist() == theirs.boxes.cls.tolist()


def test_api_accepts_paths_lists_and_numpy_bgr(tmp_path, weights):
    first, second = write_image(tmp_path / "a.jpg"), write_image(tmp_path / "b.jpg", seed=1)
    detector = Detector(weights)
    assert detector.names == {0: "cat", 1: "dog", 2: "bird"}
    by_path = detector(str(first))
    both = detector([first, second], conf=0.3, max_det=5)
    array = cv2.imread(str(first))  # BGR, as OpenCV and Ultralytics
    by_array = detector(array)
    assert [r.path for r in both] == [str(first), str(second)] and all(len(r) <= 5 for r in both)
    assert all((r.boxes.conf > 0.3).all() for r in both)
    torch.testing.assert_close(by_array[0].boxes.data, by_path[0].boxes.data)
    result = by_path[0]
    xyxy = result.boxes.xyxy
    assert xyxy.shape == (len(result), 4) and xyxy[:, 2].max() <= 128 and xyxy.min() >= 0
    plotted = result.plot()
    assert plotted.shape == array.shape and not np.array_equal(plotted, array)
    with pytest.raises(DataError, match="BGR uint8"):
        detector(np.zeros((8, 8), np.float32))


def test_bad_sources_are_one_line_errors(tmp_path, weights, capsys):
    with pytest.raises(DataError, match="does not exist"):
        source_files(tmp_path / "missing.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images or videos"):
        source_files(tmp_path / "empty")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", f"model={weights}", f"source={broken}", f"project={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "broken.jpg" in err[0]
