"""Optimiser, learning-rate schedule (a pure function of the iteration) and weight EMA for the trainer."""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from crosskd.config import Args
from crosskd.errors import ConfigError
from crosskd.utils import LOGGER, colorstr

NOMINAL_BATCH = 16  # lr0 is given for this total batch size (the paper's 8 GPUs x 2 images)
EMA_TAU = 2000  # EMA decay ramps up as decay * (1 - exp(-updates / tau)) so early weights fade quickly
AUTO_SGD_MIN_ITERS = 10_000  # optimizer=auto: the paper's SGD for runs this long (COCO 1x: ~88k), AdamW below
DEFAULT_LR0 = {"SGD": 0.01, "AdamW": 0.004}  # lr0 (for batch 16) when lr0 is empty: the paper's SGD, the demo's AdamW
WARMUP_FRACTION = 0.1  # a warmup_iters the user did not give is capped at this fraction of the run's iterations


def scaled_lr(lr0: float, batch: int) -> float:
    """Linear scaling rule: lr0 is for a total batch of 16."""
    return lr0 * batch / NOMINAL_BATCH


def scaled_steps(lr_steps: list[int], epochs: int) -> list[int]:
    """Map step epochs of a 12-epoch (1x) schedule onto `epochs`: round(s * epochs / 12)."""
    return [round(s * epochs / 12) for s in lr_steps]


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate at any iteration: linear warm-up times step decay (per epoch) or per-iteration cosine."""

    base_lr: float
    iters_per_epoch: int
    epochs: int
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)
    cos_lr: bool = False
    lrf: float = 0.01

    @property
    def total_iters(self) -> int:
        """Iterations of the whole run."""
        return self.iters_per_epoch * self.epochs

    def regular(self, iteration: int) -> float:
        """The learning rate without warm-up."""
        if self.cos_lr:
            progress = min(iteration / max(self.total_iters, 1), 1.0)
            final = self.base_lr * self.lrf
            return final + (self.base_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))
        epoch = iteration // self.iters_per_epoch
        decays = sum(epoch >= s for s in scaled_steps(list(self.lr_steps), self.epochs))
        return self.base_lr * 0.1**decays

    def __call__(self, iteration: int) -> float:
        """The learning rate at `iteration` (0-based over the whole run), warm-up included."""
        lr = self.regular(iteration)
        if iteration < self.warmup_iters:
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return lr

    def state_dict(self) -> dict:
        """The schedule's fields as plain values (for the checkpoint)."""
        state = asdict(self)
        state["lr_steps"] = list(self.lr_steps)
        return state


def resolve_run_length_defaults(args: Args, iters_per_epoch: int) -> Args:
    """`args` with optimizer, lr0 and warmup_iters fitted to a run of `iters_per_epoch` x epochs iterations.

    optimizer=auto becomes SGD from AUTO_SGD_MIN_ITERS iterations on, else AdamW; an empty lr0 becomes the chosen
    optimizer's DEFAULT_LR0; a warmup_iters the user did not give is capped at WARMUP_FRACTION of the run. Keys the
    user gave (`args.typed`) stay as given. Logs one line when anything was resolved; the result's values are final,
    so a resumed run (whose checkpoint holds them) resolves nothing.
    """
    total = iters_per_epoch * args.epochs
    name = args.optimizer
    if name.lower() == "auto":
        name = "SGD" if total >= AUTO_SGD_MIN_ITERS else "AdamW"
    name = next(key for key in DEFAULT_LR0 if key.lower() == name.lower())
    lr0 = DEFAULT_LR0[name] if args.lr0 is None else args.lr0
    warmup = args.warmup_iters
    if not args.typed("warmup_iters") and args.warmup_epochs <= 0:
        warmup = min(warmup, round(WARMUP_FRACTION * total))
    resolved = args.with_values(optimizer=name, lr0=lr0, warmup_iters=warmup)
    head = f"{args.optimizer} -> {name}" if args.optimizer != name else name
    notes = [f"{head}(lr0={lr0:g}{'' if args.lr0 is not None else ' by optimizer'}) for a run of {total} iterations"]
    if warmup != args.warmup_iters:
        notes.append(f"warmup_iters {args.warmup_iters} -> {warmup} ({WARMUP_FRACTION:.0%} of the run)")
    if name != args.optimizer or lr0 != args.lr0 or warmup != args.warmup_iters:
        LOGGER.info(f"{colorstr('optimizer:')} {', '.join(notes)}")
    return resolved


def build_schedule(args, iters_per_epoch: int) -> LRSchedule:
    """The schedule for `args` (lr0 scaled by batch/16, warmup_epochs > 0 overriding warmup_iters)."""
    warmup = round(args.warmup_epochs * iters_per_epoch) if args.warmup_epochs > 0 else int(args.warmup_iters)
    return LRSchedule(
        base_lr=scaled_lr(args.lr0, args.batch),
        iters_per_epoch=iters_per_epoch,
        epochs=args.epochs,
        warmup_iters=warmup,
        warmup_ratio=args.warmup_ratio,
        lr_steps=tuple(args.lr_steps or ()),
        cos_lr=bool(args.cos_lr),
        lrf=args.lrf,
    )


def build_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float, weight_decay: float):
    """SGD (the paper's) or AdamW over one parameter group (optimizer=auto is resolved before, see
    `resolve_run_length_defaults`)."""
    key = str(name).lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ConfigError(f"optimizer={name} is not supported; use optimizer=SGD or optimizer=AdamW")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class ModelEMA:
    """Exponential moving average of a model's weights with an update counter (decay ramps up with updates)."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, updates: int = 0):
        self.module = deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = updates

    def current_decay(self) -> float:
        """decay · (1 − exp(−updates / EMA_TAU)): small for the first updates, then close to `decay`."""
        return self.decay * (1 - math.exp(-self.updates / EMA_TAU))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's floating-point state into the average; copy integer buffers (e.g. BN counters)."""
        self.updates += 1
        d = self.current_decay()
        model_state = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = model_state[name].detach()
            if ema_value.is_floating_point():
                ema_value.mul_(d).add_(value.to(ema_value.dtype), alpha=1 - d)
            else:
                ema_value.copy_(value)
