"""CrossKD with Faster R-CNN through the Distiller and the KD method registry: the student's own losses unchanged,
KD gradient only into the student (and the width adapter), the reference's weights, one-line errors for mismatched
pairs and dense-only settings, and a distillation run on tiny digits that, stopped after epoch 1 and resumed, ends
like the uninterrupted one."""

import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.distill import Distiller
from crosskd.distill.methods.crosskd_rcnn import RoICrossKD
from crosskd.engine.deployment.checkpoint import KD_STATE_KEY, load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector

SMALL = "faster_rcnn_r18s.yaml"  # FPN 64
NC = 10


def wide_yaml(root: Path, width: int = 96) -> Path:
    """faster_rcnn_r18s.yaml with a `width`-channel FPN and RPN (a teacher wider than the student)."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "cfg" / "models" / SMALL).read_text())
    cfg["neck"]["out_channels"] = cfg["head"]["rpn_feat_channels"] = width
    path = root / f"faster_rcnn_r18s_{width}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_batch() -> SimpleNamespace:
    torch.manual_seed(0)
    gt = torch.tensor([[[4, 6, 30, 40], [34, 20, 62, 60]], [[8, 8, 36, 30], [0, 0, 0, 0]]], dtype=torch.float32)
    return SimpleNamespace(images=torch.rand(2, 3, 64, 64), gt_boxes=gt, gt_labels=torch.tensor([[0, 2], [1, -1]]),
                           img_sizes=torch.tensor([[64, 64], [48, 40]]))


def pair(tmp_path: Path, kd: str = "crosskd", **kwargs) -> Distiller:
    """An R18s student (FPN 64) and a wider teacher (FPN 96) with a confident classifier."""
    torch.manual_seed(0)
    student = build_detector(SMALL, 3).train()
    teacher = build_detector(wide_yaml(tmp_path), 3)
    with torch.no_grad():
        teacher.head.roi_head.cls.weight.normal_(0, 0.5)
    return Distiller(student, teacher, kd=kd, **kwargs)


def test_crosskd_is_the_rcnn_variant_with_the_reference_weights(tmp_path):
    distiller = pair(tmp_path, "crosskd+pkd")
    assert isinstance(distiller.methods["crosskd"], RoICrossKD)
    weights = distiller.weights
    assert (weights.cls, weights.reg, weights.feat) == (0.5, 1.0, 6.0)  # crosskd+pkd_r18_faster-rcnn_r50_fpn_1x
    adapter = distiller.methods["crosskd"].adapter
    assert (adapter.in_channels, adapter.out_channels, adapter.kernel_size) == (64, 96, (1, 1))
    assert distiller.methods["pkd"].connector.out_channels == 96


def test_student_losses_unchanged_and_kd_reaches_only_the_student(tmp_path):
    distiller = pair(tmp_path, "crosskd+pkd")
    batch = tiny_batch()
    torch.manual_seed(1)
    own = distiller.student.loss(batch)
    torch.manual_seed(1)
    losses = distiller.loss(batch)
    assert set(losses) == set(own) | {"kd_cls", "kd_reg", "kd_feat"}
    for key, value in own.items():  # bit-identical: the distiller runs the student's own pass
        torch.testing.assert_close(losses[key], value, atol=0, rtol=0)
    assert all(losses[key].item() > 0 for key in ("kd_cls", "kd_reg", "kd_feat"))

    kd_total = losses["kd_cls"] + losses["kd_reg"]
    student = distiller.student
    teacher = distiller.teacher
    kd_modules = [student.backbone, student.neck, student.head.rpn, student.head.roi_head,
                  distiller.methods["crosskd"].adapter]
    grads = [torch.autograd.grad(kd_total, list(m.parameters()), allow_unused=True, retain_graph=True)
             for m in kd_modules]
    reached = [any(g is not None and g.abs().sum() > 0 for g in group) for group in grads]
    assert reached == [True, True, False, False, True]  # FPN maps and adapter: yes; the student's own heads: no
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(name.startswith("teacher") for name in distiller.state_dict())


def test_kd_branch_keeps_one_term(tmp_path):
    losses = pair(tmp_path, kd_branch="cls").loss(tiny_batch())
    assert "kd_cls" in losses and "kd_reg" not in losses


def test_mismatched_families_are_one_line(tmp_path):
    torch.manual_seed(0)
    dense = build_detector("gfl_r18t.yaml", 3)
    frcnn = build_detector(SMALL, 3)
    with pytest.raises(CheckpointError, match=r"^the teacher is a two-stage detector \(faster_rcnn\) and the student "
                                              r"a dense detector \(gfl\)"):
        Distiller(dense, frcnn)
    with pytest.raises(CheckpointError, match=r"^the teacher is a dense detector \(gfl\) and the student a two-stage"):
        Distiller(frcnn, dense)


@pytest.mark.parametrize("settings, message", [
    ({"kd": "pm"}, "kd=pm has no Faster R-CNN pass"),
    ({"kd": "crosskd+ld"}, "kd=crosskd\\+ld has no Faster R-CNN pass"),
    ({"kd_idx": 1}, "kd_idx=1 applies to dense heads only"),
    ({"kd_strategy": "b"}, "kd_strategy=b applies to dense heads only"),
    ({"kd": "crosskd+pkd", "pkd_on": "cls"}, "pkd_on=cls applies to dense heads only"),
])
def test_dense_only_settings_refused(settings, message):
    torch.manual_seed(0)
    student, teacher = build_detector(SMALL, 3), build_detector(SMALL, 3)
    with pytest.raises(ConfigError, match=message):
        Distiller(student, teacher, **settings)


# ----- end to end on tiny digits ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml) -> Path:
    root = tmp_path_factory.mktemp("distill_frcnn")
    write_digits_yaml(root, num_train=8, num_val=4)
    return root


def checkpoint_of(root: Path, model_yaml: Path | str, name: str) -> Path:
    """A random-weights checkpoint (these tests check mechanics, not accuracy)."""
    torch.manual_seed(0)
    path = root / f"{name}.pt"
    ckpt = make_checkpoint(build_detector(model_yaml, NC), epoch=-1, best_fitness=None,
                           names={i: str(i) for i in range(NC)}, train_args={})
    save_checkpoint(ckpt, path)
    return path


class StopAfterFirstEpoch(Exception):
    """Raised from a callback to leave the resumable last.pt of epoch 1 behind."""


def distil_args(work: Path, name: str, **overrides):
    """2 epochs of 2 iterations (batch 4 of 8 images), validation every epoch (it samples RoIs too)."""
    settings = {"data": str(work / "data.yaml"), "imgsz": 64, "batch": 4, "epochs": 2, "workers": 0,
                "device": "cpu", "project": str(work / "runs"), "name": name, "plots": False, "exist_ok": True}
    return get_args({**settings, **overrides}, mode="distill")


def final_state(trainer: DistillTrainer) -> dict[str, torch.Tensor]:
    """The student's and the width adapters' tensors (the Distiller's state, no teacher), and the EMA's if any."""
    ema = {f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()} if trainer.ema is not None else {}
    return {**trainer.loss_module.state_dict(), **ema}


def results_rows(run_dir: Path) -> list[dict[str, str]]:
    """results.csv without its wall-clock column."""
    with open(run_dir / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(work) -> DistillTrainer:
    """One uninterrupted crosskd+pkd run (a 96 wide teacher, so both width adapters train), finished."""
    teacher = checkpoint_of(work, wide_yaml(work), "frcnn_teacher")
    trainer = DistillTrainer(distil_args(work, "frcnn", teacher=str(teacher), model=SMALL, kd="crosskd+pkd"))
    trainer.train()
    return trainer


def test_distil_run_writes_kd_columns_and_student_only_best(uninterrupted):
    trainer = uninterrupted
    rows = results_rows(trainer.save_dir)
    assert len(rows) == 2
    for key in ("kd_cls", "kd_reg", "kd_feat"):
        assert all(math.isfinite(float(row[f"train/{key}_loss"])) for row in rows)
    last = load_checkpoint(trainer.weights_dir / "last.pt")
    assert last["kd_args"]["head_type"] == "faster_rcnn" and last["kd_args"]["kd"] == "crosskd+pkd"
    assert set(last[KD_STATE_KEY]) == {"crosskd", "pkd"}  # both 64 -> 96 width adapters
    best = load_checkpoint(trainer.weights_dir / "best.pt")
    assert KD_STATE_KEY not in best
    assert set(best["model"]) == set(build_detector(SMALL, NC).state_dict())


def test_resume_after_epoch_1_finishes_like_the_uninterrupted_run(work, uninterrupted):
    """Stopped after epoch 1 and resumed, the run ends with the uninterrupted run's weights (student, adapters;
    rtol 1e-5, as the dense resume tests) and results.csv: the RPN and R-CNN samplers draw from torch's generator,
    whose state last.pt restores."""
    stopped = DistillTrainer(distil_args(work, "frcnn-stopped", teacher=str(work / "frcnn_teacher.pt"), model=SMALL,
                                         kd="crosskd+pkd"))

    def stop(trainer: DistillTrainer) -> None:
        raise StopAfterFirstEpoch

    stopped.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(StopAfterFirstEpoch):
        stopped.train()
    resumed = DistillTrainer(distil_args(work, "ignored", resume=str(stopped.weights_dir / "last.pt")))
    resumed.train()
    assert resumed.state.start_epoch == 1 and resumed.save_dir == stopped.save_dir
    expected = final_state(uninterrupted)
    state = final_state(resumed)
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-7)
    assert results_rows(resumed.save_dir) == results_rows(uninterrupted.save_dir)


def test_cli_refuses_a_dense_teacher_for_a_faster_rcnn_student(work):
    teacher = checkpoint_of(work, "gfl_r18t.yaml", "gfl_teacher")
    result = subprocess.run(
        [sys.executable, "-m", "crosskd", "distill", f"teacher={teacher}", f"model={SMALL}",
         f"data={work / 'data.yaml'}", "imgsz=64", "epochs=1", "workers=0", "device=cpu", f"project={work / 'cli'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the teacher is a dense detector (gfl) and the student a two-stage detector (faster_rcnn)" in (
        result.stdout + result.stderr)
    assert "Traceback" not in result.stderr
