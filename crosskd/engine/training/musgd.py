"""MuSGD, the optimiser Ultralytics 8.4 picks for long runs: SGD with Nesterov momentum on every parameter group, and
on the groups marked `use_muon` (conv and linear weights) also a Muon step (Jordan et al., 2024: the momentum of the
gradient orthogonalised by a quintic Newton–Schulz iteration).

Written from the published algorithm and Ultralytics' documented behaviour (hybrid weights muon 0.2, sgd 1.0;
Newton–Schulz coefficients (3.4445, −4.7750, 2.0315), 5 steps in bfloat16; the update scaled by
√max(1, rows/cols) of the gradient's last two dimensions; weight decay only in the SGD part).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # quintic coefficients (a, b, c)
NEWTON_SCHULZ_STEPS = 5
NORM_EPS = 1e-7
MUON_WEIGHT, SGD_WEIGHT = 0.2, 1.0  # Ultralytics' hybrid: lr x 0.2 for the Muon step, lr x 1.0 for the SGD step


def orthogonalize(matrices: Tensor) -> Tensor:
    """≈ U Vᵀ of each matrix's SVD U S Vᵀ (singular values pushed towards 1, roughly into [0.5, 1.5]): [N, R, C] ->
    [N, R, C] bfloat16, by `NEWTON_SCHULZ_STEPS` quintic Newton–Schulz steps on the Frobenius-normalised matrices."""
    x = matrices.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NORM_EPS)  # top singular value <= 1
    tall = matrices.shape[-2] > matrices.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    a, b, c = NEWTON_SCHULZ
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.transpose(-2, -1)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a·X + (b·A + c·A²)·X
    return x.transpose(-2, -1) if tall else x


def muon_updates(updates: list[Tensor]) -> list[Tensor]:
    """Each update [R, ...] orthogonalised as the matrix [R, prod(rest)] (same-shaped ones in one batched call),
    scaled by √max(1, size(-2)/size(-1)) of its own shape, in its dtype."""
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, update in enumerate(updates):
        by_shape[update.shape].append(i)
    result: list[Tensor] = [torch.empty(0)] * len(updates)
    for shape, indices in by_shape.items():
        stacked = torch.stack([updates[i].reshape(shape[0], -1) for i in indices])  # [N, R, prod(rest)]
        scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
        for i, matrix in zip(indices, orthogonalize(stacked), strict=True):
            result[i] = matrix.to(updates[i].dtype).reshape(shape) * scale
    return result


class MuSGD(torch.optim.Optimizer):
    """Per group: `lr`, `momentum`, `weight_decay`, `nesterov`, `use_muon`. A `use_muon` group steps by
    −lr·muon·orthogonalize(Muon momentum) and then by −lr·sgd·(SGD momentum step); other groups take the SGD step
    alone at lr. Weight decay enters the SGD step only (as L2 on the gradient, after the Muon step moved the weights).
    The Muon momentum is an average, m ← β·m + (1 − β)·g, and with Nesterov its update is β·m + (1 − β)·g."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = True, use_muon: bool = False, muon: float = MUON_WEIGHT, sgd: float = SGD_WEIGHT):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
                    "use_muon": use_muon}
        super().__init__(params, defaults)
        self.muon, self.sgd = muon, sgd

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = group["lr"]
            if group["use_muon"]:
                self.muon_step(params, group)
                lr *= self.sgd
            self.sgd_step(params, group, lr)
        return loss

    def muon_step(self, params: list[Tensor], group: dict) -> None:
        beta = group["momentum"]
        buffers = [self.buffer(p, "muon_momentum") for p in params]
        grads = [p.grad for p in params]
        torch._foreach_mul_(buffers, beta)
        torch._foreach_add_(buffers, grads, alpha=1 - beta)  # m <- beta m + (1 - beta) g
        updates = buffers
        if group["nesterov"]:
            updates = torch._foreach_mul(buffers, beta)
            torch._foreach_add_(updates, grads, alpha=1 - beta)  # beta m + (1 - beta) g
        torch._foreach_add_(params, muon_updates(updates), alpha=-group["lr"] * self.muon)

    def sgd_step(self, params: list[Tensor], group: dict, lr: float) -> None:
        momentum = group["momentum"]
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        buffers = [self.buffer(p, "momentum_buffer") for p in params]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)  # b <- momentum b + d
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_add_(params, updates, alpha=-lr)

    def buffer(self, param: Tensor, name: str) -> Tensor:
        state = self.state[param]
        if name not in state:
            state[name] = torch.zeros_like(param)
        return state[name]
