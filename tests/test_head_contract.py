"""The head contract: tower norms and activations, per-branch widths and depths, YAML-chosen assigners that see the
head's decoded predictions, the shared DFL piece, and the CrossKD seam through all of them."""

from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import Tensor, nn

from crosskd.assigners import ASSIGNERS, Assigner, AssignResult, ATSSAssigner, FCOSAssigner, MaxIoUAssigner, Predictions
from crosskd.distill import Distiller
from crosskd.errors import ConfigError
from crosskd.losses.dfl import DFL
from crosskd.models import build_detector
from crosskd.models.heads import ATSSHead, FCOSHead, GFLHead, RetinaHead
from crosskd.ops.boxes import Priors

NC = 3
STRIDES = [8, 16, 32, 64, 128]
FEAT_SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64×64 input
HEADS = {"gfl": GFLHead, "retinanet": RetinaHead, "fcos": FCOSHead, "atss": ATSSHead}
ONE_GT = SimpleNamespace(
    gt_boxes=torch.tensor([[[8.0, 12.0, 40.0, 44.0]], [[20.0, 4.0, 52.0, 60.0]]]), gt_labels=torch.tensor([[1], [2]])
)
UNEVEN = {"cls_channels": 8, "reg_channels": 24, "cls_depth": 1, "reg_depth": 3}  # towers of other width and depth


def make_head(kind: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    settings = {"feat_channels": 16, "stacked_convs": 2, "num_groups": 4, **kwargs}
    head = HEADS[kind](NC, 16, **settings)
    for scale in head.scales or []:  # non-trivial scales so that a missing Scale would show
        nn.init.constant_(scale.scale, 1.5)
    return head


def make_feats(batch: int = 2) -> list[Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, 16, h, w) for h, w in FEAT_SIZES]


def assert_seam(head: nn.Module, feats: list[Tensor]) -> None:
    """`forward` equals `forward_from ∘ forward_tower` at every hold index, bit for bit."""
    full = head(feats)
    for start in range(head.stacked_convs + 1):
        for level, x in enumerate(feats):
            cls_feat, reg_feat = head.forward_tower(x, start)
            assert (cls_feat.shape[1], reg_feat.shape[1]) == head.hold_channels(start)
            out = head.forward_from(cls_feat, reg_feat, level, start)
            assert torch.equal(out.cls_score, full.cls_scores[level])
            assert torch.equal(out.bbox_pred, full.bbox_preds[level])
            if full.centerness is not None:
                assert torch.equal(out.centerness, full.centerness[level])


def train_one_step(head: nn.Module) -> dict[str, Tensor]:
    """One SGD step on ONE_GT; returns the losses and checks that every tower conv moved."""
    feats = make_feats()
    before = [block.conv.weight.clone() for block in [*head.cls_convs, *head.reg_convs]]
    outputs = head(feats)
    priors = head.priors(FEAT_SIZES, "cpu")
    losses = head.loss(outputs, priors, head.get_targets(priors, ONE_GT, outputs))
    sum(losses.values()).backward()
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    after = [block.conv.weight for block in [*head.cls_convs, *head.reg_convs]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    return losses


# ----- tower blocks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize(
    ("options", "norm_type", "act_type", "has_bias"),
    [
        ({"norm": "bn"}, nn.BatchNorm2d, nn.ReLU, False),
        ({"norm": "none"}, nn.Identity, nn.ReLU, True),
        ({"norm": "gn", "act": "silu"}, nn.GroupNorm, nn.SiLU, False),
        ({"norm": "bn", "act": "silu", "conv_bias": True}, nn.BatchNorm2d, nn.SiLU, True),
    ],
)
def test_tower_norm_and_activation_build_train_and_keep_the_seam(kind, options, norm_type, act_type, has_bias):
    head = make_head(kind, **options)
    blocks = [*head.cls_convs, *head.reg_convs]
    assert len(blocks) == 4
    assert all(type(b.norm) is norm_type and type(b.act) is act_type for b in blocks)
    assert all((b.conv.bias is not None) == has_bias for b in blocks)
    losses = train_one_step(head)
    assert all(torch.isfinite(v) for v in losses.values()) and sum(losses.values()) > 0
    head.eval()  # BatchNorm running statistics: the identity holds in both modes
    assert_seam(head, make_feats())
    head.train()
    assert_seam(head, make_feats())


@pytest.mark.parametrize("kind", HEADS)
def test_uneven_towers_have_their_own_width_and_depth_and_keep_the_seam(kind):
    head = make_head(kind, **UNEVEN)
    assert (len(head.cls_convs), len(head.reg_convs), head.stacked_convs) == (1, 3, 3)
    assert [b.conv.out_channels for b in head.cls_convs] == [8]
    assert [b.conv.out_channels for b in head.reg_convs] == [24, 24, 24]
    assert [head.hold_channels(i) for i in range(4)] == [(16, 16), (8, 24), (8, 24), (8, 24)]
    x = make_feats()[0]
    cls_deep, _ = head.forward_tower(x, 3)  # past its depth the cls tower stays at its last pre-activation
    assert torch.equal(cls_deep, head.cls_convs[0](x, activate=False))
    assert_seam(head, make_feats())
    losses = train_one_step(head)
    assert all(torch.isfinite(v) for v in losses.values())


def test_default_tower_keys_keep_todays_layout():
    head = make_head("gfl", stacked_convs=3)
    assert (head.cls_channels, head.reg_channels, head.cls_depth, head.reg_depth) == (16, 16, 3, 3)
    assert head.gfl_cls.in_channels == head.gfl_reg.in_channels == 16
    no_tower = make_head("fcos", stacked_convs=0)
    assert no_tower.hold_channels(0) == (16, 16) and no_tower.conv_cls.in_channels == 16


# ----- assigners -----------------------------------------------------------------------------------------------------
class TopScoreAssigner(Assigner):
    """Each GT takes the prior whose predicted score for its class is highest (a toy task-aligned assigner)."""

    name = "top_score"

    def __init__(self, min_score: float = 0.0) -> None:
        self.min_score = min_score
        self.seen: list[Predictions] = []

    def __call__(
        self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None, predictions: Predictions
    ) -> AssignResult:
        self.seen.append(predictions)
        scores = predictions.scores.gather(2, gt_labels.clamp(min=0)[:, None].expand(-1, priors.boxes.shape[0], -1))
        best = scores.argmax(dim=1)  # [B, M] prior index per GT
        assigned = torch.full(scores.shape[:2], -1, dtype=torch.long)  # [B, N]
        gt_index = torch.arange(gt_labels.shape[1]).expand_as(best)
        assigned.scatter_(1, best, torch.where(gt_labels >= 0, gt_index, -1))
        return AssignResult.build(assigned, gt_labels)


def tiny_cfg(head: dict) -> dict:
    return {
        "backbone": {"type": "resnet", "depth": 18, "width": 0.25},
        "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5, "add_extra_convs": "on_output"},
        "head": {"stacked_convs": 1, "feat_channels": 16, "num_groups": 4, **head},
    }


def test_a_yaml_chosen_assigner_receives_the_decoded_predictions(monkeypatch):
    monkeypatch.setitem(ASSIGNERS, "top_score", TopScoreAssigner)
    detector = build_detector(tiny_cfg({"type": "gfl", "assigner": {"type": "top_score", "min_score": 0.1}}), NC)
    head = detector.head
    assert isinstance(head.assigner, TopScoreAssigner) and head.assigner.min_score == 0.1
    outputs = head(make_feats())
    chosen = [5, 70]  # per image, the prior where the GT's class scores highest
    for image, (prior, label) in enumerate(zip(chosen, (1, 2), strict=True)):
        level = 0 if prior < 64 else 1
        index = prior - (0 if level == 0 else 64)
        width = FEAT_SIZES[level][1]
        outputs.cls_scores[level].data[image, label, index // width, index % width] = 20.0
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, ONE_GT, outputs)
    assert targets.pos_mask.sum() == 2
    assert targets.assigned_gt[0, 5] == 0 and targets.assigned_gt[1, 70] == 0
    seen = head.assigner.seen[-1]
    flat = head.flatten_outputs(outputs)
    assert torch.equal(seen.boxes, head.decode_boxes(flat.reg, priors).detach())  # [B, N, 4] xyxy
    assert torch.equal(seen.scores, head.scores(flat).detach())  # [B, N, C]
    assert not seen.boxes.requires_grad and not seen.scores.requires_grad
    with pytest.raises(ValueError, match="assigner top_score scores the predictions: call get_targets"):
        head.get_targets(priors, ONE_GT)


def test_geometric_assigners_never_decode_the_predictions(monkeypatch):
    head = make_head("gfl")
    outputs = head(make_feats())
    priors = head.priors(FEAT_SIZES, "cpu")
    expected = head.get_targets(priors, ONE_GT, outputs).assigned_gt

    def fail(*_):
        raise AssertionError("decoded")

    monkeypatch.setattr(head, "decode_boxes", fail)
    assert torch.equal(head.get_targets(priors, ONE_GT, outputs).assigned_gt, expected)


def test_the_yaml_assigner_changes_the_targets():
    atss = build_detector(tiny_cfg({"type": "gfl"}), NC).head
    max_iou = build_detector(
        tiny_cfg({"type": "gfl", "assigner": {"type": "max_iou", "pos_iou_thr": 0.3, "neg_iou_thr": 0.2}}), NC
    ).head
    assert isinstance(atss.assigner, ATSSAssigner) and atss.assigner.topk == 9
    assert isinstance(max_iou.assigner, MaxIoUAssigner) and max_iou.assigner.pos_iou_thr == 0.3
    priors = atss.priors(FEAT_SIZES, "cpu")
    by_atss = atss.get_targets(priors, ONE_GT).assigned_gt
    by_max_iou = max_iou.get_targets(priors, ONE_GT).assigned_gt
    assert (by_max_iou == -2).any() and not (by_atss == -2).any()  # max-IoU ignores its IoU band, ATSS does not
    assert not torch.equal(by_atss, by_max_iou)
    fcos_on_gfl = build_detector(tiny_cfg({"type": "gfl", "assigner": {"type": "fcos"}}), NC).head
    assert isinstance(fcos_on_gfl.assigner, FCOSAssigner)
    assert fcos_on_gfl.get_targets(priors, ONE_GT).pos_mask.any()


@pytest.mark.parametrize(
    ("kind", "assigner", "settings"),
    [
        ("gfl", ATSSAssigner, {"topk": 5}),
        ("atss", ATSSAssigner, {"topk": 7}),
        ("retinanet", MaxIoUAssigner, {"pos_iou_thr": 0.6, "neg_iou_thr": 0.3, "match_low_quality": False}),
        ("fcos", FCOSAssigner, {"center_sampling": True, "center_sample_radius": 2.0}),
    ],
)
def test_the_heads_own_assignment_keys_set_its_default_assigner(kind, assigner, settings):
    head = build_detector(tiny_cfg({"type": kind, **settings}), NC).head
    assert type(head.assigner) is assigner
    assert all(getattr(head.assigner, k) == v for k, v in settings.items())


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ({"type": "gfl", "assigner": {"type": "atts"}}, r"head.assigner.type 'atts' is not one of atss, max_iou, fcos"),
        ({"type": "gfl", "assigner": {"type": "atss", "top_k": 3}},
         r"head.assigner.top_k is not an argument of atss; did you mean 'topk'\?"),
        ({"type": "gfl", "assigner": {"type": "atss", "topk": "nine"}}, r"head.assigner.topk 'nine' must be int"),
        ({"type": "gfl", "assigner": "atss"}, r"head.assigner must be a mapping with a 'type' key"),
        ({"type": "gfl", "topk": 5, "assigner": {"type": "atss"}},
         r"head.topk sets the head's default assigner, which head.assigner replaces"),
        ({"type": "fcos", "assigner": {"type": "atss"}},
         r"head.assigner atss matches anchor boxes, but fcos has points: use an assigner that matches points"),
        ({"type": "gfl", "strides": [8, 16, 32, 64, 128], "assigner": {"type": "fcos", "regress_ranges": [[0, 64]]}},
         r"head.assigner.regress_ranges has 1 ranges for 5 strides"),
        ({"type": "gfl", "act": "gelu"}, r"head.act 'gelu' is not one of relu, silu"),
        ({"type": "gfl", "norm": "ln"}, r"head.norm 'ln' is not one of gn, bn, none"),
        ({"type": "gfl", "cls_channels": 6}, r"head.num_groups 4 must divide head.cls_channels 6"),
        ({"type": "gfl", "reg_depth": -1}, r"head.reg_depth -1 must be >= 0"),
        ({"type": "gfl", "cls_depth": "two"}, r"head.cls_depth 'two' must be int"),
        ({"type": "retinanet", "cls_chanels": 8}, r"head.cls_chanels is not an argument of retinanet; did you mean"),
    ],
)
def test_bad_head_or_assigner_key_is_one_line_config_error(tmp_path, head, message):
    cfg_path = tmp_path / "m.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(head)))
    with pytest.raises(ConfigError, match=rf"^m.yaml: {message}") as e:
        build_detector(cfg_path, nc=NC)
    assert "\n" not in str(e.value)


# ----- DFL -----------------------------------------------------------------------------------------------------------
def test_dfl_integral_and_loss_hand_values():
    dfl = DFL(reg_max=2)
    side = torch.log(torch.tensor([1.0, 2.0, 3.0]))  # bin probabilities 1/6, 2/6, 3/6
    logits = side.repeat(4)[None]  # [1, 12]
    expected = 0 * 1 / 6 + 1 * 2 / 6 + 2 * 3 / 6  # 4/3 bins per side
    torch.testing.assert_close(dfl.integral(logits), torch.full((1, 4), expected))
    points = torch.tensor([[10.0, 10.0]])
    torch.testing.assert_close(dfl.decode(points, logits), torch.tensor([[10 - expected] * 2 + [10 + expected] * 2]))
    target = torch.tensor([[9.5, 10.0, 13.0, 11.0]])  # ltrb 0.5, 0, 3 (clamped to 1.9), 1
    nll = -torch.log(torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    want = torch.stack([0.5 * nll[0] + 0.5 * nll[1], nll[0], 0.1 * nll[1] + 0.9 * nll[2], nll[1]])[None]
    torch.testing.assert_close(dfl.loss(logits, points, target), want)


def test_gfl_uses_the_shared_dfl():
    head = make_head("gfl", reg_max=7)
    assert isinstance(head.dfl, DFL) and head.dfl.reg_max == 7
    assert head.gfl_reg.out_channels == head.dfl.channels == 32


# ----- CrossKD through uneven towers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEADS)
def test_crosskd_distills_through_uneven_towers(kind):
    teacher_head = {"type": kind, "norm": "gn", "cls_channels": 16, "reg_channels": 24, "cls_depth": 2, "reg_depth": 3}
    student_head = {"type": kind, "act": "silu", "norm": "bn", **UNEVEN}
    torch.manual_seed(0)
    teacher = build_detector(tiny_cfg(teacher_head), NC)
    student = build_detector(tiny_cfg(student_head), NC)
    distiller = Distiller(student, teacher, kd="crosskd", kd_idx=2)
    adapter = distiller.methods["crosskd"].adapter  # student hold (8, 24) → teacher hold (16, 24)
    assert (adapter.cls.in_channels, adapter.cls.out_channels) == (8, 16)
    assert (adapter.reg.in_channels, adapter.reg.out_channels) == (24, 24)
    torch.manual_seed(1)
    batch = SimpleNamespace(images=torch.rand(2, 3, 64, 64), **vars(ONE_GT))
    losses = distiller(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    kd = losses["kd_cls"] + losses["kd_reg"]
    assert kd > 0
    kd.backward()
    reg_before_hold = student.head.reg_convs[1].conv.weight.grad  # reg hold is after step 2: steps 0, 1 get KD grad
    reg_after_hold = student.head.reg_convs[2].conv.weight.grad
    assert reg_before_hold is not None and reg_before_hold.abs().sum() > 0
    assert reg_after_hold is None or reg_after_hold.abs().sum() == 0
    assert student.head.cls_convs[0].conv.weight.grad.abs().sum() > 0
