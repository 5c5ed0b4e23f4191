"""Load a foreign state dict through an explicit key map, accounting for every tensor on both sides."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from crosskd.errors import CheckpointError

SHOWN = 3  # names listed per kind of problem in the one-line error


def _listing(kind: str, names: list[str]) -> str:
    more = f", … (+{len(names) - SHOWN})" if len(names) > SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:SHOWN])}{more})"


def load_mapped(
    target: nn.Module,
    source: Mapping[str, Tensor],
    key_map: Mapping[str, str],
    source_name: str,
    optional: Callable[[str], bool] = lambda name: False,
    transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> int:
    """Copy `source[k]` onto `target`'s entry `key_map[k]` for every source key; returns the number copied.

    Every source tensor must be mapped, every mapped tensor must match its target's shape, and every target entry
    must be filled unless `optional(name)` says it may keep its initial value (e.g. BatchNorm's num_batches_tracked).
    Otherwise one CheckpointError counts the unexpected, missing and mis-shaped tensors and names the first few.
    `transforms[k]` reshapes or reorders a source tensor before the shape check (e.g. a permuted class axis).
    """
    own = target.state_dict()
    transforms = transforms or {}
    unexpected = [k for k in source if k not in key_map]
    unknown_targets = [f"{k}->{v}" for k, v in key_map.items() if k in source and v not in own]
    mapped = {key_map[k]: transforms.get(k, lambda t: t)(v) for k, v in source.items() if key_map.get(k) in own}
    misshaped = [
        f"{k} {tuple(source[k].shape)}->{tuple(own[key_map[k]].shape)}"
        for k in source
        if key_map.get(k) in own and mapped[key_map[k]].shape != own[key_map[k]].shape
    ]
    missing = [name for name in own if name not in mapped and not optional(name)]
    problems = [
        _listing(kind, names)
        for kind, names in (
            ("unexpected", unexpected),
            ("unmappable", unknown_targets),
            ("mis-shaped", misshaped),
            ("missing", missing),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"'{source_name}' does not fit this model: {'; '.join(problems)}; "
            "check that the model YAML (model_cfg=/teacher_cfg=) matches the checkpoint's architecture"
        )
    with torch.no_grad():
        for name, tensor in mapped.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return len(mapped)
