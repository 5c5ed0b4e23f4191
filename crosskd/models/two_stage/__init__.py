"""Two-stage detectors: Faster R-CNN (RPN + R-CNN over FPN)."""

from .faster_rcnn import FasterRCNN, FasterRCNNHead, TwoStageOutputs
from .roi_head import RoIHead, RoIOutputs
from .rpn import Proposals, ProposalSettings, RPNHead, RPNOutputs

__all__ = [
    "FasterRCNN",
    "FasterRCNNHead",
    "Proposals",
    "ProposalSettings",
    "RPNHead",
    "RPNOutputs",
    "RoIHead",
    "RoIOutputs",
    "TwoStageOutputs",
]
