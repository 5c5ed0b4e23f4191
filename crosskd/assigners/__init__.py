"""Prior-to-ground-truth assigners over the padded batch; each returns an `AssignResult`.

`ASSIGNERS` maps the model YAML's `head.assigner.type` to its class (the functions are the assigners' cores).
"""

from crosskd.assigners.atss import ATSSAssigner, atss_assign
from crosskd.assigners.base import Assigner, Predictions
from crosskd.assigners.fcos import FCOSAssigner, fcos_assign
from crosskd.assigners.max_iou import MaxIoUAssigner, max_iou_assign
from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult
from crosskd.assigners.task_aligned import TaskAlignedAssigner, task_aligned_assign

ASSIGNERS: dict[str, type[Assigner]] = {
    "atss": ATSSAssigner,
    "max_iou": MaxIoUAssigner,
    "fcos": FCOSAssigner,
    "task_aligned": TaskAlignedAssigner,
}

__all__ = [
    "ASSIGNERS",
    "BACKGROUND",
    "IGNORED",
    "ATSSAssigner",
    "AssignResult",
    "Assigner",
    "FCOSAssigner",
    "MaxIoUAssigner",
    "Predictions",
    "TaskAlignedAssigner",
    "atss_assign",
    "fcos_assign",
    "max_iou_assign",
    "task_aligned_assign",
]
