"""Detectors: backbones, FPN neck, dense heads, the model YAML builder and post-processing."""

from .build import build_detector, load_model_yaml
from .dense_detector import DenseDetector
from .heads import FlatOutputs, HeadOutputs, LevelOutput, Priors, Targets
from .postprocess import Detections, postprocess, scale_boxes

__all__ = [
    "Detections",
    "DenseDetector",
    "FlatOutputs",
    "HeadOutputs",
    "LevelOutput",
    "Priors",
    "Targets",
    "build_detector",
    "load_model_yaml",
    "postprocess",
    "scale_boxes",
]
