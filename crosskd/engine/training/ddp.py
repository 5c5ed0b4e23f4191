"""Multi-process training: relaunch under torchrun (training/torchrun.py), and process-group setup inside each child."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from crosskd.config import get_args
from crosskd.data import Batch, Sample, collate
from crosskd.dist import env_world_size, is_dist, is_torchrun_worker
from crosskd.engine.training.interrupt import STOP_SIGNALS, exit_code
from crosskd.errors import ConfigError
from crosskd.settings import format_value
from crosskd.utils import LOGGER, colorstr, parse_device_list

DDP_TIMEOUT = timedelta(hours=3)
TIMEOUT_ENV = "CROSSKD_DDP_TIMEOUT"  # seconds a collective waits for the other processes before failing
LOST_NODE_EXIT = 75  # sysexits EX_TEMPFAIL: a temporary failure, start the job again with resume=


def env_local_rank() -> int:
    """LOCAL_RANK set by torchrun: this process's index on its node (0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def needs_launch(args: Any) -> bool:
    """More than one device asked for and this process is not already one of torchrun's children."""
    return len(parse_device_list(args.device)) > 1 and "LOCAL_RANK" not in os.environ


def cli_overrides(args: Any, mode: str) -> list[str]:
    """key=value words reproducing `args`: every setting the user gave or that differs from the defaults."""
    defaults = get_args({}, mode).to_dict()
    words = []
    for key, value in args.to_dict().items():
        if key in ("mode", "student") or (value == defaults.get(key) and not args.typed(key)):
            continue
        words.append(f"{key}={format_value(value)}")
    return words


def ddp_command(args: Any, mode: str, nproc: int) -> list[str]:
    """`python -m crosskd.engine.training.torchrun ... -m crosskd MODE key=value ...` running `nproc` copies of this
    command (training/torchrun.py: torchrun ending on SIGTERM/SIGINT with 143/130 instead of a traceback).

    `--standalone`: torchrun's own stores bind port 0 and stay open, so no other process can take the port between
    choosing it and binding it (as with a port number found free by a probe socket and closed again)."""
    return [
        sys.executable, "-m", "crosskd.engine.training.torchrun", "--nproc_per_node", str(nproc), "--standalone",
        "-m", "crosskd", mode, *cli_overrides(args, mode),
    ]


def launch(args: Any, mode: str) -> None:
    """Run this command again as one process per listed device (blocking); exits with torchrun's code: 143 / 130
    after a SIGTERM / SIGINT, which every process gets once and stops on after saving last.pt."""
    nproc = len(parse_device_list(args.device))
    command = ddp_command(args, mode, nproc)
    LOGGER.info(f"{colorstr('DDP:')} debug command {' '.join(command)}")
    code = run_forwarding_signals(command)
    if code != 0:
        raise SystemExit(exit_code(-code) if code < 0 else code)


def run_forwarding_signals(command: list[str]) -> int:
    """Run `command` in a session of its own and return its exit code (-N when signal N ended it).

    The first SIGTERM or SIGINT this process gets is passed on to it, later ones are dropped: a second signal would
    cut torchrun's wait for its processes short. The own session keeps a terminal's Ctrl-C, which goes to the whole
    foreground process group, from reaching torchrun and its processes a second time. Handlers are installed only in
    the main thread (Python allows no other); elsewhere signals keep their handling.
    """
    received: list[int] = []
    started: list[subprocess.Popen] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not received:
            received.append(signum)
            for process in started:
                process.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS} if main_thread else {}
    try:
        process = subprocess.Popen(command, start_new_session=True)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a signal now waits until `started` is set
        started.append(process)
        if received:  # it came while the process was being started
            process.send_signal(received[0])
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group: NCCL on CUDA, gloo otherwise (e.g. device=cpu)."""
    if is_dist() or not is_torchrun_worker():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=ddp_timeout())
    LOGGER.info(f"{colorstr('DDP:')} {backend} process group of {dist.get_world_size()} processes")


def ddp_timeout() -> timedelta:
    """How long a collective waits for the other processes: CROSSKD_DDP_TIMEOUT seconds, else 3 hours."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DDP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds above 0; set e.g. {TIMEOUT_ENV}=600")
    return timedelta(seconds=seconds)


def is_peer_failure(error: BaseException) -> bool:
    """True when a collective failed because another process of the job died or stopped answering.

    torch.distributed's own errors (DistError: backend, network, store) and the RuntimeErrors of gloo's transport
    ("[.../gloo/transport/tcp/pair.cc] Connection reset by peer", "Timed out waiting ... for recv") qualify; anything
    else is a bug and keeps its traceback.
    """
    gloo = isinstance(error, RuntimeError) and "gloo/transport" in str(error)
    return is_dist() and (isinstance(error, dist.DistError) or gloo)


def lost_node_text(error: BaseException) -> str:
    """Which node was lost, as this process can tell: the other node of a 2-node job, else the nodes besides this one,
    with the peer address of the failed connection when the error names it (e.g. 'node 1 of 2 (peer 10.0.0.2:4301)').
    Nodes are torchrun's group ranks (GROUP_RANK), a single-node job's other processes are 'a process of this node'."""
    world, local_world = env_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", env_world_size()))
    num_nodes, this_node = max(world // max(local_world, 1), 1), int(os.environ.get("GROUP_RANK", 0))
    others = [str(node) for node in range(num_nodes) if node != this_node]
    peer = re.search(r"\[([^\]]+)\]:(\d+)", str(error))
    where = f" (peer {peer.group(1)}:{peer.group(2)})" if peer else ""
    if not others:
        return f"a process of this node{where}"
    nodes = f"node {others[0]}" if len(others) == 1 else f"one of nodes {', '.join(others)}"
    return f"{nodes} of {num_nodes}{where}"


def cleanup_distributed() -> None:
    """Leave the process group when one was joined."""
    if is_dist():
        dist.destroy_process_group()


def probe_batch(size: int, device: torch.device) -> Batch:
    """One grey [1, 3, size, size] image with one centred box of class 0: enough for every loss term's graph."""
    box = torch.tensor([[size / 4, size / 4, size * 3 / 4, size * 3 / 4]])  # [1, 4] xyxy
    image = torch.full((3, size, size), 128, dtype=torch.uint8)
    sample = Sample(image, box, torch.zeros(1, dtype=torch.int64), 0, (size, size), 1.0, "probe")
    return collate([sample], pad_multiple=size).to(device)


def unused_parameters(module: nn.Module, batch: Batch) -> list[str]:
    """Names of the trainable parameters that the summed loss of `module(batch)` does not depend on.

    One dry forward and `autograd.grad` in eval mode: no `.grad`, BatchNorm statistic or RNG state changes (the RNG
    is forked: Faster R-CNN's RPN and R-CNN samplers draw from it even in eval mode). What is unused follows from the
    loss module's structure (e.g. kd_branch=cls leaves the reg side of a width adapter out), not from the batch's
    values, so this one probe decides DDP's `find_unused_parameters`.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    was_training = module.training
    module.train(False)
    cuda = [batch.images.device] if batch.images.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            total = sum(module(batch).values())
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        module.train(was_training)
    return [name for (name, _), grad in zip(named, grads, strict=True) if grad is None]
