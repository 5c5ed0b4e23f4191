"""Task-aligned assigner and CIoU: hand-computed cases, and equality with Ultralytics 8.4's TaskAlignedAssigner run
in a subprocess (the peer)."""

import math

import pytest
import torch
from ultralytics_peer import run_peer

from crosskd.assigners import ASSIGNERS, BACKGROUND, IGNORED, Predictions, TaskAlignedAssigner, task_aligned_assign
from crosskd.assigners.task_aligned import candidate_min_side
from crosskd.losses.detection import ciou_loss
from crosskd.losses.dfl import DFL
from crosskd.ops.boxes import Priors, aligned_box_ciou, make_points

# Six points in a row at x = 2, 6, ..., 22, y = 2; one level of stride 4 (GT sides below 4 px are raised to 4).
POINTS = torch.tensor([[2.0 + 4 * i, 2.0] for i in range(6)])
MIN_SIDE = torch.tensor(4.0)
FAR = [30.0, 0.0, 42.0, 4.0]  # a predicted box far from every GT: CIoU < 0, clamped to 0, so metric 0

# CIoU of boxes 4 px high and 12 px wide (equal aspect ratios: v = 0): IoU − centre distance² / enclosing diagonal².
CIOU_SHIFT_2 = 40 / 56 - 2**2 / (14**2 + 4**2)  # [2,0,14,4] vs [0,0,12,4]: 0.695418
CIOU_SHIFT_6 = 24 / 72 - 6**2 / (18**2 + 4**2)  # [6,0,18,4] vs [0,0,12,4]: 0.227451


def metric(score: float, ciou: float) -> float:
    """The alignment metric with Ultralytics' α = 0.5, β = 6."""
    return score**0.5 * ciou**6


def assign(gt_boxes, gt_labels, pred_boxes, pred_scores, topk=2, valid=None, **kwargs):
    return task_aligned_assign(
        POINTS, MIN_SIDE, torch.tensor(gt_boxes), torch.tensor(gt_labels), torch.tensor(pred_boxes),
        torch.tensor(pred_scores), topk=topk, valid=valid, **kwargs,
    )


def scores_for(label: int, values: list[float], num_classes: int = 3) -> list[list[float]]:
    """Class probabilities `[N, C]`: `values` for class `label`, 0.5 for the others (which never count)."""
    return [[value if c == label else 0.5 for c in range(num_classes)] for value in values]


# The conflict case: gt0 [0,0,12,4] (class 1) holds points 0, 1, 2; gt1 [8,0,20,4] (class 2) holds points 2, 3, 4.
CONFLICT_GT = [[0.0, 0.0, 12.0, 4.0], [8.0, 0.0, 20.0, 4.0]]
CONFLICT_PREDS = [CONFLICT_GT[0], FAR, [6.0, 0.0, 18.0, 4.0], CONFLICT_GT[1], CONFLICT_GT[1], FAR]
# Point 2's box [6,0,18,4] is gt0 shifted by 6 and gt1 shifted by −2.
CIOU_P2_GT1 = CIOU_SHIFT_2
CONFLICT_SCORES = [
    [0.5, 0.25, 0.5], [0.5, 0.01, 0.5], [0.5, 0.81, 0.64], [0.5, 0.5, 0.36], [0.5, 0.5, 0.0025], [0.5, 0.5, 0.5]
]
# gt0 metrics: p0 √.25·1 = 0.5, p1 0 (far box), p2 0.9·0.227451⁶ = 1.25e-4 -> top 2: p0, p2.
# gt1 metrics: p2 0.8·0.695418⁶ = 0.0905, p3 √.36 = 0.6, p4 √.0025 = 0.05 -> top 2: p3, p2.
M_P2_GT1 = metric(0.64, CIOU_P2_GT1)


def test_ciou_hand_values():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 12.0, 4.0], [0.0, 0.0, 12.0, 4.0]])
    targets = torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 0.0, 14.0, 4.0], [0.0, 0.0, 12.0, 4.0]])
    # [0,0,10,10] vs [0,0,10,5]: IoU 50/100, centre distance² 2.5² over diagonal² 10²+10², and the aspect term
    # v = 4/π² (atan(10/5) − atan(10/10))² weighted by α = v / (1 − IoU + v).
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    expected = [0.5 - 6.25 / 200 - v * v / (0.5 + v), CIOU_SHIFT_2, 1.0]
    torch.testing.assert_close(aligned_box_ciou(boxes, targets), torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(ciou_loss(boxes, targets), 1 - torch.tensor(expected), atol=1e-6, rtol=0)


def test_ciou_broadcasts_pairwise_and_holds_alpha_constant():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 12.0, 4.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 0.0, 14.0, 4.0], [1.0, 1.0, 9.0, 7.0]], requires_grad=True)
    pairwise = aligned_box_ciou(gt[:, None], pred[None])  # [2, 3]
    for i in range(2):
        for j in range(3):
            assert pairwise[i, j].item() == pytest.approx(aligned_box_ciou(gt[i], pred[j]).item(), abs=1e-7)
    # ∂/∂y2 of pred [0,0,10,h] vs gt [0,0,10,10] at h = 5, with α = v / (1 − IoU + v) held constant: IoU = h/10
    # (union 100) gives 0.1; centre distance² (h − 10)²/4 over diagonal² 200 gives −(h − 10)/2/200 = +0.0125; the
    # aspect term v = 4/π² (atan(10/h) − atan 1)² gives −α · 4/π² · 2 (atan 2 − atan 1) · ∂atan(10/h)/∂h, where
    # ∂atan(10/h)/∂h = −10/h² / (1 + (10/h)²) = −0.08. A differentiated α would add −v · ∂α/∂h.
    ciou = aligned_box_ciou(gt[0], pred[0])
    ciou.backward()
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (1 - 0.5 + v)
    dv_dh = 4 / math.pi**2 * 2 * (math.atan(2.0) - math.atan(1.0)) * -0.08
    assert pred.grad[0, 3].item() == pytest.approx(0.1 + 0.0125 - alpha * dv_dh, abs=1e-6)


def test_dfl_clamps_targets_as_yolo_does():
    # Ultralytics clamps DFL targets to reg_max − 1 − 0.01 bins (16 bins: 14.99); here 3 bins, a side of 3 -> 1.99.
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).repeat(4)[None]  # bin probabilities 1/6, 2/6, 3/6 per side
    points, target = torch.tensor([[10.0, 10.0]]), torch.tensor([[9.0, 9.0, 13.0, 11.0]])  # ltrb 1, 1, 3, 1
    nll = -torch.log(torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    want = torch.stack([nll[1], nll[1], 0.01 * nll[1] + 0.99 * nll[2], nll[1]])[None]
    torch.testing.assert_close(DFL(reg_max=2, target_eps=0.01).loss(logits, points, target), want)


def test_top_k_conflict_and_normalised_scores():
    result = assign([CONFLICT_GT], [[1, 2]], [CONFLICT_PREDS], [CONFLICT_SCORES])
    # p1 (candidate of gt0, metric 0) and p4 (gt1, third best) miss the top 2; p2 is claimed by both and goes to gt1,
    # its higher CIoU; p5 lies in no box.
    assert result.assigned_gt.tolist() == [[0, BACKGROUND, 1, 1, BACKGROUND, BACKGROUND]]
    assert result.labels.tolist() == [[1, BACKGROUND, 2, 2, BACKGROUND, BACKGROUND]]
    # After the conflict gt0 keeps only p0 (metric 0.5, CIoU 1): 0.5 · 1 / 0.5. gt1 keeps p3 (0.6, CIoU 1) and p2:
    # p2 gets 0.0905 · 1 / 0.6.
    expected = [[1.0, 0.0, M_P2_GT1 / 0.6, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.max_overlaps, torch.tensor([[1.0, 0, CIOU_P2_GT1, 1.0, 0, 0]]), atol=1e-6, rtol=0)


def test_scores_scale_to_the_best_ciou_of_the_gt():
    # One GT [0,0,12,4] of class 0: p0 predicts it shifted by 2 (CIoU 0.695418), p1 by 6 (0.227451), p2 far away.
    preds = [[2.0, 0.0, 14.0, 4.0], [6.0, 0.0, 18.0, 4.0], FAR, FAR, FAR, FAR]
    result = assign([[[0.0, 0.0, 12.0, 4.0]]], [[0]], [preds], [scores_for(0, [0.49, 1.0, 1.0, 1.0, 1.0, 1.0], 1)])
    assert result.assigned_gt.tolist() == [[0, 0, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND]]
    m0, m1 = metric(0.49, CIOU_SHIFT_2), metric(1.0, CIOU_SHIFT_6)
    # Each metric · (best CIoU 0.695418) / (best metric m0): p0 gets the GT's best CIoU itself.
    expected = [[CIOU_SHIFT_2, m1 * CIOU_SHIFT_2 / m0, 0, 0, 0, 0]]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_candidates_are_points_strictly_inside_the_raised_box():
    preds = [[0.0, 0.0, 12.0, 4.0]] * 6  # every candidate scores > 0, so topk = 6 takes exactly the candidates
    scores = scores_for(0, [1.0] * 6, 1)
    border = assign([[[2.0, 0.0, 10.0, 4.0]]], [[0]], [preds], [scores], topk=6)
    assert border.pos_mask.tolist() == [[False, True, False, False, False, False]]  # x = 2 and 10 lie on the sides
    # A 2×2 box at (12, 2) holds no point; raised to 8×8 ([8,−2,16,6]) it holds x = 10 and 14 (not on its sides).
    tiny = [[[11.0, 1.0, 13.0, 3.0]]]
    assert not task_aligned_assign(
        POINTS, torch.tensor(2.0), torch.tensor(tiny), torch.tensor([[0]]), torch.tensor([preds]),
        torch.tensor([scores]), topk=6,
    ).pos_mask.any()
    raised = task_aligned_assign(
        POINTS, torch.tensor(8.0), torch.tensor(tiny), torch.tensor([[0]]), torch.tensor([preds]),
        torch.tensor([scores]), topk=6,
    )
    assert raised.pos_mask.tolist() == [[False, False, True, True, False, False]]


def test_min_side_is_the_second_level_stride():
    two_levels = Priors(torch.zeros(6, 4), POINTS, torch.tensor([8.0, 8, 8, 8, 16, 16]), [4, 2])
    one_level = Priors(torch.zeros(6, 4), POINTS, torch.full((6,), 32.0), [6])
    assert candidate_min_side(two_levels).item() == 16 and candidate_min_side(one_level).item() == 32


def test_invalid_priors_are_never_positive():
    valid = torch.tensor([[True, True, True, False, True, True]])
    result = assign([CONFLICT_GT], [[1, 2]], [CONFLICT_PREDS], [CONFLICT_SCORES], valid=valid)
    # Without p3, gt1's top 2 are p2 (0.0905) and p4 (0.05, CIoU 1): p2 becomes gt1's best metric.
    assert result.assigned_gt.tolist() == [[0, BACKGROUND, 1, IGNORED, 1, BACKGROUND]]
    expected = [[1.0, 0.0, 1.0, 0.0, metric(0.0025, 1.0) / M_P2_GT1, 0.0]]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_padding_rows_and_images_without_gt():
    plain = assign([CONFLICT_GT], [[1, 2]], [CONFLICT_PREDS], [CONFLICT_SCORES])
    padding = [0.0, 0.0, 0.0, 0.0]
    # Image 0: the same GT with padding rows before, between and after; image 1: padding only.
    gt_boxes = [[padding, CONFLICT_GT[0], padding, CONFLICT_GT[1]], [padding] * 4]
    padded = assign(gt_boxes, [[-1, 1, -1, 2], [-1] * 4], [CONFLICT_PREDS] * 2, [CONFLICT_SCORES] * 2)
    remap = torch.tensor([1, 3])  # plain GT index -> padded GT index
    expected_gt = torch.where(plain.pos_mask, remap[plain.assigned_gt.clamp(min=0)], BACKGROUND)
    assert torch.equal(padded.assigned_gt[:1], expected_gt)
    assert torch.equal(padded.labels[:1], plain.labels)
    torch.testing.assert_close(padded.scores[:1], plain.scores)
    assert (padded.assigned_gt[1] == BACKGROUND).all() and (padded.scores[1] == 0).all()
    empty = assign(torch.zeros(2, 0, 4).tolist(), torch.zeros(2, 0, dtype=torch.long).tolist(), [CONFLICT_PREDS] * 2,
                   [CONFLICT_SCORES] * 2)
    assert (empty.assigned_gt == BACKGROUND).all() and empty.assigned_gt.shape == (2, 6)


def test_registered_and_reads_the_predictions():
    assert ASSIGNERS["task_aligned"] is TaskAlignedAssigner
    priors = Priors(torch.zeros(6, 4), POINTS, torch.full((6,), 4.0), [6])
    decoded = []

    def decode():
        decoded.append(True)
        return torch.tensor([CONFLICT_PREDS]), torch.tensor([CONFLICT_SCORES])

    result = TaskAlignedAssigner(topk=2)(priors, torch.tensor([CONFLICT_GT]), torch.tensor([[1, 2]]), None,
                                         Predictions(decode))
    assert decoded and result.assigned_gt.tolist() == [[0, BACKGROUND, 1, 1, BACKGROUND, BACKGROUND]]


# Equality with Ultralytics ---------------------------------------------------------------------------------------

PEER_SCRIPT = """
import sys, torch
from ultralytics.utils.tal import TaskAlignedAssigner
outputs = []
for case in torch.load(sys.argv[1]):
    gt_boxes = case["gt_boxes"]
    mask_gt = gt_boxes.sum(2, keepdim=True).gt(0.0).float()  # as v8DetectionLoss
    assigner = TaskAlignedAssigner(topk=case["topk"], num_classes=case["pred_scores"].shape[-1], alpha=0.5, beta=6.0,
                                   stride=case["strides"], topk2=case["topk2"])
    labels, boxes, scores, fg_mask, gt_idx = assigner(case["pred_scores"], case["pred_boxes"], case["points"],
                                                      case["gt_labels"].clamp(min=0)[..., None].float(), gt_boxes,
                                                      mask_gt)
    outputs.append({"target_boxes": boxes, "target_scores": scores, "fg_mask": fg_mask, "target_gt_idx": gt_idx})
torch.save(outputs, sys.argv[2])
"""
STRIDES = [8, 16, 32]
FEAT_SIZES = [(16, 16), (8, 8), (4, 4)]  # a 128-px input: 336 priors
PEER_CASES = [(0, 10, None), (1, 10, None), (2, 10, None), (3, 13, 7)]  # (seed, topk, topk2)


def random_case(seed: int, topk: int, topk2: int | None, num_gt: int = 8, num_classes: int = 4) -> dict:
    """Three 128-px images with 8, 4 and 0 real GT (sides 4..68 px, so some are raised to 16), predicted boxes
    2..50 px from each point's sides and uniform class probabilities."""
    generator = torch.Generator().manual_seed(seed)
    points, _ = make_points(FEAT_SIZES, STRIDES, "cpu")
    corner = torch.rand(3, num_gt, 2, generator=generator) * 100
    size = torch.rand(3, num_gt, 2, generator=generator) * 64 + 4
    real = torch.arange(num_gt)[None] < torch.tensor([[num_gt], [num_gt // 2], [0]])
    gt_boxes = torch.where(real[..., None], torch.cat([corner, corner + size], -1), 0.0)
    gt_labels = torch.where(real, torch.randint(0, num_classes, (3, num_gt), generator=generator), -1)
    ltrb = torch.rand(3, points.shape[0], 4, generator=generator) * 48 + 2
    pred_boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
    pred_scores = torch.rand(3, points.shape[0], num_classes, generator=generator)
    return {"points": points, "gt_boxes": gt_boxes, "gt_labels": gt_labels, "pred_boxes": pred_boxes,
            "pred_scores": pred_scores, "strides": STRIDES, "topk": topk, "topk2": topk2}


def test_equals_ultralytics_task_aligned_assigner(tmp_path):
    cases = [random_case(*case) for case in PEER_CASES]
    torch.save(cases, tmp_path / "inputs.pt")
    run_peer(PEER_SCRIPT, tmp_path / "inputs.pt", tmp_path / "outputs.pt")
    peer_outputs = torch.load(tmp_path / "outputs.pt")
    for case, peer in zip(cases, peer_outputs, strict=True):
        points, strides = make_points(FEAT_SIZES, STRIDES, "cpu")
        priors = Priors(torch.zeros(points.shape[0], 4), points, strides, [h * w for h, w in FEAT_SIZES])
        result = TaskAlignedAssigner(topk=case["topk"], topk2=case["topk2"])(
            priors, case["gt_boxes"], case["gt_labels"], None,
            Predictions(lambda case=case: (case["pred_boxes"], case["pred_scores"])),
        )
        fg = result.pos_mask
        assert fg.sum() > 20 and torch.equal(fg, peer["fg_mask"])
        assert torch.equal(result.assigned_gt[fg], peer["target_gt_idx"][fg])
        torch.testing.assert_close(result.gather_boxes(case["gt_boxes"])[fg], peer["target_boxes"][fg], atol=1e-5,
                                   rtol=0)
        target_scores = torch.nn.functional.one_hot(result.labels.clamp(min=0), 4) * result.scores[..., None]
        torch.testing.assert_close(target_scores, peer["target_scores"].float(), atol=1e-5, rtol=0)
