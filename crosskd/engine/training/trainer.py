"""Training engine: `Trainer(args).train()` with a visible lifecycle setup -> epochs -> finish."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from crosskd.config import imgsz_hw
from crosskd.data import Batch, DetectionDataset, build_dataloader, load_data_yaml, skip_batches
from crosskd.data.loader import resize_batch
from crosskd.data.pipeline import augmentation_settings
from crosskd.dist import barrier, get_rank, get_world_size, is_dist, is_main_process, reduce_mean
from crosskd.engine.deployment.checkpoint import (
    detector_from_checkpoint,
    strip_checkpoint,
)
from crosskd.engine.deployment.loader import is_detector_checkpoint, load_runtime
from crosskd.engine.evaluation.metrics import fitness
from crosskd.engine.evaluation.validator import Validator
from crosskd.engine.training import ddp
from crosskd.engine.training.callbacks import (
    Callback,
    Callbacks,
    default_callbacks,
    write_results_csv,
)
from crosskd.engine.training.compile import compile_detector
from crosskd.engine.training.nonfinite import NonFiniteGuard
from crosskd.engine.training.optim import (
    Accumulation,
    ModelEMA,
    build_accumulation,
    build_optimizer,
    build_schedule,
    describe_optimizer,
    effective_weight_decay,
    parameter_groups,
    resolve_run_length_defaults,
)
from crosskd.engine.training.progress import EpochProgress, epoch_header
from crosskd.engine.training.recipe import apply_recipe, multiscale_size, multiscale_sizes, step_generator
from crosskd.engine.training.run_state import RunState, gather_rng_states
from crosskd.errors import ConfigError, TrainingError
from crosskd.models import DenseDetector
from crosskd.models.pretrained import load_pretrained_weights, transfer_matching
from crosskd.paths import make_save_dir, writable_dir
from crosskd.utils import LOGGER, colorstr, console, init_seeds, select_device


class DetectorLoss(nn.Module):
    """Computes a detector's losses in `forward`, so DistributedDataParallel wraps the call that makes them."""

    def __init__(self, detector: DenseDetector):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.detector.loss(batch)


MULTI_SCALE_STEP = 32  # multi_scale draws long sides in steps of 32 px (Ultralytics' grid); batches pad to the stride


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
        self.epoch = self.iteration = 0
        self.fitness: float | None = None
        self.metrics: dict[str, float] = {}
        self.final_metrics: dict[str, float] = {}
        self.loss_names: list[str] = []
        self.loss_items: dict[str, Tensor] = {}
        self.batch: Any = None  # the current train batch, for on_train_batch_end callbacks (train_batch*.jpg)
        self.epoch_losses: dict[str, float] = {}
        self.lr = 0.0
        self.save_dir: Path | None = None
        self.ema: ModelEMA | None = None
        self.accumulation = Accumulation()  # one optimiser step per batch until setup reads nbs
        self.batch_scaled_loss = False  # the loss is back-propagated times the batch (set from the model's head)
        self.nonfinite = NonFiniteGuard()
        self.mixing_closed = False  # close_mosaic was logged
        self.state = RunState(self)  # resume, mid-epoch progress, checkpoints, stopping

    def add_callback(self, event: str, fn: Callback) -> None:
        self.callbacks.add(event, fn)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Device/DDP, resume args, seeds, data, model, optimiser, schedule, scaler, EMA, run dir, resume state."""
        ckpt = self.state.load_resume_checkpoint()
        self.device = select_device(self.args.device)
        ddp.init_distributed(self.device)
        self.world_size, self.rank = get_world_size(), get_rank()
        init_seeds(self.args.seed + self.rank, self.args.deterministic)
        self.data_info = load_data_yaml(self.args.data, self.args.datasets_dir)
        self.names = dict(self.data_info.names)
        self.model = self.build_model().to(self.device)
        self.batch_scaled_loss = scales_loss_by_batch(self.model)
        self.args = apply_recipe(self.args, getattr(self.model, "yaml", None) or {})
        self.loss_module = self.build_loss_module().to(self.device)
        self.train_module = self.wrap_ddp(self.loss_module)
        self.train_loader, val_loader = self.build_dataloaders()
        self.args = resolve_run_length_defaults(self.args, len(self.train_loader),
                                                num_images=len(self.train_loader.dataset), nc=self.data_info.nc)
        self.schedule = build_schedule(self.args, len(self.train_loader))
        self.build_optimization()
        self.save_dir = self.prepare_save_dir()
        self.validator = Validator(self.args, dataloader=val_loader, save_dir=self.save_dir)
        if ckpt is not None:
            self.state.restore(ckpt)

    def build_model(self) -> DenseDetector:
        """The DenseDetector to train: from the resumed checkpoint, a model YAML, or a .pt (nc from the dataset)."""
        nc = self.data_info.nc
        if self.state.resume_ckpt is not None:
            model = detector_from_checkpoint(self.state.resume_ckpt)
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
        model.head.use_valid_region(self.args.valid_region)
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
        ms_sizes, ms_mode = multiscale_sizes(args, self.model.head.mstrain, imgsz)
        augmentation = {**augmentation_settings(args), "ms_sizes": ms_sizes, "ms_mode": ms_mode}
        train_set = DetectionDataset(self.data_info, "train", imgsz, augment=True, pad_multiple=stride,
                                     fraction=args.fraction, skip_unreadable=True, cache=args.cache, **augmentation)
        LOGGER.info(f"train: augmentation {train_set.transforms.describe()}"
                    + (f", mosaic/mixup/cutmix off for the last {args.close_mosaic} epochs" if args.close_mosaic
                       and max(args.mosaic, args.mixup, args.cutmix) > 0 else ""))
        val_set = DetectionDataset(self.data_info, args.split, imgsz, augment=False, pad_multiple=stride)
        common = {"workers": args.workers, "seed": args.seed, "rank": self.rank, "world_size": self.world_size}
        train_loader = build_dataloader(train_set, per_rank, shuffle=True, **common)
        if args.close_mosaic and max(args.mosaic, args.mixup, args.cutmix) > 0:
            train_loader.sampler.mix_off_from = max(args.epochs - args.close_mosaic, 0)
        val_loader = build_dataloader(val_set, per_rank, shuffle=False, **common)
        if self.world_size > 1:
            LOGGER.info(f"{colorstr('DDP:')} batch {args.batch} = {self.world_size} processes x {per_rank} images")
        return train_loader, val_loader

    def build_optimization(self) -> None:
        """Optimiser over the loss module's trainable parameters (one group or Ultralytics' three), gradient
        accumulation, AMP scaler and optional EMA."""
        args = self.args
        weight_decay = effective_weight_decay(args)
        muon = args.optimizer == "MuSGD"
        boosted = getattr(self.model.head, "musgd_boosted_parameters", list)() if muon else []
        params = parameter_groups(self.loss_module, weight_decay, args.norm_bias_decay, muon=muon,
                                  boosted=frozenset(map(id, boosted)))
        self.optimizer = build_optimizer(params, args.optimizer, self.schedule.base_lr, args.momentum, weight_decay,
                                         nesterov=args.nesterov)
        self.accumulation = build_accumulation(args, len(self.train_loader), self.schedule.warmup_iters)
        LOGGER.info(f"{colorstr('optimizer:')} {describe_optimizer(args, self.schedule.base_lr, params, weight_decay)}"
                    + (f", one step per {self.accumulation.nominal} batches (nbs {args.nbs})"
                       if self.accumulation.nominal > 1 else ""))
        self.amp = bool(args.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema else None

    def prepare_save_dir(self) -> Path:
        """runs/<mode>/<name> (rank 0 creates it and writes args.yaml; other ranks receive the path)."""
        path = None
        if is_main_process():
            resumed = self.state.resume_path
            path = resumed.parent.parent if resumed else make_save_dir(self.args, self.mode)
            writable_dir(path / "weights", "pass project= (and name=) a folder you can write to, or resume from a "
                         "copy of the run folder in one")
            (path / "args.yaml").write_text(yaml.safe_dump(self.args.to_dict(), sort_keys=False))
        if is_dist():
            shared = [path]
            torch.distributed.broadcast_object_list(shared, src=0)
            path = shared[0]
        return Path(path)

    def restore_extras(self, ckpt: dict) -> None:
        """Hook for subclasses: restore what `checkpoint_extras` saved."""

    def checkpoint_extras(self) -> dict:
        """Hook for subclasses: extra checkpoint keys (e.g. teacher, kd_args)."""
        return {}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, float]:
        """Run every epoch, then finish; returns the final validation metrics of best.pt.

        SIGTERM or SIGINT during the epochs stops the run after the current iteration with a resumable last.pt and
        raises RunStopped (see `RunState.stop_and_save`).
        """
        self.setup()
        state = self.state
        state.start_time = time.monotonic()
        self.callbacks.run("on_train_start", self)
        LOGGER.info(f"Logging results to {colorstr('bold', str(self.save_dir))}")
        LOGGER.info(f"Starting training for {self.args.epochs} epochs...")
        with state.stop_signals:
            try:
                for epoch in range(state.start_epoch, self.args.epochs):
                    self.epoch, state.in_epoch = epoch, True
                    self.train_epoch()
                    self.callbacks.run("on_train_epoch_end", self)
                    self.validate()
                    state.update_elapsed()
                    rank_rng = gather_rng_states()
                    if is_main_process():
                        write_results_csv(self)  # before last.pt: a resume trims rows its checkpoint had not reached
                        state.save_epoch(rank_rng)
                    state.in_epoch = False
                    self.callbacks.run("on_fit_epoch_end", self)
                    state.stop_if_requested()
            except Exception as error:
                if not ddp.is_peer_failure(error):
                    raise
                state.stop_on_lost_node(error)
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
        first = self.state.start_epoch_state()
        self.loss_names = list(self.state.loss_sums)
        sums = self.state.loss_sums
        skip_batches(self.train_loader, first)
        epoch_text = f"{self.epoch + 1}/{self.args.epochs}"
        with EpochProgress(console, num_batches, epoch_text, self.device, enabled=is_main_process(),
                           completed=first) as bar:
            for i, batch in enumerate(self.train_loader, start=first):
                self.iteration = self.epoch * num_batches + i
                self.lr = self.schedule.apply(self.optimizer, self.iteration)
                self.batch = batch = self.preprocess_batch(batch)
                self.loss_items = self.train_step(batch)
                applied = self.nonfinite.in_row == 0  # a skipped (non-finite) step adds nothing to the means
                for name, value in self.loss_items.items():
                    sums[name] = sums.get(name, 0.0) + (value if applied else torch.zeros_like(value))
                self.state.batches_done = i + 1
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

    def end_iteration(self) -> None:
        """After each iteration: stop if any rank got SIGTERM/SIGINT, else write last.pt every save_period_iters."""
        self.state.stop_if_requested()
        period = self.args.save_period_iters
        if period > 0 and (self.iteration + 1) % period == 0 and self.state.batches_done < len(self.train_loader):
            self.state.save_partial_epoch()

    def preprocess_batch(self, batch: Batch) -> Batch:
        """The batch on the device; with multi_scale, its long side redrawn (the same for teacher and student)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.args.multi_scale > 0:
            imgsz, stride = max(imgsz_hw(self.args.imgsz)), max(self.model.strides)
            generator = step_generator(self.args.seed, self.rank, self.iteration)
            size = multiscale_size(imgsz, self.args.multi_scale, MULTI_SCALE_STEP, generator)
            batch = resize_batch(batch, size, stride)
        return batch

    def seed_loader_epoch(self) -> None:
        """Make this epoch's sample order and sample seeds a function of (seed, rank, epoch), so resume is exact; say
        once when the mixing steps turn off (close_mosaic)."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        mix_off_from = getattr(sampler, "mix_off_from", None)
        if mix_off_from is not None and self.epoch >= mix_off_from and not self.mixing_closed:
            self.mixing_closed = True
            LOGGER.info(f"Closing dataloader mosaic, mixup and cutmix for the last {self.args.close_mosaic} epochs "
                        f"(close_mosaic={self.args.close_mosaic})")

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        """Forward (AMP on CUDA) and backward; at the end of an accumulation window (every iteration unless nbs > 0)
        optional gradient clipping, optimiser and EMA step. Returns the detached losses.

        A batch whose total loss (or, without AMP, a gradient) is NaN/Inf on any rank is skipped (`skip_step`) with
        the gradients accumulated before it in its window; with AMP the GradScaler skips steps with overflowed
        gradients itself.
        """
        batch = batch.to(self.device)
        self.nonfinite.save_buffers(self.train_module)
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.compute_loss(batch)
        total = sum(losses.values())
        self.scaler.scale(self.loss_for_backward(total, batch)).backward()
        steps = self.accumulation.steps_at(self.iteration)
        grads = None if self.amp else self.gradients()  # with AMP the GradScaler checks the gradients
        if steps and self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = nn.utils.clip_grad_norm_(params, self.args.clip_grad)
            grads = None if self.amp else [norm]  # finite exactly when every gradient is: no second pass
        losses = {name: value.detach().float() for name, value in losses.items()}
        if not self.nonfinite.is_finite(total, grads):
            self.skip_step(losses)
            self.optimizer.zero_grad(set_to_none=True)
            return losses
        self.nonfinite.record(applied=True)
        if steps:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    def loss_for_backward(self, total: Tensor, batch: Any) -> Tensor:
        """The total loss as it is back-propagated: with `batch_scaled_loss` (a YOLO model; with a Distiller its KD
        terms too) times the step's images on all ranks, as Ultralytics multiplies by the batch and, under DDP whose
        gradients are averaged, by the world size; else as it is."""
        if not self.batch_scaled_loss:
            return total
        return total * (len(batch.images) * self.world_size)

    def pending_gradients(self) -> dict[str, Tensor]:
        """The gradients accumulated since the last optimiser step by parameter name, on the CPU ({} right after a
        step), for a checkpoint taken inside an accumulation window."""
        return {name: p.grad.detach().cpu() for name, p in self.loss_module.named_parameters() if p.grad is not None}

    def restore_pending_gradients(self, gradients: dict[str, Tensor]) -> None:
        """Put back the gradients `pending_gradients` saved."""
        for name, param in self.loss_module.named_parameters():
            if name in gradients:
                param.grad = gradients[name].to(param.device)

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
            if self.state.best_fitness is None or self.fitness >= self.state.best_fitness:
                self.state.best_fitness = self.fitness

    @property
    def weights_dir(self) -> Path:
        return self.save_dir / "weights"

    def finish(self) -> None:
        """Strip last.pt and best.pt, re-validate best.pt with the per-class table, run on_train_end."""
        best, last = self.weights_dir / "best.pt", self.weights_dir / "last.pt"
        if is_main_process():
            hours = (time.monotonic() - self.state.start_time) / 3600
            LOGGER.info(f"{self.args.epochs - self.state.start_epoch} epochs completed in {hours:.3f} hours.")
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


def scales_loss_by_batch(model: nn.Module) -> bool:
    """Whether the model's head has its loss back-propagated times the batch (`batch_scaled_loss`: YOLO)."""
    return bool(getattr(getattr(model, "head", None), "batch_scaled_loss", False))


def load_pretrained(model: DenseDetector, pretrained: bool | str | None, model_cfg: str | None = None) -> None:
    """The weights training starts from: a detector checkpoint (crosskd, Ultralytics, MMDetection, torchvision) given as
    pretrained= transfers every tensor of matching name and shape; anything else (the YAML's backbone.pretrained when
    None, imagenet, a weights name, a backbone .pth, false) goes to the backbone."""
    if isinstance(pretrained, str) and is_detector_checkpoint(pretrained):
        source = load_runtime(pretrained, model_cfg=model_cfg, role="pretrained").detector("pretrained=")
        done, total = transfer_matching(model, source.state_dict())
        LOGGER.info(f"Transferred {done}/{total} items from pretrained weights {pretrained}")
    else:
        load_pretrained_weights(model, pretrained)
