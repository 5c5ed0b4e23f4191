"""`crosskd export`: the exporter's file, and for int8=True what the quantization cost, measured every time.

An INT8 graph has no parity tolerance (its outputs move by design), so its check is the one that matters to a user:
COCO AP of the float PyTorch model and of the INT8 file on the val split of the calibration data (or `fraction` of
it), both printed with the drop. The exporter (engine/deployment) cannot run the Validator, which sits above it, so
the check lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torch.utils.data import DataLoader

from crosskd.config import Args
from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.evaluation.validator import Validator
from crosskd.paths import newest_best
from crosskd.utils import LOGGER, colorstr

DROP_WARNING = 1.0  # AP points (AP x 100) of INT8 drop above which the check suggests other calibration settings


class QuantizationCost(NamedTuple):
    """COCO AP and AP50 of the float model and of its INT8 export on the same val images."""

    images: int
    float_ap: float
    float_ap50: float
    int8_ap: float
    int8_ap50: float

    @property
    def drop(self) -> float:
        """AP points lost (AP x 100; negative: INT8 scored higher)."""
        return 100 * (self.float_ap - self.int8_ap)


def run(args: Args) -> Path:
    """Export `args.model` (or the newest best.pt); an INT8 export is then validated against the float model."""
    source = str(args.model or newest_best("exporting"))
    args = Args(**{**vars(args), "model": source})
    path = exporter.run(args)
    if args.int8:
        report(quantization_cost(args, path))
    return path


def quantization_cost(args: Args, path: Path) -> QuantizationCost:
    """AP of the checkpoint (PyTorch, float) and of the INT8 file `path` on `fraction` of the val split of the data
    the file was calibrated on, at the export size."""
    detector = load_runtime(args.model, model_cfg=args.model_cfg).detector("the INT8 check")
    int8 = load_runtime(path).model
    val_args = Args(**{**vars(args), "data": int8.calibration["data"], "split": "val", "batch": int8.batch,
                       "plots": False, "save_json": False, "conf": None, "multi_label": None})
    loader = val_loader(val_args, max(int8.imgsz), max(int8.strides))
    LOGGER.info(f"{colorstr('INT8 check:')} COCO AP of the float model and of '{path.name}' on "
                f"{len(loader.dataset)} val images of {Path(val_args.data).name}")
    scores = [Validator(val_args, model=model, dataloader=loader).run(plots=False, per_class=False)
              for model in (detector, int8)]
    return QuantizationCost(len(loader.dataset), scores[0]["AP"], scores[0]["AP50"], scores[1]["AP"],
                            scores[1]["AP50"])


def val_loader(args: Args, imgsz: int, stride: int) -> DataLoader:
    """`fraction` of the val split at the export's long side `imgsz`, padded to a multiple of `stride`."""
    info = load_data_yaml(args.data, args.datasets_dir)
    dataset = DetectionDataset(info, "val", imgsz, augment=False, pad_multiple=stride, fraction=args.fraction)
    return build_dataloader(dataset, args.batch, args.workers, shuffle=False, seed=args.seed)


def report(cost: QuantizationCost) -> None:
    """One line with both APs and the drop; a warning with what to try when the drop is large."""
    LOGGER.info(f"{colorstr('INT8 check:')} AP {cost.float_ap:.4f} float -> {cost.int8_ap:.4f} INT8 "
                f"(drop {cost.drop:+.2f} points), AP50 {cost.float_ap50:.4f} -> {cost.int8_ap50:.4f} "
                f"on {cost.images} val images")
    if cost.drop > DROP_WARNING:
        LOGGER.warning(f"INT8 lost {cost.drop:.2f} AP points; try calib_method=percentile or entropy, or more "
                       "calibration images (fraction=)")
