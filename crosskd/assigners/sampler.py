"""Random sampling of assigned candidates (MMDetection's RandomSampler), over the whole padded batch at once."""

import torch
from torch import Tensor

from crosskd.assigners.result import BACKGROUND


def _random_pick(mask: Tensor, keys: Tensor, limit: Tensor | int, cap: int) -> Tensor:
    """`[B, N]` bool: per image at most `limit` ([B, 1] or int, ≤ `cap`) True entries of `mask`, chosen by `keys`."""
    k = min(cap, mask.shape[1])
    ranked = torch.where(mask, keys, -1.0)  # [B, N]: candidates keep their random key in [0, 1)
    top, index = ranked.topk(k, dim=1)  # [B, k], random order among the candidates
    order = torch.arange(k, device=mask.device)[None]  # [1, k]
    chosen = (top >= 0) & (order < limit)  # [B, k]
    return torch.zeros_like(mask).scatter(1, index, chosen)


@torch.no_grad()
def random_sample(assigned_gt: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """Sample `num` candidates per image: up to `int(num · pos_fraction)` positives at random, negatives the rest.

    Ignored candidates (−2) are never sampled; an image with few candidates gets fewer than `num` (MMDetection's
    RandomSampler, neg_pos_ub −1). Draws from torch's default generator.

    Args:
        assigned_gt: [B, N] gt index ≥ 0 for positives, −1 background, −2 ignored.
    Returns:
        pos [B, N] bool, neg [B, N] bool: the sampled positives and negatives.
    """
    keys = torch.rand(assigned_gt.shape, device=assigned_gt.device)  # [B, N]
    num_pos = int(num * pos_fraction)
    pos = _random_pick(assigned_gt >= 0, keys, num_pos, num_pos)
    num_neg = num - pos.sum(dim=1, keepdim=True)  # [B, 1]
    neg = _random_pick(assigned_gt == BACKGROUND, keys, num_neg, num)
    return pos, neg
