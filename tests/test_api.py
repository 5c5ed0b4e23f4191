"""The Python model API (Detector: train, distill, val, predict, export, info), explicit keys winning over a model's
own values, required inputs checked before any data, multi_label by mode, and the exported input convention."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crosskd import Detector, cli
from crosskd.config import get_args
from crosskd.engine.deployment.runtimes.exported import CROSSKD_INPUT, InputConvention
from crosskd.engine.deployment.runtimes.onnx import OnnxDetector
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.prediction import predictor
from crosskd.engine.prediction.predictor import Predictor, preprocess
from crosskd.errors import CheckpointError, ConfigError

TINY = {"imgsz": 64, "batch": 8, "workers": 0, "device": "cpu", "warmup_iters": 2, "plots": False, "lr0": 0.02}


@pytest.fixture
def weights(tmp_path):
    from test_export import write_checkpoint  # a random 3-class GFL, 'trained' at imgsz=128

    return write_checkpoint(tmp_path / "best.pt", "gfl")


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))
    return path


def test_train_val_predict_export_info_and_distill(tmp_path, write_digits_yaml):
    data = str(write_digits_yaml(tmp_path, num_train=16, num_val=8))
    model = Detector("gfl_r18t.yaml")
    metrics = model.train(data=data, epochs=1, project=str(tmp_path / "runs"), name="teacher", **TINY)
    assert set(metrics) >= {"AP", "AP50"} and model.source == str(tmp_path / "runs" / "teacher" / "weights" / "best.pt")
    assert model.names == {i: str(i) for i in range(10)}  # the trained best.pt is loaded
    val = model.val(data=data, project=str(tmp_path / "runs"), **TINY)
    assert val["AP"] == pytest.approx(metrics["AP"])
    image = next((tmp_path / "digits" / "images" / "val").glob("*.jpg"))
    results = model.predict(image, conf=0.01)
    assert len(results) == 1 and results[0].boxes.xyxy.shape[1] == 4 and results[0].path == str(image)
    assert model(str(image), conf=0.01)[0].boxes.data.tolist() == results[0].boxes.data.tolist()
    onnx_path = model.export(format="onnx", device="cpu")
    assert onnx_path == tmp_path / "runs" / "teacher" / "weights" / "best.onnx" and onnx_path.is_file()
    assert "parameters" in model.info()
    student = Detector("gfl_r18t.yaml")
    student.distill(teacher=str(model.source), data=data, epochs=1, project=str(tmp_path / "runs"), name="student",
                    **TINY)
    assert student.source == str(tmp_path / "runs" / "student" / "weights" / "best.pt")


def test_val_through_the_api_scores_what_the_validator_scores(trained_digits, tmp_path):
    settings = {"data": str(trained_digits.data), "imgsz": 128, "workers": 0, "device": "cpu", "plots": False,
                "project": str(tmp_path)}
    api = Detector(str(trained_digits.weights)).val(name="api", **settings)
    direct = Validator(get_args({**settings, "model": str(trained_digits.weights), "name": "direct"}, "val")).run()
    assert 0.3 < api["AP"] < api["AP50"] < 1.0  # a model that scores: neither all misses nor all hits
    assert api == pytest.approx(direct)


def test_keys_are_validated_like_the_cli(weights, tmp_path):
    model = Detector(weights, device="cpu")
    with pytest.raises(ConfigError, match="'epoch' is not a valid crosskd argument. Similar arguments: epochs=12"):
        model.train(epoch=3)
    with pytest.raises(ConfigError, match="'conf=2' is out of range"):
        model.predict(tmp_path, conf=2)
    with pytest.raises(ConfigError, match="'predict' needs source="):
        model.predict()
    with pytest.raises(ConfigError, match="'distill' needs teacher="):
        model.distill(data="digits.yaml")
    with pytest.raises(CheckpointError, match="export needs a PyTorch model"):
        Detector(model.export(format="onnx")).export(format="torchscript")


def test_stream_yields_one_result_at_a_time(weights, tmp_path):
    images = [write_image(tmp_path / f"{i}.jpg", 64, 96, seed=i) for i in range(3)]
    stream = Detector(weights).predict(images, stream=True)
    assert not isinstance(stream, list)
    first = next(stream)
    assert first.path == str(images[0]) and first.orig_img.shape == (64, 96, 3)
    assert [r.path for r in stream] == [str(p) for p in images[1:]]


def test_explicit_imgsz_wins_even_at_its_default_value(weights, tmp_path, capsys):
    image = write_image(tmp_path / "a.jpg", 96, 128)

    def predictor_for(**overrides):
        return Predictor(get_args({"model": str(weights), "source": str(image), "device": "cpu", **overrides},
                                  "predict"))

    assert predictor_for().imgsz == (128, 128)  # untyped: the checkpoint's training size
    assert predictor_for(imgsz=640).imgsz == (640, 640)  # typed, although 640 is default.yaml's value
    assert predictor_for(batch=16).batch == 16 and predictor_for().batch == 1
    predictor.run(get_args({"model": str(weights), "source": str(image), "imgsz": 640, "save": False}, "predict"))
    assert "per image at shape (1, 3, 512, 640)" in capsys.readouterr().out  # 480 x 640, padded to stride 128
    cfg = tmp_path / "my.yaml"
    cfg.write_text("imgsz: 640\n")  # a key in the cfg= file is typed too
    assert predictor_for(cfg=str(cfg)).imgsz == (640, 640)


def test_val_without_model_fails_before_generating_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["val"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: 'val' needs model=")
    assert list(tmp_path.iterdir()) == []  # no demo data generated, no run folder


def test_predict_keeps_one_class_per_box_and_val_every_class(weights, tmp_path):
    image = cv2.imread(str(write_image(tmp_path / "a.jpg", 96, 128)))
    model = Detector(weights)
    single = model.predict(image, conf=0.01, max_det=300)[0]
    multi = model.predict(image, conf=0.01, max_det=300, multi_label=True)[0]
    boxes = [tuple(box) for box in single.boxes.xyxy.tolist()]
    assert len(set(boxes)) == len(boxes)  # no box repeated under another class
    assert len(multi) > len(single)
    assert len({tuple(box) for box in multi.boxes.xyxy.tolist()}) < len(multi)  # the same box under several classes
    assert get_args({}, "val").multi_label is None  # the validator reads empty as every class


def test_non_square_image_gives_the_same_detections_through_pt_and_onnx(weights, tmp_path):
    onnx_path = Detector(weights).export(format="onnx", device="cpu")
    metadata = OnnxDetector(onnx_path).input_convention
    assert metadata == CROSSKD_INPUT and CROSSKD_INPUT.pad == "bottom-right" and CROSSKD_INPUT.pad_value == 0
    image = cv2.imread(str(write_image(tmp_path / "wide.jpg", 60, 200)))  # h=60, w=200
    ours, theirs = Detector(onnx_path)(image, conf=0.05)[0], Detector(weights)(image, conf=0.05)[0]
    assert len(theirs) > 0 and ours.boxes.xyxy[:, 3].max() <= 60
    torch.testing.assert_close(ours.boxes.xyxy, theirs.boxes.xyxy, atol=1e-3, rtol=0)
    assert ours.boxes.cls.tolist() == theirs.boxes.cls.tolist()


def test_the_input_convention_is_read_from_metadata_and_followed():
    convention = InputConvention.from_metadata(json.dumps({**vars(CROSSKD_INPUT), "pad_value": 114}),
                                               Path("m.onnx"))
    assert convention.pad_value == 114 and InputConvention.from_metadata(None, Path("old.onnx")) == CROSSKD_INPUT
    with pytest.raises(CheckpointError, match="'m.onnx' expects input .*'stretch'.*re-export it"):
        InputConvention.from_metadata(json.dumps({"resize": "stretch", "pad_value": 114}), Path("m.onnx"))
    images, _ = preprocess([np.zeros((64, 128, 3), np.uint8)], (128, 128), 128, torch.device("cpu"), pad_value=114)
    assert images[0, :, 64:].unique().tolist() == [pytest.approx(114 / 255)]  # padded rows carry the value
