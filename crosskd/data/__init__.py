"""Datasets (COCO JSON and YOLO txt), the padded Batch and the offline digits demo data."""

from crosskd.data.dataset import DataInfo, DetectionDataset, Sample, load_data_yaml, read_dataset_names
from crosskd.data.digits import generate_digits
from crosskd.data.loader import Batch, build_dataloader, collate, skip_batches

__all__ = [
    "Batch",
    "DataInfo",
    "DetectionDataset",
    "Sample",
    "build_dataloader",
    "collate",
    "generate_digits",
    "load_data_yaml",
    "read_dataset_names",
    "skip_batches",
]
