"""DDP: a 2-process torchrun (gloo, CPU) run matches a 1-process run with the same total batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data.digits import generate_digits
from crosskd.engine.deployment.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.training import ddp
from crosskd.engine.training.trainer import Trainer
from crosskd.models import build_detector, load_model_yaml

NAMES = {i: str(i) for i in range(10)}
LOSSES = ("train/cls_loss", "train/box_loss", "train/dfl_loss")  # results.csv columns (Ultralytics names)


def write_inputs(root: Path) -> tuple[Path, Path]:
    """8 train / 4 val digits images, and a starting checkpoint of gfl_r18t whose BatchNorm statistics are frozen
    (norm_eval), so per-process batches are normalised like the full batch, and whose classifier starts at
    probability 0.12, so GFL's box-loss normaliser (a sum of scores, clamped at 1) is above 1 on every rank."""
    data_root = generate_digits(root / "digits", num_train=8, num_val=4, imgsz=96, seed=3)
    split = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    data = root / "digits.yaml"
    data.write_text(yaml.safe_dump({"path": str(data_root), **split, "names": NAMES, "fliplr": 0}))
    model_cfg, _ = load_model_yaml("gfl_r18t.yaml")
    model_cfg["backbone"]["norm_eval"] = True
    torch.manual_seed(0)
    detector = build_detector(model_cfg, nc=10)
    torch.nn.init.constant_(detector.head.gfl_cls.bias, -2.0)  # sigmoid = 0.12
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names=NAMES, train_args={})
    return data, save_checkpoint(ckpt, root / "start.pt")


def settings(data: Path, model: Path, project: Path, name: str) -> dict:
    # batch 8 = the whole train set: one step per epoch over the same images in both runs; SGD, since AdamW (what
    # optimizer=auto picks for a run this short) turns float-rounding-size gradients into full lr-size steps
    return {"model": str(model), "data": str(data), "epochs": 3, "batch": 8, "imgsz": 96, "workers": 0,
            "device": "cpu", "warmup_iters": 0, "optimizer": "SGD", "lr0": 0.004, "val": False, "plots": False,
            "project": str(project), "name": name, "seed": 0}


def losses(run_dir: Path) -> list[list[float]]:
    with open(run_dir / "results.csv", newline="") as f:
        return [[float(row[k]) for k in LOSSES] for row in csv.DictReader(f)]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    data, model = write_inputs(tmp_path)
    Trainer(get_args(settings(data, model, tmp_path, "single"), "train")).train()

    words = [f"{k}={v}" for k, v in settings(data, model, tmp_path, "ddp").items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "crosskd",
               "train", *words]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DDP: gloo process group of 2 processes" in result.stdout
    assert "batch 8 = 2 processes x 4 images" in result.stdout

    single, distributed = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(distributed) == 3
    assert single[2] != single[0]  # the weights did change over the steps
    for one, two in zip(single, distributed):
        assert two == pytest.approx(one, rel=2e-3, abs=1e-5)
    start = load_checkpoint(tmp_path / "start.pt")["model"]
    w_single = load_checkpoint(tmp_path / "single" / "weights" / "last.pt")["model"]  # stripped: fp16
    w_ddp = load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")["model"]
    moved = max((w_single[k].float() - v).abs().max().item() for k, v in start.items() if v.is_floating_point())
    assert moved > 1e-3
    for name, value in w_single.items():
        torch.testing.assert_close(w_ddp[name].float(), value.float(), rtol=2e-3, atol=1e-4)  # fp16 rounding


def test_ddp_command_reproduces_the_settings():
    args = get_args({"model": "gfl_r18t.yaml", "device": "0,1", "batch": 4, "lr_steps": [16, 22], "name": "my run",
                     "cos_lr": True}, "train")
    command = ddp.ddp_command(args, "train", 2)
    assert command[:6] == [sys.executable, "-m", "crosskd.engine.training.torchrun", "--nproc_per_node", "2",
                           "--standalone"]  # torchrun binds its own ports: no free-port race
    assert command[6:9] == ["-m", "crosskd", "train"]
    words = command[9:]
    parsed = dict(word.split("=", 1) for word in words)
    assert parsed == {"model": "gfl_r18t.yaml", "batch": "4", "device": "0,1", "name": "my run",
                      "cos_lr": "true", "lr_steps": "[16,22]"}
    assert ddp.needs_launch(args) and not ddp.needs_launch(get_args({"device": "cpu"}, "train"))
