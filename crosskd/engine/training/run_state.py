"""The state a run saves and resumes, and how it stops: `RunState` owns resume, mid-epoch progress, checkpoints and
the stop on a signal or a lost node, so that `Trainer` keeps only setup, loop and step."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from crosskd.config import get_args
from crosskd.dist import all_gather_object, barrier, get_rank, get_world_size, is_main_process, reduce_mean
from crosskd.engine.deployment.checkpoint import is_resumable, load_checkpoint, make_checkpoint, save_checkpoint
from crosskd.engine.training import ddp
from crosskd.engine.training.callbacks import trim_results_csv
from crosskd.engine.training.interrupt import StopSignals, exit_code, resume_command, signal_name
from crosskd.errors import CheckpointError, RunStopped
from crosskd.paths import newest_file, runs_dir
from crosskd.utils import LOGGER, remove_stale_temp_files

OLDER_RUN_VALUES = {  # settings added after runs were saved -> the value a checkpoint without the key ran with
    "kd_hold": "pre",  # before kd_hold the hold features were the pre-activation ones
    "valid_region": "image",  # before valid_region only priors inside the unpadded image counted
    # before the recipes had optimisation settings every run (YOLO's too) was optimised the paper's way
    "nbs": 0, "norm_bias_decay": True, "nesterov": False, "lr_schedule": "mmdet", "warmup_bias_lr": 0.0,
    "warmup_momentum": None,
}
RESUME_WHITELIST = (  # may change when resuming
    "device", "workers", "val", "plots", "tensorboard", "save_period", "save_period_iters", "nan_patience", "compile",
)


class RunState:
    """Where a run is (epoch, iterations done, their loss sums, best fitness, time spent) and what saves or restores
    it: the resumed checkpoint, last.pt/best.pt/epoch{N}.pt, the mid-epoch last.pt and the stop on SIGTERM/SIGINT or
    a lost node. It reads the trainer's model, optimiser, scaler, EMA and schedule when it writes a checkpoint."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # the Trainer this is the state of (not imported: trainer.py imports this module)
        self.start_epoch = 0
        self.best_fitness: float | None = None
        self.elapsed = self.elapsed_before = 0.0
        self.start_time = time.monotonic()
        self.resume_path: Path | None = None
        self.resume_ckpt: dict | None = None  # the checkpoint being resumed, loaded once
        self.resume_partial: dict | None = None  # the unfinished epoch's state in a mid-epoch last.pt
        self.batches_done = 0  # iterations of the current epoch done
        self.loss_sums: dict[str, torch.Tensor] = {}  # this epoch's summed losses so far
        self.in_epoch = False  # from an epoch's start until its last.pt is saved
        self.stop_signals = StopSignals()

    # ------------------------------------------------------------------ resume
    def load_resume_checkpoint(self) -> dict | None:
        """With resume=True or a path: load last.pt, check it can be resumed and give the trainer its train args."""
        trainer = self.trainer
        if not trainer.args.resume:
            return None
        path = resume_path(trainer.args.resume)
        ckpt = load_checkpoint(path)
        if not is_resumable(ckpt):
            raise CheckpointError(
                f"'{path}' is a finished (stripped) checkpoint with no optimizer state, so it cannot be resumed; "
                f"start a new run from it with model={path}"
            )
        trainer.args = resume_args(trainer.args, ckpt["train_args"], path, trainer.mode)
        self.resume_path, self.resume_ckpt = Path(path), ckpt
        return ckpt

    def restore(self, ckpt: dict) -> None:
        """Continue from a last.pt: optimiser, scaler, EMA, epoch (for a mid-epoch checkpoint also the iterations done
        and their loss sums), best fitness, elapsed time and RNG states. Rank 0 trims results.csv to the epochs the
        checkpoint finished and removes temporary files of saves that were killed."""
        trainer = self.trainer
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") is not None and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(ckpt["scaler"])
        if trainer.ema is not None and ckpt.get("ema") is not None:
            trainer.ema.module.load_state_dict(ckpt["ema"])
            trainer.ema.updates = int(ckpt.get("ema_updates", 0))
        partial = ckpt.get("partial_epoch")  # {"batches", "loss_sums"} of an unfinished epoch, else None
        self.start_epoch = int(ckpt["epoch"]) + (0 if partial else 1)
        self.resume_partial = partial
        self.best_fitness = ckpt.get("best_fitness")
        self.elapsed_before = float((ckpt.get("train_metrics") or {}).get("elapsed", 0.0))
        trainer.restore_extras(ckpt)
        pending = (ckpt.get("scheduler") or {}).get("pending_gradients")
        if pending:
            trainer.restore_pending_gradients(pending)
        self.restore_rng(ckpt)
        if is_main_process():
            trim_results_csv(trainer.save_dir / "results.csv", self.start_epoch)
            for path in remove_stale_temp_files(trainer.weights_dir):
                LOGGER.info(f"Removed {path.name}, left by a save that was killed")
        self.log_resume(partial)

    def restore_rng(self, ckpt: dict) -> None:
        """Each rank takes up its own RNG states from the checkpoint, so that random draws inside the step (Faster
        R-CNN's RPN and R-CNN samplers) continue as in an uninterrupted run. A checkpoint saved with another number of
        processes, or without collectives (a lost node), leaves every rank but rank 0 with its fresh seed."""
        states = ckpt.get("rank_rng") or [ckpt.get("rng")]  # rank_rng: [world_size] states of a DDP run
        rank, world_size = get_rank(), get_world_size()
        if len(states) != world_size and world_size > 1:
            LOGGER.info(f"Resume: the checkpoint holds RNG states of {len(states)} process(es), this run has "
                        f"{world_size}: ranks without one keep their fresh seed")
        if rank < len(states) and states[rank] is not None:
            set_rng_state(states[rank])

    def log_resume(self, partial: dict | None) -> None:
        epochs = self.trainer.args.epochs
        if self.start_epoch >= epochs:  # killed while finishing: strip and validate again
            LOGGER.info(f"Resuming {self.resume_path}: all {epochs} epochs are trained, finishing the run")
            return
        where = f"epoch {self.start_epoch + 1}" + (f" iteration {partial['batches'] + 1}" if partial else "")
        LOGGER.info(f"Resuming training {self.resume_path} from {where} to {epochs}")

    def start_epoch_state(self) -> int:
        """The epoch's first iteration: 0, or after a mid-epoch resume the checkpoint's iterations done, whose loss
        sums and skipped-step count this epoch takes over."""
        partial, self.resume_partial = self.resume_partial, None
        if partial is None:
            self.loss_sums, self.batches_done = {}, 0
        else:
            device = self.trainer.device
            self.loss_sums = {k: torch.tensor(v, device=device) for k, v in partial["loss_sums"].items()}
            self.batches_done = int(partial["batches"])
            self.trainer.nonfinite.epoch_skips = int(partial.get("skips", 0))
        return self.batches_done

    def update_elapsed(self) -> None:
        self.elapsed = self.elapsed_before + time.monotonic() - self.start_time

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, partial: dict | None = None, rank_rng: list[dict] | None = None) -> dict:
        """The resumable state after epoch `trainer.epoch`, or with `partial` ({"batches", "loss_sums"}) inside it;
        `rank_rng` holds the RNG states of every rank (`gather_rng_states`), by default this process's."""
        trainer = self.trainer
        rank_rng = rank_rng or [get_rng_state()]
        ema = trainer.ema
        return make_checkpoint(
            trainer.model,
            epoch=trainer.epoch,
            best_fitness=self.best_fitness,
            names=trainer.names,
            train_args=trainer.args.to_dict(),
            optimizer=trainer.optimizer,
            scaler=trainer.scaler,
            ema=ema.module if ema is not None else None,
            ema_updates=ema.updates if ema is not None else 0,
            scheduler=self.scheduler_state(),
            train_metrics={**trainer.metrics, "fitness": trainer.fitness, "elapsed": self.elapsed},
            rng=rank_rng[0],
            rank_rng=rank_rng if len(rank_rng) > 1 else None,
            partial_epoch=partial,
            **trainer.checkpoint_extras(),
        )

    def scheduler_state(self) -> dict:
        """The schedule's fields, the iterations done and, inside an accumulation window (nbs > 0), the gradients
        accumulated so far (`pending_gradients`), so a resume steps with the same gradients as an uninterrupted run."""
        state = {**self.trainer.schedule.state_dict(), "iteration": self.iterations_done}
        pending = self.trainer.pending_gradients()
        return {**state, "pending_gradients": pending} if pending else state

    @property
    def iterations_done(self) -> int:
        return self.trainer.epoch * len(self.trainer.train_loader) + self.batches_done

    def save_epoch(self, rank_rng: list[dict] | None = None) -> None:
        """best.pt when this epoch's fitness is the best, epoch{N}.pt every save_period, then last.pt every epoch: a
        resume reads last.pt, so a run killed between the files redoes the epoch and writes them again."""
        trainer = self.trainer
        ckpt, weights, epoch = self.checkpoint(rank_rng=rank_rng), trainer.weights_dir, trainer.epoch
        if trainer.fitness is not None and trainer.fitness == self.best_fitness:
            save_checkpoint(ckpt, weights / "best.pt")
        if trainer.args.save_period > 0 and (epoch + 1) % trainer.args.save_period == 0:
            save_checkpoint(ckpt, weights / f"epoch{epoch + 1}.pt")
        save_checkpoint(ckpt, weights / "last.pt")
        trainer.callbacks.run("on_model_save", trainer)

    def save_partial_epoch(self, collective: bool = True) -> None:
        """Write a resumable mid-epoch last.pt (rank 0): the iterations done and their loss sums, averaged over ranks
        when `collective` (then every rank calls it), so a resume continues at the next iteration."""
        sums = torch.tensor([float(v) for v in self.loss_sums.values()], device=self.trainer.device)  # [num_losses]
        if collective:
            sums = reduce_mean(sums)
        partial = {"batches": self.batches_done, "loss_sums": dict(zip(self.loss_sums, sums.tolist(), strict=True)),
                   "skips": self.trainer.nonfinite.epoch_skips}
        self.update_elapsed()
        rank_rng = gather_rng_states(collective)
        if is_main_process():
            save_checkpoint(self.checkpoint(partial, rank_rng), self.trainer.weights_dir / "last.pt")
        if collective:
            barrier()

    # ------------------------------------------------------------------ stopping
    def stop_if_requested(self) -> None:
        """At a safe point: `stop_and_save` when any rank got SIGTERM or SIGINT (a collective under DDP)."""
        signum = self.stop_signals.requested(self.trainer.device)
        if signum:
            self.stop_and_save(f"{signal_name(signum)} received", exit_code(signum))

    def stop_and_save(self, reason: str, code: int, collective: bool = True) -> NoReturn:
        """End the run now, resumably: inside an epoch last.pt of the last finished iteration is written (after an
        epoch it is saved already), then every rank raises RunStopped(code), rank 0's with one line naming `reason`,
        where it stopped and the exact resume command. `collective=False` when other ranks may be gone: no
        all_reduce, barrier or process-group teardown, and the epoch's loss sums are this rank's own."""
        trainer = self.trainer
        last, epochs = trainer.weights_dir / "last.pt", trainer.args.epochs
        if self.in_epoch:
            self.save_partial_epoch(collective)
            where = f"epoch {trainer.epoch + 1}/{epochs} iteration {self.batches_done}/{len(trainer.train_loader)}"
        else:
            where = f"the end of epoch {trainer.epoch + 1}/{epochs}"
        main = is_main_process()
        if collective:
            ddp.cleanup_distributed()
        message = f"{reason}: stopped at {where} and saved {last}; resume with: {resume_command(trainer.mode, last)}"
        raise RunStopped(message if main else "", code)

    def stop_on_lost_node(self, error: BaseException) -> NoReturn:
        """A collective failed because a node died or stopped answering: `stop_and_save` without collectives, so that
        rank 0, if it survived, writes last.pt of the last finished iteration (BatchNorm statistics put back when the
        failure came inside an iteration's step); exit 75. On other nodes local rank 0 prints the line, as rank 0
        may be gone."""
        trainer = self.trainer
        reason = f"DDP: lost {ddp.lost_node_text(error)}"
        if self.in_epoch and self.batches_done == trainer.iteration - trainer.epoch * len(trainer.train_loader):
            trainer.nonfinite.restore_buffers()  # the step of this iteration was not applied
            trainer.optimizer.zero_grad(set_to_none=True)  # its gradients may be half reduced: drop the window's
        if is_main_process():
            self.stop_and_save(reason, ddp.LOST_NODE_EXIT, collective=False)
        last = trainer.weights_dir / "last.pt"
        message = f"{reason}: stopped; resume from the last.pt rank 0 saved with: {resume_command(trainer.mode, last)}"
        raise RunStopped(message if ddp.env_local_rank() == 0 else "", ddp.LOST_NODE_EXIT)


def resume_args(args: Any, train_args: dict, path: Path, mode: str) -> Any:
    """The checkpoint's args plus the whitelisted keys the user changed; other changes are warned and ignored.

    A setting the checkpoint predates takes the value its run used (`OLDER_RUN_VALUES`), not today's default."""
    defaults = get_args({}, mode).to_dict()
    skip = ("resume", "mode", "cfg", "student")
    changed = {k: v for k, v in args.to_dict().items() if args.typed(k) and k not in skip}
    kept = {k: v for k, v in changed.items() if k in RESUME_WHITELIST}
    ignored = sorted(k for k, v in changed.items() if k not in RESUME_WHITELIST and train_args.get(k) != v)
    if ignored:
        LOGGER.warning(f"Resume ignores {ignored}, using the checkpoint's values; start a new run to change them")
    settings = {k: v for k, v in train_args.items() if k in defaults and k not in ("cfg", "mode")}
    settings = {**{k: v for k, v in OLDER_RUN_VALUES.items() if k not in train_args}, **settings}
    return get_args({**settings, **kept, "resume": str(path)}, mode)


def resume_path(resume: bool | str) -> Path:
    """The checkpoint named by resume=: a path, or for True the newest last.pt under runs/."""
    path = newest_file(runs_dir(), "last.pt") if resume is True else Path(resume)
    if path is None:
        raise CheckpointError(f"resume=True but there is no last.pt under {runs_dir()}; pass resume=path/to/last.pt")
    return path


def gather_rng_states(collective: bool = True) -> list[dict]:
    """The RNG states of every rank in rank order (a collective under DDP), or with `collective=False` this rank's."""
    own = get_rng_state()
    return all_gather_object(own) if collective else [own]


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
