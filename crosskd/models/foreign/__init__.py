"""Weights from other frameworks (MMDetection, torchvision detection) mapped onto crosskd detectors."""
