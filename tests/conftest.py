"""Shared test settings."""

import importlib.util
import sys
import urllib.error
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
import torch
import yaml

from crosskd.data import DetectionDataset, collate, load_data_yaml
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.models import build_detector

DIGIT_NAMES = {i: str(i) for i in range(10)}
TINY_GFL = {  # quarter-width ResNet-18, FPN 16, one head conv: ~50 ms per training step on 4 images at 128 px
    "backbone": {"type": "resnet", "depth": 18, "width": 0.25},
    "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5, "add_extra_convs": "on_output"},
    "head": {"type": "gfl", "stacked_convs": 1, "feat_channels": 16, "num_groups": 4},
}


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """One intra-op thread per test process: with two cores, a second OpenMP thread mostly waits (tens of × slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def brief_export_timing():
    """Export's latency line (logged, asserted nowhere) timed for 0.05 s in one turn per side instead of 1.5 s in
    three: every in-process export spent over 3.6 s on it."""
    saved = exporter.LATENCY_SECONDS, exporter.LATENCY_ROUNDS, exporter.LATENCY_MIN_RUNS
    exporter.LATENCY_SECONDS, exporter.LATENCY_ROUNDS, exporter.LATENCY_MIN_RUNS = 0.05, 1, 2
    yield
    exporter.LATENCY_SECONDS, exporter.LATENCY_ROUNDS, exporter.LATENCY_MIN_RUNS = saved


@pytest.fixture(scope="session")
def write_digits_yaml():
    """A function writing `root/data.yaml`: digits generated on first use (64 px unless told, 1-2 digits, seed 0),
    classes 0-9."""

    def write(root: Path, num_train: int, num_val: int, imgsz: int = 64) -> Path:
        data = {
            "path": str(root / "digits"), "train": "annotations/instances_train.json",
            "val": "annotations/instances_val.json", "names": {i: str(i) for i in range(10)}, "fliplr": 0,
            "generate": {"num_train": num_train, "num_val": num_val, "imgsz": imgsz, "objects": [1, 2], "seed": 0},
        }
        path = root / "data.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


class TrainedDigits(NamedTuple):
    data: Path  # data.yaml: 2 train and 4 val digits images of 96 px (seed 0)
    weights: Path  # best.pt of TINY_GFL overfitted to the 4 val images at imgsz=128 (boxes scaled back by 0.75)


TRAINED_IMGSZ = 128
TRAINED_STEPS = 40


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py imported as the module `name`, as when run as a script (its folder on sys.path, for
    sibling imports; registered in sys.modules, where dataclasses look their module up)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fit(model: torch.nn.Module, batch, steps: int, lr: float = 3e-3) -> torch.nn.Module:
    """`steps` AdamW steps of `model` (a detector or a Distiller: anything with .loss(batch)) on one batch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = sum(model.loss(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, write_digits_yaml) -> TrainedDigits:
    """A tiny GFL that scores between 0 and 1 (val AP 0.66-0.68, by CPU; AP50 0.75): 40 AdamW steps on the val images,
    seed 0, ~3 s.

    The images are 96 px and the model sees them at 128, so a validator that forgot to scale boxes back to original
    pixels scores far lower. Copy `weights` before exporting next to it: the fixture is shared by the session.
    """
    root = tmp_path_factory.mktemp("trained_digits")
    data = write_digits_yaml(root, 2, 4, imgsz=96)
    dataset = DetectionDataset(load_data_yaml(data), "val", TRAINED_IMGSZ, augment=False, pad_multiple=128)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_multiple=128).to("cpu")  # [4, 3, 128, 128]
    torch.manual_seed(0)
    detector = fit(build_detector(TINY_GFL, nc=len(DIGIT_NAMES)), batch, TRAINED_STEPS)
    ckpt = make_checkpoint(detector.eval(), epoch=-1, best_fitness=None, names=DIGIT_NAMES,
                           train_args={"imgsz": TRAINED_IMGSZ, "data": str(data), "model": "gfl.yaml"})
    return TrainedDigits(data, save_checkpoint(ckpt, root / "best.pt"))


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """A fresh TORCH_HOME whose downloads fail: anything named (a teacher, a detector) must come from its hub cache."""

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"
