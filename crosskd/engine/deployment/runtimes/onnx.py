"""ONNX: the exporter of a .onnx file (float, or INT8 through ONNX Runtime's static quantization), and ONNX Runtime
running it behind `DenseDetector.predict()` (CUDA execution provider on CUDA)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from crosskd.engine.deployment.quantization import CalibrationInputs, CalibrationSet, float_nodes
from crosskd.engine.deployment.runtimes.exported import ExportedDetector, quiet_export_warnings
from crosskd.errors import CheckpointError
from crosskd.utils import LOGGER, colorstr

if TYPE_CHECKING:
    import onnx


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


def load(path: str | Path, device: str | torch.device = "cpu") -> OnnxDetector:
    return OnnxDetector(path, device)


def export(model: nn.Module, images: torch.Tensor, path: Path, settings: dict, metadata: dict) -> None:
    """Trace `model` to a self-contained .onnx at settings['opset'] with metadata, optionally slimmed, and check it.

    torch's TorchScript-based exporter (`dynamo=False`) on purpose: on this project's CPUs it takes under a second
    against 4.5-7 s for the torch.export-based one, writes one self-contained file, supports opsets 11-20 and
    exports torchvision's NMS.
    """
    opset = settings["opset"]
    import onnx

    LOGGER.info(f"{colorstr('ONNX:')} starting export with onnx {onnx.__version__} opset {opset}...")
    with quiet_export_warnings(), torch.no_grad():
        torch.onnx.export(
            model, (images,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
            output_names=["output0"], dynamic_axes=dynamic_axes(model.nms) if settings["dynamic"] else None,
        )
    proto = onnx.load(str(path))
    if settings["simplify"]:
        proto = slim(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def slim(proto):
    """Simplify an ONNX graph with onnxslim; on failure warn and keep the original."""
    import onnxslim

    LOGGER.info(f"{colorstr('ONNX:')} slimming with onnxslim {onnxslim.__version__}...")
    try:
        return onnxslim.slim(proto)
    except Exception as error:  # any onnxslim failure must not lose a valid export
        LOGGER.warning(f"onnxslim failed ({error}); keeping the unsimplified graph")
        return proto


def dynamic_axes(nms: bool) -> dict[str, dict[int, str]]:
    """Batch, height and width of `images`; of `output0` the batch and, raw, the priors (NMS rows [B, max_det, 6]
    keep max_det), as Ultralytics' own ONNX export. The traced per-level top-k follows the input's size."""
    output = {0: "batch"} if nms else {0: "batch", 2: "anchors"}
    return {"images": {0: "batch", 2: "height", 3: "width"}, "output0": output}


def export_int8(
    model: nn.Module, images: torch.Tensor, path: Path, settings: dict, metadata: dict, calibration: CalibrationSet
) -> None:
    """The float graph of `export`, statically quantized by ONNX Runtime into `path`: QDQ format, INT8 weights per
    output channel, UINT8 activations with ranges from `calibration`; the decode stays float (quantization.py)."""
    import onnx
    from onnxruntime import quantization

    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        export(model, images, float_path, settings, metadata)
        proto = onnx.load(str(float_path))
        kept = float_graph_nodes(proto)
        onnx.save(proto, str(float_path))  # with every node named, as nodes_to_exclude needs
        LOGGER.info(f"{colorstr('ONNX:')} quantizing with ONNX Runtime (QDQ, {len(kept)} of {len(proto.graph.node)} "
                    f"nodes stay float: the decode) on {calibration.describe()}...")
        with quiet_quantizer():
            quantization.quantize_static(
                str(float_path), str(path), CalibrationReader(calibration.inputs(settings["batch"])),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                calibrate_method=methods[calibration.method], nodes_to_exclude=kept,
            )


def float_graph_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names every unnamed node of the ONNX graph `proto` and returns those that stay float (`float_nodes`)."""
    nodes = proto.graph.node
    for i, node in enumerate(nodes):
        node.name = node.name or f"node_{i}"
    readers: dict[str, list[str]] = {}
    for node in nodes:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node.name)
    successors = {node.name: [r for tensor in node.output for r in readers.get(tensor, ())] for node in nodes}
    convolutions = {node.name for node in nodes if node.op_type == "Conv"}
    return float_nodes([node.name for node in nodes], successors, convolutions)


class CalibrationReader:
    """ONNX Runtime's calibration data reader protocol (`get_next`) over the calibration inputs."""

    def __init__(self, inputs: CalibrationInputs) -> None:
        self.batches = iter(inputs)

    def get_next(self) -> dict | None:
        array = next(self.batches, None)
        return None if array is None else {"images": array}


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's warnings on the root logger: advice to pre-process the model (its symbolic shape inference
    fails on the decode's dynamic reshapes, and quantization does not need it) and one line per GroupNorm bias that
    is computed rather than stored (those additions stay float)."""
    root = logging.getLogger()
    quantizer = logging.Filter()
    quantizer.filter = lambda record: "onnxruntime" not in record.pathname
    root.addFilter(quantizer)
    try:
        yield
    finally:
        root.removeFilter(quantizer)
