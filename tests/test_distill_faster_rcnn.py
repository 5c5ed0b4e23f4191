"""CrossKD with Faster R-CNN through the Distiller and the KD method registry: the student's own losses unchanged,
KD gradient only into the student (and the width adapter), the reference's weights, one-line errors for mismatched
pairs and dense-only settings, a distillation run on tiny digits that, stopped after epoch 1 and resumed, ends like
the uninterrupted one, and 2-process torchruns: one that matches one process where sampling leaves nothing to
chance, and one stopped after epoch 1 whose resume ends like the uninterrupted run."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data.digits import generate_digits
from crosskd.distill import Distiller
from crosskd.distill.methods.crosskd_rcnn import RoICrossKD
from crosskd.engine.deployment.checkpoint import KD_STATE_KEY, load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector, load_model_yaml
from crosskd.models.two_stage import RoIHead
from crosskd.models.two_stage import roi_head as roi_head_module

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


def test_cross_head_reuses_the_students_pooled_rois_with_the_same_result(monkeypatch):
    """An equally wide pair whose R-CNN stages pool alike: the cross-head pass takes the student's own pooled RoI
    features (one RoIAlign less per step) and gives the KD terms and FPN gradients of pooling the same maps again."""
    torch.manual_seed(0)
    student, teacher = build_detector(SMALL, 3).train(), build_detector(SMALL, 3)
    with torch.no_grad():
        teacher.head.roi_head.cls.weight.normal_(0, 0.5)
    distiller = Distiller(student, teacher, kd="crosskd")
    calls, pool = [], roi_head_module.multilevel_roi_align
    monkeypatch.setattr(roi_head_module, "multilevel_roi_align", lambda *args: calls.append(1) or pool(*args))

    def run() -> tuple[dict, list, int]:
        student.zero_grad()
        calls.clear()
        batch = tiny_batch()
        torch.manual_seed(1)
        losses = distiller.loss(batch)
        (losses["kd_cls"] + losses["kd_reg"]).backward()
        grads = [p.grad.clone() for p in student.neck.parameters()]
        return {k: v.detach() for k, v in losses.items()}, grads, len(calls)

    reused = run()
    monkeypatch.setattr(RoIHead, "pools_like", lambda self, other: False)
    pooled_again = run()
    assert (reused[2], pooled_again[2]) == (2, 3)  # the student's and the teacher's own; the cross-head's again
    assert reused[0]["kd_cls"] > 0 and reused[0].keys() == pooled_again[0].keys()
    for key, value in pooled_again[0].items():
        torch.testing.assert_close(reused[0][key], value, rtol=1e-6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in reused[1])
    for ours, again in zip(reused[1], pooled_again[1], strict=True):
        torch.testing.assert_close(ours, again, rtol=1e-5, atol=1e-7)


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


def checkpoint_of(root: Path, model_yaml: Path | str | dict, name: str) -> Path:
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


# ----- DDP: two gloo processes against one -------------------------------------------------------------------------
EXHAUSTIVE_HEAD = {  # every anchor and every proposal sampled, as many per image on every image (the test's docstring)
    "rpn_anchor_scales": [2], "rpn_pos_iou_thr": 0.5, "rpn_neg_iou_thr": 0.5, "rpn_num_samples": 1024,
    "rpn_train_post_nms": 32, "rcnn_num_samples": 64, "rcnn_pos_fraction": 0.5,
}
DDP_LOSSES = ("rpn_cls", "rpn_box", "cls", "box", "kd_cls")
# results.csv keeps 5 significant digits, as test_multinode compares them; with the shipped samplers (only the anchor
# scale of EXHAUSTIVE_HEAD) the two runs differed by 7e-4 (cls) to 8e-3 (kd_cls), partly within test_ddp's 2e-3
DDP_RTOL = 2e-4


def square_digits(root: Path) -> Path:
    """data.yaml of 8 train / 4 val digits images, 2 digits each, padded to 64 x 64 (every image has the same anchors
    and valid flags)."""
    data_root = generate_digits(root / "digits", num_train=8, num_val=4, imgsz=64, objects=(2, 2), seed=0)
    for split in ("train", "val"):
        annotations = data_root / "annotations" / f"instances_{split}.json"
        coco = json.loads(annotations.read_text())
        assert len(coco["annotations"]) == 2 * len(coco["images"])
        for image in coco["images"]:
            path = data_root / "images" / split / image["file_name"]
            pad = (0, 64 - image["height"], 0, 64 - image["width"])  # bottom and right: the boxes stay
            cv2.imwrite(str(path), cv2.copyMakeBorder(cv2.imread(str(path)), *pad, cv2.BORDER_CONSTANT))
            image.update(width=64, height=64)
        annotations.write_text(json.dumps(coco))
    split = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(data_root), **split, "names": {i: str(i) for i in range(NC)},
                                    "fliplr": 0}))
    return data


def exhaustive_yaml(width: int) -> dict:
    """faster_rcnn_r18s at quarter width, FPN and RPN `width` wide, 64-wide FCs, BatchNorm statistics frozen
    (per-process batches are normalised like the whole batch) and EXHAUSTIVE_HEAD."""
    cfg, _ = load_model_yaml(SMALL)
    cfg["backbone"].update(width=0.25, norm_eval=True)
    cfg["neck"]["out_channels"] = width
    cfg["head"].update(rpn_feat_channels=width, fc_channels=64, **EXHAUSTIVE_HEAD)
    return cfg


def ddp_settings(root: Path, name: str) -> dict:
    """batch 8 = the whole train set: one SGD step per epoch over the same images in both runs."""
    return {"model": str(root / "student.pt"), "teacher": str(root / "teacher.pt"), "data": str(root / "data.yaml"),
            "kd_branch": "cls", "epochs": 3, "batch": 8, "imgsz": 64, "workers": 0, "device": "cpu",
            "warmup_iters": 0, "optimizer": "SGD", "lr0": 0.01, "val": False, "plots": False, "seed": 0,
            "project": str(root), "name": name}


def ddp_losses(run_dir: Path) -> list[list[float]]:
    return [[float(row[f"train/{key}_loss"]) for key in DDP_LOSSES] for row in results_rows(run_dir)]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """A 2-process torchrun (gloo) CrossKD distillation has the losses and the student and adapter weights of one
    process with the same total batch, where the comparison is deterministic.

    At the shipped settings it is not, by design (MMDetection's): each rank samples 256 anchors and up to 512 RoIs
    per image with its own generator (seed + rank), and the RPN, R-CNN and KD losses are normalised by the rank's
    own sample counts and teacher weights. So the model samples every candidate, the same number on every image:
    square images (the same valid anchors), equal RPN IoU thresholds (no anchor ignored), 32 proposals plus 2 ground
    truth boxes per image, samplers larger than that, and kd_branch=cls (kd_reg divides by the rank's sum of teacher
    probabilities). The 16 -> 32 width adapter is trained under DDP too.
    """
    square_digits(tmp_path)
    checkpoint_of(tmp_path, exhaustive_yaml(16), "student")
    checkpoint_of(tmp_path, exhaustive_yaml(32), "teacher")
    DistillTrainer(get_args(ddp_settings(tmp_path, "single"), "distill")).train()

    words = [f"{k}={v}" for k, v in ddp_settings(tmp_path, "ddp").items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "crosskd",
               "distill", *words]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("DDP: gloo process group of 2 processes", "DDP: find_unused_parameters=False",
                 "DDP: batch 8 = 2 processes x 4 images"):
        assert line in result.stdout

    single, distributed = ddp_losses(tmp_path / "single"), ddp_losses(tmp_path / "ddp")
    assert len(single) == len(distributed) == 3 and single[2] != single[0]
    assert all(value > 0 for value in single[0])  # positives in both stages: every loss term has a gradient
    for one, two in zip(single, distributed):
        assert two == pytest.approx(one, rel=DDP_RTOL)
    start = load_checkpoint(tmp_path / "student.pt")["model"]
    last = {run: load_checkpoint(tmp_path / run / "weights" / "last.pt") for run in ("single", "ddp")}
    weights = last["single"]["model"]  # stripped: fp16
    assert max((weights[k].float() - v).abs().max().item() for k, v in start.items() if v.is_floating_point()) > 1e-3
    for part in ("model", KD_STATE_KEY):  # the student, the width adapter
        torch.testing.assert_close(last["ddp"][part], last["single"][part], rtol=2e-3, atol=1e-4)


# A torchrun entry point: `crosskd` whose run stops resumably at the end of epoch 1, after last.pt is saved (each
# process exits 143, torchrun 1)
STOP_AFTER_EPOCH_1 = '''
import sys
from crosskd import cli
from crosskd.engine.training.run_state import RunState
stop_if_requested = RunState.stop_if_requested
def stop_after_epoch_1(self):
    if not self.in_epoch and self.trainer.epoch == 0:
        self.stop_and_save("stopped by the test", 143)
    stop_if_requested(self)
RunState.stop_if_requested = stop_after_epoch_1
cli.main(sys.argv[1:])
'''


def torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
def test_torchrun_resume_continues_each_ranks_sampling(tmp_path):
    """Under a 2-process torchrun with the shipped (random) RPN and R-CNN samplers, a distillation stopped after
    epoch 1 and resumed ends with the uninterrupted run's losses and weights: last.pt holds every rank's RNG states
    (different ones: each rank samples with its own generator) and each rank takes up its own."""
    square_digits(tmp_path)
    for name, width in (("student", 16), ("teacher", 32)):
        cfg = exhaustive_yaml(width)
        cfg["head"].update({k: v for k, v in load_model_yaml(SMALL)[0]["head"].items() if k in EXHAUSTIVE_HEAD})
        checkpoint_of(tmp_path, cfg, name)
    runs = {}
    for name, entry in (("uninterrupted", ["-m", "crosskd"]), ("stopped", ["stop_after_epoch_1.py"])):
        (tmp_path / "stop_after_epoch_1.py").write_text(STOP_AFTER_EPOCH_1)
        words = [f"{k}={v}" for k, v in {**ddp_settings(tmp_path, name), "epochs": 2}.items()]
        runs[name] = torchrun(tmp_path, *entry, "distill", *words)
    assert runs["uninterrupted"].returncode == 0, runs["uninterrupted"].stderr[-3000:]
    stopped = runs["stopped"].stdout + runs["stopped"].stderr
    assert "exitcode  : 143" in stopped and "stopped by the test: stopped at the end of epoch 1/2" in stopped, stopped
    last = tmp_path / "stopped" / "weights" / "last.pt"
    rank_rng = load_checkpoint(last)["rank_rng"]
    assert len(rank_rng) == 2 and not torch.equal(rank_rng[0]["torch"], rank_rng[1]["torch"])

    resumed = torchrun(tmp_path, "-m", "crosskd", "distill", f"resume={last}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "from epoch 2 to 2" in resumed.stdout
    assert ddp_losses(tmp_path / "stopped") == ddp_losses(tmp_path / "uninterrupted")
    final = {run: load_checkpoint(tmp_path / run / "weights" / "last.pt") for run in ("stopped", "uninterrupted")}
    for part in ("model", KD_STATE_KEY):
        torch.testing.assert_close(final["stopped"][part], final["uninterrupted"][part], rtol=0, atol=0)
