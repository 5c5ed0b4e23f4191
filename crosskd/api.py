"""The Python model API in the Ultralytics pattern: `Detector("gfl_r18s.yaml" | "best.pt" | "best.onnx")`.

Every method takes the CLI's keys as keyword arguments and goes through the CLI's validation (`config.get_args`,
`config.check_required`) and engine entry points (`launch.fit` for train/distill, `validator.run`, `Predictor`,
`export.run`, `info.run`), so `m.val(data="digits.yaml", imgsz=128)` is `crosskd val model=... data=digits.yaml
imgsz=128`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crosskd.config import Args, check_required, get_args
from crosskd.engine.deployment.loader import Runtime, load_runtime
from crosskd.engine.evaluation import validator
from crosskd.engine.prediction.predictor import Predictor
from crosskd.engine.prediction.results import Boxes, Results
from crosskd.engine.tools import export, info
from crosskd.engine.training import launch
from crosskd.paths import newest_best
from crosskd.utils import select_device

__all__ = ["Boxes", "Detector", "Results"]


def source_setting(source: Any) -> dict[str, Any]:
    """{'source': ...} for a path or camera index, which the settings validate; {} for in-memory images."""
    if isinstance(source, bool) or not isinstance(source, str | Path | int):
        return {}
    return {"source": source if isinstance(source, int) else str(source)}


class Detector:
    """A crosskd detector: a model YAML (to train), a crosskd .pt, or an exported .onnx / .torchscript.

    `device` (cpu, a CUDA index, or None for auto) applies to every call that does not pass its own. After `train()`
    or `distill()` the object holds the run's best.pt.
    """

    def __init__(self, model: str | Path, device: str | int | None = None) -> None:
        self.source = str(model)
        self.overrides: dict[str, Any] = {} if device is None else {"device": str(device)}
        self.metrics: dict[str, float] = {}  # the latest train / distill / val metrics
        self._runtime: Runtime | None = None
        self._runtime_key: tuple[str, str | None] | None = None

    def args(self, mode: str, kwargs: dict[str, Any]) -> Args:
        """Validated settings for `mode` with this model, as the CLI builds them (unknown keys, ranges, choices)."""
        return get_args({**self.overrides, **kwargs, "model": self.source}, mode)

    def runtime(self, args: Args) -> Runtime:
        """The loaded model for `args.device`, loaded once and reused while device and model_cfg stay the same."""
        device = select_device(args.device)
        key = (str(device), args.model_cfg)
        if self._runtime is None or self._runtime_key != key:
            self._runtime = load_runtime(self.source, model_cfg=args.model_cfg, device=device)
            self._runtime_key = key
        return self._runtime

    @property
    def names(self) -> dict[int, str]:
        """Class id -> name of the loaded model."""
        return dict(self.runtime(self.args("predict", {})).names)

    def predict(self, source: Any = None, stream: bool = False, **kwargs: Any) -> list[Results] | Iterator[Results]:
        """Detect objects: a list of Results, or with `stream=True` a generator yielding one frame's Results at a time.

        `source`: a path, directory, glob, .txt list, video, http(s) URL, camera index, PIL image (RGB), numpy array
        (BGR, as cv2.imread), torch tensor (RGB 0..1, [B, 3, H, W]) or a list of these. Keys as `crosskd predict`
        (conf, iou, imgsz, classes, max_det, multi_label, batch, save, ...); `save` defaults to False here.
        """
        args = self.args("predict", {"save": False, **kwargs, **source_setting(source)})
        if source is None:
            check_required(args)
        results = Predictor(args, self.runtime(args)).stream(source)
        return results if stream else list(results)

    def __call__(self, source: Any = None, stream: bool = False, **kwargs: Any) -> list[Results] | Iterator[Results]:
        """Same as `predict`."""
        return self.predict(source, stream, **kwargs)

    def train(self, **kwargs: Any) -> dict[str, float]:
        """Train this model (`crosskd train`); returns the final metrics and loads the run's best.pt."""
        return self.fit(self.args("train", kwargs))

    def distill(self, **kwargs: Any) -> dict[str, float]:
        """Distil this model as the student from `teacher=` (`crosskd distill`); returns the final metrics and loads
        the run's best.pt."""
        return self.fit(self.args("distill", kwargs))

    def fit(self, args: Args) -> dict[str, float]:
        check_required(args)
        trainer = launch.fit(args)
        best = trainer.weights_dir / "best.pt" if trainer else newest_best("loading")  # torchrun: rank 0 wrote it
        self.source, self._runtime = str(best), None
        self.metrics = trainer.final_metrics if trainer else {}
        return self.metrics

    def val(self, **kwargs: Any) -> dict[str, float]:
        """COCO validation (`crosskd val`): {AP, AP50, AP75, APs, APm, APl, AR100}."""
        args = self.args("val", kwargs)
        check_required(args)
        self.metrics = validator.run(args)
        return self.metrics

    def export(self, **kwargs: Any) -> Path:
        """Export (`crosskd export`, e.g. format="onnx"); returns the written file."""
        args = self.args("export", kwargs)
        check_required(args)
        return export.run(args)

    def info(self, **kwargs: Any) -> str:
        """Print the module table and return the summary line (`crosskd info`): layers, parameters, GFLOPs."""
        args = self.args("info", kwargs)
        check_required(args)
        return info.run(args)

    def __repr__(self) -> str:
        return f"Detector({self.source!r})"
