"""`python -m crosskd.engine.training.torchrun ARGS`: torchrun (torch.distributed.run, same arguments) that ends on
SIGTERM or SIGINT with the shell's code 143 / 130 and no traceback of its own.

torchrun passes the signal on to its processes and waits for them (they save last.pt and stop), then raises
SignalException out of its main, which Python prints as a traceback before exiting 1. `ddp.launch` runs this instead.
"""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main

from crosskd.engine.training.interrupt import exit_code


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with `argv` (default: the command line); exit 128 + the signal's number when it got one."""
    try:
        torchrun_main(argv)
    except SignalException as stop:
        raise SystemExit(exit_code(stop.sigval)) from None


if __name__ == "__main__":
    main()
