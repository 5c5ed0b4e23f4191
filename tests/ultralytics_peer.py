"""The Ultralytics peer the equality tests compare against: a Python that can import ultralytics (crosskd never can).

Ultralytics (AGPL-3.0) is never imported by crosskd or its test process: tests run it in a subprocess, which exchanges
tensors with them through `torch.save` files.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARE_DIR = REPO / ".compare"  # `make compare`: ultralytics installed for crosskd's python, on PYTHONPATH only here
DEFAULT_PEER = Path("/work/ultra-venv/bin/python")
PEER_ENV = "CROSSKD_ULTRALYTICS_PYTHON"


def ultralytics_python() -> list[str]:
    """The command prefix running the peer: $CROSSKD_ULTRALYTICS_PYTHON, else `make compare`'s .compare/ with this
    python, else DEFAULT_PEER; the test is skipped when none exists."""
    if env := os.environ.get(PEER_ENV):
        return [env]
    if (COMPARE_DIR / "ultralytics").is_dir():
        return ["env", f"PYTHONPATH={COMPARE_DIR}", sys.executable]
    if DEFAULT_PEER.is_file():
        return [str(DEFAULT_PEER)]
    pytest.skip(f"no Ultralytics peer: run `make compare` (or set {PEER_ENV})")


def run_peer(script: str, *args: Path | str, timeout: float = 120) -> None:
    """Run `script` (Python source) with the peer and `args` as its argv; fail the test on a non-zero exit."""
    result = subprocess.run([*ultralytics_python(), "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"Ultralytics peer failed:\n{result.stderr[-3000:]}"
