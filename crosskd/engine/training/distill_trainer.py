"""DistillTrainer: the Trainer with a frozen teacher and the Distiller as the loss module (`crosskd distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from crosskd.dist import is_main_process
from crosskd.distill import Distiller
from crosskd.engine.deployment.checkpoint import (
    KD_STATE_KEY,
    drop_kd_state,
    load_checkpoint,
    read_kd_state,
    save_checkpoint,
)
from crosskd.engine.deployment.loader import load_teacher
from crosskd.engine.training.compile import compile_detector
from crosskd.engine.training.trainer import Trainer
from crosskd.errors import ConfigError
from crosskd.models import DenseDetector
from crosskd.utils import LOGGER, colorstr


class DistillTrainer(Trainer):
    """Trains the student like Trainer, with KD terms from a frozen teacher added to its loss.

    The optimizer, EMA, DDP and checkpoints hold the student (plus the KD methods' learnable state: width adapters,
    connectors); checkpoints also record the teacher's path and KD settings so that resume rebuilds the teacher.
    """

    mode = "distill"

    def __init__(self, args: Any, callbacks: Any = None):
        super().__init__(args, callbacks)
        self.teacher: DenseDetector | None = None

    def build_model(self) -> DenseDetector:
        """The student (as Trainer builds it); the teacher is loaded alongside."""
        student = super().build_model()
        self.teacher = self.build_teacher()
        return student

    def build_teacher(self) -> DenseDetector:
        """Load the teacher from teacher= (teacher_weights=), or from the paths recorded in the resumed checkpoint."""
        resumed = self.state.resume_ckpt
        if resumed is not None and resumed.get("teacher"):
            saved = resumed.get("kd_args") or resumed.get("teacher_args") or {}  # teacher_args: older checkpoints
            teacher, weights = resumed["teacher"], saved.get("teacher_weights")
            teacher_cfg = saved.get("teacher_cfg")
        elif self.args.teacher:
            teacher = self.args.teacher
            weights = str(Path(self.args.teacher_weights).resolve()) if self.args.teacher_weights else None
            teacher_cfg = self.args.teacher_cfg
        else:
            raise ConfigError("distill needs teacher=: a trained crosskd .pt, e.g. teacher=path/to/best.pt")
        runtime = load_teacher(teacher, weights, teacher_cfg)
        self.teacher_path, self.teacher_weights, self.teacher_cfg = runtime.source, weights, teacher_cfg
        LOGGER.info(f"{colorstr('teacher:')} {runtime.model.head_type} from {runtime.source}"
                    + (f" + {weights}" if weights else ""))
        return compile_detector(runtime.model, self.args.compile)

    def build_loss_module(self) -> nn.Module:
        return Distiller.from_args(self.model, self.teacher, self.args)

    def checkpoint_extras(self) -> dict:
        """teacher (path), kd_args (KD settings as resolved, ablation settings included) and the KD methods'
        learnable state (kd_state), if any."""
        distiller: Distiller = self.loss_module
        kd_args = {
            "teacher_weights": self.teacher_weights,
            "teacher_cfg": self.teacher_cfg,
            **distiller.settings(),  # kd, kd_idx, kd_align, kd_weights and the ablation settings
            "head_type": self.teacher.head_type,
        }
        extras = {"teacher": self.teacher_path, "kd_args": kd_args}
        kd_state = distiller.kd_state()
        return {**extras, KD_STATE_KEY: kd_state} if kd_state else extras

    def restore_extras(self, ckpt: dict) -> None:
        self.loss_module.load_kd_state(read_kd_state(ckpt))

    def finish(self) -> None:
        """Drop the KD methods' state from best.pt (only the student is deployed), then finish as Trainer."""
        best = self.weights_dir / "best.pt"
        if is_main_process() and best.exists():
            ckpt = load_checkpoint(best)
            if drop_kd_state(ckpt):
                save_checkpoint(ckpt, best)
        super().finish()
