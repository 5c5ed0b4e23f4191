"""TorchScript: the tracer writing a .torchscript (metadata in the archive's config.txt), and the traced module run
behind `DenseDetector.predict()`."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from crosskd.engine.deployment.runtimes.exported import ExportedDetector, quiet_export_warnings
from crosskd.errors import CheckpointError
from crosskd.utils import LOGGER, colorstr

TORCHSCRIPT_METADATA = "config.txt"

class TorchScriptDetector(ExportedDetector):
    """A traced crosskd ExportModel (metadata in the archive's config.txt) behind DenseDetector.predict()."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"TorchScript model not found: '{path}'; export one with format=torchscript")
        device = torch.device(device)
        extra_files = {TORCHSCRIPT_METADATA: ""}
        LOGGER.info(f"Loading {path} for TorchScript inference...")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*")  # TorchScript still loads in torch 2.14
            try:
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[0]
                raise CheckpointError(f"cannot load '{path}' as TorchScript (corrupt?): {reason}") from None
        metadata = json.loads(extra_files[TORCHSCRIPT_METADATA] or "{}")
        super().__init__(path, metadata, traced_device(path, metadata, device))
        self.module = module.to(self.device).eval()
        dynamic = bool(self.args.get("dynamic"))
        height, width = (None, None) if dynamic else self.imgsz
        self.input_shape = (None if dynamic else self.batch, 3, height, width)
        self.dtype = torch.float16 if self.args.get("half") else torch.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = self.module(images.to(self.device, self.dtype))
        return output.float().to(images.device)


def traced_device(path: Path, metadata: dict[str, str], requested: torch.device) -> torch.device:
    """Where a TorchScript trace can run: the device it was traced on (its factory calls are pinned there)."""
    traced = torch.device(ast.literal_eval(metadata.get("args", "{}")).get("device", "cpu"))
    if traced.type == requested.type:
        return traced
    if traced.type == "cpu":
        LOGGER.warning(f"'{path.name}' was traced on the CPU and runs there; re-export it with device={requested} "
                       "to run on that device")
        return traced
    raise CheckpointError(f"'{path.name}' was traced on {traced} and cannot run on {requested}; "
                          f"re-export it with device={requested.type}")


def load(path: str | Path, device: str | torch.device = "cpu") -> TorchScriptDetector:
    return TorchScriptDetector(path, device)


def export(model: nn.Module, images: torch.Tensor, path: Path, settings: dict, metadata: dict) -> None:
    """torch.jit.trace `model`; the metadata goes into the archive as config.txt (JSON)."""
    LOGGER.info(f"{colorstr('TorchScript:')} starting export with torch {torch.__version__}...")
    with quiet_export_warnings(), torch.no_grad():
        traced = torch.jit.trace(model, images, strict=False)
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
