"""DistillTrainer: the Trainer with a frozen teacher and the Distiller as the loss module (`crosskd distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from crosskd.dist import is_main_process
from crosskd.distill import Distiller
from crosskd.engine.checkpoint import is_yaml, load_checkpoint, load_detector, save_checkpoint
from crosskd.engine.trainer import Trainer
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import DenseDetector
from crosskd.paths import resolve_cfg_file
from crosskd.utils import LOGGER, colorstr

ADAPTER_KEY = "kd_adapter"  # last.pt only: the learned width adapter, needed to resume


def resolve_teacher_path(teacher: str) -> str:
    """An absolute path for a teacher .pt or YAML file (shipped model YAMLs are found by name)."""
    path = Path(teacher)
    if is_yaml(path):
        path = resolve_cfg_file(path, "models")
    elif not path.is_file():
        raise CheckpointError(f"teacher '{teacher}' not found: pass teacher=path/to/teacher.pt (a crosskd checkpoint)")
    return str(path.resolve())


def load_teacher(teacher: str, teacher_weights: str | None) -> DenseDetector:
    """A trained teacher: a crosskd .pt, or a model YAML with `teacher_weights=` (a crosskd .pt of that model)."""
    if not is_yaml(teacher):
        if teacher_weights:
            raise ConfigError(f"teacher_weights= is only for a YAML teacher; teacher={teacher} already holds weights")
        return load_detector(teacher)[0]
    if not teacher_weights:
        raise ConfigError(
            f"teacher={teacher} is a model YAML without weights: add teacher_weights=path/to/teacher.pt "
            "or pass the trained checkpoint as teacher="
        )
    ckpt = load_checkpoint(teacher_weights)
    model = load_detector(teacher, nc=int(ckpt["nc"]))[0]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"teacher_weights={teacher_weights} do not fit teacher={teacher} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys): pass the model YAML they were trained with, or just teacher=the .pt"
        )
    return model


class DistillTrainer(Trainer):
    """Trains the student like Trainer, with KD terms from a frozen teacher added to its loss.

    The optimizer, EMA, DDP and checkpoints hold the student (plus a width adapter when the heads differ);
    checkpoints also record the teacher's path and KD settings so that resume rebuilds the teacher.
    """

    mode = "distill"

    def __init__(self, args: Any, callbacks: Any = None):
        super().__init__(args, callbacks)
        self.teacher: DenseDetector | None = None
        self.resume_ckpt: dict | None = None

    def load_resume_checkpoint(self) -> dict | None:
        self.resume_ckpt = super().load_resume_checkpoint()
        return self.resume_ckpt

    def build_model(self) -> DenseDetector:
        """The student (as Trainer builds it); the teacher is loaded alongside."""
        student = super().build_model()
        self.teacher = self.build_teacher()
        return student

    def build_teacher(self) -> DenseDetector:
        """Load the teacher from teacher= (teacher_weights=), or from the paths recorded in the resumed checkpoint."""
        if self.resume_ckpt is not None and self.resume_ckpt.get("teacher"):
            saved = self.resume_ckpt.get("kd_args") or self.resume_ckpt.get("teacher_args") or {}  # older checkpoints
            teacher, weights = self.resume_ckpt["teacher"], saved.get("teacher_weights")
        elif self.args.teacher:
            teacher = resolve_teacher_path(self.args.teacher)
            weights = str(Path(self.args.teacher_weights).resolve()) if self.args.teacher_weights else None
        else:
            raise ConfigError("distill needs teacher=: a trained crosskd .pt, e.g. teacher=path/to/best.pt")
        model = load_teacher(teacher, weights)
        self.teacher_path, self.teacher_weights = teacher, weights
        LOGGER.info(f"{colorstr('teacher:')} {model.head_type} from {teacher}" + (f" + {weights}" if weights else ""))
        return model

    def build_loss_module(self) -> nn.Module:
        return Distiller.from_args(self.model, self.teacher, self.args)

    def checkpoint_extras(self) -> dict:
        """teacher (path), kd_args (KD settings as resolved) and, with a width adapter, its weights."""
        distiller: Distiller = self.loss_module
        w = distiller.weights
        kd_args = {
            "teacher_weights": self.teacher_weights,
            "kd": distiller.kd,
            "kd_idx": distiller.kd_idx,
            "kd_align": distiller.kd_align,
            "kd_weights": {"cls": w.cls, "reg": w.reg, "ctr": w.ctr, "feat": w.feat},
            "head_type": self.teacher.head_type,
        }
        extras = {"teacher": self.teacher_path, "kd_args": kd_args}
        adapter = distiller.adapter_state()
        return extras if adapter is None else {**extras, ADAPTER_KEY: adapter}

    def restore_extras(self, ckpt: dict) -> None:
        self.loss_module.load_adapter_state(ckpt.get(ADAPTER_KEY))

    def finish(self) -> None:
        """Drop the adapter from best.pt (only the student is deployed), then finish as Trainer."""
        best = self.weights_dir / "best.pt"
        if is_main_process() and best.exists():
            ckpt = load_checkpoint(best)
            if ckpt.pop(ADAPTER_KEY, None) is not None:
                save_checkpoint(ckpt, best)
        super().finish()
