"""Distiller: teacher handling, gradient flow of the cross-head pass, alignment, baselines and mismatch errors."""

import copy
from types import SimpleNamespace

import pytest
import torch

from crosskd.data import DetectionDataset, collate, load_data_yaml
from crosskd.distill import Distiller, KDWeights, align_scale
from crosskd.distill.passes import head_pass
from crosskd.engine.deployment.checkpoint import detector_from_checkpoint, load_checkpoint
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector
from crosskd.models.backbones import ResNet
from crosskd.models.dense_detector import DenseDetector
from crosskd.models.heads import ATSSHead, FCOSHead, GFLHead, RetinaHead
from crosskd.models.neck import FPN
from crosskd.utils import LOGGER

HEADS = {"gfl": GFLHead, "retinanet": RetinaHead, "atss": ATSSHead, "fcos": FCOSHead}
IMGSZ = 64


def tiny_detector(head_type: str = "gfl", nc: int = 3, feat: int = 16, stacked: int = 2, seed: int = 0,
                  num_outs: int = 5, **head_kwargs) -> DenseDetector:
    """A quarter-width ResNet-18, FPN and head of `feat` channels: fast enough for unit tests."""
    torch.manual_seed(seed)
    backbone = ResNet(depth=18, width=0.25)
    neck = FPN(backbone.out_channels, feat, num_outs=num_outs)
    strides = [8 * 2**i for i in range(num_outs)]
    head = HEADS[head_type](nc, feat, feat, stacked_convs=stacked, num_groups=4, strides=strides, **head_kwargs)
    return DenseDetector(backbone, neck, head)


def tiny_batch(batch: int = 2, seed: int = 0) -> SimpleNamespace:
    """Random images with two boxes in the first image and one in the others."""
    gen = torch.Generator().manual_seed(seed)
    gt_boxes = torch.zeros(batch, 2, 4)
    gt_labels = torch.full((batch, 2), -1)
    gt_boxes[:, 0] = torch.tensor([8.0, 8.0, 40.0, 36.0])
    gt_labels[:, 0] = torch.arange(batch) % 3
    gt_boxes[0, 1] = torch.tensor([30.0, 20.0, 60.0, 62.0])
    gt_labels[0, 1] = 2
    images = torch.rand(batch, 3, IMGSZ, IMGSZ, generator=gen)
    return SimpleNamespace(images=images, gt_boxes=gt_boxes, gt_labels=gt_labels)


def kd_args(**overrides) -> SimpleNamespace:
    """The distillation run settings at their defaults, with `overrides`."""
    settings = dict(kd="crosskd", kd_idx=None, kd_align=True, kd_weight=1.0, kd_cls_weight=None, kd_reg_weight=None,
                    kd_ctr_weight=None, kd_feat_weight=None, kd_branch="both", kd_cls_loss="qfl", kd_region="all",
                    pkd_on="neck", kd_strategy="a", kd_hold="post", valid_region="mmdet")
    return SimpleNamespace(**{**settings, **overrides})


def kd_total(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.startswith("kd_"))


def grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_teacher_is_hidden_frozen_and_always_eval():
    distiller = Distiller(tiny_detector(seed=1), tiny_detector(seed=2))
    teacher_ids = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    assert all(not p.requires_grad for p in distiller.teacher.parameters())
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    distiller.to(torch.float64)
    assert next(distiller.teacher.parameters()).dtype == torch.float64


def test_kd_gradient_reaches_only_the_student_layers_before_the_hold_point():
    student, teacher = tiny_detector(stacked=3, seed=1), tiny_detector(stacked=3, seed=2)
    distiller = Distiller(student, teacher, kd="crosskd", kd_idx=2)
    losses = distiller(tiny_batch())
    assert {"loss_cls", "loss_box", "loss_dfl", "kd_cls", "kd_reg"} <= set(losses)
    kd_total(losses).backward()
    head = student.head
    for late in (head.cls_convs[2], head.reg_convs[2], head.gfl_cls, head.gfl_reg, head.scales):
        assert grad_norm(late) == 0.0
    for early in (head.cls_convs[0], head.cls_convs[1], head.reg_convs[1], student.neck, student.backbone):
        assert grad_norm(early) > 0.0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_weights_stay_bit_identical_after_optimizer_steps():
    student, teacher = tiny_detector(seed=1), tiny_detector(seed=2)
    before = copy.deepcopy(teacher.state_dict())
    distiller = Distiller(student, teacher)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    student_before = student.head.cls_convs[0].conv.weight.detach().clone()
    for seed in range(2):
        optimizer.zero_grad()
        sum(distiller(tiny_batch(seed=seed)).values()).backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student_before, student.head.cls_convs[0].conv.weight)


@pytest.mark.parametrize("head_type", list(HEADS))
def test_student_copy_of_teacher_gives_teacher_outputs_and_zero_kd(head_type):
    teacher = tiny_detector(head_type, seed=3)
    distiller = Distiller(copy.deepcopy(teacher), teacher, kd_idx=1).eval()
    batch = tiny_batch()
    with torch.no_grad():
        feats = teacher.extract_features(batch.images)
        holds, expected = head_pass(teacher.head, feats, 1)
        cross = distiller.methods["crosskd"].cross_head(teacher.head, holds, holds)
    for got, want in zip(cross.cls_scores + cross.bbox_preds, expected.cls_scores + expected.bbox_preds):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    losses = distiller(batch)
    assert losses["kd_cls"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["kd_reg"].item() == pytest.approx(0.0, abs=1e-4)


def test_align_scale_matches_teacher_channel_statistics():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 5, 6, generator=gen) * 3 + 1
    teacher = torch.randn(2, 4, 5, 6, generator=gen) * torch.tensor([0.5, 2.0, 1.0, 4.0]).view(1, 4, 1, 1) - 2
    aligned = align_scale(student.requires_grad_(), teacher)
    dims = (0, 2, 3)
    torch.testing.assert_close(aligned.mean(dims), teacher.mean(dims), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aligned.std(dims), teacher.std(dims), atol=1e-5, rtol=1e-4)
    aligned.sum().backward()
    assert student.grad is not None


def test_align_scale_single_position_is_finite():
    aligned = align_scale(torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1))
    assert torch.isfinite(aligned).all()


def test_kd_weight_scales_every_kd_term():
    student, teacher, batch = tiny_detector(seed=1), tiny_detector(seed=2), tiny_batch()
    one = Distiller(student, teacher, weights=KDWeights(cls=1.0, reg=4.0))(batch)
    half = Distiller(student, teacher, weights=KDWeights(cls=0.5, reg=2.0))(batch)
    assert half["kd_cls"].item() == pytest.approx(one["kd_cls"].item() / 2, rel=1e-5)
    assert half["kd_reg"].item() == pytest.approx(one["kd_reg"].item() / 2, rel=1e-5)
    assert half["loss_cls"].item() == pytest.approx(one["loss_cls"].item(), rel=1e-5)


def test_from_args_uses_teacher_type_defaults_and_overrides():
    args = kd_args(kd_weight=2.0, kd_reg_weight=0.5)
    distiller = Distiller.from_args(tiny_detector("gfl", seed=1), tiny_detector("fcos", seed=2), args)
    assert distiller.weights == KDWeights(cls=0.8, reg=1.0, feat=4.0)
    assert distiller.kd_idx == 0  # FCOS default is stacked_convs - 2 = 0 for 2-conv heads


def test_heterogeneous_retinanet_teacher_distils_gfl_student():
    student, teacher = tiny_detector("gfl", seed=1), tiny_detector("retinanet", seed=2)
    distiller = Distiller(student, teacher)
    losses = distiller(tiny_batch())
    assert {"loss_cls", "loss_box", "loss_dfl", "kd_cls", "kd_reg"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    kd_total(losses).backward()
    assert grad_norm(student.backbone) > 0.0
    assert grad_norm(student.head.gfl_cls) == 0.0


def test_width_mismatch_adds_trained_adapter():
    student, teacher = tiny_detector(feat=16, seed=1), tiny_detector(feat=32, seed=2)
    distiller = Distiller(student, teacher, kd_idx=1)
    adapter = distiller.methods["crosskd"].adapter
    assert adapter is not None
    assert {"methods.crosskd.adapter.cls.weight", "methods.crosskd.adapter.reg.weight"} <= set(distiller.state_dict())
    kd_total(distiller(tiny_batch())).backward()
    assert grad_norm(adapter.cls) > 0.0 and grad_norm(adapter.reg) > 0.0
    assert Distiller(tiny_detector(seed=1), tiny_detector(seed=2)).methods["crosskd"].adapter is None


def test_mismatched_classes_and_strides_fail_with_one_line():
    with pytest.raises(CheckpointError, match="teacher has 5 classes but the student's data has 3"):
        Distiller(tiny_detector(nc=3), tiny_detector(nc=5))
    with pytest.raises(CheckpointError, match=r"teacher strides \[8, 16, 32, 64\] \(4 levels\)"):
        Distiller(tiny_detector(), tiny_detector(num_outs=4))


def test_kd_idx_out_of_range_and_default_clamp(caplog):
    with pytest.raises(ConfigError, match=r"kd_idx=3 is out of range: use an integer 0\.\.2"):
        Distiller(tiny_detector(stacked=2), tiny_detector(stacked=4), kd_idx=3)
    LOGGER.addHandler(caplog.handler)
    try:
        distiller = Distiller(tiny_detector(stacked=1), tiny_detector(stacked=4))
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert distiller.kd_idx == 1  # teacher default 3 clamped to the student's single conv
    assert "kd_idx: the default 3 exceeds the heads' 1 stacked convs, using 1" in caplog.text


def test_baselines_through_the_same_path():
    student, teacher, batch = tiny_detector(seed=1), tiny_detector(seed=2), tiny_batch()
    assert set(Distiller(student, teacher, kd="none")(batch)) == {"loss_cls", "loss_box", "loss_dfl"}
    assert set(Distiller(student, teacher, kd="pkd")(batch)) == {"loss_cls", "loss_box", "loss_dfl", "kd_feat"}
    assert set(Distiller(student, teacher, kd="ld")(batch)) == {"loss_cls", "loss_box", "loss_dfl", "kd_reg"}
    both = Distiller(student, teacher, kd="crosskd+pkd")(batch)
    assert {"kd_cls", "kd_reg", "kd_feat"} <= set(both)
    pm = Distiller(student, teacher, kd="pm")
    kd_total(pm(batch)).backward()
    assert grad_norm(student.head.gfl_cls) > 0.0  # prediction mimicking acts on the student's own predictors


def test_pm_and_ld_refuse_different_heads():
    with pytest.raises(CheckpointError, match="kd=pm needs the same head"):
        Distiller(tiny_detector("gfl"), tiny_detector("atss"), kd="pm")
    with pytest.raises(CheckpointError, match=r"kd=ld distils box distributions \(GFL, YOLO\)"):
        Distiller(tiny_detector("retinanet"), tiny_detector("retinanet"), kd="ld")


@pytest.mark.parametrize("pkd_on", ["neck", "cls"])
def test_pkd_between_widths_trains_a_connector_outside_the_student(pkd_on):
    student, teacher = tiny_detector(feat=16, seed=1), tiny_detector(feat=32, seed=2)
    distiller = Distiller(student, teacher, kd="pkd", kd_idx=1, pkd_on=pkd_on)
    connector = distiller.methods["pkd"].connector
    assert (connector.in_channels, connector.out_channels, connector.kernel_size) == (16, 32, (1, 1))
    assert {"methods.pkd.connector.weight", "methods.pkd.connector.bias"} <= set(distiller.state_dict())
    assert not any("connector" in k for k in student.state_dict())
    loss = distiller(padded_batch())["kd_feat"]
    loss.backward()
    assert torch.isfinite(loss) and grad_norm(connector) > 0.0 and grad_norm(student.neck) > 0.0
    assert Distiller(tiny_detector(seed=1), tiny_detector(seed=2), kd="pkd").methods["pkd"].connector is None


@pytest.mark.parametrize("hold", ["post", "pre"])
def test_kd_align_standardises_the_student_holds_fed_to_the_teacher_head(hold):
    """The cross-head pass gets align_scale(student hold, teacher hold) with kd_align=true, the raw hold without."""
    student, teacher, batch = tiny_detector(seed=1).eval(), tiny_detector(seed=2).eval(), tiny_batch()
    with torch.no_grad():
        s_holds, _ = head_pass(student.head, student.extract_features(batch.images), 1, hold)
        t_holds, _ = head_pass(teacher.head, teacher.extract_features(batch.images), 1, hold)
    seen, run_from = {}, teacher.head.forward_from

    def recording(cls_feat, reg_feat, level, start, **kwargs):
        if cls_feat.requires_grad:  # the cross-head pass, not the teacher's own (no_grad) pass
            seen[level] = (cls_feat.detach(), reg_feat.detach())
        return run_from(cls_feat, reg_feat, level, start, **kwargs)

    teacher.head.forward_from = recording
    losses = {}
    for align in (True, False):
        distiller = Distiller(student, teacher, kd_idx=1, kd_align=align, kd_hold=hold).eval()
        losses[align] = distiller(batch)["kd_cls"].item()
        for level, ((s_cls, s_reg), (t_cls, t_reg)) in enumerate(zip(s_holds, t_holds)):
            want = (align_scale(s_cls, t_cls), align_scale(s_reg, t_reg)) if align else (s_cls, s_reg)
            torch.testing.assert_close(seen[level][0], want[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(seen[level][1], want[1], atol=1e-5, rtol=1e-5)
    del teacher.head.forward_from
    assert not torch.allclose(align_scale(s_holds[0][0], t_holds[0][0]), s_holds[0][0], atol=1e-3)
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)


def test_kd_state_round_trips_every_methods_learnable_state():
    def build(seed: int) -> Distiller:
        student, teacher = tiny_detector(feat=16, seed=1), tiny_detector(feat=32, seed=2)
        torch.manual_seed(seed)  # the adapter's and the connector's initial weights
        return Distiller(student, teacher, kd="crosskd+pkd", kd_idx=1)

    saved = build(0).kd_state()
    assert set(saved) == {"crosskd", "pkd"}
    assert set(saved["pkd"]) == {"connector.weight", "connector.bias"}
    restored = build(1)
    assert not torch.equal(restored.kd_state()["pkd"]["connector.weight"], saved["pkd"]["connector.weight"])
    restored.load_kd_state(saved)
    for name, state in restored.kd_state().items():
        assert all(torch.equal(v, saved[name][k]) for k, v in state.items()), name


@pytest.mark.parametrize("head_type", ["gfl", "atss"])
def test_optimising_kd_alone_lowers_every_kd_term(head_type):
    student, teacher = tiny_detector(head_type, seed=1), tiny_detector(head_type, seed=2)
    distiller = Distiller(student, teacher, kd_idx=1)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    batch = tiny_batch()
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        losses = {k: v for k, v in distiller(batch).items() if k.startswith("kd_")}
        sum(losses.values()).backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert all(history[-1][k] < history[0][k] for k in history[0])


# ----- issue 12: valid flags and the paper's ablation settings ------------------------------------------------------
def padded_batch() -> SimpleNamespace:
    """A big (64×64) and a small (24×40) image in one 64×64 batch: most of image 1's input is padding."""
    batch = tiny_batch()
    batch.gt_boxes[1, 0] = torch.tensor([4.0, 4.0, 30.0, 22.0])
    batch.img_sizes = torch.tensor([[64, 64], [24, 40]])
    return batch


def perturb_map(x: torch.Tensor, img_hw: tuple[int, int], value: float) -> torch.Tensor:
    """`value` added to image 1 of a [2, C, H, W] map at the cells that start outside its (h, w)."""
    stride = IMGSZ // x.shape[-2]
    rows = torch.arange(x.shape[-2])[:, None] * stride >= img_hw[0]
    cols = torch.arange(x.shape[-1])[None, :] * stride >= img_hw[1]
    return x + value * torch.stack([torch.zeros_like(rows | cols), rows | cols])[:, None]


def perturb_padding(module: torch.nn.Module, value: float = 3.0) -> torch.utils.hooks.RemovableHandle:
    """Hook `module` so that its [2, K, H, W] output changes at image 1's padding (of the 24×40 padded_batch)."""
    return module.register_forward_hook(lambda _m, _i, out: perturb_map(out, (24, 40), value))


PREDICTORS = {"gfl": ("gfl_cls", "gfl_reg"), "retinanet": ("retina_cls", "retina_reg"),
              "atss": ("atss_cls", "atss_reg", "atss_centerness"), "fcos": ("conv_cls", "conv_reg", "conv_centerness")}


@pytest.mark.parametrize("head_type, kd", [
    ("gfl", "crosskd"), ("gfl", "pm"), ("gfl", "ld"), ("gfl", "crosskd+pm"), ("gfl", "crosskd+ld"),
    ("retinanet", "crosskd"), ("atss", "crosskd"), ("fcos", "crosskd"), ("atss", "pm"),
])
def test_predictions_at_padded_priors_change_no_loss(head_type, kd):
    """valid_region=image: predictions in another image's padding change no detection or KD loss."""
    student, teacher = tiny_detector(head_type, seed=1), tiny_detector(head_type, seed=2)
    distiller, batch = Distiller(student, teacher, kd=kd, kd_idx=1, valid_region="image"), padded_batch()
    clean = {k: v.item() for k, v in distiller(batch).items()}
    handles = [perturb_padding(getattr(model.head, name)) for model in (student, teacher)
               for name in PREDICTORS[head_type]]
    noisy = {k: v.item() for k, v in distiller(batch).items()}
    for handle in handles:
        handle.remove()
    assert clean.keys() == noisy.keys() and any(k.startswith(("kd_", "pm_", "ld_")) for k in clean)
    for key, value in clean.items():
        assert noisy[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    del batch.img_sizes  # without valid flags the same perturbation does change the losses
    plain = {k: v.item() for k, v in distiller(batch).items()}
    handles = [perturb_padding(getattr(model.head, name)) for model in (student, teacher)
               for name in PREDICTORS[head_type]]
    changed = {k: v.item() for k, v in distiller(batch).items()}
    for handle in handles:
        handle.remove()
    assert changed["loss_cls"] != pytest.approx(plain["loss_cls"], rel=1e-4)


@pytest.mark.parametrize("head_type", list(HEADS))
def test_mmdet_valid_region_counts_padding_up_to_32_and_every_fcos_point(head_type):
    """valid_region=mmdet (default): image 1 (24×40) counts as 32×64. Predictions beyond that change no loss of an
    anchor head; FCOS's detection and KD terms (the reference's: every point) change; the 24..32 band counts."""
    student, teacher = tiny_detector(head_type, seed=1), tiny_detector(head_type, seed=2)
    distiller, batch = Distiller(student, teacher, kd_idx=1), padded_batch()
    clean = {k: v.item() for k, v in distiller(batch).items()}
    strict_pair = copy.deepcopy(student), copy.deepcopy(teacher)  # a Distiller sets its heads' valid region
    strict = {k: v.item() for k, v in Distiller(*strict_pair, kd_idx=1, valid_region="image")(batch).items()}
    assert clean["kd_cls"] != pytest.approx(strict["kd_cls"], rel=1e-5)  # the regions differ
    handles = [perturb_padding_beyond(getattr(model.head, name), (32, 64)) for model in (student, teacher)
               for name in PREDICTORS[head_type]]
    noisy = {k: v.item() for k, v in distiller(batch).items()}
    for handle in handles:
        handle.remove()
    changed = {k for k in clean if noisy[k] != pytest.approx(clean[k], rel=1e-5, abs=1e-6)}
    assert changed == ({"loss_cls", "kd_cls", "kd_reg"} if head_type == "fcos" else set()), changed


def perturb_padding_beyond(module: torch.nn.Module, region_hw: tuple[int, int], value: float = 3.0):
    """Hook `module` so that its [2, K, H, W] output changes where image 1's cells start outside `region_hw`."""
    return module.register_forward_hook(lambda _m, _i, out: perturb_map(out, region_hw, value))


@pytest.mark.parametrize("pkd_on", ["neck", "cls"])
def test_features_at_padded_positions_change_no_pkd(pkd_on):
    student, teacher = tiny_detector(seed=1), tiny_detector(seed=2)
    distiller = Distiller(student, teacher, kd="crosskd+pkd", kd_idx=1, pkd_on=pkd_on, valid_region="image")
    batch = padded_batch()
    clean = distiller(batch)["kd_feat"].item()
    if pkd_on == "neck":  # every FPN output of the student
        handle = student.neck.register_forward_hook(lambda _m, _i, outs: [perturb_map(x, (24, 40), 5.0) for x in outs])
    else:  # the cls hold feature (pre-activation output of the first tower conv)
        handle = perturb_padding(student.head.cls_convs[0].norm, 5.0)
    noisy = distiller(batch)["kd_feat"].item()
    handle.remove()
    assert noisy == pytest.approx(clean, rel=1e-5)


def test_kd_branch_keeps_one_branchs_terms_with_unchanged_values():
    student, teacher, batch = tiny_detector("atss", seed=1), tiny_detector("atss", seed=2), tiny_batch()
    both = {k: v.item() for k, v in Distiller(student, teacher, kd_idx=1)(batch).items()}
    cls = Distiller(student, teacher, kd_idx=1, kd_branch="cls")(batch)
    reg = Distiller(student, teacher, kd_idx=1, kd_branch="reg")(batch)
    assert {k for k in cls if k.startswith("kd_")} == {"kd_cls"}
    assert {k for k in reg if k.startswith("kd_")} == {"kd_reg", "kd_ctr"}
    assert cls["kd_cls"].item() == pytest.approx(both["kd_cls"], rel=1e-6)
    assert reg["kd_reg"].item() == pytest.approx(both["kd_reg"], rel=1e-6)
    with pytest.raises(ConfigError, match="kd=ld has no classification term"):
        Distiller(student, teacher, kd="ld", kd_branch="cls")
    with pytest.raises(ConfigError, match="kd_branch='box' is not valid"):
        Distiller(student, teacher, kd_branch="box")


def test_crosskd_plus_pm_and_ld_keep_both_methods_terms_apart():
    student, teacher, batch = tiny_detector(seed=1), tiny_detector(seed=2), tiny_batch()
    values = {kd: {k: v.item() for k, v in Distiller(student, teacher, kd=kd, kd_idx=1)(batch).items()}
              for kd in ("crosskd", "pm", "ld", "crosskd+pm", "crosskd+ld")}
    assert set(values["crosskd+pm"]) == set(values["crosskd"]) | {"pm_cls", "pm_reg"}
    assert set(values["crosskd+ld"]) == set(values["crosskd"]) | {"ld_reg"}
    for combo in ("crosskd+pm", "crosskd+ld"):
        assert all(values[combo][k] == pytest.approx(v, rel=1e-6) for k, v in values["crosskd"].items())
    assert values["crosskd+pm"]["pm_cls"] == pytest.approx(values["pm"]["kd_cls"], rel=1e-6)
    assert values["crosskd+pm"]["pm_reg"] == pytest.approx(values["pm"]["kd_reg"], rel=1e-6)
    assert values["crosskd+ld"]["ld_reg"] == pytest.approx(values["ld"]["kd_reg"], rel=1e-6)


def test_kd_region_pos_and_neg_partition_the_all_region():
    student, teacher, batch = tiny_detector("atss", seed=1), tiny_detector("atss", seed=2), tiny_batch()
    out = {r: Distiller(student, teacher, kd_idx=1, kd_region=r)(batch) for r in ("all", "pos", "neg")}
    for key in ("kd_cls", "kd_reg"):  # ATSS normalises by num_pos, so the two regions add up
        assert (out["pos"][key] + out["neg"][key]).item() == pytest.approx(out["all"][key].item(), rel=1e-5)
        assert 0 < out["pos"][key].item() < out["all"][key].item()
    assert out["neg"]["kd_ctr"].item() == 0.0 and out["pos"]["kd_ctr"].item() == out["all"]["kd_ctr"].item()
    bce = Distiller(student, teacher, kd_idx=1, kd_cls_loss="bce")(batch)
    assert bce["kd_cls"].item() > out["all"]["kd_cls"].item()
    assert bce["kd_reg"].item() == pytest.approx(out["all"]["kd_reg"].item(), rel=1e-6)


@pytest.mark.parametrize("pkd_on, trained, untouched", [("neck", "neck", None), ("cls", "cls_convs", "reg_convs"),
                                                        ("reg", "reg_convs", "cls_convs")])
def test_pkd_on_picks_the_imitated_features(pkd_on, trained, untouched):
    student, teacher = tiny_detector(stacked=3, seed=1), tiny_detector(stacked=3, seed=2)
    distiller = Distiller(student, teacher, kd="pkd", kd_idx=2, pkd_on=pkd_on)
    distiller(tiny_batch())["kd_feat"].backward()
    owner = student if trained == "neck" else student.head
    assert grad_norm(getattr(owner, trained)) > 0.0
    if untouched is not None:
        assert grad_norm(getattr(student.head, untouched)) == 0.0
        assert grad_norm(student.head.cls_convs[2]) == 0.0  # only the tower up to kd_idx is imitated


def test_pkd_alone_uses_mmrazors_four_levels_and_weight():
    from crosskd.distill.kd_losses import feature_kd

    student, teacher, batch = tiny_detector(seed=1), tiny_detector(seed=2), tiny_batch()
    alone, with_cross = Distiller(student, teacher, kd="pkd"), Distiller(student, teacher, kd="crosskd+pkd")
    assert (alone.weights.feat, with_cross.weights.feat) == (10.0, 6.0)
    with torch.no_grad():
        s, t = student.extract_features(batch.images), teacher.extract_features(batch.images)
        assert alone(batch)["kd_feat"].item() == pytest.approx(feature_kd(s[:4], t[:4], 10.0).item(), rel=1e-5)
        assert with_cross(batch)["kd_feat"].item() == pytest.approx(feature_kd(s, t, 6.0).item(), rel=1e-5)


@pytest.mark.parametrize("strategy, own_head, early", [("a", False, True), ("b", True, True), ("c", True, True),
                                                       ("d", True, False)])
def test_kd_strategies_route_the_kd_gradient_as_fig7(strategy, own_head, early):
    student, teacher = tiny_detector(stacked=3, seed=1), tiny_detector(stacked=3, seed=2)
    distiller = Distiller(student, teacher, kd_idx=2, kd_strategy=strategy)
    losses = distiller(tiny_batch())
    kd_total(losses).backward()
    assert kd_total(losses).item() > 0
    assert (grad_norm(student.head.gfl_cls) > 0.0) == own_head  # KD at the student's own predictors?
    assert (grad_norm(student.backbone) > 0.0) == early  # does KD reach the backbone?
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("strategy", ["a", "b", "c", "d"])
def test_every_strategy_is_zero_for_a_copy_of_the_teacher(strategy):
    teacher = tiny_detector(seed=3)
    losses = Distiller(copy.deepcopy(teacher), teacher, kd_idx=1, kd_strategy=strategy).eval()(tiny_batch())
    assert losses["kd_cls"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["kd_reg"].item() == pytest.approx(0.0, abs=1e-4)


def test_strategies_check_their_inputs_in_one_line():
    with pytest.raises(ConfigError, match="kd_strategy=c is a cross-head strategy: use it with kd=crosskd"):
        Distiller(tiny_detector(), tiny_detector(), kd="pm", kd_strategy="c")
    with pytest.raises(CheckpointError, match="kd_strategy=b needs the same head on both sides"):
        Distiller(tiny_detector("gfl"), tiny_detector("atss"), kd_strategy="b")
    with pytest.raises(CheckpointError, match="kd_strategy=d needs equal head widths at kd_idx=1"):
        Distiller(tiny_detector(feat=16), tiny_detector(feat=32), kd_idx=1, kd_strategy="d")
    with pytest.raises(CheckpointError, match="kd_strategy=c needs equal head widths at kd_idx=1"):
        Distiller(tiny_detector(feat=16), tiny_detector(feat=32), kd_idx=1, kd_strategy="c")


def test_settings_record_every_ablation_key_for_checkpoints():
    distiller = Distiller.from_args(tiny_detector(seed=1), tiny_detector(seed=2),
                                    kd_args(kd="crosskd+ld", kd_branch="reg", kd_region="pos", kd_strategy="c"))
    saved = distiller.settings()
    assert {k: saved[k] for k in ("kd", "kd_branch", "kd_cls_loss", "kd_region", "pkd_on", "kd_strategy")} == {
        "kd": "crosskd+ld", "kd_branch": "reg", "kd_cls_loss": "qfl", "kd_region": "pos", "pkd_on": "neck",
        "kd_strategy": "c"}
    assert saved["kd_weights"]["ld"] == 0.25


@pytest.mark.parametrize("strategy", ["a", "d"])
def test_teacher_under_inference_mode_feeds_every_strategy_at_hold_point_zero(strategy):
    distiller = Distiller(tiny_detector(seed=1), tiny_detector(seed=2), kd_idx=0, kd_align=False, kd_strategy=strategy)
    losses = distiller(tiny_batch())
    sum(losses.values()).backward()  # teacher FPN outputs (inference_mode) may not be saved for backward as they are
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.head.parameters())


def test_priors_are_cached_per_size_and_device_and_usable_after_inference_mode():
    head = tiny_detector(seed=1).head
    with torch.inference_mode():
        first = head.priors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], "cpu")
    again = head.priors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], torch.device("cpu"))
    assert again is first and not first.boxes.is_inference()
    fresh = head.make_priors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], "cpu")
    assert torch.equal(fresh.boxes, first.boxes) and torch.equal(fresh.strides, first.strides)
    assert head.priors([(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)], "cpu").boxes.shape[0] < first.boxes.shape[0]


# ----- distillation helps ---------------------------------------------------------------------------------------
KD_STEPS = 20


def train_student(teacher: DenseDetector, batch, kd: str, seed: int) -> DenseDetector:
    """The TINY_GFL student from `seed`, KD_STEPS AdamW steps on `batch` as a Distiller with `kd`."""
    from conftest import TINY_GFL, fit

    torch.manual_seed(seed)
    return fit(Distiller(build_detector(TINY_GFL, nc=teacher.nc), teacher, kd=kd), batch, KD_STEPS).student


def crosskd_terms(student: DenseDetector, teacher: DenseDetector, batch) -> float:
    """kd_cls + kd_reg of the teacher head on the student's hold features against the teacher: one yardstick for
    students trained with and without distillation."""
    with torch.no_grad():
        losses = Distiller(student, teacher, kd="crosskd").eval().loss(batch)
    return float(losses["kd_cls"] + losses["kd_reg"])


def test_a_crosskd_student_matches_its_teacher_far_better_than_one_trained_alone(trained_digits):
    """The fixture's overfitted GFL teaches a fresh student of its size on its 4 images for 20 steps: with CrossKD
    the KD terms end 5-20x below those of the same student, seed and steps with kd=none (seeds 1-4: at most 0.25x)."""
    teacher = detector_from_checkpoint(load_checkpoint(trained_digits.weights))
    dataset = DetectionDataset(load_data_yaml(trained_digits.data), "val", 128, augment=False, pad_multiple=128)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_multiple=128).to("cpu")
    distilled = crosskd_terms(train_student(teacher, batch, "crosskd", seed=1), teacher, batch)
    alone = crosskd_terms(train_student(teacher, batch, "none", seed=1), teacher, batch)
    assert distilled < 0.4 * alone, (distilled, alone)
