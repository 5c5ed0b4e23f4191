"""Knowledge distillation: the Distiller (CrossKD cross-head pass and baselines) and its loss recipes."""

from crosskd.distill.adapters import TowerAdapter, check_compatible, resolve_kd_idx
from crosskd.distill.crosskd import Distiller, align_scale
from crosskd.distill.kd_losses import DEFAULT_WEIGHTS, KD_METHODS, KDWeights, parse_kd, resolve_kd_weights

__all__ = [
    "DEFAULT_WEIGHTS",
    "KD_METHODS",
    "Distiller",
    "KDWeights",
    "TowerAdapter",
    "align_scale",
    "check_compatible",
    "parse_kd",
    "resolve_kd_idx",
    "resolve_kd_weights",
]
