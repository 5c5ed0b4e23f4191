"""The export format table: one row per format, read by the `format=` setting, the exporter, the loader's suffix
sniffing and `crosskd benchmark`.

A row names its runtime module instead of importing it, so that this table stays plain data (the run settings read
it at start without loading torch). A runtime module provides `export(model, images, path, settings, metadata)`,
which writes the file, and `load(path, device)`, which returns an `ExportedDetector` running it; a row with `int8`
also `export_int8(model, images, path, settings, metadata, calibration)`, which writes the INT8 file calibrated on
`calibration` (deployment/quantization.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from crosskd.errors import ConfigError


@dataclass(frozen=True)
class ExportFormat:
    """One export format: how it is named, where it is written and what runs it."""

    name: str  # the format= value
    title: str  # in logs and the benchmark table
    suffix: str  # appended to the weights' stem: a file suffix, or the ending of a folder's name
    module: str | None  # the runtime module (export, load); None for the PyTorch checkpoint itself
    package: str | None = None  # the Python package its runtime needs
    extra: str | None = None  # the crosskd pip extra that installs that package
    gpu: bool = False  # needs a CUDA device to export and run
    cpu_only: bool = False  # traced and run on the CPU whatever device= says
    half: tuple[str, ...] = ()  # the device types on which it can be written in FP16 (half=True)
    int8: str | None = None  # the Python package that quantizes it to INT8 (int8=True); None: no INT8
    opset: bool = False  # takes opset= (an ONNX graph is written on the way)
    also: tuple[str, ...] = ()  # other path endings that name this format (OpenVINO's .xml)

    def runtime_module(self) -> ModuleType:
        """The imported runtime module; a missing runtime package ends in one line naming its pip extra."""
        self.check_installed()
        return importlib.import_module(self.module)

    def check_installed(self, int8: bool = False) -> None:
        """One line naming the pip command when the runtime package (and with `int8` the quantizer) is missing."""
        needed = [(self.package, "export and inference need"), (self.int8 if int8 else None, "INT8 export needs")]
        for package, purpose in needed:
            if package and importlib.util.find_spec(package) is None:
                command = f"pip install 'crosskd[{self.extra}]'" if self.extra else f"pip install {package}"
                raise ConfigError(f"{self.title} {purpose} the {package} package; install it with: {command}")

    def matches(self, source: str | Path) -> bool:
        """Whether the path `source` names a file or folder of this format."""
        text = str(source).rstrip("/\\").lower()
        return self.module is not None and text.endswith((self.suffix.lower(), *self.also))

    @property
    def folder(self) -> bool:
        """The export is a folder (<stem><suffix>/), not a file."""
        return self.suffix.startswith("_")

    def path_for(self, weights: Path, precision: str = "fp32") -> Path:
        """The export of `weights` (a .pt): beside it with the same stem (`<stem>_int8` for INT8, as Ultralytics)."""
        return weights.with_name(weights.stem + PRECISION_STEMS[precision] + self.suffix)


PRECISION_STEMS = {"fp32": "", "fp16": "", "int8": "_int8"}  # what each precision adds to the export's stem
RUNTIMES = "crosskd.engine.deployment.runtimes"
FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("pytorch", "PyTorch", ".pt", None),
    ExportFormat("torchscript", "TorchScript", ".torchscript", f"{RUNTIMES}.torchscript", half=("cuda",)),
    ExportFormat("onnx", "ONNX", ".onnx", f"{RUNTIMES}.onnx", half=("cuda",), int8="onnxruntime", opset=True),
    ExportFormat("openvino", "OpenVINO", "_openvino_model", f"{RUNTIMES}.openvino", package="openvino",
                 extra="openvino", cpu_only=True, half=("cpu",), int8="nncf", opset=True, also=(".xml",)),
)


def export_formats() -> tuple[ExportFormat, ...]:
    """The formats `crosskd export` writes (every row but PyTorch's), in table order."""
    return tuple(fmt for fmt in FORMATS if fmt.module is not None)


def export_format(name: str) -> ExportFormat:
    """The row of format=`name`; one line listing the formats for any other name."""
    for fmt in export_formats():
        if fmt.name == name.lower():
            return fmt
    names = ", ".join(fmt.name for fmt in export_formats())
    raise ConfigError(f"format={name} is not an export format; use one of {names}")


def format_of_path(source: str | Path) -> ExportFormat | None:
    """The export format a path names by its suffix (or folder ending), None for anything else."""
    return next((fmt for fmt in export_formats() if fmt.matches(source)), None)


def exported_sources() -> tuple[str, ...]:
    """What an exported model's path looks like, for error messages."""
    return tuple(f"a *{fmt.suffix} folder" if fmt.folder else fmt.suffix for fmt in export_formats())
