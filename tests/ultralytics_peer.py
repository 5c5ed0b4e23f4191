"""Where the tests find Ultralytics, the peer whose numbers crosskd's YOLO pieces are checked against.

Ultralytics (AGPL-3.0) is never imported by crosskd or its test process: tests run it in a subprocess with the
peer's own Python, which exchanges tensors with them through `torch.save` files.
"""

import os
import subprocess
from pathlib import Path

import pytest

PEER_ENV = "CROSSKD_ULTRALYTICS_PYTHON"
DEFAULT_PEER = "/work/ultra-venv/bin/python"


def ultralytics_python() -> Path:
    """The peer's Python (`$CROSSKD_ULTRALYTICS_PYTHON`, else the default venv); skips the test when there is none."""
    python = Path(os.environ.get(PEER_ENV) or DEFAULT_PEER)
    if not python.is_file():
        pytest.skip(f"no Ultralytics peer at {python} (set {PEER_ENV} to a Python with ultralytics installed)")
    return python


def run_peer(script: str, *args: Path | str, timeout: float = 120) -> None:
    """Run `script` (Python source) with the peer's Python and `args` as its argv; fail the test on a non-zero exit."""
    result = subprocess.run(
        [str(ultralytics_python()), "-c", script, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"Ultralytics peer failed:\n{result.stderr[-3000:]}"
