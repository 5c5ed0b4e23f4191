"""Teacher/student compatibility: checks with one-line errors, the hold-point index, 1x1 width adapters (CrossKD) and
connectors (feature methods)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from crosskd.distill.kd_losses import KD_BRANCHES, KD_STRATEGIES, PKD_POSITIONS, check_choice
from crosskd.errors import CheckpointError, ConfigError
from crosskd.utils import LOGGER

if TYPE_CHECKING:
    from crosskd.models import DenseDetector
    from crosskd.models.heads.base import DenseHead


def check_ablation(kd_branch: str, pkd_on: str, kd_strategy: str, cross_head: bool) -> None:
    """One-line ConfigErrors for ablation settings that are unknown, or kd_strategy without a cross-head method."""
    check_choice("kd_branch", kd_branch, KD_BRANCHES)
    check_choice("pkd_on", pkd_on, PKD_POSITIONS)
    check_choice("kd_strategy", kd_strategy, KD_STRATEGIES)
    if kd_strategy != "a" and not cross_head:
        raise ConfigError(f"kd_strategy={kd_strategy} is a cross-head strategy: use it with kd=crosskd (or a "
                          "crosskd+ method)")


def check_compatible(student: DenseDetector, teacher: DenseDetector) -> None:
    """Raise a one-line CheckpointError when the teacher cannot distil this student (detector family, classes, FPN
    levels)."""
    if teacher.two_stage != student.two_stage:
        raise CheckpointError(
            f"the teacher is a {_family(teacher)} and the student a {_family(student)}: distil a Faster R-CNN "
            "student from a Faster R-CNN teacher, and a dense student from a dense teacher"
        )
    if teacher.nc != student.nc:
        raise CheckpointError(
            f"teacher has {teacher.nc} classes but the student's data has {student.nc}: "
            "train the teacher on the same dataset"
        )
    t_strides, s_strides = list(teacher.strides), list(student.strides)
    if t_strides != s_strides:
        raise CheckpointError(
            f"teacher strides {t_strides} ({len(t_strides)} levels) differ from the student's {s_strides} "
            f"({len(s_strides)} levels): give both model YAMLs the same FPN levels"
        )


def _family(detector: DenseDetector) -> str:
    kind = "two-stage" if detector.two_stage else "dense"
    return f"{kind} detector ({detector.head_type})"


def check_two_stage(kd: str, supported: bool, kd_idx: int | None, kd_strategy: str, pkd_on: str, kd_cls_loss: str,
                    kd_region: str) -> None:
    """One-line ConfigErrors for KD settings a two-stage (Faster R-CNN) pair cannot honour: methods without a
    two-stage pass, and the dense heads' hold point, strategies, PKD positions and prediction-KD options."""
    if not supported:
        raise ConfigError(f"kd={kd} has no Faster R-CNN pass; use kd=crosskd, pkd, crosskd+pkd or none")
    dense_only = {"kd_idx": (kd_idx, (None, 0)), "kd_strategy": (kd_strategy, ("a",)), "pkd_on": (pkd_on, ("neck",)),
                  "kd_cls_loss": (kd_cls_loss, ("qfl",)), "kd_region": (kd_region, ("all",))}
    for name, (value, allowed) in dense_only.items():
        if value not in allowed:
            raise ConfigError(f"{name}={value} applies to dense heads only: the Faster R-CNN cross-head pass is the "
                              f"teacher's whole R-CNN stage on the student's FPN maps; leave {name} unset")


def check_same_head(student_head: DenseHead, teacher_head: DenseHead, setting: str) -> None:
    """Prediction mimicking, LD and strategies b-d compare raw outputs, so both heads need the same type and layout.

    `setting` names what asks for it in the message, e.g. 'kd=pm' or 'kd_strategy=c'.
    """
    s_layout = (student_head.head_type, student_head.num_anchors, getattr(student_head, "reg_max", None))
    t_layout = (teacher_head.head_type, teacher_head.num_anchors, getattr(teacher_head, "reg_max", None))
    if s_layout != t_layout:
        raise CheckpointError(
            f"{setting} needs the same head on both sides, but the teacher has (type, anchors, reg_max) {t_layout} "
            f"and the student {s_layout}: use kd=crosskd for different heads"
        )


def check_hold_widths(student_head: DenseHead, teacher_head: DenseHead, idx: int, setting: str) -> None:
    """A CheckpointError when the hold features at tower step `idx` differ in width (no adapter on this path)."""
    s_channels, t_channels = hold_channels(student_head, idx), hold_channels(teacher_head, idx)
    if s_channels != t_channels:
        raise CheckpointError(
            f"{setting} needs equal head widths at kd_idx={idx}, but the teacher's tower features have "
            f"{_widths(t_channels)} channels and the student's {_widths(s_channels)}: use the same feat_channels or "
            "kd_strategy=a"
        )


def check_strategy(student_head: DenseHead, teacher_head: DenseHead, idx: int, kd_strategy: str) -> None:
    """Strategies b-d compare predictions of one layout (same head) and need equal hold widths: b and d feed teacher
    features to the student head, and c's cross-head is a target without gradient, which would leave a width adapter
    untrained."""
    if kd_strategy == "a":
        return
    check_same_head(student_head, teacher_head, f"kd_strategy={kd_strategy}")
    check_hold_widths(student_head, teacher_head, idx, f"kd_strategy={kd_strategy}")


def feature_channels(detector: DenseDetector) -> int:
    """Channels of the FPN outputs, i.e. the head's input width; one line when they differ per level (a YOLO neck),
    which PKD's one shared connector cannot serve."""
    widths = set(detector.head.level_channels)
    if len(widths) > 1:
        raise ConfigError(f"pkd_on=neck needs one width on every level, but the {detector.head_type} neck has "
                          f"{detector.head.level_channels}: use kd=sl2 (per-level projectors) or pkd_on=cls|reg")
    return int(detector.head.in_channels)


def resolve_kd_idx(kd_idx: int | None, student_head: DenseHead, teacher_head: DenseHead) -> int:
    """The hold point: `kd_idx` checked against both towers, or the teacher's default clamped to the towers."""
    depth = min(student_head.stacked_convs, teacher_head.stacked_convs)
    if kd_idx is None:
        default = teacher_head.default_kd_idx
        if default > depth:
            LOGGER.info(f"kd_idx: the default {default} exceeds the heads' {depth} stacked convs, using {depth}")
        return min(default, depth)
    if isinstance(kd_idx, bool) or not isinstance(kd_idx, int) or not 0 <= kd_idx <= depth:
        raise ConfigError(
            f"kd_idx={kd_idx!r} is out of range: use an integer 0..{depth} "
            f"(student head {student_head.stacked_convs} convs, teacher head {teacher_head.stacked_convs})"
        )
    return kd_idx


def hold_channels(head: DenseHead, idx: int) -> tuple[int, int]:
    """Channels (cls, reg) of the tower features after step `idx` (the head input where a tower has not begun)."""
    return head.hold_channels(idx)


def _widths(channels: tuple[int, int]) -> str:
    return str(channels[0]) if channels[0] == channels[1] else f"{channels[0]} (cls) / {channels[1]} (reg)"


class TowerAdapter(nn.Module):
    """Learned 1x1 convs mapping the student's cls and reg hold features to the teacher's width."""

    def __init__(self, student_channels: tuple[int, int], teacher_channels: tuple[int, int]) -> None:
        super().__init__()
        self.cls = nn.Conv2d(student_channels[0], teacher_channels[0], kernel_size=1)
        self.reg = nn.Conv2d(student_channels[1], teacher_channels[1], kernel_size=1)

    def forward(self, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor]:
        """[B, C_student, H, W] hold features → [B, C_teacher, H, W] each."""
        return self.cls(cls_feat), self.reg(reg_feat)

    def for_level(self, level: int) -> TowerAdapter:
        """The adapter of FPN `level`: this one, shared by every level."""
        return self


class LevelAdapters(nn.ModuleList):
    """One TowerAdapter per level, where the hold widths differ from level to level (a YOLO neck at kd_idx=0)."""

    def __init__(self, student_levels: list[tuple[int, int]], teacher_levels: list[tuple[int, int]]) -> None:
        super().__init__(TowerAdapter(s, t) for s, t in zip(student_levels, teacher_levels, strict=True))

    def for_level(self, level: int) -> TowerAdapter:
        """The adapter of FPN `level`."""
        return self[level]


def level_hold_channels(head: DenseHead, idx: int) -> list[tuple[int, int]]:
    """(cls, reg) hold widths at step `idx` on every level (they differ per level only at step 0 of a YOLO head)."""
    return [head.hold_channels(idx, level) for level in range(len(head.strides))]


def build_adapter(student_head: DenseHead, teacher_head: DenseHead, idx: int) -> TowerAdapter | LevelAdapters | None:
    """A TowerAdapter when the hold features' widths differ, one per level (LevelAdapters) when the widths also
    differ from level to level (the neck outputs of YOLO heads at kd_idx=0), else None."""
    s_levels, t_levels = level_hold_channels(student_head, idx), level_hold_channels(teacher_head, idx)
    if s_levels == t_levels:
        return None
    if len(set(s_levels)) > 1 or len(set(t_levels)) > 1:
        LOGGER.info(f"CrossKD: student hold features have {[s for s, _ in s_levels]} channels per level, the "
                    f"teacher's {[t for t, _ in t_levels]}; adding learned 1x1 adapters (cls, reg) per level")
        return LevelAdapters(s_levels, t_levels)
    s_channels, t_channels = s_levels[0], t_levels[0]
    LOGGER.info(f"CrossKD: student hold features have {_widths(s_channels)} channels, the teacher's "
                f"{_widths(t_channels)}; adding learned 1x1 adapters (cls, reg)")
    return TowerAdapter(s_channels, t_channels)


def build_connector(student_channels: int, teacher_channels: int, owner: str) -> nn.Conv2d | None:
    """A learned 1x1 conv mapping student features to the teacher's width when they differ (as MMRazor's
    connectors), else None; it trains with the student and is no part of it."""
    if student_channels == teacher_channels:
        return None
    LOGGER.info(f"{owner}: student features have {student_channels} channels, the teacher's {teacher_channels}; "
                "adding a learned 1x1 connector")
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
