"""Every KD recipe against values computed by hand (plain Python math on tiny tensors)."""

import math

import pytest
import torch

from crosskd.config import get_args
from crosskd.distill import resolve_kd_weights
from crosskd.distill.kd_losses import (
    DEFAULT_WEIGHTS,
    KDInputs,
    KDOptions,
    KDWeights,
    atss_kd,
    fcos_kd,
    feature_kd,
    gfl_kd,
    keep_branch,
    ld_loss,
    renamed,
    retina_kd,
)
from crosskd.distill.registry import components
from crosskd.errors import ConfigError
from crosskd.models.heads.base import FlatOutputs, Priors, Targets

TOL = 1e-6


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def qfl(p: float, t: float, beta: float = 1.0) -> float:
    """KD quality focal loss of one logit pair (beta 0: plain soft-target BCE)."""
    target = sig(t)
    bce = -(target * math.log(sig(p)) + (1 - target) * math.log(1 - sig(p)))
    return bce * abs(sig(p) - target) ** beta


def kl(p: list[float], t: list[float], temp: float = 1.0) -> list[float]:
    """Per-bin KL terms of softmax(t/T) ‖ softmax(p/T)."""
    ps = [math.exp(v / temp) for v in p]
    ts = [math.exp(v / temp) for v in t]
    ps, ts = [v / sum(ps) for v in ps], [v / sum(ts) for v in ts]
    return [ti * (math.log(ti) - math.log(pi)) for pi, ti in zip(ps, ts)]


def box_iou_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou, iou - (hull - union) / hull


class AddDecoder:
    """A stand-in head whose regression outputs are xyxy offsets added to the prior boxes."""

    def decode_boxes(self, reg: torch.Tensor, priors: Priors) -> torch.Tensor:
        return priors.boxes + reg


def make_targets(pos: list[bool], label_weights: list[float], num_pos: float, denorm: float | None = None) -> Targets:
    n = len(pos)
    pos_mask = torch.tensor([pos])
    assigned = torch.where(pos_mask, 0, -1)
    return Targets(
        assigned_gt=assigned, labels=torch.where(pos_mask, 0, -1), label_weights=torch.tensor([label_weights]),
        box_targets=torch.zeros(1, n, 4), pos_mask=pos_mask, num_pos=torch.tensor(num_pos),
        centerness_denorm=None if denorm is None else torch.tensor(denorm),
    )


PRIORS = Priors(
    boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]]),
    points=torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0]]),
    strides=torch.tensor([8.0, 8.0, 8.0]),
    num_per_level=[3],
)
P_CLS = [[0.2, -1.0], [1.5, 0.3], [-0.7, 2.0]]
T_CLS = [[0.9, -2.0], [0.1, 0.4], [-1.2, 1.0]]
P_BOX = [[0.5, -0.5, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0], [1.0, 1.0, 0.5, -0.5]]
T_BOX = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [-0.5, 0.5, 1.5, 0.0]]


def box_inputs(targets: Targets, p_ctr=None, t_ctr=None) -> KDInputs:
    def ctr(values: list[float] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor([values])

    pred = FlatOutputs(torch.tensor([P_CLS]), torch.tensor([P_BOX]), ctr(p_ctr))
    target = FlatOutputs(torch.tensor([T_CLS]), torch.tensor([T_BOX]), ctr(t_ctr))
    return KDInputs(pred, target, PRIORS, targets)


def decoded(i: int, offsets: list[list[float]]) -> list[float]:
    return [b + o for b, o in zip(PRIORS.boxes[i].tolist(), offsets[i])]


def hand_cls(weights: list[float], beta: float = 1.0) -> float:
    return sum(w * qfl(p, t, beta) for w, ps, ts in zip(weights, P_CLS, T_CLS) for p, t in zip(ps, ts))


def hand_w(mask: list[float]) -> list[float]:
    return [m * sig(max(ts)) for m, ts in zip(mask, T_CLS)]


def test_retina_recipe_matches_hand_values():
    label_weights = [1.0, 0.0, 1.0]  # the middle anchor is in the ignore band
    targets = make_targets([True, False, False], label_weights, num_pos=7.0)  # num_pos of targets is not used
    out = retina_kd(box_inputs(targets), AddDecoder(), KDWeights(cls=1.0, reg=1.0))
    avg = 1.0  # one image with one positive: max(1, 1)
    w = hand_w(label_weights)
    giou = [1 - box_iou_giou(decoded(i, P_BOX), decoded(i, T_BOX))[1] for i in range(3)]
    assert out["kd_cls"].item() == pytest.approx(hand_cls(label_weights) / avg, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(sum(a * b for a, b in zip(w, giou)) / avg, abs=TOL)


def test_retina_normaliser_counts_at_least_one_per_image():
    pos_mask = torch.tensor([[True, True, False], [False, False, False]])  # 2 positives, then an empty image
    targets = Targets(torch.where(pos_mask, 0, -1), torch.where(pos_mask, 0, -1), torch.ones(2, 3),
                      torch.zeros(2, 3, 4), pos_mask, torch.tensor(1.0))
    flat = box_inputs(targets)
    two = [FlatOutputs(f.cls.repeat(2, 1, 1), f.reg.repeat(2, 1, 1), None) for f in flat[:2]]
    out = retina_kd(KDInputs(two[0], two[1], PRIORS, targets), AddDecoder(), KDWeights(cls=1.0, reg=1.0))
    assert out["kd_cls"].item() == pytest.approx(2 * hand_cls([1.0, 1.0, 1.0]) / 3, abs=TOL)  # 2 + max(0, 1)


def test_gfl_recipe_matches_hand_values():
    bins = 3
    torch.manual_seed(0)
    p_reg, t_reg = torch.randn(1, 3, 4 * bins), torch.randn(1, 3, 4 * bins)
    label_weights = [1.0, 1.0, 0.0]
    targets = make_targets([True, False, False], label_weights, num_pos=2.0)
    inputs = KDInputs(FlatOutputs(torch.tensor([P_CLS]), p_reg, None), FlatOutputs(torch.tensor([T_CLS]), t_reg, None),
                      PRIORS, targets)
    out = gfl_kd(inputs, AddDecoder(), KDWeights(cls=1.0, reg=4.0))
    w = hand_w(label_weights)
    kl_sum = 0.0
    for i in range(3):
        for side in range(4):
            sl = slice(side * bins, (side + 1) * bins)
            kl_sum += w[i] * sum(kl(p_reg[0, i, sl].tolist(), t_reg[0, i, sl].tolist()))
    assert out["kd_cls"].item() == pytest.approx(hand_cls(label_weights) / 2.0, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(4.0 * kl_sum / 4 / sum(w), abs=TOL)


def test_atss_recipe_matches_hand_values():
    label_weights = [1.0, 0.0, 1.0]  # the middle anchor lies in another image's padding
    pos = [True, False, True]
    p_ctr, t_ctr = [0.3, -1.0, 1.2], [1.0, 0.5, -0.4]
    targets = make_targets(pos, label_weights, num_pos=2.5)
    out = atss_kd(box_inputs(targets, p_ctr, t_ctr), AddDecoder(), KDWeights(cls=1.0, reg=1.0, ctr=1.0))
    w = hand_w(label_weights)
    giou = [1 - box_iou_giou(decoded(i, P_BOX), decoded(i, T_BOX))[1] for i in range(3)]
    bce = [-(sig(t) * math.log(sig(p)) + (1 - sig(t)) * math.log(1 - sig(p))) for p, t in zip(p_ctr, t_ctr)]
    assert out["kd_cls"].item() == pytest.approx(hand_cls(label_weights) / 2.5, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(sum(a * b for a, b in zip(w, giou)) / 2.5, abs=TOL)
    assert out["kd_ctr"].item() == pytest.approx((bce[0] + bce[2]) / 2.5, abs=TOL)


def test_fcos_recipe_matches_hand_values():
    valid = [1.0, 1.0, 0.0]  # FCOS has no ignore band: label weight 0 only for the point in another image's padding
    targets = make_targets([True, False, False], valid, num_pos=1.0, denorm=0.8)
    out = fcos_kd(box_inputs(targets), AddDecoder(), KDWeights(cls=0.4, reg=0.75))
    w = hand_w(valid)
    iou = [-math.log(box_iou_giou(decoded(i, P_BOX), decoded(i, T_BOX))[0]) for i in range(3)]
    assert out["kd_cls"].item() == pytest.approx(0.4 * hand_cls(valid) / 0.8, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(0.75 * sum(a * b for a, b in zip(w, iou)) / 0.8, abs=TOL)


def test_ld_matches_hand_values():
    bins = 3
    torch.manual_seed(1)
    p_reg, t_reg = torch.randn(1, 3, 4 * bins), torch.randn(1, 3, 4 * bins)
    targets = make_targets([True, False, True], [1.0, 1.0, 1.0], num_pos=2.0)
    student = FlatOutputs(torch.tensor([P_CLS]), p_reg, None)
    out = ld_loss(student, FlatOutputs(torch.tensor([T_CLS]), t_reg, None), targets, weight=0.25)
    w = [sig(max(P_CLS[i])) if i in (0, 2) else 0.0 for i in range(3)]
    total = 0.0
    for i in range(3):
        for side in range(4):
            sl = slice(side * bins, (side + 1) * bins)
            terms = kl(p_reg[0, i, sl].tolist(), t_reg[0, i, sl].tolist(), temp=10.0)
            total += w[i] * sum(terms) / bins * 100.0  # mean over bins × T²
    assert out.item() == pytest.approx(0.25 * total / 4, abs=TOL)  # avg_factor=4.0 only, not 4·Σw


def test_pkd_sums_levels_of_standardised_mse():
    torch.manual_seed(2)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]

    def standardise(x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, B*H*W]
        mean = flat.mean(1)
        std = ((flat - mean[:, None]) ** 2).sum(1).div(flat.shape[1] - 1).sqrt()
        return (x - mean[None, :, None, None]) / (std[None, :, None, None] + 1e-6)

    expected = sum(((standardise(a) - standardise(b)) ** 2).mean().item() / 2 for a, b in zip(s, t))
    assert feature_kd(s, t, weight=6.0).item() == pytest.approx(6.0 * expected, abs=TOL)


def test_identical_predictions_give_zero_kd():
    targets = make_targets([True, False, True], [1.0, 1.0, 1.0], num_pos=2.0)
    same = FlatOutputs(torch.tensor([T_CLS]), torch.tensor([T_BOX]), torch.tensor([[0.1, 0.2, 0.3]]))
    out = atss_kd(KDInputs(same, same, PRIORS, targets), AddDecoder(), DEFAULT_WEIGHTS["atss"])
    assert out["kd_cls"].item() == pytest.approx(0.0, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(0.0, abs=TOL)


def test_weights_defaults_overrides_and_global_scale():
    assert resolve_kd_weights("gfl") == KDWeights(cls=1.0, reg=4.0, feat=6.0)
    assert resolve_kd_weights("yolo") == resolve_kd_weights("gfl")  # 4x measured no better (docs/results.md)
    assert resolve_kd_weights("fcos", reg=1.5, kd_weight=2.0) == KDWeights(cls=0.8, reg=3.0, feat=4.0)
    assert resolve_kd_weights("atss", kd="ld").reg == 0.25
    assert resolve_kd_weights("retinanet").feat == 2.0


def test_pkd_alone_takes_mmrazors_weight_and_ld_its_own_beside_crosskd():
    assert resolve_kd_weights("gfl", kd="pkd").feat == 10.0  # MMRazor's RetinaNet/FCOS PKD configs
    assert resolve_kd_weights("gfl", kd="crosskd+pkd").feat == 6.0  # CrossKD+PKD's GFL config
    both = resolve_kd_weights("gfl", kd="crosskd+ld", kd_weight=2.0)
    assert (both.reg, both.ld) == (8.0, 0.5)  # CrossKD's DFL-KL weight 4 and LD's 0.25, both × kd_weight
    assert resolve_kd_weights("gfl", kd="ld", reg=0.5).ld == 0.5
    assert resolve_kd_weights("gfl").ld == 0.0


def test_parse_kd_rejects_unknown_method():
    assert components("CrossKD+PKD") == ("pkd", "crosskd")
    assert components("none") == ()
    with pytest.raises(ConfigError, match="kd='fitnet' is not a distillation method"):
        components("fitnet")


def test_bce_cls_loss_is_the_qfl_recipe_with_beta_zero():
    label_weights = [1.0, 0.0, 1.0]
    targets = make_targets([True, False, False], label_weights, num_pos=2.0)
    qfl_out = atss_kd(box_inputs(targets, [0.0] * 3, [0.0] * 3), AddDecoder(), KDWeights(cls=1.0, reg=1.0))
    options = KDOptions(cls_loss="bce")
    bce_out = atss_kd(box_inputs(targets, [0.0] * 3, [0.0] * 3), AddDecoder(), KDWeights(cls=1.0, reg=1.0), options)
    assert bce_out["kd_cls"].item() == pytest.approx(hand_cls(label_weights, beta=0.0) / 2.0, abs=TOL)
    assert bce_out["kd_cls"].item() > qfl_out["kd_cls"].item()  # |σp − σt| < 1 shrinks every QFL term
    assert bce_out["kd_reg"].item() == pytest.approx(qfl_out["kd_reg"].item(), abs=TOL)


@pytest.mark.parametrize("region, mask", [("all", [1.0, 0.0, 1.0]), ("pos", [1.0, 0.0, 0.0]), ("neg", [0.0, 0.0, 1.0])])
def test_kd_region_restricts_every_term_to_the_valid_positives_or_negatives(region, mask):
    label_weights = [1.0, 0.0, 1.0]  # the middle prior is ignored: in no region
    p_ctr, t_ctr = [0.3, -1.0, 1.2], [1.0, 0.5, -0.4]
    targets = make_targets([True, False, False], label_weights, num_pos=2.0)
    out = atss_kd(box_inputs(targets, p_ctr, t_ctr), AddDecoder(), KDWeights(1.0, 1.0, 1.0), KDOptions(region=region))
    w = hand_w(mask)
    giou = [1 - box_iou_giou(decoded(i, P_BOX), decoded(i, T_BOX))[1] for i in range(3)]
    bce0 = -(sig(t_ctr[0]) * math.log(sig(p_ctr[0])) + (1 - sig(t_ctr[0])) * math.log(1 - sig(p_ctr[0])))
    assert out["kd_cls"].item() == pytest.approx(hand_cls(mask) / 2.0, abs=TOL)
    assert out["kd_reg"].item() == pytest.approx(sum(a * b for a, b in zip(w, giou)) / 2.0, abs=TOL)
    assert out["kd_ctr"].item() == pytest.approx(mask[0] * bce0 / 2.0, abs=TOL)  # centerness KD: positives only


def test_kd_options_reject_unknown_values_in_one_line():
    with pytest.raises(ConfigError, match="kd_cls_loss='focal' is not valid; use one of qfl, bce"):
        KDOptions(cls_loss="focal")
    with pytest.raises(ConfigError, match="kd_region='both' is not valid; use one of all, pos, neg"):
        KDOptions(region="both")


@pytest.mark.parametrize("key, good, bad", [
    ("kd_branch", "cls", "box"), ("kd_cls_loss", "bce", "focal"), ("kd_region", "neg", "both"),
    ("pkd_on", "reg", "fpn"), ("kd_strategy", "d", "e"), ("kd", "crosskd+ld", "crosskd+fitnet"),
])
def test_ablation_settings_validate_at_the_door(key, good, bad):
    assert getattr(get_args({key: good.upper()}), key) == good
    with pytest.raises(ConfigError) as error:
        get_args({key: bad})
    assert str(error.value).startswith(f"'{key}={bad}' is invalid: '{key}' must be one of ")
    assert "\n" not in str(error.value)


def test_branch_filter_and_renaming_of_a_second_method():
    losses = {"kd_cls": torch.tensor(1.0), "kd_reg": torch.tensor(2.0), "kd_ctr": torch.tensor(3.0)}
    assert set(keep_branch(losses, "cls")) == {"kd_cls"}
    assert set(keep_branch(losses, "reg")) == {"kd_reg", "kd_ctr"}
    assert keep_branch(losses, "both") is losses
    assert set(renamed(losses, "pm")) == {"pm_cls", "pm_reg", "pm_ctr"}


def test_masked_pkd_ignores_padded_positions_and_equals_plain_pkd_on_a_full_mask():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    full = torch.ones(2, 4, 4, dtype=torch.bool)
    assert feature_kd([s], [t], 1.0, [full]).item() == pytest.approx(feature_kd([s], [t], 1.0).item(), abs=TOL)
    mask = full.clone()
    mask[1, 2:, :] = False  # image 1 is half as tall
    noisy_s, noisy_t = s.clone(), t.clone()
    noisy_s[1, :, 2:] += 50.0
    noisy_t[1, :, 2:] -= 20.0
    masked = feature_kd([s], [t], 1.0, [mask]).item()
    assert feature_kd([noisy_s], [noisy_t], 1.0, [mask]).item() == pytest.approx(masked, abs=TOL)
    assert feature_kd([noisy_s], [noisy_t], 1.0).item() != pytest.approx(feature_kd([s], [t], 1.0).item(), abs=1e-3)
    kept = [torch.cat([x[0].flatten(1), x[1, :, :2].flatten(1)], 1) for x in (s, t)]  # [C, 24] each
    z = [(x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6) for x in kept]
    assert masked == pytest.approx(((z[0] - z[1]) ** 2).mean().item() / 2, abs=TOL)
