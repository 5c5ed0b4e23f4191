"""Training engine: `Trainer(args).train()` with a visible lifecycle setup -> epochs -> finish."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from crosskd.config import get_args, imgsz_hw
from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml, skip_batches
from crosskd.dist import barrier, get_rank, get_world_size, is_dist, is_main_process, reduce_mean
from crosskd.engine import ddp
from crosskd.engine.backend import is_detector_checkpoint, load_runtime
from crosskd.engine.callbacks import Callback, Callbacks, default_callbacks, trim_results_csv, write_results_csv
from crosskd.engine.checkpoint import (
    detector_from_checkpoint,
    is_resumable,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    strip_checkpoint,
)
from crosskd.engine.compile import compile_detector
from crosskd.engine.interrupt import StopSignals, exit_code, resume_command, signal_name
from crosskd.engine.metrics import fitness
from crosskd.engine.nonfinite import NonFiniteGuard
from crosskd.engine.optim import ModelEMA, build_optimizer, build_schedule, resolve_run_length_defaults, set_lr
from crosskd.engine.progress import EpochProgress, epoch_header
from crosskd.engine.validator import Validator
from crosskd.errors import CheckpointError, ConfigError, RunStopped, TrainingError
from crosskd.models import DenseDetector
from crosskd.models.pretrained import load_pretrained_weights, transfer_matching
from crosskd.paths import make_save_dir, newest_file, runs_dir, writable_dir
from crosskd.utils import LOGGER, colorstr, console, init_seeds, remove_stale_temp_files, select_device

RESUME_WHITELIST = (  # may change when resuming
    "device", "workers", "val", "plots", "tensorboard", "save_period", "save_period_iters", "nan_patience", "compile",
)


class DetectorLoss(nn.Module):
    """Computes a detector's losses in `forward`, so DistributedDataParallel wraps the call that makes them."""

    def __init__(self, detector: DenseDetector):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.detector.loss(batch)


class Trainer:
    """DenseDetector training: SGD/AdamW, warm-up + step/cosine schedule, AMP, EMA, DDP, checkpoints and validation.

    Subclasses change what is trained through `build_model()` (the DenseDetector that is saved and validated),
    `build_loss_module()` (an nn.Module whose forward(batch) returns the loss dict; it is what DDP wraps and whose
    trainable parameters the optimiser gets) and `checkpoint_extras()` / `restore_extras()`.
    """

    mode = "train"

    def __init__(self, args: Any, callbacks: Callbacks | None = None):
        self.args = args
        self.callbacks = callbacks or Callbacks(default_callbacks())
        self.epoch = self.start_epoch = self.iteration = 0
        self.best_fitness: float | None = None
        self.fitness: float | None = None
        self.metrics: dict[str, float] = {}
        self.final_metrics: dict[str, float] = {}
        self.loss_names: list[str] = []
        self.loss_items: dict[str, Tensor] = {}
        self.batch: Any = None  # the current train batch, for on_train_batch_end callbacks (train_batch*.jpg)
        self.epoch_losses: dict[str, float] = {}
        self.lr = 0.0
        self.elapsed = self.elapsed_before = 0.0
        self.resume_path: Path | None = None
        self.resume_ckpt: dict | None = None  # the checkpoint being resumed, loaded once
        self.save_dir: Path | None = None
        self.ema: ModelEMA | None = None
        self.nonfinite = NonFiniteGuard()
        self.batches_done = 0  # iterations of self.epoch done
        self.loss_sums: dict[str, Tensor] = {}  # this epoch's summed losses so far
        self.resume_partial: dict | None = None  # the unfinished epoch's state in a mid-epoch last.pt
        self.in_epoch = False  # from an epoch's start until its last.pt is saved
        self.stop_signals = StopSignals()

    def add_callback(self, event: str, fn: Callback) -> None:
        self.callbacks.add(event, fn)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Device/DDP, resume args, seeds, data, model, optimiser, schedule, scaler, EMA, run dir, resume state."""
        ckpt = self.load_resume_checkpoint()
        self.device = select_device(self.args.device)
        ddp.init_distributed(self.device)
        self.world_size, self.rank = get_world_size(), get_rank()
        init_seeds(self.args.seed + self.rank, self.args.deterministic)
        self.data_info = load_data_yaml(self.args.data, self.args.datasets_dir)
        self.names = dict(self.data_info.names)
        self.model = self.build_model().to(self.device)
        self.loss_module = self.build_loss_module().to(self.device)
        self.train_module = self.wrap_ddp(self.loss_module)
        self.train_loader, val_loader = self.build_dataloaders()
        self.args = resolve_run_length_defaults(self.args, len(self.train_loader))
        self.schedule = build_schedule(self.args, len(self.train_loader))
        self.build_optimization()
        self.save_dir = self.prepare_save_dir()
        self.validator = Validator(self.args, dataloader=val_loader, save_dir=self.save_dir)
        if ckpt is not None:
            self.restore(ckpt)

    def load_resume_checkpoint(self) -> dict | None:
        """With resume=True or a path: load last.pt, check it can be resumed and take its train args."""
        if not self.args.resume:
            return None
        path = resume_path(self.args.resume)
        ckpt = load_checkpoint(path)
        if not is_resumable(ckpt):
            raise CheckpointError(
                f"'{path}' is a finished (stripped) checkpoint with no optimizer state, so it cannot be resumed; "
                f"start a new run from it with model={path}"
            )
        self.args = self.resume_args(ckpt["train_args"], path)
        self.resume_path, self.resume_ckpt = Path(path), ckpt
        return ckpt

    def resume_args(self, train_args: dict, path: Path) -> Any:
        """The checkpoint's args plus the whitelisted keys the user changed; other changes are warned and ignored."""
        defaults = get_args({}, self.mode).to_dict()
        current = self.args.to_dict()
        skip = ("resume", "mode", "cfg", "student")
        changed = {k: v for k, v in current.items() if self.args.typed(k) and k not in skip}
        kept = {k: v for k, v in changed.items() if k in RESUME_WHITELIST}
        ignored = sorted(k for k, v in changed.items() if k not in RESUME_WHITELIST and train_args.get(k) != v)
        if ignored:
            LOGGER.warning(f"Resume ignores {ignored}, using the checkpoint's values; start a new run to change them")
        settings = {k: v for k, v in train_args.items() if k in defaults and k not in ("cfg", "mode")}
        return get_args({**settings, **kept, "resume": str(path)}, self.mode)

    def build_model(self) -> DenseDetector:
        """The DenseDetector to train: from the resumed checkpoint, a model YAML, or a .pt (nc from the dataset)."""
        nc = self.data_info.nc
        if self.resume_ckpt is not None:
            model = detector_from_checkpoint(self.resume_ckpt)
        elif self.args.model is None:
            raise ConfigError("train needs model=: a model YAML (e.g. model=gfl_r18s.yaml) or a crosskd .pt")
        else:
            runtime = load_runtime(self.args.model, nc=nc, model_cfg=self.args.model_cfg, adapt_nc=True)
            model = runtime.detector("training")
            if runtime.kind != "yaml":
                LOGGER.info(f"Loaded weights from {self.args.model}")
            if runtime.kind == "yaml" or self.args.pretrained is not None:  # YAML backbone.pretrained, or pretrained=
                load_pretrained(model, self.args.pretrained, self.args.model_cfg)
        model.names = self.names
        return compile_detector(model, self.args.compile)

    def build_loss_module(self) -> nn.Module:
        return DetectorLoss(self.model)

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel over the loss module (SyncBatchNorm with sync_bn on CUDA); find_unused_parameters
        only when one dry check finds trainable parameters the loss does not reach (e.g. kd_branch=cls)."""
        if self.world_size <= 1:
            return module
        unused = ddp.unused_parameters(module, ddp.probe_batch(max(self.model.strides), self.device))
        LOGGER.info(f"{colorstr('DDP:')} find_unused_parameters={bool(unused)}"
                    + (f", no gradient for {len(unused)} tensors: {', '.join(unused[:4])}" if unused else ""))
        if self.args.sync_bn:
            if self.device.type == "cuda":
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            else:
                LOGGER.warning("sync_bn=true needs CUDA; BatchNorm stays per-process on the CPU")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=bool(unused))

    def build_dataloaders(self):
        """Train loader (augmented, shuffled, per-rank batch) and val loader (sharded per rank)."""
        args = self.args
        if args.batch < self.world_size:
            raise ConfigError(f"batch={args.batch} is smaller than the {self.world_size} processes; "
                              f"use batch>={self.world_size}")
        per_rank = args.batch // self.world_size
        imgsz = max(imgsz_hw(args.imgsz))  # the loaders resize the long side
        stride = max(self.model.strides)
        train_set = DetectionDataset(self.data_info, "train", imgsz, augment=True, pad_multiple=stride,
                                     fliplr=args.fliplr, fraction=args.fraction, skip_unreadable=True)
        val_set = DetectionDataset(self.data_info, args.split, imgsz, augment=False, pad_multiple=stride)
        common = {"workers": args.workers, "seed": args.seed, "rank": self.rank, "world_size": self.world_size}
        train_loader = build_dataloader(train_set, per_rank, shuffle=True, **common)
        val_loader = build_dataloader(val_set, per_rank, shuffle=False, **common)
        if self.world_size > 1:
            LOGGER.info(f"{colorstr('DDP:')} batch {args.batch} = {self.world_size} processes x {per_rank} images")
        return train_loader, val_loader

    def build_optimization(self) -> None:
        """Optimiser over the loss module's trainable parameters, AMP scaler and optional EMA."""
        args = self.args
        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, args.optimizer, self.schedule.base_lr, args.momentum,
                                         args.weight_decay)
        LOGGER.info(
            f"{colorstr('optimizer:')} {args.optimizer}(lr={self.schedule.base_lr:.5g} = lr0 {args.lr0} x batch "
            f"{args.batch}/16, momentum={args.momentum}, weight_decay={args.weight_decay}), {len(params)} tensors"
        )
        self.amp = bool(args.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema else None

    def prepare_save_dir(self) -> Path:
        """runs/<mode>/<name> (rank 0 creates it and writes args.yaml; other ranks receive the path)."""
        path = None
        if is_main_process():
            path = self.resume_path.parent.parent if self.resume_path else make_save_dir(self.args, self.mode)
            writable_dir(path / "weights", "pass project= (and name=) a folder you can write to, or resume from a "
                         "copy of the run folder in one")
            (path / "args.yaml").write_text(yaml.safe_dump(self.args.to_dict(), sort_keys=False))
        if is_dist():
            shared = [path]
            torch.distributed.broadcast_object_list(shared, src=0)
            path = shared[0]
        return Path(path)

    def restore(self, ckpt: dict) -> None:
        """Continue from a last.pt: optimiser, scaler, EMA, epoch (for a mid-epoch checkpoint also the iterations done
        and their loss sums), best fitness, elapsed time and RNG states. Rank 0 trims results.csv to the epochs the
        checkpoint finished and removes temporary files of saves that were killed."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        partial = ckpt.get("partial_epoch")  # {"batches", "loss_sums"} of an unfinished epoch, else None
        self.start_epoch = int(ckpt["epoch"]) + (0 if partial else 1)
        self.resume_partial = partial
        self.best_fitness = ckpt.get("best_fitness")
        self.elapsed_before = float((ckpt.get("train_metrics") or {}).get("elapsed", 0.0))
        self.restore_extras(ckpt)
        if ckpt.get("rng") is not None and self.world_size == 1:
            set_rng_state(ckpt["rng"])
        if is_main_process():
            trim_results_csv(self.save_dir / "results.csv", self.start_epoch)
            for path in remove_stale_temp_files(self.weights_dir):
                LOGGER.info(f"Removed {path.name}, left by a save that was killed")
        if self.start_epoch >= self.args.epochs:  # killed while finishing: strip and validate again
            LOGGER.info(f"Resuming {self.resume_path}: all {self.args.epochs} epochs are trained, finishing the run")
            return
        where = f"epoch {self.start_epoch + 1}" + (f" iteration {partial['batches'] + 1}" if partial else "")
        LOGGER.info(f"Resuming training {self.resume_path} from {where} to {self.args.epochs}")

    def restore_extras(self, ckpt: dict) -> None:
        """Hook for subclasses: restore what `checkpoint_extras` saved."""

    def checkpoint_extras(self) -> dict:
        """Hook for subclasses: extra checkpoint keys (e.g. teacher, kd_args)."""
        return {}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, float]:
        """Run every epoch, then finish; returns the final validation metrics of best.pt.

        SIGTERM or SIGINT during the epochs stops the run after the current iteration with a resumable last.pt and
        raises RunStopped (see `stop_and_save`).
        """
        self.setup()
        self.start_time = time.monotonic()
        self.callbacks.run("on_train_start", self)
        LOGGER.info(f"Logging results to {colorstr('bold', str(self.save_dir))}")
        LOGGER.info(f"Starting training for {self.args.epochs} epochs...")
        with self.stop_signals:
            try:
                for epoch in range(self.start_epoch, self.args.epochs):
                    self.epoch, self.in_epoch = epoch, True
                    self.train_epoch()
                    self.callbacks.run("on_train_epoch_end", self)
                    self.validate()
                    self.elapsed = self.elapsed_before + time.monotonic() - self.start_time
                    if is_main_process():
                        write_results_csv(self)  # before last.pt: a resume trims rows its checkpoint had not reached
                        self.save_model()
                    self.in_epoch = False
                    self.callbacks.run("on_fit_epoch_end", self)
                    self.stop_if_requested()
            except Exception as error:
                if not ddp.is_peer_failure(error):
                    raise
                self.stop_on_lost_node(error)
        self.finish()
        return self.final_metrics

    def train_epoch(self) -> None:
        """One pass over the train loader with the running-mean progress display. A mid-epoch resume goes on after
        the checkpoint's iteration with the same sample order (the batches done are drawn, not loaded) and loss sums."""
        self.train_module.train()
        self.seed_loader_epoch()
        self.nonfinite.start_epoch()
        self.callbacks.run("on_train_epoch_start", self)
        num_batches = len(self.train_loader)
        first = self.start_epoch_state()
        sums = self.loss_sums
        skip_batches(self.train_loader, first)
        epoch_text = f"{self.epoch + 1}/{self.args.epochs}"
        with EpochProgress(console, num_batches, epoch_text, self.device, enabled=is_main_process(),
                           completed=first) as bar:
            for i, batch in enumerate(self.train_loader, start=first):
                self.iteration = self.epoch * num_batches + i
                self.lr = self.schedule(self.iteration)
                set_lr(self.optimizer, self.lr)
                self.batch = batch
                self.loss_items = self.train_step(batch)
                applied = self.nonfinite.in_row == 0  # a skipped (non-finite) step adds nothing to the means
                for name, value in self.loss_items.items():
                    sums[name] = sums.get(name, 0.0) + (value if applied else torch.zeros_like(value))
                self.batches_done = i + 1
                if i == first:
                    self.loss_names = list(sums)
                    LOGGER.info(epoch_header(self.loss_names, self.device.type == "cuda"))
                bar.advance(len(batch.images))
                if bar.due(i):
                    steps = max(i + 1 - self.nonfinite.epoch_skips, 1)
                    bar.refresh(i, {k: float(v) / steps for k, v in sums.items()}, self.lr, self.nonfinite.epoch_skips)
                self.callbacks.run("on_train_batch_end", self)
                self.end_iteration()
        steps = max(num_batches - self.nonfinite.epoch_skips, 1)  # the applied steps, the same on every rank
        means = reduce_mean(torch.stack(list(sums.values())) / steps)  # [num_losses], averaged over ranks
        self.epoch_losses = dict(zip(self.loss_names, means.tolist(), strict=True))
        summary = "  ".join(f"{k} {v:.4g}" for k, v in self.epoch_losses.items())
        skipped = f"  skipped {self.nonfinite.epoch_skips} non-finite steps" if self.nonfinite.epoch_skips else ""
        LOGGER.info(f"Epoch {epoch_text}: {summary}  lr {self.lr:.4g}{skipped}")

    def start_epoch_state(self) -> int:
        """The epoch's first iteration: 0, or after a mid-epoch resume the checkpoint's iterations done, whose loss
        sums and skipped-step count this epoch takes over."""
        partial, self.resume_partial = self.resume_partial, None
        if partial is None:
            self.loss_sums, self.batches_done = {}, 0
        else:
            self.loss_sums = {k: torch.tensor(v, device=self.device) for k, v in partial["loss_sums"].items()}
            self.batches_done = int(partial["batches"])
            self.nonfinite.epoch_skips = int(partial.get("skips", 0))
        self.loss_names = list(self.loss_sums)
        return self.batches_done

    def end_iteration(self) -> None:
        """After each iteration: stop if any rank got SIGTERM/SIGINT, else write last.pt every save_period_iters."""
        self.stop_if_requested()
        period = self.args.save_period_iters
        if period > 0 and (self.iteration + 1) % period == 0 and self.batches_done < len(self.train_loader):
            self.save_partial_epoch()

    def seed_loader_epoch(self) -> None:
        """Make this epoch's sample order and worker seeds a function of (seed, rank, epoch), so resume is exact."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(self.args.seed + self.rank + self.epoch)

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        """Forward (AMP on CUDA), backward, optional gradient clipping, optimiser and EMA step; detached losses.

        A step whose total loss (or, without AMP, a gradient) is NaN/Inf on any rank is skipped (`skip_step`); with
        AMP the GradScaler skips steps with overflowed gradients itself.
        """
        batch = batch.to(self.device)
        self.nonfinite.save_buffers(self.train_module)
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.compute_loss(batch)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        grads = None if self.amp else self.gradients()  # with AMP the GradScaler checks the gradients
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = nn.utils.clip_grad_norm_(params, self.args.clip_grad)
            grads = None if self.amp else [norm]  # finite exactly when every gradient is: no second pass
        losses = {name: value.detach().float() for name, value in losses.items()}
        if self.nonfinite.is_finite(total, grads):
            self.nonfinite.record(applied=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self.skip_step(losses)
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def gradients(self) -> list[Tensor]:
        """The .grad of every optimised parameter that has one."""
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def skip_step(self, losses: dict[str, Tensor]) -> None:
        """Leave weights, optimiser state and EMA as they were: put back the BatchNorm statistics the forward pass
        changed and clear the scaler's record of this step. Warn at the first of a run of skipped steps and stop with
        one line after nan_patience in a row; the checkpoints already saved stay as they are."""
        self.nonfinite.restore_buffers()
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale())  # same scale, no inf checks carried into the next step
        in_row = self.nonfinite.record(applied=False)
        values = ", ".join(f"{name} {float(value):.4g}" for name, value in losses.items())
        where = f"epoch {self.epoch + 1}, iteration {self.iteration}"
        if in_row == 1:
            LOGGER.warning(f"Non-finite loss at {where} ({values}): step skipped, weights unchanged")
        if 0 < self.args.nan_patience <= in_row:
            raise TrainingError(f"training stopped: {in_row} steps in a row had a non-finite loss, the last at "
                                f"{where} ({values}); {self.nonfinite_fix()}")

    def nonfinite_fix(self) -> str:
        """The fix offered when non-finite losses stop training: where the last good weights are, what to change."""
        last = self.weights_dir / "last.pt"
        change = f"lower lr0 (now {self.args.lr0}), set clip_grad (e.g. clip_grad=10) or amp=false"
        if not last.exists():
            return f"no checkpoint was saved yet; {change} and start again"
        return f"{last} holds the last good epoch: {change} and train from it with model={last}"

    def compute_loss(self, batch: Any) -> dict[str, Tensor]:
        """The loss dict of one batch through the (DDP-wrapped) loss module."""
        return self.train_module(batch)

    def validate(self) -> None:
        """COCO metrics of the EMA (or raw) model when val=true and always after the last epoch."""
        last = self.epoch + 1 == self.args.epochs
        self.metrics, self.fitness = {}, None
        if not (self.args.val or last):
            return
        model = self.ema.module if self.ema is not None else self.model
        self.metrics = self.validator.run(model, plots=False, per_class=False, losses=True)
        if self.metrics:
            self.fitness = fitness(self.metrics)
            if self.best_fitness is None or self.fitness >= self.best_fitness:
                self.best_fitness = self.fitness

    # ------------------------------------------------------------------ saving and finishing
    def checkpoint(self, partial: dict | None = None) -> dict:
        """The resumable state after epoch `self.epoch`, or with `partial` ({"batches", "loss_sums"}) in its middle."""
        return make_checkpoint(
            self.model,
            epoch=self.epoch,
            best_fitness=self.best_fitness,
            names=self.names,
            train_args=self.args.to_dict(),
            optimizer=self.optimizer,
            scaler=self.scaler,
            ema=self.ema.module if self.ema is not None else None,
            ema_updates=self.ema.updates if self.ema is not None else 0,
            scheduler={**self.schedule.state_dict(), "iteration": self.iterations_done},
            train_metrics={**self.metrics, "fitness": self.fitness, "elapsed": self.elapsed},
            rng=get_rng_state(),
            partial_epoch=partial,
            **self.checkpoint_extras(),
        )

    @property
    def iterations_done(self) -> int:
        return self.epoch * len(self.train_loader) + self.batches_done

    @property
    def weights_dir(self) -> Path:
        return self.save_dir / "weights"

    def save_model(self) -> None:
        """best.pt when this epoch's fitness is the best, epoch{N}.pt every save_period, then last.pt every epoch: a
        resume reads last.pt, so a run killed between the files redoes the epoch and writes them again."""
        ckpt = self.checkpoint()
        if self.fitness is not None and self.fitness == self.best_fitness:
            save_checkpoint(ckpt, self.weights_dir / "best.pt")
        if self.args.save_period > 0 and (self.epoch + 1) % self.args.save_period == 0:
            save_checkpoint(ckpt, self.weights_dir / f"epoch{self.epoch + 1}.pt")
        save_checkpoint(ckpt, self.weights_dir / "last.pt")
        self.callbacks.run("on_model_save", self)

    def save_partial_epoch(self, collective: bool = True) -> None:
        """Write a resumable mid-epoch last.pt (rank 0): the iterations done and their loss sums, averaged over ranks
        when `collective` (then every rank calls it), so a resume continues at the next iteration."""
        sums = torch.tensor([float(v) for v in self.loss_sums.values()], device=self.device)  # [num_losses]
        if collective:
            sums = reduce_mean(sums)
        partial = {"batches": self.batches_done, "loss_sums": dict(zip(self.loss_sums, sums.tolist(), strict=True)),
                   "skips": self.nonfinite.epoch_skips}
        self.elapsed = self.elapsed_before + time.monotonic() - self.start_time
        if is_main_process():
            save_checkpoint(self.checkpoint(partial), self.weights_dir / "last.pt")
        if collective:
            barrier()

    def stop_if_requested(self) -> None:
        """At a safe point: `stop_and_save` when any rank got SIGTERM or SIGINT (a collective under DDP)."""
        signum = self.stop_signals.requested(self.device)
        if signum:
            self.stop_and_save(f"{signal_name(signum)} received", exit_code(signum))

    def stop_and_save(self, reason: str, code: int, collective: bool = True) -> NoReturn:
        """End the run now, resumably: inside an epoch last.pt of the last finished iteration is written (after an
        epoch it is saved already), then every rank raises RunStopped(code), rank 0's with one line naming `reason`,
        where it stopped and the exact resume command. `collective=False` when other ranks may be gone: no
        all_reduce, barrier or process-group teardown, and the epoch's loss sums are this rank's own."""
        last = self.weights_dir / "last.pt"
        if self.in_epoch:
            self.save_partial_epoch(collective)
            where = f"epoch {self.epoch + 1}/{self.args.epochs} iteration {self.batches_done}/{len(self.train_loader)}"
        else:
            where = f"the end of epoch {self.epoch + 1}/{self.args.epochs}"
        main = is_main_process()
        if collective:
            ddp.cleanup_distributed()
        message = f"{reason}: stopped at {where} and saved {last}; resume with: {resume_command(self.mode, last)}"
        raise RunStopped(message if main else "", code)

    def stop_on_lost_node(self, error: BaseException) -> NoReturn:
        """A collective failed because a node died or stopped answering: `stop_and_save` without collectives, so that
        rank 0, if it survived, writes last.pt of the last finished iteration (BatchNorm statistics put back when the
        failure came inside an iteration's step); exit 75. On other nodes local rank 0 prints the line, as rank 0
        may be gone."""
        reason = f"DDP: lost {ddp.lost_node_text(error)}"
        if self.in_epoch and self.batches_done == self.iteration - self.epoch * len(self.train_loader):
            self.nonfinite.restore_buffers()  # the step of this iteration was not applied
        if is_main_process():
            self.stop_and_save(reason, ddp.LOST_NODE_EXIT, collective=False)
        last = self.weights_dir / "last.pt"
        message = f"{reason}: stopped; resume from the last.pt rank 0 saved with: {resume_command(self.mode, last)}"
        raise RunStopped(message if ddp.env_local_rank() == 0 else "", ddp.LOST_NODE_EXIT)

    def finish(self) -> None:
        """Strip last.pt and best.pt, re-validate best.pt with the per-class table, run on_train_end."""
        best, last = self.weights_dir / "best.pt", self.weights_dir / "last.pt"
        if is_main_process():
            hours = (time.monotonic() - self.start_time) / 3600
            LOGGER.info(f"{self.args.epochs - self.start_epoch} epochs completed in {hours:.3f} hours.")
            for path in (best, last):  # last.pt last: until it is stripped, a resume finishes the run again
                if path.exists():
                    strip_checkpoint(path)
        barrier()
        if best.exists():
            LOGGER.info(f"Validating {best}...")
            model = load_runtime(best, device=self.device).model
            self.final_metrics = self.validator.run(model, plots=self.args.plots)
        self.callbacks.run("on_train_end", self)
        LOGGER.info(f"Results saved to {colorstr('bold', str(self.save_dir))}")
        ddp.cleanup_distributed()


def get_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as plain values and tensors (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def load_pretrained(model: DenseDetector, pretrained: bool | str | None, model_cfg: str | None = None) -> None:
    """The weights training starts from: a detector checkpoint (crosskd, MMDetection, torchvision) given as
    pretrained= transfers every tensor of matching name and shape; anything else (the YAML's backbone.pretrained when
    None, imagenet, a weights name, a backbone .pth, false) goes to the backbone."""
    if isinstance(pretrained, str) and is_detector_checkpoint(pretrained):
        source = load_runtime(pretrained, model_cfg=model_cfg, role="pretrained").detector("pretrained=")
        done, total = transfer_matching(model, source.state_dict())
        LOGGER.info(f"Transferred {done}/{total} items from pretrained weights {pretrained}")
    else:
        load_pretrained_weights(model, pretrained)


def resume_path(resume: bool | str) -> Path:
    """The checkpoint named by resume=: a path, or for True the newest last.pt under runs/."""
    path = newest_file(runs_dir(), "last.pt") if resume is True else Path(resume)
    if path is None:
        raise CheckpointError(f"resume=True but there is no last.pt under {runs_dir()}; pass resume=path/to/last.pt")
    return path
