"""Prior-to-ground-truth assigners over the padded batch; each returns an `AssignResult`."""

from crosskd.assigners.atss import atss_assign
from crosskd.assigners.fcos import fcos_assign
from crosskd.assigners.max_iou import max_iou_assign
from crosskd.assigners.result import BACKGROUND, IGNORED, AssignResult

__all__ = ["BACKGROUND", "IGNORED", "AssignResult", "atss_assign", "fcos_assign", "max_iou_assign"]
