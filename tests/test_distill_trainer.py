"""DistillTrainer end to end on a tiny generated digits set: every detector type, heterogeneous teachers,
width adapters, resume, and the student-only best.pt in val and export."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.engine.deployment.checkpoint import KD_STATE_KEY, load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.deployment.exporter import run as export_run
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.prediction.predictor import Predictor
from crosskd.engine.prediction.sources import read_image
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.launch import trainer_class
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector

NC = 10
KD_COLUMNS = {"gfl": {"kd_cls", "kd_reg"}, "retinanet": {"kd_cls", "kd_reg"},
              "atss": {"kd_cls", "kd_reg", "kd_ctr"}, "fcos": {"kd_cls", "kd_reg"}}


class StopAfterFirstEpoch(Exception):
    """Raised from a callback to leave a resumable last.pt behind."""


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml) -> Path:
    """A directory holding a tiny digits data YAML (8 train, 4 val images of 64 px)."""
    root = tmp_path_factory.mktemp("distill")
    write_digits_yaml(root, num_train=8, num_val=4)
    return root


def model_yaml(root: Path, head_type: str, feat: int = 32, stacked: int = 2) -> Path:
    """A quarter-width ResNet-18 detector YAML with a `feat`-channel FPN and head."""
    cfg = {
        "backbone": {"type": "resnet", "depth": 18, "width": 0.25},
        "neck": {"type": "fpn", "out_channels": feat, "num_outs": 5},
        "head": {"type": head_type, "stacked_convs": stacked, "feat_channels": feat, "num_groups": 8,
                 "norm": "none" if head_type == "retinanet" else "gn"},
    }
    path = root / f"{head_type}_{feat}_{stacked}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def teacher_pt(root: Path, head_type: str, feat: int = 32, nc: int = NC, seed: int = 0) -> Path:
    """A teacher checkpoint (random weights: these tests check mechanics, not accuracy)."""
    torch.manual_seed(seed)
    detector = build_detector(model_yaml(root, head_type, feat), nc)
    path = root / f"teacher_{head_type}_{feat}_{nc}.pt"
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names={i: str(i) for i in range(nc)}, train_args={})
    save_checkpoint(ckpt, path)
    return path


def distill_args(root: Path, name: str, **overrides):
    settings = {"data": str(root / "data.yaml"), "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0,
                "device": "cpu", "project": str(root / "runs"), "name": name, "plots": False, "val": False,
                "exist_ok": True,
                **overrides}
    return get_args(settings, mode="distill")


@pytest.fixture(scope="module")
def distilled(work):
    """Distil a student of a head type from a same-type teacher once per module; returns the finished trainer."""
    trainers = {}

    def run(head_type: str) -> DistillTrainer:
        if head_type not in trainers:
            teacher = teacher_pt(work, head_type)
            args = distill_args(work, head_type, teacher=str(teacher), model=str(model_yaml(work, head_type)))
            trainers[head_type] = DistillTrainer(args)
            trainers[head_type].train()
        return trainers[head_type]

    return run


def results_columns(save_dir: Path) -> list[str]:
    with open(save_dir / "results.csv") as f:
        return next(csv.reader(f))


@pytest.mark.parametrize("head_type", list(KD_COLUMNS))
def test_each_detector_distils_and_best_pt_is_student_only(work, distilled, head_type):
    trainer = distilled(head_type)
    assert {f"train/{name}_loss" for name in KD_COLUMNS[head_type]} <= set(results_columns(trainer.save_dir))
    assert KD_COLUMNS[head_type] <= set(trainer.epoch_losses)
    best = trainer.weights_dir / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["teacher"] == str((work / f"teacher_{head_type}_32_{NC}.pt").resolve())
    assert ckpt["kd_args"]["kd"] == "crosskd" and ckpt["kd_args"]["head_type"] == head_type
    assert set(ckpt["model"]) == set(build_detector(model_yaml(work, head_type), NC).state_dict())
    val_args = get_args({"model": str(best), "data": str(work / "data.yaml"), "imgsz": 64, "batch": 4,
                         "workers": 0, "device": "cpu", "plots": False, "project": str(work / "val")}, mode="val")
    assert "AP" in Validator(val_args, model=str(best)).run()


@pytest.mark.parametrize(  # the other heads' best.pt: slow
    "head_type", [t if t == "gfl" else pytest.param(t, marks=pytest.mark.slow) for t in KD_COLUMNS]
)
def test_best_pt_predicts_and_exports_without_teacher(work, distilled, head_type):
    best = distilled(head_type).weights_dir / "best.pt"
    Path(load_checkpoint(best)["teacher"]).unlink()  # nothing of the teacher is needed any more
    image = sorted((work / "digits" / "images" / "val").glob("*.jpg"))[0]
    predictor = Predictor(get_args({"model": str(best), "source": str(image), "imgsz": 64, "device": "cpu",
                                    "conf": 0.0, "save": False}, mode="predict"))
    results = predictor.predict([read_image(image, 0)])
    assert len(results) == 1 and results[0].boxes.xyxy.shape[1:] == (4,)
    path = export_run(get_args({"model": str(best), "format": "torchscript", "imgsz": 64, "device": "cpu"},
                               mode="export"))
    assert path.is_file() and path.stat().st_size > 0


def test_retinanet_teacher_distils_gfl_student(work):
    teacher = teacher_pt(work, "retinanet")
    trainer = DistillTrainer(distill_args(work, "hetero", teacher=str(teacher), model=str(model_yaml(work, "gfl"))))
    trainer.train()
    columns = set(results_columns(trainer.save_dir))
    assert {"train/cls_loss", "train/box_loss", "train/dfl_loss", "train/kd_cls_loss", "train/kd_reg_loss"} <= columns
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.epoch_losses.values())


def test_width_adapter_is_saved_for_resume_and_dropped_from_best(work):
    teacher = teacher_pt(work, "gfl", feat=64)
    args = distill_args(work, "adapter", teacher=str(teacher), model=str(model_yaml(work, "gfl")), epochs=2)
    first = DistillTrainer(args)

    def stop(trainer):
        raise StopAfterFirstEpoch

    first.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(StopAfterFirstEpoch):
        first.train()
    last = first.weights_dir / "last.pt"
    saved = load_checkpoint(last)[KD_STATE_KEY]["crosskd"]
    assert set(saved) == {"adapter.cls.weight", "adapter.cls.bias", "adapter.reg.weight", "adapter.reg.bias"}
    assert saved["adapter.cls.weight"].shape == (64, 32, 1, 1)
    restored = {}
    resumed = DistillTrainer(distill_args(work, "adapter", resume=str(last)))
    resumed.add_callback("on_train_start", lambda t: restored.update(t.loss_module.kd_state()["crosskd"]))
    resumed.train()
    assert all(torch.equal(restored[k], v) for k, v in saved.items())
    assert resumed.state.start_epoch == 1 and resumed.teacher_path == str(teacher.resolve())
    assert KD_STATE_KEY not in load_checkpoint(resumed.weights_dir / "best.pt")
    assert KD_STATE_KEY in load_checkpoint(last)


def test_yaml_teacher_with_weights_and_errors(work):
    teacher = teacher_pt(work, "atss")
    atss_yaml = str(model_yaml(work, "atss"))
    good = DistillTrainer(distill_args(work, "yaml", teacher=atss_yaml, teacher_weights=str(teacher), model=atss_yaml))
    good.setup()
    state = load_checkpoint(teacher)["model"]
    assert all(torch.equal(v, state[k]) for k, v in good.teacher.state_dict().items())
    no_weights = DistillTrainer(distill_args(work, "yaml", teacher=str(model_yaml(work, "atss")),
                                             model=str(model_yaml(work, "atss"))))
    with pytest.raises(ConfigError, match="is a model YAML without weights: add teacher_weights="):
        no_weights.setup()
    wrong_classes = DistillTrainer(distill_args(work, "nc", teacher=str(teacher_pt(work, "gfl", nc=5)),
                                                model=str(model_yaml(work, "gfl"))))
    with pytest.raises(CheckpointError, match="teacher has 5 classes but the student's data has 10"):
        wrong_classes.setup()


def test_train_with_teacher_uses_distill_trainer():
    args = get_args({"model": "gfl_r18t.yaml", "distill_model": "teacher.pt", "dis": 2.0}, mode="train")
    assert trainer_class(args) is DistillTrainer
    assert args.teacher == "teacher.pt" and args.kd_weight == 2.0


@pytest.mark.slow
def test_cli_reports_a_missing_teacher_in_one_line(work):
    result = subprocess.run(
        [sys.executable, "-m", "crosskd", "distill", f"teacher={work / 'absent.pt'}", "model=gfl_r18t.yaml",
         f"data={work / 'data.yaml'}", "imgsz=64", "epochs=1", "workers=0", "device=cpu", f"project={work / 'cli'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "teacher" in result.stderr + result.stdout and "absent.pt" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_distil(work):
    teacher = teacher_pt(work, "gfl")
    words = [f"teacher={teacher}", f"model={model_yaml(work, 'gfl')}", f"data={work / 'data.yaml'}", "imgsz=64",
             "epochs=1", "batch=4", "workers=0", "device=cpu", f"project={work / 'ddp'}", "name=run", "plots=false"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "crosskd",
               "distill", *words]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = work / "ddp" / "run"
    with open(run_dir / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert all(math.isfinite(float(row[f"train/{k}_loss"])) for k in ("cls", "kd_cls", "kd_reg"))
    ckpt = load_checkpoint(run_dir / "weights" / "last.pt")
    assert ckpt["teacher"] == str(teacher.resolve())
    assert set(ckpt["model"]) == set(build_detector(model_yaml(work, "gfl"), NC).state_dict())
