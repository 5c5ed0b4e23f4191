"""Two torchrun nodes on this machine (c10d rendezvous, gloo, one CPU process each): the losses of one process with the
same total batch, only global rank 0 writes, and a lost node ends the job with one line and a resumable last.pt."""

import contextlib
import csv
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data import load_data_yaml
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.training import ddp
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.trainer import Trainer
from crosskd.models import build_detector, load_model_yaml

NAMES = {i: str(i) for i in range(10)}
LOSSES = {"train": ("train/cls_loss", "train/box_loss", "train/dfl_loss"),
          "distill": ("train/cls_loss", "train/box_loss", "train/dfl_loss", "train/kd_cls_loss")}
# results.csv keeps 5 significant digits (a rounding step is up to 1e-4 relative); float32 sums in another order
# (per-rank loss sums, gloo's all-reduce of the gradients) differ by at most 3e-7 relative over the 3 steps (measured
# at full precision: 6e-7 absolute); a wrong split of the batch (e.g. a normaliser taken per rank) moves them by > 1e-2
RTOL = 2e-4


def start_checkpoint(path: Path, width: int) -> Path:
    """gfl_r18t with FPN and head convs `width` wide, BatchNorm statistics frozen (norm_eval: per-process batches are
    normalised like the whole batch) and classifier bias -2 (scores 0.12: with 4-6 digits per image GFL's box-loss
    normaliser, the rank mean of the positives' scores clamped at 1, is 3-5, so the clamp never makes it differ from
    the whole batch's; with 1-2 digits it is 0.74 on 2 ranks, clamped to 1, while one process has 1.47)."""
    model_cfg, _ = load_model_yaml("gfl_r18t.yaml")
    model_cfg["backbone"]["norm_eval"] = True
    model_cfg["neck"]["out_channels"] = width
    model_cfg["head"].update(feat_channels=width, num_groups=width // 4)
    torch.manual_seed(0)
    detector = build_detector(model_cfg, nc=10)
    torch.nn.init.constant_(detector.head.gfl_cls.bias, -2.0)
    return save_checkpoint(make_checkpoint(detector, epoch=-1, best_fitness=None, names=NAMES, train_args={}), path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    """8 train / 4 val digits (64 px, 4-6 per image, no flips), a 32 wide start (also the teacher) and a 16 wide
    student (its hold features at kd_idx 0, the FPN outputs, get a 16 -> 32 adapter)."""
    root = tmp_path_factory.mktemp("multinode")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({
        "path": str(root / "digits"), "train": "annotations/instances_train.json",
        "val": "annotations/instances_val.json", "names": NAMES, "fliplr": 0,
        "generate": {"num_train": 8, "num_val": 4, "imgsz": 64, "objects": [4, 6], "seed": 0},
    }))
    load_data_yaml(data)  # generate the images once, before two nodes read them
    return SimpleNamespace(root=root, data=data, start=start_checkpoint(root / "start.pt", 32),
                           student=start_checkpoint(root / "student.pt", 16))


def settings(inputs: SimpleNamespace, mode: str, **overrides) -> dict:
    """batch 8 = the whole train set: one step per epoch over the same 8 images in every run."""
    common = {"data": str(inputs.data), "epochs": 3, "batch": 8, "imgsz": 64, "workers": 0, "device": "cpu",
              "warmup_iters": 0, "lr0": 0.004, "val": False, "plots": False, "seed": 0, "name": "run"}
    if mode == "distill":  # kd_branch=cls leaves the reg side of the 16 -> 32 adapter unused: find_unused_parameters
        common.update(model=str(inputs.student), teacher=str(inputs.start), kd_branch="cls", kd_align=False)
    else:
        common.update(model=str(inputs.start))
    return {**common, **overrides}


def reserve_port() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1 with SO_REUSEADDR, never listening. While it is open no other
    process's port-0 bind or outgoing connection gets that port, yet node 0's rendezvous store (libuv binds with
    SO_REUSEADDR too) can bind it; a probe socket closed before the launch would leave the port to whoever asks next."""
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind(("127.0.0.1", 0))
    return reservation


def listening(port: int) -> bool:
    """Whether some socket of this machine listens on TCP `port` (/proc/net/tcp and tcp6: state 0A is LISTEN)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        if any(f"{row.split()[1].rsplit(':', 1)[1]} {row.split()[3]}" == f"{port:04X} 0A" for row in rows):
            return True
    return False


def launch_nodes(root: Path, mode: str, config: dict) -> list[subprocess.Popen]:
    """Node 0 then node 1, each a torchrun of one process in its own folder (root/node0, root/node1); node 0's
    launcher hosts the rendezvous store (on one machine both would try), as the endpoint's host does on a cluster.
    The endpoint's port stays reserved until node 0's store listens on it. Every address is the loopback one (the
    launchers' and gloo's), whatever this machine's host name resolves to."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", ddp.TIMEOUT_ENV: "60", "GLOO_SOCKET_IFNAME": "lo"}
    words = [f"{key}={value}" for key, value in config.items()]
    nodes = []
    with reserve_port() as reservation:
        port = reservation.getsockname()[1]
        for node_rank in (0, 1):
            cwd = root / f"node{node_rank}"
            cwd.mkdir(parents=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                       "--local-addr=127.0.0.1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                       f"--rdzv-conf=is_host={int(node_rank == 0)}", "-m", "crosskd", mode, *words]
            nodes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
            time.sleep(0.5)  # started first (a lower pid), node 0 is given rank 0 by the c10d rendezvous
        deadline = time.monotonic() + 120
        while not listening(port) and nodes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    return nodes


def finish(nodes: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Both nodes' outputs, read side by side (neither pipe can fill and stall its node). When one node fails, or
    the timeout passes, every process of both is killed at once (a launcher whose peer failed waits 300 s in
    torchrun's exit barrier) and the test fails with both outputs."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        outputs = [pool.submit(node.communicate) for node in nodes]
        deadline = time.monotonic() + timeout
        while not all(output.done() for output in outputs):
            failed = any(node.poll() not in (None, 0) for node in nodes)
            if failed or time.monotonic() > deadline:
                for node in nodes:
                    kill_tree(node.pid)
                texts = [output.result()[0] for output in outputs]
                reason = "a node failed" if failed else f"the nodes ran past {timeout:.0f} s"
                pytest.fail(f"{reason}: " + "\n".join(f"--- node {rank}: exit {node.returncode}\n{text[-3000:]}"
                                                       for rank, (node, text) in enumerate(zip(nodes, texts))))
            time.sleep(0.1)
        return [output.result()[0] for output in outputs]


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (gone ones are skipped)."""
    for process in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def epoch_losses(run_dir: Path, names: tuple[str, ...]) -> list[list[float]]:
    with open(run_dir / "results.csv", newline="") as f:
        return [[float(row[k]) for k in names] for row in csv.DictReader(f)]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "distill"])
def test_two_nodes_match_one_process_and_only_rank_0_writes(inputs, mode):
    root = inputs.root / mode
    trainer_class = DistillTrainer if mode == "distill" else Trainer
    trainer_class(get_args(settings(inputs, mode, project=str(root / "single")), mode)).train()

    nodes = launch_nodes(root, mode, settings(inputs, mode))
    outputs = finish(nodes)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "DDP: gloo process group of 2 processes" in outputs[0]
    assert "batch 8 = 2 processes x 4 images" in outputs[0]
    assert f"find_unused_parameters={mode == 'distill'}" in outputs[0], outputs[0][:3000]
    assert outputs[1].count("Epoch") == 0  # rank 1 logs nothing below ERROR

    run_dir = root / "node0" / "runs" / mode / "run"
    assert files_under(root / "node1") == []  # global rank 1 wrote nothing in its folder ...
    assert files_under(run_dir) == files_under(root / "single" / "run")  # ... nor beside rank 0's files
    single, two_nodes = epoch_losses(root / "single" / "run", LOSSES[mode]), epoch_losses(run_dir, LOSSES[mode])
    assert len(single) == len(two_nodes) == 3
    assert single[2] != single[0]  # the weights did change over the steps
    diff = max(abs(a - b) for one, two in zip(single, two_nodes) for a, b in zip(one, two))
    print(f"{mode}: max abs diff of the epoch losses, 2 nodes vs 1 process: {diff:.3g}")
    for one, two in zip(single, two_nodes):
        assert two == pytest.approx(one, rel=RTOL, abs=1e-6)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts each worker in a session of its own), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(parents.get(tree[-1], []))
    return tree


def wait_for(path: Path, nodes: list[subprocess.Popen], timeout: float = 240) -> None:
    """Poll until `path` exists (a node ending first or the timeout fails the test with its output)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        ended = [node for node in nodes if node.poll() is not None]
        if ended or time.monotonic() > deadline:
            for node in nodes:
                node.kill()
            pytest.fail(f"{path} never appeared: " + "\n".join(node.communicate()[0][-2000:] for node in nodes))
        time.sleep(0.05)


@pytest.mark.slow
def test_lost_node_ends_the_job_with_one_line_and_a_resumable_last_pt(inputs):
    """SIGKILL node 1 (launcher and process, as a machine lost) after rank 0's first last.pt: node 0 sees the broken
    collective, writes last.pt of its last finished iteration, prints one line and exits; the printed resume ends it."""
    root = inputs.root / "lost"
    config = settings(inputs, "train", epochs=8, batch=4, save_period_iters=1)  # 2 iterations per epoch
    nodes = launch_nodes(root, "train", config)
    last = root / "node0" / "runs" / "train" / "run" / "weights" / "last.pt"
    wait_for(last, nodes)
    for pid in process_tree(nodes[1].pid):
        os.kill(pid, signal.SIGKILL)
    output = nodes[0].communicate(timeout=120)[0]
    nodes[1].wait(timeout=30)

    assert nodes[0].returncode != 0 and nodes[1].returncode == -signal.SIGKILL
    lines = [line for line in output.splitlines() if line.startswith("DDP: lost")]
    print(lines)
    assert len(lines) == 1 and lines[0].startswith("DDP: lost node 1 of 2 (peer 127.0.0.1:"), output[-3000:]
    assert f"saved {last}; resume with: crosskd train resume={last}" in lines[0]
    assert f'File "{Path(__file__).parents[1] / "crosskd"}' not in output  # no traceback through crosskd
    assert files_under(root / "node1") == []

    command = shlex.split(lines[0].split("resume with: ")[1])
    resumed = subprocess.run([sys.executable, "-m", "crosskd", *command[1:]], cwd=root / "node0", timeout=300,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming training" in resumed.stdout
    with open(last.parents[1] / "results.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, 9))
