"""Weights from other frameworks (Ultralytics, MMDetection, torchvision detection) mapped onto crosskd detectors."""
