"""The bad-input matrix: the real CLI (`python -m crosskd ...`) in a subprocess, once per way a user gets it wrong.

Every case must end with exit code 2, exactly one `ERROR:` line that names the problem and the fix, no traceback,
and every file that existed before it ran unchanged. The cases run in parallel once per module (`results`); each
test reads its own case. Marked slow: each case starts Python and imports torch (about 110 s of CPU in all).
docs/troubleshooting.md lists these messages with their causes and fixes.
"""

import copy
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch
import yaml
from test_ultralytics_checkpoints import write_checkpoint as write_ultralytics_checkpoint
from test_ultralytics_checkpoints import write_yolov5u_checkpoint

from crosskd.data.digits import generate_digits
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.models import build_detector
from crosskd.models.build import load_model_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = "data={S}/data.yaml imgsz=64 batch=4 workers=0 epochs=1"
DISTILL = "distill student=gfl_r18t.yaml " + TINY
MARKER = "code_ran"  # a folder the malicious pickle would create


class Case(NamedTuple):
    command: str  # words after `python -m crosskd`; {S} is the shared input folder
    problem: str  # what the ERROR line must name
    fix: str  # the hint the ERROR line must give


CASES = {
    # unwritable places: a run folder, export target or output folder under a regular file (fails for root too)
    "train_project_under_a_file": Case("train model=gfl_r18t.yaml " + TINY + " project={S}/a_file/runs",
                                       "a_file is a file, not a folder", "pass project="),
    "distill_project_under_a_file": Case(DISTILL + " teacher={S}/tiny.pt project={S}/a_file/runs",
                                         "a_file is a file, not a folder", "pass project="),
    "val_project_under_a_file": Case("val model={S}/tiny.pt " + TINY + " project={S}/a_file/runs",
                                     "a_file is a file, not a folder", "pass project="),
    "predict_project_under_a_file": Case("predict model={S}/tiny.pt source={S}/digits/images/val imgsz=64 "
                                         "project={S}/a_file/runs", "a_file is a file, not a folder", "pass project="),
    "analyze_project_under_a_file": Case("analyze teacher={S}/tiny.pt student={S}/tiny.pt " + TINY
                                         + " project={S}/a_file/runs", "a_file is a file, not a folder",
                                         "pass project="),
    "export_target_is_a_folder": Case("export model={S}/export/tiny.pt imgsz=128",
                                      "tiny.onnx: a folder of that name is in the way", "copy the .pt to a folder"),
    "convert_save_dir_under_a_file": Case("convert model={S}/tiny.pt save_dir={S}/a_file/out",
                                          "a_file is a file, not a folder", "pass save_dir="),
    # teacher / student pairs
    "teacher_class_count": Case(DISTILL + " teacher={S}/nc3.pt", "teacher has 3 classes but the student's data has 10",
                                "train the teacher on the same dataset"),
    "teacher_levels": Case(DISTILL + " teacher={S}/four_levels.pt", "teacher strides [8, 16, 32, 64] (4 levels)",
                           "same FPN levels"),
    "kd_idx_out_of_range": Case(DISTILL + " teacher={S}/tiny.pt kd_idx=5", "kd_idx=5 is out of range",
                                "use an integer 0..1"),
    "widths_without_adapter": Case(DISTILL + " teacher={S}/wide.pt kd_strategy=b kd_idx=1",
                                   "teacher's tower features have 64 channels and the student's 32",
                                   "use the same feat_channels or kd_strategy=a"),
    # model files
    "pt_not_a_crosskd_checkpoint": Case("val model={S}/foreign.pt " + TINY, "is neither a crosskd checkpoint",
                                        "pass model_cfg="),
    "pickle_that_would_run_code": Case("val model={S}/malicious.pt " + TINY, "was refused (loading it could run code)",
                                       "use a .pt written by crosskd"),
    "truncated_checkpoint": Case("val model={S}/truncated.pt " + TINY, "corrupt", "use a complete copy"),
    "ultralytics_pickle_that_would_run_code": Case("val model={S}/ultralytics_malicious.pt " + TINY,
                                                   "its pickle names posix.mkdir, which could run code",
                                                   "use a checkpoint written by Ultralytics"),
    "ultralytics_segmentation_model": Case("val model={S}/ultralytics_seg.pt " + TINY,
                                           "is an Ultralytics SegmentationModel",
                                           "pass a YOLOv8 or YOLO11 detection checkpoint"),
    "ultralytics_unmapped_family": Case("val model={S}/yolov5su.pt " + TINY,
                                        "holds Ultralytics yolov5su.yaml, whose layers crosskd does not map",
                                        "supported: YOLOv8"),
    "ultralytics_truncated": Case("val model={S}/ultralytics_truncated.pt " + TINY,
                                  "ultralytics_truncated.pt' (corrupt", "use a complete copy"),
    "image_as_model": Case("val model={S}/image.jpg " + TINY, "cannot load model", "expected one of .yaml, .pt"),
    "missing_model": Case("val model={S}/missing.pt " + TINY, "missing.pt' not found", "pass model="),
    "missing_resume_checkpoint": Case("train resume={S}/missing/last.pt", "last.pt' not found", "pass an existing"),
    "model_yaml_typo": Case("train model={S}/typo.yaml " + TINY, "backbone.type 'resnett'", "is not one of resnet"),
    # datasets
    "empty_image_folder": Case("train model=gfl_r18t.yaml data={S}/empty.yaml", "no usable images",
                               "check the dataset YAML"),
    "all_images_unreadable": Case("train model=gfl_r18t.yaml data={S}/unreadable.yaml",
                                  "no usable images in {S}/unreadable/images/train (3 unreadable images skipped)",
                                  "that the image files open"),
    "corrupt_dataset_yaml": Case("train model=gfl_r18t.yaml data={S}/corrupt.yaml", "not valid YAML", "fix the syntax"),
    "missing_dataset_yaml": Case("train model=gfl_r18t.yaml data={S}/missing.yaml", "is neither a file nor a YAML",
                                 "pass an existing file"),
    "dataset_without_names": Case("train model=gfl_r18t.yaml data={S}/no_names.yaml", "'names:' is missing",
                                  "add it"),
    "wrong_class_id": Case("train model=gfl_r18t.yaml data={S}/wrong_class.yaml",
                           "(2 boxes with class id outside 0..1 skipped)", "fix the labels"),
    "empty_labels": Case("train model=gfl_r18t.yaml data={S}/empty_labels.yaml", "no boxes left in the labels",
                         "fix the labels"),
    "predict_missing_source": Case("predict model={S}/tiny.pt source={S}/missing_images", "does not exist",
                                   "pass an image, video, directory"),
    # settings
    "unknown_key": Case("train model=gfl_r18t.yaml lr_0=0.1", "'lr_0' is not a valid crosskd argument", "lr0="),
    "device_0_without_cuda": Case("train model=gfl_r18t.yaml " + TINY + " device=0", "device=0 asks for CUDA",
                                  "use device=cpu"),
    "batch_0": Case("train model=gfl_r18t.yaml batch=0", "'batch=0' is out of range", "e.g. batch=16"),
    "negative_imgsz": Case("train model=gfl_r18t.yaml imgsz=-5", "'imgsz=-5' is invalid", "e.g. imgsz=640"),
    "epochs_not_a_number": Case("train model=gfl_r18t.yaml epochs=abc", "'epochs=abc' is invalid", "e.g. epochs=12"),
    "unknown_export_format": Case("export model={S}/tiny.pt format=xyz", "'format=xyz' is invalid", "must be one of"),
}


class Malicious:
    """Unpickling this would create the MARKER folder: crosskd must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def save_tiny(path: Path, model_cfg: dict, nc: int) -> None:
    """An untrained crosskd checkpoint of `model_cfg` (enough for every check before training)."""
    torch.manual_seed(0)
    detector = build_detector(model_cfg, nc)
    names = {i: str(i) for i in range(nc)}
    save_checkpoint(make_checkpoint(detector, epoch=-1, best_fitness=None, names=names, train_args={"imgsz": 64}), path)


def write_yolo_split(root: Path, image: Path, label_lines: list[str]) -> None:
    """root/images/train/i.jpg copies of `image` with labels/train/i.txt holding `label_lines[i]`."""
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    for i, line in enumerate(label_lines):
        (root / f"images/train/{i}.jpg").write_bytes(image.read_bytes())
        (root / f"labels/train/{i}.txt").write_text(line)


def write_checkpoints(shared: Path) -> None:
    base, _ = load_model_yaml("gfl_r18t.yaml")
    save_tiny(shared / "tiny.pt", base, 10)
    save_tiny(shared / "nc3.pt", base, 3)
    four = copy.deepcopy(base)
    four["neck"]["num_outs"], four["head"]["strides"] = 4, [8, 16, 32, 64]
    save_tiny(shared / "four_levels.pt", four, 10)
    wide = copy.deepcopy(base)
    wide["head"]["feat_channels"] = 64
    save_tiny(shared / "wide.pt", wide, 10)
    (shared / "export").mkdir()
    (shared / "export/tiny.pt").write_bytes((shared / "tiny.pt").read_bytes())
    (shared / "export/tiny.onnx").mkdir()  # the export target is taken by a folder
    torch.save({"weights": torch.zeros(3)}, shared / "foreign.pt")
    torch.save({"model": Malicious(shared / MARKER)}, shared / "malicious.pt")
    data = (shared / "tiny.pt").read_bytes()
    (shared / "truncated.pt").write_bytes(data[: len(data) // 2])
    write_ultralytics_checkpoint(shared / "ultralytics_malicious.pt", git=Malicious(shared / MARKER))
    write_ultralytics_checkpoint(shared / "ultralytics_seg.pt", model_class="SegmentationModel")
    write_yolov5u_checkpoint(shared / "yolov5su.pt")
    write_ultralytics_checkpoint(shared / "ultralytics_truncated.pt")
    data = (shared / "ultralytics_truncated.pt").read_bytes()
    (shared / "ultralytics_truncated.pt").write_bytes(data[: len(data) // 2])
    (shared / "typo.yaml").write_text("backbone: {type: resnett, depth: 18}\nneck: {type: fpn}\nhead: {type: gfl}\n")


def write_datasets(shared: Path) -> None:
    names = {i: str(i) for i in range(10)}
    splits = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    generate_digits(shared / "digits", num_train=8, num_val=4, imgsz=64, objects=(1, 2), seed=0)
    (shared / "data.yaml").write_text(yaml.safe_dump({"path": str(shared / "digits"), **splits, "names": names}))
    image = shared / "image.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    (shared / "empty/images/train").mkdir(parents=True)
    (shared / "empty/labels/train").mkdir(parents=True)
    write_yolo_split(shared / "unreadable", image, ["0 0.5 0.5 0.2 0.2\n"] * 3)
    for path in (shared / "unreadable/images/train").iterdir():
        path.write_bytes(b"not an image")
    write_yolo_split(shared / "wrong_class", image, ["12 0.5 0.5 0.2 0.2\n"] * 2)
    write_yolo_split(shared / "empty_labels", image, ["", ""])
    for name in ("empty", "unreadable", "wrong_class", "empty_labels"):
        split = {"path": str(shared / name), "train": "images/train", "val": "images/train", "names": ["a", "b"]}
        (shared / f"{name}.yaml").write_text(yaml.safe_dump(split))
    (shared / "corrupt.yaml").write_text("path: x\ntrain: [unclosed\n")
    (shared / "no_names.yaml").write_text(yaml.safe_dump({"path": str(shared / "digits"), **splits}))
    (shared / "a_file").write_text("a regular file where a folder is expected\n")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file()}


def run_case(name: str, shared: Path, cases_dir: Path) -> subprocess.CompletedProcess:
    cwd = cases_dir / name
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    words = CASES[name].command.format(S=shared).split()
    return subprocess.run([sys.executable, "-m", "crosskd", *words], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run every case once (4 at a time); returns the results, the shared folder and its files before and after."""
    root = tmp_path_factory.mktemp("matrix")
    shared = root / "shared"
    shared.mkdir()
    write_datasets(shared)
    write_checkpoints(shared)
    before = snapshot(shared)
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(CASES, pool.map(lambda name: run_case(name, shared, root / "cases"), CASES), strict=True))
    return {"runs": done, "shared": shared, "before": before, "after": snapshot(shared)}


@pytest.mark.slow  # 32 CLI processes, ~110 s of CPU (torch is imported 32 times)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line(results: dict, name: str) -> None:
    case, run, shared = CASES[name], results["runs"][name], results["shared"]
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: "), output[-3000:]
    assert errors[0] in run.stderr.splitlines()
    assert case.problem.format(S=shared) in errors[0] and case.fix in errors[0], errors[0]


@pytest.mark.slow
def test_no_file_that_existed_before_changed(results: dict) -> None:
    before, after = results["before"], results["after"]
    assert {path: after.get(path) for path in before} == before


@pytest.mark.slow
def test_the_malicious_pickle_ran_no_code(results: dict) -> None:
    assert (results["shared"] / "malicious.pt").is_file() and not (results["shared"] / MARKER).exists()


def test_the_matrix_covers_every_mode_that_writes_files() -> None:
    assert len(CASES) >= 24
    modes = {case.command.split()[0] for name, case in CASES.items() if "under_a_file" in name or "target" in name}
    assert modes == {"train", "distill", "val", "predict", "analyze", "export", "convert"}
