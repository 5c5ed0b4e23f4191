"""YOLO exports in Ultralytics' own layout: the metadata Ultralytics reads, its letterbox (centred, grey 114) as the
file's input convention, and the same detections from crosskd's runtimes, crosskd's PyTorch model and Ultralytics'
`YOLO(path)` (run by the peer in a subprocess), on a square and a non-square image."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn
from ultralytics_peer import ultralytics_python

from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.runtimes.exported import (
    ULTRALYTICS_INPUT,
    InputConvention,
    centre_images,
    centre_offsets,
)
from crosskd.engine.prediction.predictor import Predictor
from crosskd.models import build_detector

NAMES = {0: "cat", 1: "dog", 2: "bird"}
IMGSZ = 160
CONF, IOU = 0.82, 0.7  # CONF sits between well-separated scores of the seeded model on IMAGE (none within 0.01)
IMAGE_HW = (96, 160)  # the non-square image: 32 grey rows above and below it in a 160 x 160 input
PEER_PACKAGES = ("onnxruntime", "onnx", "flatbuffers", "google")  # what Ultralytics' ONNX backend imports
PEER_PREDICT = """
import json, sys
from ultralytics import YOLO
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for model, image, imgsz, conf, iou in jobs:
    r = YOLO(model, task="detect").predict(image, imgsz=imgsz, conf=conf, iou=iou, verbose=False)[0].boxes
    results[f"{model}|{image}"] = [[*box, score, cls] for box, score, cls in
                                   zip(r.xyxy.tolist(), r.conf.tolist(), r.cls.tolist())]
json.dump(results, open(out, "w"))
"""


def seeded_yolo(image: np.ndarray) -> nn.Module:
    """YOLO11n (3 classes) with seeded BatchNorm statistics and predictors scaled on `image` so that its class logits
    spread over about ±2 around -4 and its box logits over ±1.5: a few confident, distinct detections."""
    torch.manual_seed(0)
    detector = build_detector("yolo11n.yaml", len(NAMES)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
        head = detector.head
        for predictor in [*head.cls_preds, *head.reg_preds]:
            predictor.bias.zero_()
        outputs = detector(torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255)
        for predictors, logits, spread in ((head.cls_preds, outputs.cls_scores, 2.0),
                                           (head.reg_preds, outputs.bbox_preds, 1.5)):
            for predictor, level in zip(predictors, logits, strict=True):
                level = level[0].flatten(1)  # [C, H*W] logits without bias
                scale = spread / level.std(1)
                predictor.weight.mul_(scale[:, None, None, None])
                predictor.bias.copy_(-level.mean(1) * scale)
        for predictor in head.cls_preds:
            predictor.bias.sub_(4.0)
        for predictor in head.reg_preds:
            predictor.bias.add_(torch.randn(predictor.bias.shape, generator=generator))
    return detector


def sample_image() -> np.ndarray:
    """96 x 160 BGR: blurred seeded noise with a rectangle, a disc and a white square on it."""
    noise = (np.random.default_rng(0).random((*IMAGE_HW, 3)) * 255).astype(np.uint8)
    image = cv2.GaussianBlur(noise, (0, 0), 2)
    cv2.rectangle(image, (10, 12), (50, 70), (20, 200, 240), -1)
    cv2.circle(image, (110, 50), 25, (230, 60, 30), -1)
    cv2.rectangle(image, (130, 5), (155, 30), (250, 250, 250), -1)
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """best.pt of the seeded model, its exports (static raw, dynamic raw, NMS in a static and in a dynamic graph,
    TorchScript) and the images (non-square, square, and the non-square one padded by hand to the static input)."""
    root = tmp_path_factory.mktemp("yolo_export")
    image = sample_image()
    pad = (IMGSZ - IMAGE_HW[0]) // 2
    paths = {"rect": root / "rect.png", "square": root / "square.png", "padded": root / "padded.png"}
    cv2.imwrite(str(paths["rect"]), image)
    cv2.imwrite(str(paths["square"]), cv2.resize(image, (IMGSZ, IMGSZ)))
    cv2.imwrite(str(paths["padded"]), cv2.copyMakeBorder(image, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(114,) * 3))
    checkpoint = make_checkpoint(seeded_yolo(image), epoch=-1, best_fitness=None, names=NAMES,
                                 train_args={"imgsz": IMGSZ, "model": "yolo11n.yaml"})
    paths["pt"] = save_checkpoint(checkpoint, root / "best.pt")
    nms = {"nms": True, "conf": CONF, "iou": IOU, "multi_label": False}
    exports = {"onnx": {}, "dynamic": {"dynamic": True}, "nms": nms, "nms_dynamic": {**nms, "dynamic": True},
               "torchscript": {"format": "torchscript"}}
    for name, overrides in exports.items():
        weights = shutil.copy(paths["pt"], root / f"{name}.pt")
        paths[name] = exporter.run(get_args({"model": str(weights), "device": "cpu", **overrides}, "export"))
    return paths


def crosskd_predict(model: Path, image: Path) -> torch.Tensor:
    """`crosskd predict model=... source=...` rows [K, 6] (x1, y1, x2, y2, score, class) in original pixels."""
    args = get_args({"model": str(model), "device": "cpu", "imgsz": IMGSZ, "conf": CONF, "iou": IOU, "save": False},
                    "predict")
    return next(Predictor(args).stream(str(image))).boxes.data


def assert_same_detections(ours: torch.Tensor, theirs: torch.Tensor, box_tol: float, score_tol: float) -> None:
    """Same detections in the same (score) order: equal classes, boxes within `box_tol` px, scores `score_tol`."""
    assert len(ours) > 0 and ours.shape == theirs.shape
    assert ours[:, 5].tolist() == theirs[:, 5].tolist()
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], atol=box_tol, rtol=0)
    torch.testing.assert_close(ours[:, 4], theirs[:, 4], atol=score_tol, rtol=0)


def test_onnx_carries_the_metadata_and_layout_ultralytics_reads(files):
    proto = onnx.load(str(files["onnx"]))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert metadata["task"] == "detect" and metadata["stride"] == "32" and metadata["batch"] == "1"
    assert ast.literal_eval(metadata["imgsz"]) == [IMGSZ, IMGSZ] and ast.literal_eval(metadata["names"]) == NAMES
    assert metadata["channels"] == "3" and metadata["end2end"] == "False"
    args = ast.literal_eval(metadata["args"])
    assert args["nms"] is False and args["dynamic"] is False
    assert InputConvention.from_metadata(metadata["input"], files["onnx"]) == ULTRALYTICS_INPUT
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output0"]
    output_shape = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert output_shape == [1, 4 + len(NAMES), sum((IMGSZ // s) ** 2 for s in (8, 16, 32))]  # [B, 4+nc, N]
    nms_args = ast.literal_eval({e.key: e.value for e in onnx.load(str(files["nms"])).metadata_props}["args"])
    assert nms_args["nms"] is True and nms_args["multi_label"] is False  # Ultralytics: end2end, rows taken as they are


def test_dynamic_nms_onnx_has_ultralytics_dynamic_layout(files):
    """nms=True dynamic=True: batch, height and width dynamic, output0 [B, max_det, 6], as Ultralytics' own export."""
    proto = onnx.load(str(files["nms_dynamic"]))
    dims = [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in (proto.graph.input[0], proto.graph.output[0])]
    assert dims[0] == ["batch", 3, "height", "width"] and dims[1][0] == "batch" and len(dims[1]) == 3
    args = ast.literal_eval({e.key: e.value for e in proto.metadata_props}["args"])
    assert args["nms"] is True and args["dynamic"] is True


def test_centring_rounds_as_ultralytics_letterbox():
    sizes = torch.tensor([[95, 160], [160, 97], [160, 160]])  # (h, w)
    assert centre_offsets(sizes, 160, 160).tolist() == [[0, 32], [31, 0], [0, 0]]  # (left, top); odd: extra after
    images = torch.zeros(1, 3, 96, 160)
    canvas, offsets = centre_images(images, torch.tensor([[96, 160]]), (160, 160), 114 / 255)
    grey = (canvas[0] == 114 / 255).all(0).all(1)  # [160] rows entirely grey
    assert offsets.tolist() == [[0, 32]] and grey.nonzero().flatten().tolist() == [*range(32), *range(128, 160)]


@pytest.mark.parametrize("model", ["dynamic", "nms_dynamic"])
@pytest.mark.parametrize("image", ["rect", "square"])
def test_dynamic_onnx_equals_the_pt(files, model, image):
    """Dynamic graphs are fed the letterbox at its own size: nothing padded for either image, as for the .pt."""
    ours, pytorch = crosskd_predict(files[model], files[image]), crosskd_predict(files["pt"], files[image])
    assert_same_detections(ours, pytorch, box_tol=1e-2, score_tol=1e-4)


def test_static_onnx_centres_a_non_square_image_on_grey(files):
    """The 160 x 160 graph sees the 96 x 160 image between 32 grey rows: what the .pt sees when given that input."""
    static = crosskd_predict(files["onnx"], files["rect"])
    padded = crosskd_predict(files["pt"], files["padded"])
    padded[:, 1:4:2] = (padded[:, 1:4:2] - 32).clamp(0, IMAGE_HW[0])
    assert_same_detections(static, padded, box_tol=1e-2, score_tol=1e-4)
    square = crosskd_predict(files["onnx"], files["square"])
    assert_same_detections(square, crosskd_predict(files["pt"], files["square"]), box_tol=1e-2, score_tol=1e-4)


def peer_env(root: Path) -> dict[str, str]:
    """The environment of the peer: crosskd's own ONNX Runtime (with its dist-info, so Ultralytics finds the
    requirement) linked into `root` and put on its path, and Ultralytics kept from installing anything."""
    for name in PEER_PACKAGES:
        package = Path(importlib.util.find_spec(name).submodule_search_locations[0])
        for path in [package, *package.parent.glob(f"{name}-*.dist-info")]:
            (root / path.name).symlink_to(path)
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(root)]))
    return {**os.environ, "PYTHONPATH": path, "YOLO_AUTOINSTALL": "false", "YOLO_OFFLINE": "true"}


def ultralytics_predict(jobs: list[tuple[Path, Path]], root: Path) -> dict[tuple[Path, Path], torch.Tensor]:
    """Ultralytics' `YOLO(model, task="detect").predict(image, imgsz, conf, iou)` rows [K, 6] per (model, image)."""
    links, out = root / "peer_site", root / "peer.json"
    links.mkdir()
    specs = [(str(model), str(image), IMGSZ, CONF, IOU) for model, image in jobs]
    result = subprocess.run([*ultralytics_python(), "-c", PEER_PREDICT, json.dumps(specs), str(out)],
                            capture_output=True, text=True, timeout=300, env=peer_env(links))
    assert result.returncode == 0, f"Ultralytics peer failed:\n{result.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    return {(model, image): torch.tensor(rows[f"{model}|{image}"]).reshape(-1, 6) for model, image in jobs}


def test_ultralytics_reads_every_export_as_crosskd_does(files, tmp_path):
    """The same file, run by Ultralytics and by `crosskd predict`: the same detections (same input, same NMS)."""
    jobs = [(files[name], files[image]) for name in ("onnx", "dynamic", "nms", "nms_dynamic", "torchscript")
            for image in ("rect", "square")]
    theirs = ultralytics_predict(jobs, tmp_path)
    for model, image in jobs:
        assert_same_detections(crosskd_predict(model, image), theirs[model, image], box_tol=1e-3, score_tol=1e-5)


def test_cli_exports_a_yolo_checkpoint(files, tmp_path):
    weights = shutil.copy(files["pt"], tmp_path / "best.pt")
    result = subprocess.run([sys.executable, "-m", "crosskd", "export", f"model={weights}", "format=onnx",
                             "device=cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metadata = {e.key: e.value for e in onnx.load(str(tmp_path / "best.onnx")).metadata_props}
    assert json.loads(metadata["input"])["pad"] == "center" and metadata["head_type"] == "yolo"
