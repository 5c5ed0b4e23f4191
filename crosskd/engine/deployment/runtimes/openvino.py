"""OpenVINO: the exporter of an IR folder (<name>.xml + .bin, metadata.yaml) converted from the ONNX graph (FP32, FP16
weights with half=True, or INT8 through NNCF), and that folder compiled for the CPU behind
`DenseDetector.predict()`."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch import nn

from crosskd.engine.deployment.formats import export_format
from crosskd.engine.deployment.quantization import CalibrationSet, float_nodes
from crosskd.engine.deployment.runtimes import onnx
from crosskd.engine.deployment.runtimes.exported import ExportedDetector
from crosskd.errors import CheckpointError
from crosskd.utils import LOGGER, colorstr

if TYPE_CHECKING:
    import openvino

OPENVINO_SUFFIX = "_openvino_model"  # an OpenVINO export is the folder <weights stem>_openvino_model (Ultralytics')
OPENVINO_METADATA = "metadata.yaml"


def import_openvino():
    """The openvino module, or a one-line ConfigError with the command that installs it (from the format table)."""
    export_format("openvino").check_installed()
    import openvino

    return openvino


@functools.cache
def shared_core() -> openvino.Core:
    """The process's one OpenVINO Core, kept until exit.

    The first compile of a Core's CPU plugin swaps the main thread's alternate signal stack for one of its own and
    puts back the stack it found when the Core is destroyed. Two Cores destroyed in the order they were made leave
    the first one's freed stack in place, and the next signal handled on it is a segmentation fault: Python's signal
    handlers run there, e.g. torch's SIGCHLD handler when a DataLoader worker or a subprocess ends (measured with
    OpenVINO 2026.4: two loads, then `subprocess.run`, killed the process). One Core never frees its stack.
    """
    return import_openvino().Core()


class OpenVinoDetector(ExportedDetector):
    """An OpenVINO IR folder (<name>.xml + .bin, metadata.yaml) compiled for the CPU behind DenseDetector.predict().

    Compiled at f32 precision: on processors with bf16 support OpenVINO's CPU default is bf16, which moves scores by
    ~0.2 on a tiny model and breaks parity with PyTorch.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        openvino = import_openvino()
        folder = Path(path).parent if Path(path).suffix.lower() == ".xml" else Path(path)
        xml = min(folder.glob("*.xml"), default=None) if folder.is_dir() else None
        if xml is None or not (folder / OPENVINO_METADATA).is_file():
            raise CheckpointError(f"OpenVINO model not found: '{folder}' needs a .xml/.bin pair and "
                                  f"{OPENVINO_METADATA}; export one with 'crosskd export format=openvino'")
        if torch.device(device).type != "cpu":
            LOGGER.warning(f"OpenVINO runs '{folder.name}' on the CPU, not on {device}")
        LOGGER.info(f"Loading {folder} for OpenVINO inference...")
        core = shared_core()
        try:
            model = core.read_model(str(xml))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"cannot load '{xml}' with OpenVINO (corrupt?): {reason}") from None
        metadata = yaml.safe_load((folder / OPENVINO_METADATA).read_text()) or {}
        super().__init__(folder, {str(k): str(v) for k, v in metadata.items()}, torch.device("cpu"))
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        LOGGER.info(f"Using OpenVINO {openvino.__version__.split('-')[0]} on the CPU")
        shape = model.input(0).get_partial_shape()  # B, 3, H, W; dynamic axes are None
        self.input_shape = tuple(dim.get_length() if dim.is_static else None for dim in shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.compiled(images.detach().to("cpu", torch.float32).numpy())[0]
        return torch.from_numpy(output).to(images.device)


def load(path: str | Path, device: str | torch.device = "cpu") -> OpenVinoDetector:
    return OpenVinoDetector(path, device)


def export(model: nn.Module, images: torch.Tensor, path: Path, settings: dict, metadata: dict) -> None:
    """The ONNX graph of format=onnx converted by OpenVINO into the folder `path`: <stem>.xml/.bin + metadata.yaml,
    with FP16 weights when settings['half'] (compiled at f32 on the CPU, like an FP32 folder).

    Going through ONNX keeps one traced graph for both formats (dynamic axes and embedded NMS included).
    """
    save_folder(convert(model, images, settings, metadata), path, metadata, fp16=settings["half"])


def export_int8(
    model: nn.Module, images: torch.Tensor, path: Path, settings: dict, metadata: dict, calibration: CalibrationSet
) -> None:
    """The IR of `export` quantized by NNCF (INT8 weights and activations, ranges from `calibration`); the decode stays
    float (quantization.py)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimators = {"minmax": RangeEstimatorParametersSet.MINMAX, "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
                  "entropy": RangeEstimatorParametersSet.HISTOGRAM}
    ov_model = convert(model, images, settings, metadata)
    kept = float_ir_nodes(ov_model)
    inputs = calibration.inputs(settings["batch"])
    LOGGER.info(f"{colorstr('OpenVINO:')} quantizing with NNCF {nncf.__version__} ({len(kept)} of "
                f"{len(ov_model.get_ordered_ops())} nodes stay float: the decode) on {calibration.describe()}...")
    nncf_logger, level = logging.getLogger("nncf"), logging.getLogger("nncf").level
    nncf_logger.setLevel(logging.WARNING)  # not a line per node it leaves float
    try:
        quantized = nncf.quantize(
            ov_model, nncf.Dataset(inputs), subset_size=len(inputs) * settings["batch"],
            ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(
                activations_range_estimator_params=estimators[calibration.method]),
        )
    finally:
        nncf_logger.setLevel(level)
    save_folder(quantized, path, metadata, fp16=False)


def convert(model: nn.Module, images: torch.Tensor, settings: dict, metadata: dict) -> openvino.Model:
    """The OpenVINO model of `model`'s ONNX graph (format=onnx's export, through a temporary file)."""
    openvino = import_openvino()
    LOGGER.info(f"{colorstr('OpenVINO:')} starting export with openvino {openvino.__version__.split('-')[0]}...")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx.export(model, images, onnx_path, settings, metadata)
        return openvino.convert_model(str(onnx_path))


def save_folder(ov_model: openvino.Model, path: Path, metadata: dict, fp16: bool) -> None:
    """<stem>.xml/.bin (FP32 weights unless `fp16`: parity within 1e-3) and metadata.yaml in the folder `path`."""
    openvino = import_openvino()
    xml = path / f"{path.name.removesuffix(OPENVINO_SUFFIX)}.xml"
    openvino.save_model(ov_model, str(xml), compress_to_fp16=fp16)
    (path / OPENVINO_METADATA).write_text(yaml.safe_dump(metadata, sort_keys=False))


def float_ir_nodes(ov_model: openvino.Model) -> list[str]:
    """The friendly names of the OpenVINO model's operations that stay float (`float_nodes`)."""
    ops = ov_model.get_ordered_ops()
    successors = {op.get_friendly_name(): [target.get_node().get_friendly_name() for output in op.outputs()
                                           for target in output.get_target_inputs()] for op in ops}
    convolutions = {op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"}
    return float_nodes([op.get_friendly_name() for op in ops], successors, convolutions)
