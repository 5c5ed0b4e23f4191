"""Engines: training, validation, prediction and export, plus checkpoints, metrics, plots and callbacks."""
