"""The one registry of KD methods: every `kd=` value and the method objects behind it.

It imports nothing but `crosskd.errors`, so the run settings read the `kd` choices from it without loading torch
models: built-in methods are named by "module:Class" and imported when a Distiller first builds one; a method
registered at run time (`register`) is a class. A combination is an ordered tuple of method names: the Distiller runs
them in that order, which is also the order of their terms in the loss dict and results.csv. A method whose pass
differs for a detector family has a variant per teacher head type (`VARIANTS`, e.g. CrossKD for Faster R-CNN runs the
teacher's R-CNN stage instead of a dense head's tower): the same `kd=` name, another class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from crosskd.errors import ConfigError

METHODS: dict[str, Any] = {  # kd= name -> its KDMethod class, or "module:Class" of a built-in one
    "crosskd": "crosskd.distill.methods.crosskd:CrossKD",
    "pm": "crosskd.distill.methods.pm:PredictionMimicking",
    "ld": "crosskd.distill.methods.ld:LD",
    "pkd": "crosskd.distill.methods.pkd:PKD",
    "sl2": "crosskd.distill.methods.sl2:ScoreWeightedL2",
}
VARIANTS: dict[tuple[str, str], Any] = {  # (kd= name, teacher head type) -> the class used for that teacher
    ("crosskd", "faster_rcnn"): "crosskd.distill.methods.crosskd_rcnn:RoICrossKD",
}
COMBINATIONS: dict[str, tuple[str, ...]] = {  # kd= name -> its methods, in the order they run
    "crosskd+pkd": ("pkd", "crosskd"),
    "crosskd+pm": ("crosskd", "pm"),
    "crosskd+ld": ("crosskd", "ld"),
    "none": (),
}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a KDMethod subclass the method `kd=name` (a name may be registered once)."""
    key = name.strip().lower()
    if key in METHODS or key in COMBINATIONS or "+" in key:
        raise ValueError(f"kd method name {name!r} is taken or contains '+'")

    def add(cls: type) -> type:
        METHODS[key] = cls
        return cls

    return add


def unregister(name: str) -> None:
    """Remove a method added with `register` (built-in methods stay)."""
    if isinstance(METHODS.get(name), str):
        raise ValueError(f"{name!r} is a built-in kd method")
    METHODS.pop(name, None)


def kd_names() -> tuple[str, ...]:
    """Every valid `kd=` value: the single methods, then the combinations and none."""
    return (*METHODS, *COMBINATIONS)


def components(kd: str) -> tuple[str, ...]:
    """The method names of a `kd=` value in run order, e.g. 'crosskd+pm' -> ('crosskd', 'pm'); 'none' -> ()."""
    key = str(kd).strip().lower()
    if key in METHODS:
        return (key,)
    if key not in COMBINATIONS:
        raise ConfigError(f"kd={kd!r} is not a distillation method; use one of {', '.join(kd_names())}")
    return COMBINATIONS[key]


def method_class(name: str, head_type: str | None = None) -> type:
    """The KDMethod class of a single method name for a teacher of `head_type` (its variant when `VARIANTS` has one;
    a built-in one is imported here on first use)."""
    entry = VARIANTS.get((name, head_type), METHODS[name])
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry
