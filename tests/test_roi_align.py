"""crosskd's RoIAlign: torchvision's forward, and on CPU a separable backward equal to torchvision's gradient (RoIs
inside, across and outside the map, empty and tiny ones, both alignments, adaptive and fixed sampling)."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from crosskd.ops.roi_align import roi_align


def random_rois(count: int, images: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 5] RoIs in input pixels of a ~96 x 80 image: some empty, some tiny, some past the borders."""
    corner = torch.rand(count, 2, generator=generator) * 110 - 15
    size = torch.rand(count, 2, generator=generator) * 70
    size[:4] = 0.0
    size[4:8] = 0.3
    image = torch.randint(images, (count, 1), generator=generator).float()
    return torch.cat([image, corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_cpu_gradient_equals_torchvision(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 16, 20, 24, generator=generator, requires_grad=True)
    rois = random_rois(300, 3, generator)
    upstream = torch.randn(300, 16, 7, 7, generator=generator)
    expected = torchvision_roi_align(feat, rois, 7, 0.25, sampling_ratio, aligned)
    (expected_grad,) = torch.autograd.grad(expected, feat, upstream)
    out = roi_align(feat, rois, 7, 0.25, sampling_ratio, aligned)
    assert out.grad_fn.name().endswith("SeparableRoIAlignBackward")
    (grad,) = torch.autograd.grad(out, feat, upstream)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert expected_grad.abs().max() > 1
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_no_rois_and_no_grad_and_traced_graphs_use_torchvisions_op():
    feat = torch.randn(2, 4, 8, 8, requires_grad=True)
    empty = roi_align(feat, torch.zeros(0, 5), 7, 1.0, 0, True)
    (grad,) = torch.autograd.grad(empty.sum(), feat, allow_unused=True, materialize_grads=True)
    assert empty.shape == (0, 4, 7, 7) and not grad.any()
    rois = torch.tensor([[1.0, 1.0, 1.0, 6.0, 5.0]])
    assert roi_align(feat.detach(), rois, 7, 1.0, 0, True).grad_fn is None
    traced = torch.jit.trace(lambda x, r: roi_align(x, r, 7, 1.0, 0, True), (feat, rois))
    assert "torchvision::roi_align" in str(traced.graph)
