"""crosskd: dense object detectors and Cross-Head Knowledge Distillation."""

__version__ = "0.1.0"
