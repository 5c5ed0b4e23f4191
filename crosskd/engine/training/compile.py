"""`compile=True`: torch.compile on a detector's backbone, neck and head, with one warning and eager fallback.

torch.compile is lazy: it traces and compiles at the first call, so that is where a failure (no C++ compiler, an
unsupported operator, an old platform) shows. The wrapper catches it there, warns once per process and runs the
eager forward from then on. The wrapper is an instance attribute, not a wrapping module, so `state_dict()` keys stay
those of the plain module (no `_orig_mod.` prefix) and checkpoints load into uncompiled models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from crosskd.utils import LOGGER

COMPILED_PARTS = ("backbone", "neck", "head")  # the DenseDetector submodules compiled by compile_detector
BACKEND = "inductor"  # torch.compile's backend when none is given (tests use "eager": tracing without code generation)
_warned = False  # one fallback warning per process


class CompiledForward:
    """`module`'s own forward through torch.compile; after a failure at a call, the eager forward."""

    def __init__(self, module: nn.Module, backend: str | Any | None = None):
        backend = BACKEND if backend is None else backend
        self.module, self.backend = module, backend
        self.eager = type(module).forward.__get__(module)  # the class's forward, bound: never this wrapper
        self.compiled = torch.compile(self.eager, backend=backend)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compile failure falls back; a real error recurs below
                self.failed = True
                warn_fallback(type(self.module).__name__, error)
        return self.eager(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> CompiledForward:
        """A copied module (the EMA) gets its own wrapper, compiled at its own first call."""
        return CompiledForward(copy.deepcopy(self.module, memo), self.backend)


def warn_fallback(name: str, error: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        LOGGER.warning(f"compile=True: torch.compile failed on {name} ({type(error).__name__}: {reason[:200]}); "
                       "running eager PyTorch instead (set compile=false to silence this)")


def maybe_compile(module: nn.Module, enabled: bool, backend: str | Any | None = None) -> nn.Module:
    """`module` itself, its forward compiled when `enabled` (in place; parameters and state_dict unchanged)."""
    if enabled and not is_compiled(module):
        module.forward = CompiledForward(module, backend)
    return module


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CompiledForward)


def compile_detector(detector: nn.Module, enabled: bool, backend: str | Any | None = None) -> nn.Module:
    """Compile a DenseDetector's backbone, neck and head forwards (what forward, loss, predict and the distiller's
    extract_features run) when `enabled`; returns the detector."""
    for name in COMPILED_PARTS:
        maybe_compile(getattr(detector, name), enabled, backend)
    return detector
