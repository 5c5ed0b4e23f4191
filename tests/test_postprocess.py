"""The one post-processing path: traceable priors, the padded core against its per-image view, and a traced graph
giving the eager detections at other batch and input sizes."""

import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

from crosskd.models import DenseDetector, build_detector
from crosskd.models.postprocess import grouped_nms, postprocess, select_detections, traceable_priors

SMALL_MODELS = {"gfl": "gfl_r18t", "retinanet": "retinanet_r18s", "fcos": "fcos_r18s", "atss": "atss_r18s"}


def small_detector(head_type: str, nc: int = 3) -> DenseDetector:
    """A shipped small model with random head biases, so that scores spread well above and below 0.01."""
    torch.manual_seed(0)
    detector = build_detector(SMALL_MODELS[head_type], nc)
    for module in detector.head.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            nn.init.normal_(module.bias, 0.0, 1.0)
    return detector.eval()


def random_candidates(batch: int = 3, num: int = 60, nc: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Overlapping boxes [B, N, 4] xyxy in a 64-px image and scores [B, N, C]."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, num, 2, generator=generator) * 48
    sizes = 4 + torch.rand(batch, num, 2, generator=generator) * 16
    scores = torch.rand(batch, num, nc, generator=generator) ** 3
    return torch.cat([corners, corners + sizes], dim=-1), scores


@pytest.mark.parametrize("head_type", SMALL_MODELS)
def test_traceable_priors_equal_head_priors(head_type):
    sizes = [(5, 3), (3, 2), (2, 1), (1, 1), (1, 1)]
    head = small_detector(head_type).head
    expected, actual = head.priors(sizes, "cpu"), traceable_priors(head, sizes, "cpu")
    assert torch.equal(actual.boxes, expected.boxes) and torch.equal(actual.strides, expected.strides)
    torch.testing.assert_close(actual.points, expected.points)  # anchor centres: (x1 + x2) / 2 rounds differently
    assert list(actual.num_per_level) == list(expected.num_per_level)


def test_padded_core_and_per_image_view_agree():
    boxes, scores = random_candidates()
    rows, counts = select_detections(boxes, scores, [40, 20], conf=0.05, iou=0.5, max_det=8, nms_pre=30)
    dets = postprocess(boxes, scores, [40, 20], conf=0.05, iou=0.5, max_det=8, nms_pre=30)
    assert rows.shape == (3, 8, 6) and counts.tolist() == [len(d.scores) for d in dets]
    assert counts.max() == 8 and counts.min() > 0  # max_det caps at least one image
    for row, count, det in zip(rows, counts.tolist(), dets, strict=True):
        assert torch.equal(row[:count, :4], det.boxes) and torch.equal(row[:count, 4], det.scores)
        assert torch.equal(row[:count, 5].long(), det.labels) and det.labels.dtype == torch.int64
        assert (row[count:] == 0).all()  # zero padding after the detections
        assert (det.scores[:-1] >= det.scores[1:]).all() and (det.scores > 0.05).all()


def test_core_suppresses_within_image_and_class_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], dtype=torch.float32).expand(2, -1, -1)
    scores = torch.zeros(2, 3, 2)
    scores[0, :2, 0] = torch.tensor([0.9, 0.8])  # IoU 0.68 with the first box, same class: suppressed
    scores[0, 2, 1] = 0.7  # the same place, another class: kept
    scores[1, 1, 0] = 0.6  # another image: kept
    rows, counts = select_detections(boxes, scores, [3], conf=0.05, iou=0.5, max_det=4)
    assert counts.tolist() == [2, 1]
    assert rows[0, :2, 4].tolist() == pytest.approx([0.9, 0.7]) and rows[0, :2, 5].tolist() == [0, 1]
    assert rows[1, 0].tolist() == pytest.approx([1, 1, 11, 11, 0.6, 0])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("num", [0, 30, 3000])  # 3000 boxes: batched_nms loops over groups; fewer: its offset trick
def test_grouped_nms_eager_equals_the_traced_offset_trick(num):
    """Eager `grouped_nms` (torchvision's batched_nms) keeps the boxes the traced one-`nms` version keeps, in the
    same score order, with groups whose boxes overlap across groups (so a missing offset would suppress them)."""
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(num, 2, generator=generator) * 40
    boxes = torch.cat([corners, corners + 8 + torch.rand(num, 2, generator=generator) * 16], 1)  # [num, 4]
    scores = torch.rand(num, generator=generator)
    groups = torch.randint(12, (num,), generator=generator)
    eager = grouped_nms(boxes, scores, groups, 0.5)
    traced = torch.jit.trace(lambda b, s, g: grouped_nms(b, s, g, 0.5), (boxes, scores, groups))(boxes, scores, groups)
    assert torch.equal(eager, traced)
    single = torchvision.ops.nms(boxes, scores, 0.5)
    assert num == 0 or len(eager) > len(single)  # groups overlap: one nms over all would suppress more


def test_nms_pre_zero_keeps_every_candidate():
    boxes = torch.stack([torch.tensor([i * 20.0, 0, i * 20 + 10, 10]) for i in range(12)])[None]  # disjoint
    scores = torch.linspace(0.1, 0.9, 12).view(1, 12, 1)
    assert select_detections(boxes, scores, [6, 6], conf=0.05, nms_pre=0)[1].tolist() == [12]
    assert select_detections(boxes, scores, [6, 6], conf=0.05, nms_pre=2)[1].tolist() == [4]  # 2 per level


class Detect(nn.Module):
    """The eager path's two shared steps as one graph: images -> padded detections [B, max_det, 6]."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tensor:
        return select_detections(*self.detector.decode(images), conf=0.01, iou=0.6, max_det=30, nms_pre=50)[0]


@pytest.mark.parametrize("head_type", ["gfl", "retinanet"])
def test_traced_graph_gives_eager_detections_at_other_sizes(head_type):
    """Traced at B=1, 64x64, the graph keeps batch, H and W dynamic and matches DenseDetector.predict."""
    detector = small_detector(head_type)
    model = Detect(detector).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    for shape in [(2, 3, 64, 64), (3, 3, 128, 96)]:
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            rows = traced(images)
        expected = detector.predict(images, conf=0.01, iou=0.6, max_det=30, nms_pre=50)
        assert rows.shape == (shape[0], 30, 6)
        for row, det in zip(rows, expected, strict=True):
            found = row[row[:, 4] > 0]
            assert 0 < len(found) == len(det.scores)
            torch.testing.assert_close(found[:, :4], det.boxes, atol=1e-4, rtol=0)
            torch.testing.assert_close(found[:, 4], det.scores, atol=1e-6, rtol=0)
            assert torch.equal(found[:, 5].long(), det.labels)
            assert (det.boxes[:, 2] <= shape[3]).all() and (det.boxes[:, 3] <= shape[2]).all()  # clamped to W, H
