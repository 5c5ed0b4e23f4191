"""Shared helpers: logging, colours, run directories, atomic saving, seeding and device selection."""

import logging
import os
import random

import numpy as np
import pytest
import torch

from crosskd import utils
from crosskd.errors import UserError
from crosskd.utils import (
    LOGGER,
    atomic_save,
    colorstr,
    init_seeds,
    parse_device_list,
    select_device,
)


def test_logger_prints_plain_messages_to_stdout_and_prefixes_warnings(capsys):
    LOGGER.info("hello")
    LOGGER.warning("careful")
    captured = capsys.readouterr()
    assert captured.out == "hello\nWARNING: careful\n" and captured.err == ""


def test_logger_is_silent_below_error_on_other_ranks(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    LOGGER.info("from rank 1")
    LOGGER.warning("warned on rank 1")
    LOGGER.error("broken on rank 1")
    assert capsys.readouterr().out == "ERROR: broken on rank 1\n"


def test_logger_does_not_propagate_to_root():
    assert LOGGER.name == "crosskd" and not LOGGER.propagate and LOGGER.level == logging.INFO


def test_colorstr_is_plain_off_terminal_and_coloured_on_one(monkeypatch):
    assert colorstr("bold", "red", "text") == "text"
    monkeypatch.setattr(utils, "_use_colour", lambda: True)
    assert colorstr("bold", "red", "text") == "\033[1;31mtext\033[0m"  # rich's SGR codes
    assert colorstr("text") == "\033[1;34mtext\033[0m"


def test_atomic_save_writes_a_loadable_file_and_no_temp_files(tmp_path):
    path = atomic_save({"epoch": 3, "w": torch.arange(4)}, tmp_path / "weights" / "last.pt")
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4))
    assert os.listdir(path.parent) == ["last.pt"]


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    path = atomic_save({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception, match="pickle|lambda"):
        atomic_save({"epoch": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_save_respects_the_umask_like_other_run_files(tmp_path, umask, mode):
    old_umask = os.umask(umask)
    try:
        path = atomic_save({"epoch": 1}, tmp_path / "last.pt")
        (tmp_path / "results.csv").write_text("epoch\n")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == mode == (tmp_path / "results.csv").stat().st_mode & 0o777


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def test_init_seeds_makes_every_generator_repeat(restore_determinism):
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    init_seeds(7)
    first = draw()
    init_seeds(7)
    assert draw() == first
    init_seeds(8)
    assert draw() != first


def test_init_seeds_deterministic_switch(restore_determinism):
    init_seeds(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    init_seeds(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    ("device", "expected"),
    [(None, []), ("", []), ("cpu", []), (0, [0]), ("0", [0]), ("0,1", [0, 1]), ([0, 2], [0, 2]), ((1,), [1]),
     ("cuda:1", [1]), ("[0, 1]", [0, 1]), ("cuda", [])],
)
def test_parse_device_list(device, expected):
    assert parse_device_list(device) == expected


def test_parse_device_list_rejects_nonsense():
    with pytest.raises(UserError, match="device=gpu is not valid; use cpu"):
        parse_device_list("gpu")


def test_select_device_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None) == torch.device("cpu")
    assert select_device("") == torch.device("cpu")
    with pytest.raises(UserError) as error:
        select_device("0")
    assert str(error.value) == "device=0 asks for CUDA but torch.cuda.is_available() is False; use device=cpu"
    with pytest.raises(UserError, match="use device=cpu"):
        select_device("cuda")


def test_select_device_picks_this_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device("0,1") == torch.device("cuda", 0)
    assert select_device("") == torch.device("cuda", 0)
    assert select_device(1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device("0,1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="lists 1 GPU"):
        select_device("0")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(UserError, match="asks for GPU 3 but only 2 CUDA device"):
        select_device("3")

