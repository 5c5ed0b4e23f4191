"""Dense heads: the CrossKD tower split, shapes, priors, flattening, targets, coders and losses."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crosskd.models.heads import ATSSHead, FCOSHead, GFLHead, HeadOutputs, RetinaHead
from crosskd.models.heads.regions import region_sizes, valid_prior_mask
from crosskd.ops.boxes import delta_xywh_encode, distance_encode

NC = 3
STRIDES = [8, 16, 32, 64, 128]
FEAT_SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64×64 input
HEADS = {"gfl": GFLHead, "retinanet": RetinaHead, "fcos": FCOSHead, "atss": ATSSHead}


def make_head(kind: str, stacked_convs: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    head = HEADS[kind](NC, 16, feat_channels=16, stacked_convs=stacked_convs, num_groups=4, **kwargs)
    for scale in head.scales or []:  # non-trivial scales so that a missing Scale would show
        nn.init.constant_(scale.scale, 1.5)
    return head


def make_feats(batch: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, 16, h, w) for h, w in FEAT_SIZES]


def make_batch(boxes: list[list[list[float]]], labels: list[list[int]]) -> SimpleNamespace:
    return SimpleNamespace(gt_boxes=torch.tensor(boxes, dtype=torch.float32), gt_labels=torch.tensor(labels))


def unflatten(flat: torch.Tensor, num_anchors: int) -> list[torch.Tensor]:
    """Inverse of flatten_levels: [B, N, K] → per-level [B, A*K, H, W]."""
    maps, start = [], 0
    for h, w in FEAT_SIZES:
        n = h * w * num_anchors
        level = flat[:, start : start + n].reshape(flat.shape[0], h, w, -1)  # [B, H, W, A*K]
        maps.append(level.permute(0, 3, 1, 2).contiguous())
        start += n
    return maps


ONE_GT = make_batch([[[8.0, 12.0, 40.0, 44.0]], [[20.0, 4.0, 52.0, 60.0]]], [[1], [2]])


@pytest.mark.parametrize("kind", HEADS)
def test_forward_from_tower_equals_forward(kind):
    head = make_head(kind)
    feats = make_feats()
    full = head(feats)
    for start in range(head.stacked_convs + 1):
        for level, x in enumerate(feats):
            out = head.forward_from(*head.forward_tower(x, start), level, start)
            assert torch.equal(out.cls_score, full.cls_scores[level])
            assert torch.equal(out.bbox_pred, full.bbox_preds[level])
            if full.centerness is not None:
                assert torch.equal(out.centerness, full.centerness[level])


@pytest.mark.parametrize("kind", HEADS)
def test_forward_tower_is_pre_activation(kind):
    head = make_head(kind)
    x = make_feats()[0]
    assert all(torch.equal(f, x) for f in head.forward_tower(x, 0))
    cls_feat, reg_feat = head.forward_tower(x, 2)
    assert cls_feat.min() < 0 and reg_feat.min() < 0
    assert torch.equal(head.cls_convs[1](head.cls_convs[0](x), activate=False), cls_feat)
    with pytest.raises(ValueError):
        head.forward_tower(x, head.stacked_convs + 1)


@pytest.mark.parametrize(
    ("kind", "bbox_channels", "has_ctr", "num_anchors"),
    [("gfl", 4 * 17, False, 1), ("retinanet", 9 * 4, False, 9), ("fcos", 4, True, 1), ("atss", 4, True, 1)],
)
def test_output_shapes(kind, bbox_channels, has_ctr, num_anchors):
    head = make_head(kind)
    out = head(make_feats())
    assert head.num_anchors == num_anchors
    for level, (h, w) in enumerate(FEAT_SIZES):
        assert out.cls_scores[level].shape == (2, num_anchors * NC, h, w)
        assert out.bbox_preds[level].shape == (2, bbox_channels, h, w)
        if has_ctr:
            assert out.centerness[level].shape == (2, num_anchors, h, w)
    assert (out.centerness is not None) == has_ctr


def test_mmdet_structure_and_init():
    gfl, retina, fcos = make_head("gfl", 4), make_head("retinanet", 4), make_head("fcos", 4)
    assert isinstance(gfl.cls_convs[0].norm, nn.GroupNorm) and gfl.cls_convs[0].conv.bias is None
    assert isinstance(retina.reg_convs[0].norm, nn.Identity) and retina.reg_convs[0].conv.bias is not None
    assert retina.scales is None and len(gfl.scales) == 5
    prior_bias = -math.log(0.99 / 0.01)
    assert torch.allclose(gfl.gfl_cls.bias, torch.full((NC,), prior_bias))
    assert torch.allclose(retina.retina_cls.bias, torch.full((9 * NC,), prior_bias))
    assert torch.allclose(fcos.conv_reg.bias, torch.zeros(4))
    assert abs(retina.retina_cls.weight.std().item() - 0.01) < 0.002
    assert (gfl.default_kd_idx, retina.default_kd_idx, fcos.default_kd_idx) == (3, 3, 2)
    assert make_head("atss", 2).default_kd_idx == 1


def test_anchor_priors_follow_mmdet():
    head = make_head("retinanet")
    priors = head.priors(FEAT_SIZES, "cpu")
    assert priors.num_per_level == [h * w * 9 for h, w in FEAT_SIZES]
    assert priors.boxes.shape == (sum(priors.num_per_level), 4)
    first = priors.boxes[:9]  # location (0, 0) of P3: centre (0, 0), sizes 4·8·2^(i/3)·ratio
    assert torch.allclose(priors.points[:9], torch.zeros(9, 2))
    widths = first[:, 2] - first[:, 0]
    heights = first[:, 3] - first[:, 1]
    assert torch.allclose((widths * heights).sqrt()[:3], torch.tensor([32 * 2 ** (i / 3) for i in range(3)]))
    assert priors.points[9].tolist() == [8.0, 0.0]  # next x
    assert priors.strides[: priors.num_per_level[0]].eq(8).all() and priors.strides[-1] == 128


def test_point_priors_for_fcos():
    priors = make_head("fcos").priors(FEAT_SIZES, "cpu")
    assert priors.points[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]
    assert torch.equal(priors.boxes, torch.cat([priors.points, priors.points], 1))
    assert priors.num_per_level == [64, 16, 4, 1, 1]


def test_flatten_order_matches_priors():
    head = make_head("retinanet")
    out = head(make_feats())
    flat = head.flatten_outputs(out)
    num_priors = sum(h * w * 9 for h, w in FEAT_SIZES)
    assert flat.cls.shape == (2, num_priors, NC) and flat.reg.shape == (2, num_priors, 4) and flat.ctr is None
    y, x, a = 3, 5, 7  # prior index on P3 = (y * W + x) * A + a
    index = (y * 8 + x) * 9 + a
    assert torch.equal(flat.cls[1, index], out.cls_scores[0][1, a * NC : (a + 1) * NC, y, x])
    assert torch.equal(flat.reg[1, index], out.bbox_preds[0][1, a * 4 : (a + 1) * 4, y, x])
    first_p4 = 8 * 8 * 9
    assert torch.equal(flat.reg[0, first_p4], out.bbox_preds[1][0, :4, 0, 0])


@pytest.mark.parametrize("kind", HEADS)
def test_empty_gt_gives_finite_zero_box_losses_with_graph(kind):
    head = make_head(kind)
    out = head(make_feats())
    priors = head.priors(FEAT_SIZES, "cpu")
    batch = SimpleNamespace(gt_boxes=torch.zeros(2, 0, 4), gt_labels=torch.zeros(2, 0, dtype=torch.long))
    targets = head.get_targets(priors, batch)
    empty_images_count = kind != "fcos"  # MMDet anchor heads count max(num_pos, 1) per image; FCOS max(total, 1)
    assert targets.num_pos.item() == (2.0 if empty_images_count else 1.0) and not targets.pos_mask.any()
    losses = head.loss(out, priors, targets)
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert all(v.item() == 0 for k, v in losses.items() if k != "loss_cls")
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert head.cls_convs[0].conv.weight.grad is not None


@pytest.mark.parametrize("kind", HEADS)
def test_targets_gather_the_assigned_gt(kind):
    head = make_head(kind)
    priors = head.priors(FEAT_SIZES, "cpu")
    boxes = [[[8.0, 12.0, 40.0, 44.0], [0, 0, 0, 0]], [[20.0, 4.0, 52.0, 60.0], [2, 2, 14, 14]]]
    batch = make_batch(boxes, [[1, -1], [2, 0]])
    targets = head.get_targets(priors, batch)
    pos = targets.pos_mask
    assert pos[0].any() and pos[1].any()
    assert torch.equal(targets.labels[pos], batch.gt_labels.gather(1, targets.assigned_gt.clamp(min=0))[pos])
    assert (targets.labels[~pos] == -1).all() and (targets.labels[0][pos[0]] == 1).all()
    gathered = batch.gt_boxes[0][targets.assigned_gt[0][pos[0]]]
    assert torch.equal(targets.box_targets[0][pos[0]], gathered)
    assert targets.num_pos.item() == pos.sum().item()
    assert torch.equal(targets.label_weights, (targets.assigned_gt != -2).float())
    if head.with_centerness:
        ctr = targets.centerness_targets
        assert (ctr[pos] > 0).all() and (ctr[pos] <= 1).all() and (ctr[~pos] == 0).all()
        assert torch.isclose(targets.centerness_denorm, ctr.sum())
    else:
        assert targets.centerness_targets is None


def test_retinanet_ignores_the_iou_band():
    head = make_head("retinanet")
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, ONE_GT)
    ignored = targets.assigned_gt == -2
    assert ignored.any() and (targets.label_weights[ignored] == 0).all()


def _perfect_reg(head, priors, targets) -> torch.Tensor:
    """Regression outputs [B, N, R] that decode exactly to each prior's box target (integer distances for GFL)."""
    boxes = targets.box_targets
    if isinstance(head, (RetinaHead, ATSSHead)):
        return delta_xywh_encode(priors.boxes.expand_as(boxes), boxes, stds=head.box_stds)
    ltrb = distance_encode(priors.points, boxes)
    if isinstance(head, FCOSHead):
        return ltrb / priors.strides[:, None] if head.norm_on_bbox else ltrb
    bins = (ltrb / priors.strides[:, None]).round().clamp(0, head.reg_max).long()  # [B, N, 4]
    return (nn.functional.one_hot(bins, head.reg_max + 1).float() * 50).flatten(-2)  # sharp DFL logits


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("retinanet", {}), ("atss", {}), ("fcos", {}), ("fcos", {"norm_on_bbox": True})]
)
def test_decode_inverts_encode_and_perfect_boxes_have_zero_box_loss(kind, kwargs):
    head = make_head(kind, **kwargs)
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, ONE_GT)
    reg = _perfect_reg(head, priors, targets)
    pos = targets.pos_mask
    decoded = head.decode_boxes(reg, priors)
    assert torch.allclose(decoded[pos], targets.box_targets[pos], atol=1e-3)
    out = head(make_feats())
    num_anchors = head.num_anchors
    perfect = HeadOutputs(out.cls_scores, unflatten(reg, num_anchors), out.centerness)
    losses = head.loss(perfect, priors, targets)
    assert losses["loss_box"].item() < 1e-4
    assert losses["loss_box"].item() < head.loss(out, priors, targets)["loss_box"].item()


def test_gfl_decode_integral_and_dfl_on_exact_bins():
    head = make_head("gfl")
    priors = head.priors(FEAT_SIZES, "cpu")
    batch = make_batch([[[0.0, 8.0, 32.0, 40.0]], [[16.0, 16.0, 48.0, 64.0]]], [[0], [1]])  # multiples of 8
    targets = head.get_targets(priors, batch)
    reg = _perfect_reg(head, priors, targets)
    pos = targets.pos_mask
    assert torch.allclose(head.decode_boxes(reg, priors)[pos], targets.box_targets[pos], atol=1e-3)
    out = head(make_feats())
    losses = head.loss(HeadOutputs(out.cls_scores, unflatten(reg, 1), None), priors, targets)
    assert losses["loss_box"].item() < 1e-4
    assert losses["loss_dfl"].item() < 0.05  # the (clamped) integer bins are nearly certain
    assert set(losses) == {"loss_cls", "loss_box", "loss_dfl"}


def test_gfl_box_losses_are_normalised_by_the_summed_score_weights():
    head = make_head("gfl")
    out = head(make_feats())
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, ONE_GT)
    num_pos = targets.pos_mask.sum().item()

    def losses_with_logit(logit: float) -> dict:
        constant = [torch.full_like(m, logit) for m in out.cls_scores]  # every weight_target = sigmoid(logit)
        return head.loss(HeadOutputs(constant, out.bbox_preds, None), priors, targets)

    high, mid, low = losses_with_logit(5.0), losses_with_logit(2.0), losses_with_logit(-8.0)
    for key in ("loss_box", "loss_dfl"):  # Σw > 1: a weighted mean, independent of the weight's size
        assert torch.isclose(high[key], mid[key], rtol=1e-4)
    weight = torch.sigmoid(torch.tensor(-8.0))  # Σw < 1: MMDet's clamp(min=1) leaves a weighted sum
    assert torch.isclose(low["loss_box"], high["loss_box"] * num_pos * weight, rtol=1e-3)
    assert torch.isclose(low["loss_dfl"], high["loss_dfl"] * num_pos * weight, rtol=1e-3)
    doubled = GFLHead(NC, 16, feat_channels=16, stacked_convs=3, num_groups=4, loss_box_weight=4.0, loss_dfl_weight=0.5)
    doubled.load_state_dict(head.state_dict())
    base, scaled = head.loss(out, priors, targets), doubled.loss(out, priors, targets)
    assert torch.isclose(scaled["loss_box"], 2 * base["loss_box"])
    assert torch.isclose(scaled["loss_dfl"], 2 * base["loss_dfl"])
    assert torch.equal(scaled["loss_cls"], base["loss_cls"])


def test_fcos_norm_on_bbox_outputs_relu_distances_in_stride_units():
    head = make_head("fcos", norm_on_bbox=True, centerness_on_reg=True)
    out = head(make_feats())
    assert all((p >= 0).all() for p in out.bbox_preds)
    assert (torch.cat([p.flatten() for p in out.bbox_preds]) == 0).any()  # relu, not exp
    priors = head.priors(FEAT_SIZES, "cpu")
    reg = torch.ones(1, priors.points.shape[0], 4)
    boxes = head.decode_boxes(reg, priors)
    assert torch.allclose(boxes[0, -1], priors.points[-1].repeat(2) + torch.tensor([-128.0, -128.0, 128.0, 128.0]))


@pytest.mark.parametrize("kind", HEADS)
def test_scores_are_probabilities_with_centerness(kind):
    head = make_head(kind)
    flat = head.flatten_outputs(head(make_feats()))
    scores = head.scores(flat)
    assert scores.shape == flat.cls.shape and (scores >= 0).all() and (scores <= 1).all()
    expected = flat.cls.sigmoid() if flat.ctr is None else flat.cls.sigmoid() * flat.ctr.sigmoid()[..., None]
    assert torch.allclose(scores, expected)


# ----- valid flags and num_pos (issue 12) --------------------------------------------------------------------------
def padding_mask(img_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Per level [2, 1, H, W]: True at the cells of image 1 (not image 0) that start outside its (h, w)."""
    masks = []
    for (h, w), stride in zip(FEAT_SIZES, STRIDES):
        outside = (torch.arange(h)[:, None] * stride >= img_hw[0]) | (torch.arange(w)[None, :] * stride >= img_hw[1])
        masks.append(torch.stack([torch.zeros_like(outside), outside])[:, None])
    return masks


def add_at(maps: list[torch.Tensor] | None, masks: list[torch.Tensor], value: float) -> list[torch.Tensor] | None:
    """`value` added to every channel of per-level [B, K, H, W] maps where the [B, 1, H, W] mask is True."""
    return None if maps is None else [m + value * mask for m, mask in zip(maps, masks)]


def test_valid_prior_mask_keeps_the_cells_that_start_inside_each_image():
    priors = make_head("fcos").priors(FEAT_SIZES, "cpu")  # points at (index + 0.5) * stride
    valid = valid_prior_mask(priors, torch.tensor([[64, 64], [20, 33]]))
    assert valid[0].all()
    p3 = valid[1, :64].reshape(8, 8)  # stride 8: rows 0, 8, 16 < 20; columns 0..32 < 33
    assert p3[:3, :5].all() and not p3[3:].any() and not p3[:, 5:].any()
    assert valid[1, 64:80].reshape(4, 4)[:2, :3].all() and valid[1, 64:80].sum() == 6  # stride 16: 2 rows, 3 cols
    anchors = make_head("retinanet").priors(FEAT_SIZES, "cpu")  # 9 anchors centred at index * stride
    assert valid_prior_mask(anchors, torch.tensor([[20, 33]]))[0, : 64 * 9].sum() == 15 * 9


@pytest.mark.parametrize("kind", HEADS)
def test_priors_in_another_images_padding_are_ignored_and_change_no_loss(kind):
    """valid_region=image: every prior whose cell starts outside its own unpadded image is ignored."""
    head = make_head(kind)
    head.use_valid_region("image")
    img_hw = (24, 40)  # image 1 is small: the rest of the 64×64 input is padding
    batch = make_batch([[[8.0, 12.0, 40.0, 44.0]], [[4.0, 4.0, 20.0, 22.0]]], [[1], [2]])
    batch.img_sizes = torch.tensor([[64, 64], list(img_hw)])
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, batch)
    valid = valid_prior_mask(priors, batch.img_sizes)
    assert (~valid[1]).sum() > 0 and (targets.label_weights[~valid] == 0).all()
    assert not targets.pos_mask[~valid].any() and (targets.assigned_gt[~valid] == -2).all()
    out = head(make_feats())
    losses = head.loss(out, priors, targets)
    masks = padding_mask(img_hw)
    noisy = HeadOutputs(add_at(out.cls_scores, masks, 5.0), add_at(out.bbox_preds, masks, 0.5),
                        add_at(out.centerness, masks, 3.0))
    assert not torch.equal(noisy.cls_scores[0], out.cls_scores[0])
    for key, value in head.loss(noisy, priors, targets).items():
        assert value.item() == pytest.approx(losses[key].item(), rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("kind", HEADS)
def test_the_mmdet_valid_region_is_each_image_padded_up_to_32_and_every_point_for_fcos(kind):
    """valid_region=mmdet (the default): a 24×40 image counts as 32×64 (MMDet's pad_shape with pad_size_divisor 32);
    predictions beyond that change no loss of an anchor head, while FCOS, like MMDet's, assigns every point."""
    head = make_head(kind)
    assert head.valid_region == "mmdet"
    batch = make_batch([[[8.0, 12.0, 40.0, 44.0]], [[4.0, 4.0, 20.0, 22.0]]], [[1], [2]])
    batch.img_sizes = torch.tensor([[64, 64], [24, 40]])
    assert region_sizes(batch.img_sizes, (64, 64)).tolist() == [[64, 64], [32, 64]]
    assert region_sizes(batch.img_sizes, (64, 48)).tolist() == [[64, 48], [32, 48]]  # capped at the batch
    priors = head.priors(FEAT_SIZES, "cpu")
    targets = head.get_targets(priors, batch)
    region = valid_prior_mask(priors, torch.tensor([[64, 64], [32, 64]]))
    weights = targets.label_weights == 1
    if kind == "fcos":
        assert weights.all()
    else:
        assert not weights[~region].any() and (targets.assigned_gt[~region] == -2).all()
        band = ~valid_prior_mask(priors, batch.img_sizes) & region  # rows 24..32 of image 1: padding that counts
        assert band.any() and weights[band].any()
    out = head(make_feats())
    losses = head.loss(out, priors, targets)
    masks = padding_mask((32, 64))
    noisy = HeadOutputs(add_at(out.cls_scores, masks, 5.0), add_at(out.bbox_preds, masks, 0.5),
                        add_at(out.centerness, masks, 3.0))
    noisy_cls = head.loss(noisy, priors, targets)["loss_cls"].item()
    if kind == "fcos":
        assert noisy_cls != pytest.approx(losses["loss_cls"].item(), rel=1e-4)
    else:
        assert noisy_cls == pytest.approx(losses["loss_cls"].item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", HEADS)
def test_num_pos_counts_an_image_without_positives_as_one_in_anchor_heads(kind):
    head = make_head(kind)
    priors = head.priors(FEAT_SIZES, "cpu")
    batch = make_batch([[[8.0, 12.0, 40.0, 44.0]], [[0.0, 0.0, 0.0, 0.0]]], [[1], [-1]])  # image 2 has no GT
    targets = head.get_targets(priors, batch)
    positives = targets.pos_mask.sum().item()
    assert positives > 0 and not targets.pos_mask[1].any()
    expected = positives if kind == "fcos" else positives + 1  # MMDet: Σ_img max(num_pos, 1); FCOS: the total
    assert targets.num_pos.item() == expected
