"""The Ultralytics peer the equality tests compare against: a python that can import ultralytics (crosskd never can)."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARE_DIR = REPO / ".compare"  # `make compare`: ultralytics installed for crosskd's python, on PYTHONPATH only here
DEFAULT_PEER = Path("/work/ultra-venv/bin/python")


def ultralytics_python() -> list[str]:
    """The command prefix running the peer: $CROSSKD_ULTRALYTICS_PYTHON, else `make compare`'s .compare/ with this
    python, else DEFAULT_PEER; the test is skipped when none exists."""
    if env := os.environ.get("CROSSKD_ULTRALYTICS_PYTHON"):
        return [env]
    if (COMPARE_DIR / "ultralytics").is_dir():
        return ["env", f"PYTHONPATH={COMPARE_DIR}", sys.executable]
    if DEFAULT_PEER.is_file():
        return [str(DEFAULT_PEER)]
    pytest.skip("no Ultralytics peer: run `make compare` (or set CROSSKD_ULTRALYTICS_PYTHON)")
