"""crosskd: dense object detectors and Cross-Head Knowledge Distillation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy `from crosskd import Detector` (the predictor API), so `import crosskd` stays light."""
    if name == "Detector":
        from crosskd.api import Detector

        return Detector
    raise AttributeError(f"module 'crosskd' has no attribute {name!r}")
