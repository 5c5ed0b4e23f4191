"""ONNX Runtime: an exported .onnx file behind `DenseDetector.predict()` (CUDA execution provider on CUDA)."""

from __future__ import annotations

from pathlib import Path

import torch

from crosskd.engine.deployment.runtimes.exported import ExportedDetector
from crosskd.errors import CheckpointError
from crosskd.utils import LOGGER


class OnnxDetector(ExportedDetector):
    """An ONNX Runtime session behind the DenseDetector predict() interface (CUDA EP when `device` is CUDA)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model not found: '{path}'; export one with 'crosskd export model=best.pt'")
        device = torch.device(device)
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if cuda else []
        LOGGER.info(f"Loading {path} for ONNX Runtime inference...")
        errors = ort.capi.onnxruntime_pybind11_state
        try:
            self.session = ort.InferenceSession(str(path), providers=[*providers, "CPUExecutionProvider"])
        except (errors.InvalidProtobuf, errors.InvalidGraph, errors.Fail) as error:
            raise CheckpointError(f"cannot load '{path}' with ONNX Runtime (corrupt or not ONNX): {error}") from None
        LOGGER.info(f"Using ONNX Runtime {ort.__version__} with {self.session.get_providers()[0]}")
        super().__init__(path, self.session.get_modelmeta().custom_metadata_map, device)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        self.fp16 = graph_input.type == "tensor(float16)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float16 if self.fp16 else torch.float32).numpy()
        output = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(output).float().to(images.device)
