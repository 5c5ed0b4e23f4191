"""Non-finite training steps: the all-rank skip decision, the BatchNorm statistics a skipped step must not keep, and
the counts shown in the progress bar and results.csv."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crosskd.dist import reduce_mean


class NonFiniteGuard:
    """Decides whether a training step is applied, and counts the skipped ones (this epoch and in a row)."""

    def __init__(self) -> None:
        self.epoch_skips = 0  # steps skipped in the current epoch
        self.in_row = 0  # steps skipped since the last applied one
        self.module: nn.Module | None = None
        self.buffers: list[Tensor] = []
        self.saved: list[Tensor] = []

    def start_epoch(self) -> None:
        self.epoch_skips = 0

    def save_buffers(self, module: nn.Module) -> None:
        """Remember `module`'s buffers (BatchNorm running statistics), which its next forward pass changes."""
        if module is not self.module:
            self.module = module
            self.buffers = list(module.buffers())
            self.saved = [buffer.detach().clone() for buffer in self.buffers]
        elif self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore_buffers(self) -> None:
        """Put back the buffers saved before the skipped step's forward pass."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)

    def is_finite(self, total: Tensor, grads: list[Tensor] | None = None) -> bool:
        """Whether the scalar loss `total` (and every gradient in `grads`, when given) is finite on every rank.

        One flag is averaged over the ranks, so all DDP processes take the same decision (and the same host sync).
        """
        bad = (~torch.isfinite(total.detach())).float()
        if grads:
            bad = bad + (~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))).float()
        return reduce_mean(bad).item() == 0

    def record(self, applied: bool) -> int:
        """Count a step; returns how many steps in a row have now been skipped (0 after an applied step)."""
        if applied:
            self.in_row = 0
        else:
            self.in_row += 1
            self.epoch_skips += 1
        return self.in_row
