"""Shared test settings."""

from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """One intra-op thread per test process: with two cores, a second OpenMP thread mostly waits (tens of × slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def write_digits_yaml():
    """A function writing `root/data.yaml`: digits generated on first use (64 px, 1-2 digits, seed 0), classes 0-9."""

    def write(root: Path, num_train: int, num_val: int) -> Path:
        data = {
            "path": str(root / "digits"), "train": "annotations/instances_train.json",
            "val": "annotations/instances_val.json", "names": {i: str(i) for i in range(10)}, "fliplr": 0,
            "generate": {"num_train": num_train, "num_val": num_val, "imgsz": 64, "objects": [1, 2], "seed": 0},
        }
        path = root / "data.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write
