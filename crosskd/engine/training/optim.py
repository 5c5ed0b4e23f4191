"""Optimiser, parameter groups, learning-rate schedules and gradient accumulation (pure functions of the iteration)
and weight EMA for the trainer.

Two styles, chosen by run settings the model's recipe fills: the paper's (MMDetection: one parameter group, lr0 scaled
linearly with batch, iteration warm-up, step decay) and Ultralytics 8.4's (`nbs` > 0: gradients accumulated to a
nominal batch, weight decay scaled with it; `norm_bias_decay=false`: three parameter groups; `lr_schedule=ultralytics`:
epoch warm-up with the biases' and momentum's own ramps, then a per-epoch linear or cosine decay).
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
from torch import nn

from crosskd.config import Args
from crosskd.engine.training.musgd import MuSGD
from crosskd.errors import ConfigError
from crosskd.utils import LOGGER, colorstr

NOMINAL_BATCH = 16  # lr0 is given for this total batch size (the paper's 8 GPUs x 2 images)
EMA_TAU = 2000  # EMA decay ramps up as decay * (1 - exp(-updates / tau)) so early weights fade quickly
AUTO_SGD_MIN_ITERS = 10_000  # optimizer=auto: the paper's SGD for runs this long (COCO 1x: ~88k), AdamW below
DEFAULT_LR0 = {"SGD": 0.01, "AdamW": 0.004, "MuSGD": 0.01}  # lr0 (batch 16) when empty: the paper's SGD, the demo's
# AdamW, Ultralytics' MuSGD
WARMUP_FRACTION = 0.1  # a warmup_iters the user did not give is capped at this fraction of the run's iterations
ULTRALYTICS_MUSGD_LR0 = 0.01  # optimizer=auto with nbs > 0 (Ultralytics 8.4's rule): MuSGD's lr0 for long runs
ULTRALYTICS_ADAMW_BETA1 = 0.9  # ... and AdamW's beta1 for short ones
NORM_LAYERS = tuple(cls for name, cls in vars(nn).items() if isinstance(cls, type) and "Norm" in name)
MUSGD_BOOST = 3.0  # MuSGD: the learning-rate factor of the parameters a model names (YOLO: the class branches)


def scaled_lr(lr0: float, batch: int) -> float:
    """Linear scaling rule: lr0 is for a total batch of 16."""
    return lr0 * batch / NOMINAL_BATCH


def base_lr(args: Args) -> float:
    """lr0 scaled linearly for batch 16 (nbs=0, the paper), or as given (nbs > 0: accumulation keeps the nominal
    batch, as Ultralytics)."""
    return args.lr0 if args.nbs > 0 else scaled_lr(args.lr0, args.batch)


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

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set the learning rate of `iteration` on every parameter group; returns it."""
        lr = self(iteration)
        set_lr(optimizer, lr)
        return lr

    def state_dict(self) -> dict:
        """The schedule's fields as plain values (for the checkpoint)."""
        state = asdict(self)
        state["lr_steps"] = list(self.lr_steps)
        return state


def interpolate(iteration: int, length: int, start: float, end: float) -> float:
    """`start` at iteration 0 to `end` at `length`, linearly (numpy.interp's arithmetic; `end` from `length` on)."""
    if iteration >= length:
        return end
    return (end - start) / length * iteration + start


@dataclass(frozen=True)
class EpochSchedule:
    """Ultralytics 8.4's schedule: the learning rate falls once per epoch from base_lr to base_lr × lrf, linearly or
    on a half cosine (its LambdaLR); during the first `warmup_iters` iterations every group's lr rises linearly from 0
    (the biases' falls from warmup_bias_lr) to that epoch's value and SGD's momentum from warmup_momentum to
    momentum (None: momentum throughout)."""

    base_lr: float
    iters_per_epoch: int
    epochs: int
    warmup_iters: int = 0
    cos_lr: bool = False
    lrf: float = 0.01
    warmup_bias_lr: float = 0.0
    warmup_momentum: float | None = None
    momentum: float = 0.937

    def factor(self, epoch: int) -> float:
        """The lr factor of `epoch`: 1 at epoch 0, towards lrf at `epochs` (linear, or cosine with cos_lr)."""
        if self.cos_lr:
            return max((1 - math.cos(epoch * math.pi / self.epochs)) / 2, 0) * (self.lrf - 1) + 1
        return max(1 - epoch / self.epochs, 0) * (1.0 - self.lrf) + self.lrf

    def regular(self, iteration: int) -> float:
        """The learning rate without warm-up: that of the iteration's epoch."""
        return self.base_lr * self.factor(iteration // self.iters_per_epoch)

    def __call__(self, iteration: int, bias: bool = False, scale: float = 1.0) -> float:
        """The learning rate at `iteration` (0-based over the run) of the weights, or of the biases, in a group whose
        lr is `scale` times the schedule's (the biases' warm-up still starts at warmup_bias_lr, as Ultralytics')."""
        start = self.warmup_bias_lr if bias else 0.0
        if self.warmup_iters and iteration <= self.warmup_iters:
            return interpolate(iteration, self.warmup_iters, start, self.regular(iteration) * scale)
        return self.regular(iteration) * scale

    def momentum_at(self, iteration: int) -> float | None:
        """SGD's momentum at `iteration`; None when momentum has no warm-up."""
        if self.warmup_momentum is None:
            return None
        if self.warmup_iters and iteration <= self.warmup_iters:
            return interpolate(iteration, self.warmup_iters, self.warmup_momentum, self.momentum)
        return self.momentum

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set each group's learning rate (times its `lr_scale`) and SGD momentum of `iteration`; returns the weights'
        learning rate."""
        momentum = self.momentum_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = self(iteration, bias=group.get("param_group") == "bias", scale=group.get("lr_scale", 1.0))
            if momentum is not None and "momentum" in group:
                group["momentum"] = momentum
        return self(iteration)

    def state_dict(self) -> dict:
        """The schedule's fields as plain values (for the checkpoint)."""
        return asdict(self)


@dataclass(frozen=True)
class Accumulation:
    """How many batches' gradients make one optimiser step: `nominal` (Ultralytics' round(nbs / batch)), ramping from
    1 over the warm-up as Ultralytics does. A step ends at an iteration when the iterations since the last step reach
    the count of that iteration, counted over the whole run (not per epoch), so whether an iteration steps is a pure
    function of it: a resumed run steps where an uninterrupted one does."""

    nominal: int = 1
    warmup_iters: int = 0

    @cached_property
    def warmup_steps(self) -> tuple[frozenset[int], int]:
        """The warm-up iterations (0..warmup_iters) that end a step, and the last of them (-1: none, no warm-up)."""
        steps, last = set(), -1
        if self.warmup_iters:
            for iteration in range(self.warmup_iters + 1):
                count = max(1, round(interpolate(iteration, self.warmup_iters, 1, self.nominal)))
                if iteration - last >= count:
                    steps.add(iteration)
                    last = iteration
        return frozenset(steps), last

    def steps_at(self, iteration: int) -> bool:
        """Whether the optimiser steps after the backward pass of `iteration`."""
        steps, last = self.warmup_steps
        if self.warmup_iters and iteration <= self.warmup_iters:
            return iteration in steps
        return (iteration - last) % self.nominal == 0


def nominal_accumulation(batch: int, nbs: int) -> int:
    """Batches per optimiser step for a nominal batch `nbs` (0: 1): max(round(nbs / batch), 1)."""
    return max(round(nbs / batch), 1) if nbs > 0 else 1


def effective_weight_decay(args: Args) -> float:
    """weight_decay, scaled by batch × accumulation / nbs when nbs > 0 (Ultralytics)."""
    if args.nbs <= 0:
        return args.weight_decay
    return args.weight_decay * args.batch * nominal_accumulation(args.batch, args.nbs) / args.nbs


def build_accumulation(args: Args, iters_per_epoch: int, warmup_iters: int) -> Accumulation:
    """The run's accumulation: nominal_accumulation, at most the run's iterations, ramping over the warm-up."""
    nominal = min(nominal_accumulation(args.batch, args.nbs), iters_per_epoch * args.epochs)
    return Accumulation(nominal, warmup_iters if nominal > 1 else 0)


def resolve_run_length_defaults(args: Args, iters_per_epoch: int, *, num_images: int = 0, nc: int = 80) -> Args:
    """`args` with optimizer, lr0 and warmup_iters fitted to a run of `iters_per_epoch` x epochs iterations.

    optimizer=auto becomes SGD from AUTO_SGD_MIN_ITERS iterations on, else AdamW; an empty lr0 becomes the chosen
    optimizer's DEFAULT_LR0; a warmup_iters the user did not give is capped at WARMUP_FRACTION of the run. With nbs > 0
    optimizer=auto follows Ultralytics' rule instead (`resolve_ultralytics_auto`, from `num_images` and `nc`). Keys
    the user gave (`args.typed`) stay as given. Logs one line when anything was resolved; the result's values are
    final, so a resumed run (whose checkpoint holds them) resolves nothing.
    """
    if args.nbs > 0:
        return resolve_ultralytics_auto(args, num_images, nc)
    total = iters_per_epoch * args.epochs
    name = args.optimizer
    if name.lower() == "auto":
        name = "SGD" if total >= AUTO_SGD_MIN_ITERS else "AdamW"
    name = canonical_optimizer(name)
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


def canonical_optimizer(name: str) -> str:
    """SGD, AdamW or MuSGD as DEFAULT_LR0 spells it, for any case of the name."""
    return next(key for key in DEFAULT_LR0 if key.lower() == name.lower())


def resolve_ultralytics_auto(args: Args, num_images: int, nc: int) -> Args:
    """optimizer=auto as Ultralytics 8.4 decides it: MuSGD (lr0 0.01) when ceil(num_images / max(batch, nbs)) x
    epochs optimiser steps exceed AUTO_SGD_MIN_ITERS, else AdamW with lr0 round(0.002 x 5 / (4 + nc), 6) and beta1
    0.9; the biases' warm-up then starts at 0. MuSGD's momentum is the warm-up's, which ends at `momentum`. Keys
    the user gave stay (Ultralytics' auto would override lr0 and momentum); an explicit optimizer keeps lr0 (0.01 by
    the recipe, DEFAULT_LR0 when empty)."""
    if args.optimizer.lower() != "auto":
        name = canonical_optimizer(args.optimizer)
        return args.with_values(optimizer=name, lr0=DEFAULT_LR0[name] if args.lr0 is None else args.lr0)
    steps = math.ceil(num_images / max(args.batch, args.nbs)) * args.epochs
    name = "MuSGD" if steps > AUTO_SGD_MIN_ITERS else "AdamW"
    fitted = {"optimizer": name, "lr0": ULTRALYTICS_MUSGD_LR0 if name == "MuSGD" else round(0.002 * 5 / (4 + nc), 6),
              "momentum": ULTRALYTICS_ADAMW_BETA1 if name == "AdamW" else args.momentum, "warmup_bias_lr": 0.0}
    resolved = args.with_values(**{key: value for key, value in fitted.items()
                                   if key == "optimizer" or not args.typed(key)})
    LOGGER.info(f"{colorstr('optimizer:')} auto -> {name}(lr0={resolved.lr0:g}, momentum={resolved.momentum:g}) for "
                f"{steps} optimiser steps of nbs {args.nbs} (Ultralytics' rule), "
                f"warmup_bias_lr={resolved.warmup_bias_lr:g}")
    return resolved


def build_schedule(args: Args, iters_per_epoch: int) -> LRSchedule | EpochSchedule:
    """The schedule of lr_schedule: mmdet (`LRSchedule`, warmup_epochs > 0 overriding warmup_iters) or ultralytics
    (`EpochSchedule`, warm-up over min(warmup_epochs, epochs - 1) epochs); base lr from `base_lr`."""
    if args.lr_schedule == "ultralytics":
        warmup_epochs = min(args.warmup_epochs, max(args.epochs - 1, 0))
        return EpochSchedule(
            base_lr=base_lr(args),
            iters_per_epoch=iters_per_epoch,
            epochs=args.epochs,
            warmup_iters=round(warmup_epochs * iters_per_epoch) if warmup_epochs > 0 else 0,
            cos_lr=bool(args.cos_lr),
            lrf=args.lrf,
            warmup_bias_lr=args.warmup_bias_lr,
            warmup_momentum=args.warmup_momentum,
            momentum=args.momentum,
        )
    warmup = round(args.warmup_epochs * iters_per_epoch) if args.warmup_epochs > 0 else int(args.warmup_iters)
    return LRSchedule(
        base_lr=base_lr(args),
        iters_per_epoch=iters_per_epoch,
        epochs=args.epochs,
        warmup_iters=warmup,
        warmup_ratio=args.warmup_ratio,
        lr_steps=tuple(args.lr_steps or ()),
        cos_lr=bool(args.cos_lr),
        lrf=args.lrf,
    )


def parameter_groups(module: nn.Module, weight_decay: float, norm_bias_decay: bool, muon: bool = False,
                     boosted: frozenset[int] = frozenset()) -> list:
    """The trainable parameters of `module` as the optimiser takes them: one plain list (every parameter decays), or
    Ultralytics' three named groups, in its order: `weight` (decay), `bn` (norm-layer weights, no decay), `bias` (every
    bias, no decay). With `muon` (MuSGD) the conv and linear weights form a fourth group, `muon` (decay, `use_muon`),
    and each group is split as Ultralytics 8.4 splits it: the parameters whose ids are in `boosted` first, at
    `lr_scale` MUSGD_BOOST, then the others (empty parts are left out)."""
    if norm_bias_decay and not muon:
        return [p for p in module.parameters() if p.requires_grad]
    groups = {"weight": [], "bn": [], "bias": [], "muon": []}
    for layer in module.modules():
        for name, param in layer.named_parameters(recurse=False):
            if param.requires_grad:
                groups[parameter_kind(layer, name, param, muon, norm_bias_decay)].append(param)
    decay = {"weight": weight_decay, "bn": 0.0, "bias": 0.0, "muon": weight_decay}
    if not muon:
        return [{"params": groups[kind], "weight_decay": decay[kind], "param_group": kind}
                for kind in ("weight", "bn", "bias")]
    split = []
    for kind, params in groups.items():
        for scale, part in ((MUSGD_BOOST, [p for p in params if id(p) in boosted]),
                            (1.0, [p for p in params if id(p) not in boosted])):
            if part:
                split.append({"params": part, "weight_decay": decay[kind], "param_group": kind,
                              "use_muon": kind == "muon", "lr_scale": scale})
    return split


def parameter_kind(layer: nn.Module, name: str, param: nn.Parameter, muon: bool, norm_bias_decay: bool) -> str:
    """muon (MuSGD: every conv and linear weight), else bias, bn (norm-layer weights) or weight; with
    `norm_bias_decay` (one decaying group) everything but the Muon weights is weight."""
    if muon and param.ndim in (2, 4):
        return "muon"
    if norm_bias_decay:
        return "weight"
    return "bias" if "bias" in name else "bn" if isinstance(layer, NORM_LAYERS) else "weight"


def build_optimizer(params: list, name: str, lr: float, momentum: float, weight_decay: float, nesterov: bool = False):
    """SGD (the paper's; Nesterov's with `nesterov`), AdamW or MuSGD (Ultralytics 8.4's, `musgd.py`) over `params`:
    parameters or parameter groups (see `parameter_groups`; optimizer=auto is resolved before, see
    `resolve_run_length_defaults`)."""
    key = str(name).lower()
    if key == "sgd":
        if nesterov and momentum <= 0:
            raise ConfigError("nesterov=true needs momentum > 0; set momentum (e.g. momentum=0.937) or nesterov=false")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    if key == "musgd":
        return MuSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise ConfigError(f"optimizer={name} is not supported; use optimizer=SGD, AdamW or MuSGD")


def describe_optimizer(args: Args, lr: float, params: list, weight_decay: float) -> str:
    """One line: the optimiser, its lr (and how it came from lr0), momentum and the decay of each group."""
    scaling = f" = lr0 {args.lr0} x batch {args.batch}/{NOMINAL_BATCH}" if args.nbs <= 0 else ""
    head = f"{args.optimizer}(lr={lr:.5g}{scaling}, momentum={args.momentum}{', nesterov' if args.nesterov else ''}"
    if params and isinstance(params[0], dict):
        groups = ", ".join(f"{len(g['params'])} {g['param_group']}(decay={g['weight_decay']:.5g}"
                           + (f", lr x{g['lr_scale']:g}" if g.get("lr_scale", 1.0) != 1.0 else "") + ")"
                           for g in params)
        return f"{head}) with parameter groups {groups}"
    return f"{head}, weight_decay={weight_decay}), {len(params)} tensors"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` (times the group's `lr_scale`, if any) on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
