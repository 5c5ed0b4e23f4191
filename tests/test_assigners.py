"""ATSS, max-IoU and FCOS assigners on constructed cases, padded and empty batches, and per-image references."""

import numpy as np
import pytest
import torch

from crosskd.assigners import (
    BACKGROUND,
    IGNORED,
    AssignResult,
    ATSSAssigner,
    FCOSAssigner,
    MaxIoUAssigner,
    Predictions,
    atss_assign,
    fcos_assign,
    max_iou_assign,
)
from crosskd.ops.boxes import Priors, anchors_per_level, make_anchors, make_points

INF = 1e8


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def np_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N, M] written out with numpy."""
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(-1)
    return inter / (area1[:, None] + area2[None, :] - inter)


def random_gt(batch: int, num_gt: int, size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random GT with a random number of real boxes per image, the rest padding (label −1, zero box)."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, num_gt, 2, generator=generator) * size * 0.8
    wh = torch.rand(batch, num_gt, 2, generator=generator) * size * 0.5 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    labels = torch.randint(0, 5, (batch, num_gt), generator=generator)
    real = torch.arange(num_gt)[None] < torch.randint(0, num_gt + 1, (batch, 1), generator=generator)
    return torch.where(real[..., None], boxes, 0.0), torch.where(real, labels, -1)


def to_padded_index(assigned: np.ndarray, real: torch.Tensor) -> np.ndarray:
    """Map a reference's indices into the real GT of one image back to indices into its padded GT."""
    real_index = np.append(torch.nonzero(real).flatten().numpy(), 0)  # the 0 keeps the lookup valid without GT
    return np.where(assigned >= 0, real_index[assigned.clip(min=0)], assigned)


def check_labels(result: AssignResult, gt_labels: torch.Tensor) -> None:
    positive = result.assigned_gt >= 0
    expected = torch.where(positive, gt_labels.gather(1, result.assigned_gt.clamp(min=0)), -1)
    assert torch.equal(result.labels, expected)


# ATSS -------------------------------------------------------------------------------------------------------------


def test_atss_threshold_picks_expected_anchor_across_levels():
    sizes, strides = [(4, 4), (2, 2)], [10, 20]
    anchors = make_anchors(sizes, strides, [10.0, 20.0], [1.0], [1.0], "cpu")  # 10x10 and 20x20 anchors at x*s
    gt_boxes, gt_labels = tensor([[[6, 6, 22, 22]]]), torch.tensor([[3]])
    result = atss_assign(anchors, anchors_per_level(sizes), gt_boxes, gt_labels, topk=3)
    # candidates: level 0 (10,10) IoU 81/275, (20,10) and (10,20) 63/293; level 1 (20,20) 144/512, (20,0) and
    # (0,20) 48/608. mean + std = 0.2889: only the level-0 anchor at (10,10) (index 1*4+1) clears it;
    # the level-1 anchor (20,20) with IoU 0.281 does not.
    ious = np.array([81 / 275, 63 / 293, 63 / 293, 144 / 512, 48 / 608, 48 / 608])
    threshold = ious.mean() + ious.std(ddof=1)
    assert 144 / 512 < threshold <= 81 / 275
    expected = torch.full((1, 20), BACKGROUND)
    expected[0, 5] = 0
    assert torch.equal(result.assigned_gt, expected)
    assert result.labels[0, 5] == 3 and (result.labels[0, torch.arange(20) != 5] == -1).all()
    assert result.max_overlaps[0, 5].item() == pytest.approx(81 / 275, abs=1e-6)
    assert (result.max_overlaps[0, torch.arange(20) != 5] == 0).all()  # negatives carry no IoU (MMDet: -inf)


def test_atss_requires_candidate_centre_inside_gt():
    anchors = tensor([[0, 0, 40, 40], [100, 100, 140, 140], [200, 200, 240, 240], [300, 300, 340, 340]])
    # the only overlapping anchor clears mean + std in both images; its centre x = 20 lies outside the first GT
    gt_boxes, gt_labels = tensor([[[21, 0, 61, 40]], [[19, 0, 59, 40]]]), torch.tensor([[0], [0]])
    result = atss_assign(anchors, [4], gt_boxes, gt_labels, topk=4)
    assert torch.equal(result.assigned_gt, torch.tensor([[-1, -1, -1, -1], [0, -1, -1, -1]]))


def test_atss_anchor_positive_for_two_gts_takes_higher_iou():
    anchors = tensor([[0, 0, 10, 10], [10, 0, 20, 10], [100, 100, 110, 110], [200, 200, 210, 210]])
    # both GTs contain anchor 0's centre (5, 5); IoU with GT 0 is 64/100, with GT 1 is 100/144
    gt_boxes, gt_labels = tensor([[[1, 1, 9, 9], [0, 0, 12, 12]]]), torch.tensor([[1, 2]])
    result = atss_assign(anchors, [4], gt_boxes, gt_labels, topk=4)
    assert result.assigned_gt[0, 0] == 1 and result.labels[0, 0] == 2
    assert result.max_overlaps[0, 0].item() == pytest.approx(100 / 144, abs=1e-6)
    # duplicate GTs tie exactly: the first one wins, as argmax in MMDet
    duplicates = atss_assign(anchors, [4], gt_boxes[:, [1, 1]], gt_labels[:, [0, 1]], topk=4)
    assert duplicates.assigned_gt[0, 0] == 0 and duplicates.labels[0, 0] == 1


def test_atss_invalid_anchors_are_ignored_and_never_candidates():
    sizes, strides = [(4, 4), (2, 2)], [10, 20]
    anchors = make_anchors(sizes, strides, [10.0, 20.0], [1.0], [1.0], "cpu")
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, 5] = False  # the anchor that was positive above
    result = atss_assign(
        anchors, anchors_per_level(sizes), tensor([[[6, 6, 22, 22]]]), torch.tensor([[3]]), topk=3, valid=valid
    )
    assert result.assigned_gt[0, 5] == IGNORED
    assert (result.assigned_gt[0, torch.arange(20) != 5] != IGNORED).all()


def atss_reference(anchors: np.ndarray, counts: list[int], gt: np.ndarray, topk: int) -> np.ndarray:
    """MMDet ATSSAssigner for one image, GT by GT."""
    assigned = np.full(len(anchors), -1)
    if len(gt) == 0:
        return assigned
    ious = np_iou(anchors, gt)  # [N, M]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = np.full(len(anchors), -np.inf)
    for j, box in enumerate(gt):
        dist = np.linalg.norm(centres - (box[:2] + box[2:]) / 2, axis=1)
        starts = np.cumsum([0, *counts])
        cands = np.concatenate([s + np.argsort(dist[s:e], kind="stable")[:topk] for s, e in zip(starts, starts[1:])])
        thr = ious[cands, j].mean() + ious[cands, j].std(ddof=1)
        for i in cands:
            inside = min(centres[i, 0] - box[0], centres[i, 1] - box[1], box[2] - centres[i, 0], box[3] - centres[i, 1])
            if ious[i, j] >= thr and inside > 0.01 and ious[i, j] > best[i]:
                best[i], assigned[i] = ious[i, j], j
    return assigned


def test_atss_matches_per_image_reference_on_random_padded_batch():
    sizes, strides = [(8, 8), (4, 4), (2, 2)], [8, 16, 32]
    anchors = make_anchors(sizes, strides, [s * 4.0 for s in strides], [1.0], [1.0], "cpu")
    counts = anchors_per_level(sizes)
    gt_boxes, gt_labels = random_gt(6, 7, 64.0, seed=0)
    result = atss_assign(anchors, counts, gt_boxes, gt_labels, topk=9)
    for image in range(6):
        real = gt_labels[image] >= 0
        expected = atss_reference(anchors.double().numpy(), counts, gt_boxes[image][real].double().numpy(), 9)
        assert np.array_equal(result.assigned_gt[image].numpy(), expected)
    assert result.pos_mask.sum() > 20
    check_labels(result, gt_labels)


# Max IoU ----------------------------------------------------------------------------------------------------------

MAX_IOU_ANCHORS = tensor(
    [
        [0, 0, 10, 10],  # IoU 1 with GT 0: positive
        [0, 0, 10, 22],  # IoU 100/220 = 0.45 with GT 0: ignore band
        [0, 0, 10, 30],  # IoU 1/3 with GT 0: background
        [200, 200, 210, 210],  # overlaps nothing: background
        [50, 40, 60, 100],  # IoU 1/3 with GT 2: GT 2's best anchor (low-quality match)
        [50, 40, 60, 100],  # ties it
    ]
)
# GT 1 is padding with a real-looking box: it must claim nothing
MAX_IOU_GT = tensor([[[0, 0, 10, 10], [0, 0, 10, 22], [50, 50, 60, 70]]])
MAX_IOU_LABELS = torch.tensor([[4, -1, 7]])


def test_max_iou_ignore_band_and_low_quality_matches():
    result = max_iou_assign(MAX_IOU_ANCHORS, MAX_IOU_GT, MAX_IOU_LABELS)
    assert result.assigned_gt.tolist() == [[0, IGNORED, BACKGROUND, BACKGROUND, 2, 2]]
    assert result.labels.tolist() == [[4, -1, -1, -1, 7, 7]]
    np.testing.assert_allclose(result.max_overlaps[0].numpy(), [1, 100 / 220, 1 / 3, 0, 1 / 3, 1 / 3], atol=1e-6)
    without = max_iou_assign(MAX_IOU_ANCHORS, MAX_IOU_GT, MAX_IOU_LABELS, match_low_quality=False)
    assert without.assigned_gt.tolist() == [[0, IGNORED, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND]]
    strict = max_iou_assign(MAX_IOU_ANCHORS, MAX_IOU_GT, MAX_IOU_LABELS, min_pos_iou=0.35)
    assert strict.assigned_gt.tolist() == without.assigned_gt.tolist()


def test_max_iou_low_quality_match_goes_to_the_last_gt_as_mmdet():
    anchors = tensor([[0, 0, 10, 10], [100, 100, 110, 110]])
    # both GTs have anchor 0 as their best (IoU 0.25 each): MMDet's loop lets the later GT win
    gt_boxes, gt_labels = tensor([[[0, 0, 5, 5], [5, 5, 10, 10]]]), torch.tensor([[0, 1]])
    result = max_iou_assign(anchors, gt_boxes, gt_labels)
    assert result.assigned_gt.tolist() == [[1, BACKGROUND]]


def test_max_iou_gt_overlapping_no_anchor_claims_nothing():
    anchors = tensor([[0, 0, 10, 10], [100, 100, 110, 110]])
    gt_boxes, gt_labels = tensor([[[500, 500, 510, 510]]]), torch.tensor([[0]])
    result = max_iou_assign(anchors, gt_boxes, gt_labels)
    assert result.assigned_gt.tolist() == [[BACKGROUND, BACKGROUND]]


def test_max_iou_invalid_anchors_are_ignored():
    valid = torch.tensor([[False, True, True, True, False, True]])
    result = max_iou_assign(MAX_IOU_ANCHORS, MAX_IOU_GT, MAX_IOU_LABELS, valid=valid)
    # without anchor 0, anchor 1 (IoU 0.45) becomes GT 0's best anchor and is claimed as a low-quality match
    assert result.assigned_gt.tolist() == [[IGNORED, 0, BACKGROUND, BACKGROUND, IGNORED, 2]]


def max_iou_reference(anchors: np.ndarray, gt: np.ndarray, pos: float, neg: float) -> np.ndarray:
    """MMDet MaxIoUAssigner (min_pos_iou 0, gt_max_assign_all) for one image, in its own index encoding."""
    if len(gt) == 0:
        return np.full(len(anchors), -1)
    ious = np_iou(anchors, gt)  # [N, M]
    best = ious.max(1)
    assigned = np.where(best < neg, -1, -2)
    assigned = np.where(best >= pos, ious.argmax(1), assigned)
    for j in range(len(gt)):
        if ious[:, j].max() > 0:
            assigned[ious[:, j] == ious[:, j].max()] = j
    return assigned


def test_max_iou_matches_per_image_reference_on_random_padded_batch():
    sizes, strides = [(8, 8), (4, 4)], [8, 16]
    anchors = make_anchors(sizes, strides, [32.0, 64.0], [1.0, 1.26], [0.5, 1.0, 2.0], "cpu")
    gt_boxes, gt_labels = random_gt(6, 7, 64.0, seed=1)
    result = max_iou_assign(anchors, gt_boxes, gt_labels)
    for image in range(6):
        real = gt_labels[image] >= 0
        expected = max_iou_reference(anchors.numpy(), gt_boxes[image][real].numpy(), 0.5, 0.4)
        expected = to_padded_index(expected, real)
        assert np.array_equal(result.assigned_gt[image].numpy(), expected)
    assert (result.assigned_gt == IGNORED).any() and result.pos_mask.sum() > 10
    check_labels(result, gt_labels)


# FCOS -------------------------------------------------------------------------------------------------------------


def test_fcos_center_sampling_region():
    points, _ = make_points([(4, 4)], [8], "cpu")  # coordinates 4, 12, 20, 28
    gt_boxes, gt_labels = tensor([[[0, 0, 32, 32]]]), torch.tensor([[2]])
    args = (points, [16], [8], [(-1, INF)], gt_boxes, gt_labels)
    sampled = fcos_assign(*args)
    # centre region: 16 ± 1.5·8 = [4, 28]; points on its edge (4, 28) are outside
    assert torch.nonzero(sampled.pos_mask[0]).flatten().tolist() == [5, 6, 9, 10]
    assert (sampled.labels[0, [5, 6, 9, 10]] == 2).all()
    assert sampled.pos_mask.sum() == 4
    assert fcos_assign(*args, center_sampling=False).pos_mask.all()


def test_fcos_regress_ranges_pick_the_level():
    sizes, strides = [(4, 4), (2, 2)], [8, 16]
    points, _ = make_points(sizes, strides, "cpu")
    gt_boxes, gt_labels = tensor([[[0, 0, 32, 32]]]), torch.tensor([[0]])
    result = fcos_assign(
        points, anchors_per_level(sizes), strides, [(-1, 16), (16, INF)], gt_boxes, gt_labels, center_sampling=False
    )
    # level-0 points reach at least 20 px to a side (> 16); every level-1 point (max 24) is in range
    assert torch.nonzero(result.pos_mask[0]).flatten().tolist() == [16, 17, 18, 19]


def test_fcos_ambiguous_point_takes_smallest_gt_and_padding_is_ignored():
    points, _ = make_points([(4, 4)], [8], "cpu")
    # GT 0 big, GT 1 small inside it, GT 2 padding (label -1) with a box covering everything
    gt_boxes = tensor([[[0, 0, 32, 32], [8, 8, 24, 24], [0, 0, 2, 2]]])
    gt_labels = torch.tensor([[0, 1, -1]])
    result = fcos_assign(points, [16], [8], [(-1, INF)], gt_boxes, gt_labels, center_sampling=False)
    grid = result.assigned_gt[0].view(4, 4)
    assert grid.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(result.gather_boxes(gt_boxes)[0, 5], gt_boxes[0, 1])


def fcos_reference(points, strides, ranges, gt, radius) -> np.ndarray:
    """MMDet FCOSHead targets for one image, point by point."""
    assigned = np.full(len(points), -1)
    for i, ((x, y), stride, (low, high)) in enumerate(zip(points, strides, ranges)):
        best_area = np.inf
        for j, (x1, y1, x2, y2) in enumerate(gt):
            cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, stride * radius
            region = (max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2))
            inside = min(x - region[0], y - region[1], region[2] - x, region[3] - y) > 0
            reach = max(x - x1, y - y1, x2 - x, y2 - y)
            area = (x2 - x1) * (y2 - y1)
            if inside and low <= reach <= high and area < best_area:
                best_area, assigned[i] = area, j
    return assigned


def test_fcos_matches_per_image_reference_on_random_padded_batch():
    sizes, strides = [(8, 8), (4, 4), (2, 2)], [8, 16, 32]
    ranges = [(-1, 24), (24, 48), (48, INF)]
    points, point_strides = make_points(sizes, strides, "cpu")
    gt_boxes, gt_labels = random_gt(5, 6, 64.0, seed=2)
    result = fcos_assign(points, anchors_per_level(sizes), strides, ranges, gt_boxes, gt_labels)
    level_ranges = [r for r, n in zip(ranges, anchors_per_level(sizes)) for _ in range(n)]
    for image in range(5):
        real = gt_labels[image] >= 0
        real_boxes = gt_boxes[image, real].numpy()
        expected = fcos_reference(points.numpy(), point_strides.numpy(), level_ranges, real_boxes, 1.5)
        expected = to_padded_index(expected, real)
        assert np.array_equal(result.assigned_gt[image].numpy(), expected)
    assert result.pos_mask.sum() > 10
    check_labels(result, gt_labels)
    from_point_strides = fcos_assign(points, anchors_per_level(sizes), point_strides, ranges, gt_boxes, gt_labels)
    assert torch.equal(from_point_strides.assigned_gt, result.assigned_gt)


def no_decode() -> tuple[torch.Tensor, torch.Tensor]:
    raise AssertionError("an assigner decoded the predictions")


def test_assigner_objects_run_their_functions_on_the_priors():
    sizes, strides = [(4, 4), (2, 2)], [8, 16]
    anchors = make_anchors(sizes, strides, [32.0, 64.0], [1.0], [1.0], "cpu")
    points, point_strides = make_points(sizes, strides, "cpu")
    counts = anchors_per_level(sizes)
    gt_boxes = tensor([[[2, 2, 30, 30], [20, 10, 60, 50]], [[8, 8, 40, 24], [0, 0, 0, 0]]])
    gt_labels = torch.tensor([[0, 3], [1, -1]])
    valid = torch.rand(2, sum(counts), generator=torch.Generator().manual_seed(0)) > 0.2
    anchor_priors = Priors(anchors, (anchors[:, :2] + anchors[:, 2:]) / 2, point_strides, counts)
    point_priors = Priors(torch.cat([points, points], 1), points, point_strides, counts)
    unused = Predictions(no_decode)  # geometric assigners never read the predictions
    ranges = [(-1, 32), (32, INF)]
    pairs = [
        (ATSSAssigner(topk=3)(anchor_priors, gt_boxes, gt_labels, valid, unused),
         atss_assign(anchors, counts, gt_boxes, gt_labels, topk=3, valid=valid)),
        (MaxIoUAssigner(0.4, 0.3)(anchor_priors, gt_boxes, gt_labels, valid, unused),
         max_iou_assign(anchors, gt_boxes, gt_labels, 0.4, 0.3, valid=valid)),
        (FCOSAssigner(ranges, True, 1.0)(point_priors, gt_boxes, gt_labels, valid, unused),
         fcos_assign(points, counts, strides, ranges, gt_boxes, gt_labels, True, 1.0)),
    ]
    for ours, reference in pairs:
        assert torch.equal(ours.assigned_gt, reference.assigned_gt) and ours.pos_mask.any()


# All assigners ----------------------------------------------------------------------------------------------------


def run_all(gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> list[AssignResult]:
    sizes, strides = [(4, 4), (2, 2)], [8, 16]
    anchors = make_anchors(sizes, strides, [32.0, 64.0], [1.0], [1.0], "cpu")
    points, _ = make_points(sizes, strides, "cpu")
    counts = anchors_per_level(sizes)
    return [
        atss_assign(anchors, counts, gt_boxes, gt_labels),
        max_iou_assign(anchors, gt_boxes, gt_labels),
        fcos_assign(points, counts, strides, [(-1, 32), (32, INF)], gt_boxes, gt_labels),
    ]


@pytest.mark.parametrize("num_gt", [0, 3])
def test_empty_ground_truth_gives_all_background(num_gt):
    gt_boxes, gt_labels = torch.zeros(2, num_gt, 4), torch.full((2, num_gt), -1)
    for result in run_all(gt_boxes, gt_labels):
        assert result.assigned_gt.shape == (2, 20)
        assert (result.assigned_gt == BACKGROUND).all() and (result.labels == -1).all()
        assert torch.isfinite(result.max_overlaps).all() and (result.max_overlaps == 0).all()
        assert (result.gather_boxes(gt_boxes) == 0).all()


def test_padding_rows_do_not_change_the_assignment():
    gt_boxes, gt_labels = tensor([[[4, 4, 20, 28]]]), torch.tensor([[1]])
    padded_boxes = torch.cat([gt_boxes, tensor([[[0, 0, 30, 30], [10, 10, 12, 12]]])], dim=1)
    padded_labels = torch.cat([gt_labels, torch.tensor([[-1, -1]])], dim=1)
    for plain, padded in zip(run_all(gt_boxes, gt_labels), run_all(padded_boxes, padded_labels), strict=True):
        assert plain.pos_mask.any()
        assert torch.equal(plain.assigned_gt, padded.assigned_gt)
        assert torch.equal(plain.labels, padded.labels)
        torch.testing.assert_close(plain.max_overlaps, padded.max_overlaps)
