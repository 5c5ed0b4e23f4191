"""Thin helpers over torch.distributed that also work when it is not initialised."""

import logging
import os
import sys

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


def all_gather_object(obj: object) -> list:
    """Every rank's `obj`, in rank order (`[obj]` without a process group); a collective."""
    if not is_dist():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_torchrun_worker() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1): it joins a process group."""
    return env_world_size() > 1


def end_torchrun_worker(code: int) -> None:
    """Flush the logs and end this torchrun worker now with `code`, skipping the interpreter's finalisation.

    Once DistributedDataParallel has wrapped a module, torch keeps its gloo process group and the group's worker threads
    alive after destroy_process_group (a torch leak, tests/test_dist.py watches it); while the interpreter finalises,
    those threads can abort the process ("terminate called without an active exception", SIGABRT), failing a run that
    had finished and saved everything. Ending with os._exit after the flush leaves nothing for them to race.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
