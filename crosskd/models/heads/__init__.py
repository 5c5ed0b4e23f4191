"""Dense detection heads sharing one contract (see base.py)."""

from .atss import ATSSHead
from .base import ConvBlock, DenseHead, FlatOutputs, HeadLayout, HeadOutputs, LevelOutput, Priors, Scale, Targets
from .fcos import FCOSHead
from .gfl import GFLHead
from .retinanet import RetinaHead
from .yolo import YOLOHead

__all__ = [
    "ATSSHead",
    "ConvBlock",
    "DenseHead",
    "FCOSHead",
    "FlatOutputs",
    "GFLHead",
    "HeadLayout",
    "HeadOutputs",
    "LevelOutput",
    "Priors",
    "RetinaHead",
    "Scale",
    "Targets",
    "YOLOHead",
]
