"""Deployment: the export format table, the exporter that writes a student alone, the one model loader
(`load_runtime`, for every source: YAML, crosskd/MMDetection/torchvision checkpoints, exported files), one runtime
module per exported format, the checkpoint format and `crosskd convert`."""
