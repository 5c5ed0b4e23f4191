"""Read a pickled torch file of Python objects without running any of its code: classes become inert records.

A `torch.save` of a whole model (an Ultralytics `.pt`) pickles its module objects, and `torch.load(weights_only=False)`
would import and call whatever the pickle names. Here the pickle goes through `InertUnpickler`, passed to `torch.load`
as its `pickle_module` (this module exposes `Unpickler` and `load`), so torch's zip reading and tensor rebuilding are
reused while `find_class` decides every global:
- a class under one of `INERT_PREFIXES` (torch.nn modules, Ultralytics' classes) becomes an `InertObject` subclass
  that only stores the state pickle hands to it; the real class is never imported;
- the few callables torch needs to rebuild tensors and containers (`SAFE_GLOBALS`) are returned as themselves;
- `getattr` (a pickled bound method, e.g. a fused layer's `forward`) becomes `InertMethod`, a name and nothing more;
- anything else raises `RefusedGlobal`, naming it.
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

INERT_PREFIXES = ("torch.nn.modules.", "ultralytics.")
BUILTIN_MODULES = ("builtins", "__builtin__")  # pickle protocol 2 names builtins `__builtin__`
PATH_CLASSES = ("pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath")


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that could run code when loaded."""

    def __init__(self, name: str):
        super().__init__(f"refused global {name}")
        self.name = name


class InertObject:
    """A stand-in for a pickled object of class `class_path`: it keeps the state pickle gives it, and nothing runs."""

    class_path: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def attributes(self) -> dict:
        """The object's pickled `__dict__` (an nn.Module's `_modules`, `_parameters`, ... and its plain attributes)."""
        state = getattr(self, "state", None)
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self.class_path}>"


class InertMethod:
    """A pickled bound method `getattr(owner, name)`, kept as a name: it cannot be called."""

    def __init__(self, owner: InertObject, name: str):
        self.owner, self.name = owner, name


_INERT_CLASSES: dict[str, type[InertObject]] = {}


def inert_class(class_path: str) -> type[InertObject]:
    """The one InertObject subclass standing for `class_path` (created on first use)."""
    if class_path not in _INERT_CLASSES:
        name = class_path.rpartition(".")[2]
        _INERT_CLASSES[class_path] = type(name, (InertObject,), {"class_path": class_path})
    return _INERT_CLASSES[class_path]


def inert_getattr(owner: Any, name: str) -> InertMethod:
    """`getattr` as a pickle may call it: only a method name of an inert object, looked up nowhere."""
    if not isinstance(owner, InertObject) or not isinstance(name, str):
        raise RefusedGlobal(f"builtins.getattr on {type(owner).__name__}")
    return InertMethod(owner, name)


def inert_reconstructor(cls: Any, base: Any, state: Any) -> InertObject:
    """`copyreg._reconstructor` (pickle protocols 0 and 1) for inert classes only."""
    if not (isinstance(cls, type) and issubclass(cls, InertObject)) or base is not object or state is not None:
        raise RefusedGlobal(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)}")
    return InertObject.__new__(cls)


def path_text(*parts: str) -> str:
    """A pickled pathlib path, as its text."""
    return "/".join(str(part) for part in parts)


SAFE_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.getattr": inert_getattr,
    "copyreg._reconstructor": inert_reconstructor,
    "builtins.object": object,  # only as _reconstructor's base
    **{name: path_text for name in PATH_CLASSES},
}


def resolve_global(module: str, name: str) -> Any:
    """What `module.name` stands for in an inert read; RefusedGlobal for anything that is not allowed."""
    module = "builtins" if module in BUILTIN_MODULES else module
    full = f"{module}.{name}"
    if full in SAFE_GLOBALS:
        return SAFE_GLOBALS[full]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if full.startswith(INERT_PREFIXES) and name.isidentifier():
        return inert_class(full)
    raise RefusedGlobal(full)


class InertUnpickler(pickle.Unpickler):
    """An Unpickler whose every global goes through `resolve_global` (torch subclasses it to add storages)."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)


Unpickler = InertUnpickler  # the names torch.load uses on a pickle_module


def load(file: IO[bytes], **kwargs: Any) -> Any:
    return InertUnpickler(file, **kwargs).load()


def read_inert(path: str | Path) -> Any:
    """`torch.load` of `path` on the CPU with every class inert; RefusedGlobal for a global outside the allowed set.

    torch's own errors (a truncated or corrupt file) pass through unchanged."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__])


def pickle_globals(path: str | Path) -> set[str]:
    """Every global (`module.name`) the pickle of a torch zip file references, read with pickletools: nothing runs.

    Empty for a file that is not a torch zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            data = archive.read(pickles[0]) if pickles else b""
    except (OSError, zipfile.BadZipFile):
        return set()
    return _globals_in(data)


def _globals_in(data: bytes) -> set[str]:
    """The globals of one pickle: GLOBAL's argument (protocols 0-2, torch.save's default), or STACK_GLOBAL's two
    strings when pushed just before it (protocol 4+)."""
    found, strings = set(), []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                found.add(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except (ValueError, EOFError):  # a damaged pickle: what was read so far
        pass
    return found

