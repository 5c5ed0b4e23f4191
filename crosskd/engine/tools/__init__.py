"""Tools: `crosskd analyze` (what the cross-head pass does to a batch), `crosskd benchmark` (every export format's
size, AP and speed) and `crosskd info` (layers, parameters, GFLOPs)."""
