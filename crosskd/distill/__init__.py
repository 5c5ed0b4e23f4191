"""Knowledge distillation: the Distiller, the registry of KD methods (crosskd, pm, ld, pkd, ...) and their recipes.

The names below load on first use, so that `crosskd.distill.registry` (the `kd=` names the run settings read) imports
without torch models.
"""

from __future__ import annotations

import importlib
from typing import Any

EXPORTS = {  # name -> the module defining it
    "DEFAULT_WEIGHTS": "crosskd.distill.kd_losses",
    "Distiller": "crosskd.distill.crosskd",
    "KDMethod": "crosskd.distill.methods.base",
    "KDWeights": "crosskd.distill.kd_losses",
    "TowerAdapter": "crosskd.distill.adapters",
    "align_scale": "crosskd.distill.passes",
    "check_compatible": "crosskd.distill.adapters",
    "components": "crosskd.distill.registry",
    "kd_names": "crosskd.distill.registry",
    "register": "crosskd.distill.registry",
    "resolve_kd_idx": "crosskd.distill.adapters",
    "resolve_kd_weights": "crosskd.distill.crosskd",
}
__all__ = [*EXPORTS, "KD_METHODS"]


def __getattr__(name: str) -> Any:
    """Import an exported name on first use; KD_METHODS is the registry's kd= names at the time of asking."""
    if name == "KD_METHODS":
        return importlib.import_module("crosskd.distill.registry").kd_names()
    if name not in EXPORTS:
        raise AttributeError(f"module 'crosskd.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
