"""Thin helpers over torch.distributed that also work when it is not initialised."""

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (identity without a process group)."""
    if not is_dist():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / get_world_size()


def barrier() -> None:
    if is_dist():
        dist.barrier()
