"""A process that used a loader with persistent workers exits: also a multiprocessing child (a process pool running
one training per task), where `atexit` handlers never run and the workers, which ignore SIGTERM, kept it waiting."""

import multiprocessing
from pathlib import Path

from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml

ALIVE_AT_EXIT = []  # a loader still referenced when the process ends (a trainer held by a module, a cycle)


def one_batch_with_a_worker(data: str, done: Path) -> None:
    """Take one batch from a loader with a persistent worker and leave the worker running, as a run's last
    validation loader does."""
    dataset = DetectionDataset(load_data_yaml(data), "train", 64, augment=True, pad_multiple=32)
    loader = build_dataloader(dataset, 2, workers=1, shuffle=True, seed=0, pin_memory=False)
    batches = iter(loader)
    ALIVE_AT_EXIT.append(batches)
    done.write_text(str(len(next(batches))))


def test_a_multiprocessing_child_with_persistent_loader_workers_exits(tmp_path: Path, write_digits_yaml) -> None:
    data = write_digits_yaml(tmp_path, 4, 2)
    load_data_yaml(data)  # generate the images here, not in the child
    done = tmp_path / "done.txt"
    child = multiprocessing.get_context("spawn").Process(target=one_batch_with_a_worker, args=(str(data), done))
    child.start()
    child.join(timeout=120)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert done.read_text() == "2"  # the batch came
    assert not hung and child.exitcode == 0, "the child did not exit: its loader worker kept it waiting"
