"""Run by the Ultralytics peer (never by crosskd's python): YOLOv8n and YOLO11n with seeded random weights, saved with
Ultralytics' own `Model.save`, and what Ultralytics computes from each saved file for one fixed input.

    <peer python> tests/ultralytics_peer_dump.py OUT_DIR

writes, per model NAME in MODELS: OUT_DIR/NAME.pt (the Ultralytics checkpoint) and OUT_DIR/NAME_expected.pt, a plain
dict of tensors (loadable with weights_only=True): `state` (the reloaded model's state_dict, float32), `input`
[1, 3, H, W] in 0..1 (Ultralytics' model input: the image already divided by 255), per level `box` [1, 4*16, h, w]
and `cls` [1, nc, h, w] (Detect's cv2 / cv3 outputs; float64, and float32 as `box32` / `cls32`), `decoded`
[1, 4 + nc, N] (xywh pixels, class scores; float64) and `detections` [K, 6] (xyxy, score, class) after Ultralytics'
NMS with CONF, IOU and MAX_DET (float64). Per name in TEACHERS only the checkpoint OUT_DIR/NAME.pt. And
OUT_DIR/sl2_expected.pt: Ultralytics' own feature distillation (`distill_model=`, DistillationModel) of the YOLO11n
file from the YOLO11s file on one seeded batch in training mode: `images` [B, 3, H, W], the labels as Ultralytics
takes them (`batch_idx`, `cls`, `bboxes` normalised xywh), its seeded `projector` state_dict and `dis_loss` (its
distillation loss, the `dis` gain included, before Ultralytics multiplies it by the batch size).
"""

import sys
from pathlib import Path

import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.nms import non_max_suppression

MODELS = ("yolov8n", "yolo11n")
TEACHERS = ("yolo11s",)  # checkpoints only: a larger teacher for the distillation run
NAMES = {0: "cat", 1: "dog", 2: "bird"}
INPUT_HW = (96, 128)
CONF, IOU, MAX_DET = 0.25, 0.7, 300
SEED = 0
BN_MOMENTUM = 0.03  # Ultralytics' initialize_weights
SL2_LABELS = {"batch_idx": [0.0, 0.0, 1.0], "cls": [[0.0], [2.0], [1.0]],
              "bboxes": [[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.4, 0.5]]}


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """BatchNorm affine terms away from identity and running statistics measured on seeded random images (with the
    init's identity statistics the features fade to near-constant maps by the head, whose equal scores tie in NMS),
    and class biases near logit -2, so that every layer matters and some boxes pass CONF."""
    batchnorms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    with torch.no_grad():
        for batchnorm in batchnorms:
            batchnorm.weight.copy_(torch.rand(batchnorm.num_features, generator=generator) + 0.5)
            batchnorm.bias.copy_(torch.randn(batchnorm.num_features, generator=generator) * 0.1)
            batchnorm.reset_running_stats()
            batchnorm.momentum = None  # a cumulative average: the statistics of the one calibration batch
        for predictor in (branch[-1] for branch in model.model[-1].cv3):
            predictor.bias.copy_(torch.randn(predictor.bias.shape, generator=generator) - 2)
        model.train()
        model(torch.rand(4, 3, *INPUT_HW, generator=generator))
    model.eval()
    for batchnorm in batchnorms:
        batchnorm.momentum = BN_MOMENTUM


def save_seeded(name: str, path: Path) -> None:
    """A `name` model for NAMES with seeded weights, written by Ultralytics' Model.save (half precision)."""
    torch.manual_seed(SEED)
    yolo = YOLO(f"{name}.yaml")
    yolo.model = DetectionModel(f"{name}.yaml", nc=len(NAMES), verbose=False)
    yolo.model.names = dict(NAMES)
    randomise(yolo.model, torch.Generator().manual_seed(SEED))
    yolo.save(path)


def head_outputs(model: nn.Module, image: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Detect's per-level cv2 (box) and cv3 (class) outputs and the decoded [1, 4 + nc, N] output for `image`."""
    detect = model.model[-1]
    levels: dict[str, list[torch.Tensor]] = {"box": [], "cls": []}
    hooks = [branch.register_forward_hook(lambda module, args, out, key=key: levels[key].append(out.detach().clone()))
             for key, branches in (("box", detect.cv2), ("cls", detect.cv3)) for branch in branches]
    with torch.no_grad():
        output = model(image)
    for hook in hooks:
        hook.remove()
    return levels, output[0] if isinstance(output, tuple | list) else output


def expected_outputs(path: Path) -> dict:
    """What Ultralytics computes from the saved file for one seeded input: in float64 (free of rounding, so that
    crosskd in float64 must agree to ~1e-12) and, for the raw outputs, in float32 as models run."""
    model = YOLO(path).model.eval()
    image = torch.rand(1, 3, *INPUT_HW, generator=torch.Generator().manual_seed(SEED))
    levels32, _ = head_outputs(model.float(), image)
    levels, decoded = head_outputs(model.double(), image.double())
    detections = non_max_suppression(decoded, conf_thres=CONF, iou_thres=IOU, max_det=MAX_DET)[0]
    return {
        "state": {k: v.float() if v.is_floating_point() else v for k, v in model.float().state_dict().items()},
        "input": image, "box": levels["box"], "cls": levels["cls"], "box32": levels32["box"],
        "cls32": levels32["cls"], "decoded": decoded, "detections": detections,
        "names": dict(NAMES), "conf": CONF, "iou": IOU, "max_det": MAX_DET,
    }


def sl2_expected(student_path: Path, teacher_path: Path) -> dict:
    """Ultralytics' DistillationModel of the two files (projectors seeded) on one seeded batch, in training mode."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.distill_model import DistillationModel

    student = YOLO(student_path).model
    student.args = get_cfg(overrides={"imgsz": max(INPUT_HW)})
    torch.manual_seed(SEED)
    model = DistillationModel(teacher_model=teacher_path, student_model=student).train()
    images = torch.rand(2, 3, *INPUT_HW, generator=torch.Generator().manual_seed(SEED + 1))
    labels = {key: torch.tensor(value) for key, value in SL2_LABELS.items()}
    _, items = model.loss({"img": images, **labels})
    return {"images": images, **labels, "projector": model.projector.state_dict(), "dis": float(model.dis),
            "dis_loss": items["dis_loss"].reshape(())}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        path = out_dir / f"{name}.pt"
        save_seeded(name, path)
        expected = expected_outputs(path)
        torch.save(expected, out_dir / f"{name}_expected.pt")
        print(f"{name}: {len(expected['detections'])} detections")
    for name in TEACHERS:
        save_seeded(name, out_dir / f"{name}.pt")
    torch.save(sl2_expected(out_dir / "yolo11n.pt", out_dir / "yolo11s.pt"), out_dir / "sl2_expected.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
