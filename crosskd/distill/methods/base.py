"""The KD method contract: what a method declares it needs, the named loss terms it computes and the state it owns.

A method is an `nn.Module` built once per run from the student, the teacher and the resolved settings (`KDSetup`);
its learnable submodules (width adapters, connectors) train with the student and are saved in `last.pt` under
`kd_state`, never in the student. Every step the Distiller runs the student and teacher passes once, for the union of
the methods' needs, and calls `losses(ctx)` of each method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import Tensor, nn

from crosskd.distill.kd_losses import KDOptions, KDWeights, renamed

if TYPE_CHECKING:
    from crosskd.distill.passes import StudentPass, TeacherPass
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import DenseHead, FlatOutputs, Priors, Targets

NEEDS = frozenset({"holds", "teacher_outputs", "neck"})  # what a method may ask the passes for


@dataclass(frozen=True)
class KDSetup:
    """The resolved KD settings every method of a run sees.

    kd_idx: the hold point (0 when no method needs hold features); alone: the method is the only one of `kd`;
    kd_hold: 'post' or 'pre' activation hold features (already applied to the passes' holds).
    """

    kd_idx: int
    kd_align: bool
    weights: KDWeights
    options: KDOptions
    kd_branch: str
    pkd_on: str
    kd_strategy: str
    alone: bool
    kd_hold: str = "post"
    valid_region: str = "mmdet"  # the heads' valid region, also PKD's (DenseHead.use_valid_region)


class PredictionInputs(NamedTuple):
    """Flat predictions (cls [B,N,C], reg [B,N,R], ctr [B,N]) and the targets of the teacher head's layout."""

    own: FlatOutputs  # the student's own predictions
    teacher: FlatOutputs  # the teacher's predictions (no graph)
    priors: Priors  # the teacher head's priors
    targets: Targets  # assigner output of the teacher's head type (regions and normalisers)


class KDContext:
    """One step's passes for the methods to read; `predictions` is built on first use and shared."""

    def __init__(
        self,
        batch: Any,
        heads: tuple[DenseHead, DenseHead],
        strides: list[int],
        passes: tuple[StudentPass, TeacherPass],
        build_predictions: Callable[[KDContext], PredictionInputs],
    ) -> None:
        self.batch, self.strides = batch, strides
        self.student_head, self.teacher_head = heads
        self.student, self.teacher = passes
        self._build_predictions = build_predictions

    @cached_property
    def predictions(self) -> PredictionInputs:
        """Both heads' flat predictions and the teacher layout's priors and targets (needs 'teacher_outputs')."""
        return self._build_predictions(self)


class KDMethod(nn.Module):
    """A KD method: declares its needs, computes named, weighted loss terms and owns its learnable state.

    Subclasses set `needs` (a subset of NEEDS: 'holds' = student and teacher tower features at kd_idx,
    'teacher_outputs' = the teacher head's predictions, 'neck' = the teacher's FPN outputs) and implement `losses`.
    Terms are named `kd_*`; beside another method they are renamed `<combined_prefix>_*` (pm_cls, ld_reg).
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    combined_prefix: ClassVar[str] = "kd"
    cross_head_pass: ClassVar[bool] = False  # runs a cross-head pass: kd_strategy and kd_align apply to it
    two_stage: ClassVar[bool] = False  # also distils a two-stage (Faster R-CNN) pair, reading only FPN maps and RoIs

    def __init__(self, student: DenseDetector, teacher: DenseDetector, setup: KDSetup) -> None:
        super().__init__()
        self.setup = setup

    @classmethod
    def needs_for(cls, pkd_on: str) -> frozenset[str]:
        """What the method needs under these settings (the class's `needs` unless it depends on them)."""
        return cls.needs

    @classmethod
    def default_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """The head type's default weights as this method changes them, before the user's kd_*_weight."""
        return weights

    @classmethod
    def given_weights(cls, weights: KDWeights, alone: bool) -> KDWeights:
        """The weights after the user's kd_*_weight, as this method ties them together."""
        return weights

    def losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """The method's weighted scalar terms, e.g. {'kd_cls': ..., 'kd_reg': ...}."""
        raise NotImplementedError

    def named_losses(self, ctx: KDContext) -> dict[str, Tensor]:
        """`losses(ctx)` under their loss-dict names: kd_* alone, <combined_prefix>_* beside another method."""
        terms = self.losses(ctx)
        return terms if self.setup.alone else renamed(terms, self.combined_prefix)
