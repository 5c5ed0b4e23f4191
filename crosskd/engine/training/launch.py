"""Entry for `crosskd train` and `crosskd distill`: pick the trainer class, relaunch under torchrun or train here."""

from __future__ import annotations

from typing import Any

from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training import ddp
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.run_state import resume_path
from crosskd.engine.training.trainer import Trainer


def trainer_class(args: Any, resumed_args: dict | None = None) -> type[Trainer]:
    """DistillTrainer when a teacher is given (or recorded in the resumed run) or the mode is distill, else Trainer."""
    if args.teacher or (resumed_args or {}).get("teacher") or args.mode == "distill":
        return DistillTrainer
    return Trainer


def fit(args: Any) -> Trainer | None:
    """Relaunch under torchrun for several devices, else train in this process and return the finished trainer
    (its `save_dir`, `weights_dir`, `final_metrics`); None after a torchrun relaunch.

    On resume the checkpoint's args decide the trainer class, and its device unless device= is given.
    """
    resumed_args = load_checkpoint(resume_path(args.resume))["train_args"] if args.resume else {}
    if args.device is None and resumed_args.get("device") is not None:
        args = args.with_values(device=resumed_args["device"])
    cls = trainer_class(args, resumed_args)
    if ddp.needs_launch(args):
        ddp.launch(args, cls.mode)
        return None
    trainer = cls(args)
    trainer.train()
    return trainer


def run(args: Any) -> dict[str, float]:
    """`crosskd train` / `crosskd distill`: `fit`, returning the final metrics ({} after a torchrun relaunch)."""
    trainer = fit(args)
    return trainer.final_metrics if trainer else {}
