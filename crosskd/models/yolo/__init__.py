"""YOLOv8 / YOLO11 bodies: Ultralytics 8.4's blocks and layer tables, with its module names and layer numbering."""

from .body import FAMILIES, YOLOBackbone, YOLONeck

__all__ = ["FAMILIES", "YOLOBackbone", "YOLONeck"]
