"""CrossKD and the baselines on YOLO heads: the per-level hold point, width adapters between scales and families,
gradient routing, PM / LD / Ultralytics' feature KD (sl2), the stride check against dense detectors, and analyze."""

import copy
import math

import pytest
import torch
import yaml
from test_analyze import analyze_args, save_teacher
from test_distill import tiny_batch, tiny_detector

from crosskd.distill import Distiller
from crosskd.distill.methods.sl2 import ULTRALYTICS_DIS
from crosskd.engine.tools.analyzer import run as analyze
from crosskd.errors import CheckpointError
from crosskd.models import build_detector
from crosskd.models.build import load_model_yaml

NC = 3


def tiny_yolo(family: str = "yolo11", width: float = 0.0625, seed: int = 0, nc: int = NC):
    """A YOLO of the family's layers at a made-up scale (depth 0.33, `width`, max 1024 channels): fast on a CPU."""
    cfg, _ = load_model_yaml(f"{family}.yaml")
    cfg["scales"] = {"t": [0.33, width, 1024]}
    cfg["scale"] = "t"
    torch.manual_seed(seed)
    return build_detector(cfg, nc)


def sure_teacher(width: float = 0.125, family: str = "yolo11", seed: int = 1):
    """A random teacher that behaves like a trained one in eval mode: BatchNorm statistics of the test batch (fresh
    ones let the features vanish through the depth) and class logits starting at 0, not at Ultralytics' prior for rare
    objects (whose scores of ~1e-6 would make every score-weighted KD term vanish)."""
    teacher = tiny_yolo(family, width=width, seed=seed)
    for pred in teacher.head.cls_preds:
        torch.nn.init.zeros_(pred.bias)
    for norm in teacher.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.momentum = None  # the cumulative average: one pass sets the batch's statistics
    with torch.no_grad():
        teacher.train()(tiny_batch().images)
    return teacher.eval()


def kd_only(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.startswith("kd_"))


def grads_of(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters() if p.requires_grad]


def test_default_hold_is_after_the_first_conv_of_each_branch():
    distiller = Distiller(tiny_yolo(width=0.0625), sure_teacher(), kd="crosskd")
    assert distiller.kd_idx == 1  # the reference keeps one teacher conv and the predictor (3 of 4 in GFL)
    adapter = distiller.methods["crosskd"].adapter
    student, teacher = distiller.student.head, distiller.teacher.head
    assert (adapter.cls.in_channels, adapter.cls.out_channels) == (student.cls_channels, teacher.cls_channels)
    assert (adapter.reg.in_channels, adapter.reg.out_channels) == (student.reg_channels, teacher.reg_channels)


def test_kd_gradient_reaches_the_student_up_to_the_hold_point_only():
    distiller = Distiller(tiny_yolo(), sure_teacher(), kd="crosskd")
    losses = distiller.loss(tiny_batch())
    assert {"loss_box", "loss_cls", "loss_dfl", "kd_cls", "kd_reg"} <= losses.keys()
    kd_only(losses).backward()
    head = distiller.student.head
    for level in range(3):
        assert any(grads_of(head.cls_branches[level][0])) and any(grads_of(head.reg_branches[level][0]))
        assert not any(grads_of(head.cls_branches[level][1])) and not any(grads_of(head.cls_preds[level]))
        assert not any(grads_of(head.reg_branches[level][1])) and not any(grads_of(head.reg_preds[level]))
    assert any(grads_of(distiller.student.backbone)) and all(p.grad is None for p in distiller.teacher.parameters())


def test_a_student_equal_to_its_teacher_has_no_kd_loss():
    teacher = sure_teacher(seed=3)
    student = copy.deepcopy(teacher)  # eval: BatchNorm as the teacher's, so the cross-head pass is its forward
    distiller = Distiller(student, teacher, kd="crosskd", kd_align=False)
    distiller.student.eval()
    losses = distiller.loss(tiny_batch())
    assert losses["kd_reg"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["kd_cls"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("student_family", "teacher_family"), [("yolo11", "yolov8"), ("yolov8", "yolo11")])
def test_crosskd_across_the_two_families(student_family, teacher_family):
    distiller = Distiller(tiny_yolo(student_family), sure_teacher(family=teacher_family))
    losses = distiller.loss(tiny_batch())
    assert all(math.isfinite(v.item()) for v in losses.values())
    kd_only(losses).backward()
    assert any(grads_of(distiller.methods["crosskd"].adapter))


def test_kd_idx_zero_between_scales_adapts_each_neck_level():
    distiller = Distiller(tiny_yolo(), sure_teacher(), kd="crosskd", kd_idx=0)
    adapters = distiller.methods["crosskd"].adapter
    student, teacher = distiller.student.head.level_channels, distiller.teacher.head.level_channels
    assert [(a.cls.in_channels, a.cls.out_channels) for a in adapters] == list(zip(student, teacher, strict=True))
    assert len(set(student)) == 3 and [a.reg.out_channels for a in adapters] == teacher
    kd_only(distiller.loss(tiny_batch())).backward()
    assert all(any(grads_of(adapter)) for adapter in adapters)
    assert any(grads_of(distiller.student.neck)) and not any(grads_of(distiller.student.head))


def test_per_level_adapters_round_trip_through_the_kd_state():
    saved = Distiller(tiny_yolo(), sure_teacher(), kd="crosskd", kd_idx=0).kd_state()
    torch.manual_seed(5)
    restored = Distiller(tiny_yolo(), sure_teacher(), kd="crosskd", kd_idx=0)
    restored.load_kd_state(saved)
    assert saved["crosskd"].keys() >= {"adapter.0.cls.weight", "adapter.2.reg.bias"}
    assert all(torch.equal(v, restored.kd_state()["crosskd"][k]) for k, v in saved["crosskd"].items())


def test_kd_idx_zero_between_equal_widths_works():
    distiller = Distiller(tiny_yolo(seed=0), tiny_yolo(seed=1), kd="crosskd", kd_idx=0)
    assert distiller.methods["crosskd"].adapter is None and math.isfinite(kd_only(distiller.loss(tiny_batch())).item())


def test_yolo_teacher_and_dense_student_with_other_strides_is_one_line():
    with pytest.raises(CheckpointError, match=r"teacher strides \[8, 16, 32\] \(3 levels\) differ from the student's"):
        Distiller(tiny_detector("gfl", nc=NC), tiny_yolo(), kd="crosskd")
    with pytest.raises(CheckpointError, match=r"teacher strides \[8, 16, 32, 64, 128\]"):
        Distiller(tiny_yolo(), tiny_detector("gfl", nc=NC), kd="crosskd")


def test_yolo_teacher_distils_a_dense_student_with_the_same_strides():
    student = tiny_detector("gfl", nc=NC, num_outs=3)
    distiller = Distiller(student, sure_teacher(), kd="crosskd")
    losses = distiller.loss(tiny_batch())
    assert distiller.kd_idx == 1 and {"kd_cls", "kd_reg"} <= losses.keys()
    kd_only(losses).backward()
    assert any(grads_of(student.head.cls_convs[0])) and not any(grads_of(student.head.gfl_cls))


@pytest.mark.parametrize("kd", ["pm", "ld"])
def test_prediction_baselines_on_yolo_heads(kd):
    distiller = Distiller(tiny_yolo(), sure_teacher(), kd=kd)
    losses = distiller.loss(tiny_batch())
    expected = {"kd_cls", "kd_reg"} if kd == "pm" else {"kd_reg"}
    assert expected <= losses.keys() and all(math.isfinite(losses[k].item()) for k in expected)
    kd_only(losses).backward()
    assert any(grads_of(distiller.student.head.reg_preds[0]))  # on the student's own predictions


def test_ultralytics_feature_kd_weights_neck_errors_by_teacher_scores():
    student, teacher = tiny_yolo(), sure_teacher()
    distiller = Distiller(student, teacher, kd="sl2")
    method = distiller.methods["sl2"]
    assert distiller.weights.feat == ULTRALYTICS_DIS
    assert [p[0].in_channels for p in method.projectors] == student.head.level_channels
    assert [p[2].out_channels for p in method.projectors] == teacher.head.level_channels
    batch = tiny_batch()
    losses = distiller.loss(batch)
    # by hand: Σ_level Σ (P(s) − t)² · score / (C · Σ score), × 6
    with torch.no_grad():
        s_feats, t_feats = student.extract_features(batch.images), teacher.extract_features(batch.images)
        t_cls = teacher.head(t_feats).cls_scores
        expected = 0.0
        for project, s, t, cls in zip(method.projectors, s_feats, t_feats, t_cls):
            score = cls.sigmoid().amax(1, keepdim=True)
            expected += ((project(s) - t) ** 2 * score).sum() / (score.sum() * t.shape[1])
    assert losses["kd_feat"].item() == pytest.approx(6.0 * expected.item(), rel=1e-4)
    losses["kd_feat"].backward()
    assert any(grads_of(student.neck)) and not any(grads_of(student.head))


@pytest.mark.parametrize(("kd_idx", "hold"), [(None, 1), (0, 0)])
def test_analyze_measures_a_yolo_pair(tmp_path, write_digits_yaml, kd_idx, hold):
    write_digits_yaml(tmp_path, num_train=2, num_val=4)
    cfg, _ = load_model_yaml("yolo11.yaml")
    cfg["scales"], cfg["scale"] = {"t": [0.33, 0.0625, 1024]}, "t"
    teacher_cfg = {**cfg, "scales": {"t": [0.33, 0.125, 1024]}}
    save_teacher(teacher_cfg, tmp_path / "teacher.pt", seed=0)
    student_yaml = tmp_path / "yolo_student.yaml"
    student_yaml.write_text(yaml.safe_dump(cfg))
    report = analyze(analyze_args(tmp_path, "yolo", student=str(student_yaml), kd_idx=kd_idx))
    assert [lv["level"] for lv in report["levels"]] == ["P3", "P4", "P5", "all"]
    assert report["setup"]["teacher_head"] == report["setup"]["student_head"] == "yolo"
    assert report["setup"]["kd_idx"] == hold and report["setup"]["adapter"].startswith("untrained")
    assert report["levels"][-1]["neg"]["locations"] > 0


def test_yolo_student_of_a_dense_teacher_layout_is_refused_for_pm():
    with pytest.raises(CheckpointError, match="kd=pm needs the same head"):
        Distiller(tiny_yolo(), tiny_detector("gfl", nc=NC, num_outs=3), kd="pm")


def test_distiller_loss_of_a_yolo_pair_is_deterministic():
    batch, runs = tiny_batch(), []
    for _ in range(2):
        student, teacher = tiny_yolo(), sure_teacher()
        torch.manual_seed(2)  # the width adapter's initialisation
        runs.append(Distiller(student, teacher).loss(batch))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

