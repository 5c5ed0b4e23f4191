"""Non-finite losses: degenerate inputs stay finite (values and gradients); a NaN/Inf step is skipped, counted in the
progress line and results.csv, decided alike on every rank, and nan_patience in a row stop training in one line."""

import csv
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distill import kd_args, tiny_detector
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from crosskd import cli
from crosskd.config import get_args
from crosskd.distill import Distiller
from crosskd.distill.passes import align_scale
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training.nonfinite import NonFiniteGuard
from crosskd.engine.training.run_state import RunState
from crosskd.engine.training.trainer import Trainer
from crosskd.losses.detection import giou_loss, iou_loss
from crosskd.losses.distill import channel_standardize, kd_quality_focal_loss, kl_div_loss, pkd_loss
from crosskd.ops.boxes import aligned_box_iou

NAN, INF = float("nan"), float("inf")

DEGENERATE_PAIRS = {  # name -> (pred, target), xyxy
    "identical zero-area": ([10.0, 10.0, 10.0, 10.0], [10.0, 10.0, 10.0, 10.0]),
    "zero-width lines": ([5.0, 0.0, 5.0, 20.0], [5.0, 0.0, 5.0, 20.0]),
    "zero-area target": ([0.0, 0.0, 10.0, 10.0], [4.0, 4.0, 4.0, 4.0]),
    "inverted pred": ([20.0, 20.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]),
    "inverted in one side": ([0.0, 10.0, 10.0, 0.0], [0.0, 0.0, 10.0, 10.0]),
    "both inverted": ([10.0, 0.0, 0.0, 10.0], [10.0, 0.0, 0.0, 10.0]),
}


def value_and_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    value.sum().backward()
    return value.detach(), [x.grad for x in inputs]


def assert_finite(value: torch.Tensor, grads: list[torch.Tensor]) -> None:
    assert torch.isfinite(value).all(), value
    for grad in grads:
        assert torch.isfinite(grad).all(), grad


# ------------------------------------------------------------------ guards in the losses
@pytest.mark.parametrize("name", list(DEGENERATE_PAIRS))
def test_box_losses_finite_on_degenerate_boxes(name):
    pred, target = (torch.tensor([box]) for box in DEGENERATE_PAIRS[name])
    for fn in (giou_loss, aligned_box_iou, iou_loss, lambda p, t: iou_loss(p, t, mode="linear")):
        value, grads = value_and_grads(fn, pred, target)
        assert_finite(value, grads)
    loss = giou_loss(pred, target)
    assert 0 <= loss.item() <= 2


def test_inverted_boxes_count_as_empty_and_ordinary_giou_matches_torchvision():
    inverted, box = torch.tensor([[20.0, 20.0, 10.0, 10.0]]), torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    assert aligned_box_iou(inverted, box).item() == 0  # not the IoU of the box it mirrors
    assert giou_loss(inverted, box).item() == pytest.approx(1.0)  # IoU 0, enclosing box == the target
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 64, 2, 2, generator=gen) * 100  # two sets of 64 boxes from sorted corner pairs
    pred, target = (torch.cat([c.min(dim=1).values, c.max(dim=1).values], dim=-1) for c in corners)
    torch.testing.assert_close(giou_loss(pred, target), generalized_box_iou_loss(pred, target, eps=1e-7))


@pytest.mark.parametrize("masked", [False, True])
def test_feature_standardisation_on_a_constant_map(masked):
    constant = torch.full((2, 3, 4, 5), 0.7)
    teacher = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 4, 5, dtype=torch.bool) if masked else None
    mask = mask if mask is None else mask.index_fill(2, torch.tensor([4]), False)  # a padded column
    value, grads = value_and_grads(lambda s: channel_standardize(s, mask), constant)
    assert_finite(value, grads)
    assert value.abs().max() < 0.1  # ~0: only the rounding of 0.7's mean (~6e-8) over eps (1e-6) is left
    assert_finite(*value_and_grads(lambda s: pkd_loss(s, teacher, mask), constant))  # a constant student
    assert_finite(*value_and_grads(lambda s: pkd_loss(s, constant, mask), teacher))  # a constant teacher


def test_align_scale_of_a_constant_student_gives_the_teacher_mean():
    constant = torch.full((2, 3, 4, 4), -1.5)
    teacher = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    value, grads = value_and_grads(lambda s: align_scale(s, teacher), constant)
    assert_finite(value, grads)
    torch.testing.assert_close(value, teacher.mean(dim=(0, 2, 3), keepdim=True).expand_as(value))
    assert_finite(*value_and_grads(lambda s: align_scale(s, constant), teacher))  # a constant teacher too


@pytest.mark.parametrize("scale", [0.0, 1e4])
def test_kl_and_kd_quality_focal_on_all_equal_logits(scale):
    logits = torch.full((6, 4, 17), scale)
    for temperature in (1.0, 10.0):
        for reduction in ("sum", "mean"):
            value, grads = value_and_grads(lambda p, t=temperature, r=reduction: kl_div_loss(p, logits, t, r), logits)
            assert_finite(value, grads)
            assert value.abs().max() < 1e-6  # the same distribution: KL 0
    for beta in (0.0, 0.5, 1.0, 2.0):
        assert_finite(*value_and_grads(lambda p, b=beta: kd_quality_focal_loss(p, logits, b), logits))


@pytest.mark.parametrize("head_type", ["gfl", "atss"])
def test_distillation_on_blank_images_and_degenerate_boxes_is_finite(head_type):
    """Constant images make constant feature maps (hold features, FPN outputs); zero-size ground truth too."""
    student, teacher = tiny_detector(head_type, seed=1), tiny_detector(head_type, seed=2)
    distiller = Distiller.from_args(student, teacher, kd_args(kd="crosskd+pkd")).train()
    gt_boxes = torch.tensor([[[8.0, 8.0, 8.0, 8.0], [20.0, 10.0, 20.0, 40.0]], [[0.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    gt_labels = torch.tensor([[0, 1], [2, -1]])
    batch = SimpleNamespace(images=torch.zeros(2, 3, 64, 64), gt_boxes=gt_boxes, gt_labels=gt_labels)
    losses = distiller.loss(batch)
    assert {"kd_cls", "kd_reg", "kd_feat"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total), losses
    for name, param in distiller.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


# ------------------------------------------------------------------ skipping steps in the trainer
class PoisonedLoss(nn.Module):
    """Wraps a loss module: at chosen iterations one loss becomes NaN or Inf, or only a gradient becomes NaN."""

    def __init__(self, trainer: Trainer, inner: nn.Module, poison: dict[int, str]):
        super().__init__()
        self.trainer, self.inner, self.poison = trainer, inner, poison

    def forward(self, batch):
        losses = self.inner(batch)
        kind = self.poison.get(self.trainer.iteration)
        if kind == "nan":  # a NaN value with no gradient of its own: only the loss check catches it
            losses["loss_cls"] = losses["loss_cls"] + torch.tensor(NAN)
        elif kind == "inf":
            losses["loss_box"] = losses["loss_box"] * INF
        elif kind == "nan_grad":  # a finite loss whose gradient is NaN: the norm of zeros, d‖x‖/dx = x / 0
            trained = next(p for p in self.inner.parameters() if p.requires_grad)
            losses["loss_cls"] = losses["loss_cls"] + (trained * 0).pow(2).sum().sqrt()
        return losses


def poisoned(trainer_cls: type[Trainer], poison: dict[int, str]) -> type[Trainer]:
    class Poisoned(trainer_cls):
        def build_loss_module(self) -> nn.Module:
            return PoisonedLoss(self, super().build_loss_module(), poison)

    return Poisoned


def tiny_settings(data: Path, project: Path) -> dict:
    """Two epochs of 4 iterations (32 images, batch 8) of the small GFL at 64 px, no validation until the end."""
    return {"model": "gfl_r18t.yaml", "data": str(data), "epochs": 2, "batch": 8, "imgsz": 64, "workers": 0,
            "device": "cpu", "warmup_iters": 2, "lr0": 0.02, "project": str(project), "name": "exp", "seed": 0,
            "val": False, "plots": False, "ema": True}


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, BatchNorm buffers, EMA weights and optimiser momentum, cloned."""
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    state |= {f"ema.{k}": v.clone() for k, v in trainer.ema.module.state_dict().items()}
    momenta = [s["momentum_buffer"] for s in trainer.optimizer.state.values() if "momentum_buffer" in s]
    return state | {f"momentum.{i}": m.clone() for i, m in enumerate(momenta)}


def test_non_finite_steps_are_skipped_and_counted(tmp_path, write_digits_yaml, capsys, caplog):
    data = write_digits_yaml(tmp_path, num_train=32, num_val=8)  # 4 iterations per epoch
    poison = {1: "nan", 2: "inf", 5: "nan_grad"}
    trainer = poisoned(Trainer, poison)(get_args(tiny_settings(data, tmp_path), "train"))
    states, ema_updates, grads_left = [], [], []

    def record(t):
        states.append(snapshot(t))
        ema_updates.append(t.ema.updates)
        grads_left.append(any(p.grad is not None for p in t.model.parameters()))

    trainer.add_callback("on_train_batch_end", record)
    with caplog.at_level(logging.WARNING, logger="crosskd"):
        trainer.train()
    assert ema_updates == [1, 1, 1, 2, 3, 3, 4, 5]
    assert not any(grads_left)
    for iteration in poison:  # nothing changed: weights, BatchNorm statistics, EMA, momentum
        before, after = states[iteration - 1], states[iteration]
        for key, value in before.items():
            assert torch.equal(after[key], value), (iteration, key)
    assert any(not torch.equal(states[3][k], states[2][k]) for k in states[3])  # the next good step trains

    rows = list(csv.DictReader((trainer.save_dir / "results.csv").read_text().splitlines()))
    assert [r["nonfinite_steps"] for r in rows] == ["2", "1"]
    assert all(math.isfinite(float(r[f"train/{k}_loss"])) for r in rows for k in ("cls", "box", "dfl"))
    out = capsys.readouterr().out
    assert "skip 2" in out and "skip 1" in out  # the progress line of each epoch
    assert "Non-finite loss at epoch 1, iteration 1 (loss_cls nan" in caplog.text
    assert "Non-finite loss at epoch 2, iteration 5" in caplog.text
    assert caplog.text.count("Non-finite loss") == 2  # once per run of skipped steps
    ckpt = load_checkpoint(trainer.weights_dir / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_patience_stops_with_one_line_and_keeps_last_pt(tmp_path, write_digits_yaml, monkeypatch, capsys):
    data = write_digits_yaml(tmp_path, num_train=32, num_val=8)
    saved = {}
    save_epoch = RunState.save_epoch

    def save_and_remember(state, rank_rng=None):
        save_epoch(state, rank_rng)
        saved[state.trainer.epoch] = (state.trainer.weights_dir / "last.pt").read_bytes()

    monkeypatch.setattr(RunState, "save_epoch", save_and_remember)
    build_loss_module = Trainer.build_loss_module
    poison = dict.fromkeys(range(5, 8), "nan")  # every step from epoch 2's second on
    monkeypatch.setattr(Trainer, "build_loss_module", lambda t: PoisonedLoss(t, build_loss_module(t), poison))
    words = [f"{k}={v}" for k, v in tiny_settings(data, tmp_path).items()]
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", *words, "nan_patience=3"])
    assert stop.value.code == 2
    last = tmp_path / "exp" / "weights" / "last.pt"
    err = capsys.readouterr().err
    number = r"[-+.e\d]+"
    assert re.fullmatch(
        r"ERROR: training stopped: 3 steps in a row had a non-finite loss, the last at epoch 2, iteration 7 "
        rf"\(loss_cls nan, loss_box {number}, loss_dfl {number}\); "
        + re.escape(f"{last} holds the last good epoch: lower lr0 (now 0.02), set clip_grad (e.g. clip_grad=10) "
                    f"or amp=false and train from it with model={last}") + "\n",
        err,
    ), err
    assert list(saved) == [0] and last.read_bytes() == saved[0]  # epoch 1's last.pt, untouched
    assert not [p for p in last.parent.iterdir() if p.name != "last.pt"]


def test_amp_skip_keeps_the_grad_scaler_usable():
    """With an enabled GradScaler (here on the CPU) a skipped step leaves no unscale record for the next one."""
    trainer = Trainer(get_args({"clip_grad": 1.0, "device": "cpu"}, "train"))
    module = nn.Linear(3, 1)
    poison = iter([True, False])
    trainer.compute_loss = lambda batch: {"loss": module(batch).sum() * (NAN if next(poison) else 1.0)}
    trainer.device, trainer.amp, trainer.ema, trainer.train_module = torch.device("cpu"), True, None, module
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    trainer.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.train_step(torch.ones(2, 3))
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))
    assert trainer.scaler.get_scale() == 4.0 and trainer.nonfinite.in_row == 1
    trainer.train_step(torch.ones(2, 3))  # would raise "unscale_() has already been called" without the reset
    assert not torch.equal(module.weight, before[0]) and trainer.nonfinite.in_row == 0


# ------------------------------------------------------------------ the same decision on every rank
def decide_on_rank(rank: int, out: str) -> None:
    store = Path(out, "store")  # a file rendezvous: no port to choose, so none another process can take first
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    guard = NonFiniteGuard()
    loss_nan_on_1 = torch.tensor(NAN if rank == 1 else 1.0)
    grad_inf_on_0 = [torch.tensor([INF if rank == 0 else 1.0])]
    decisions = [guard.is_finite(loss_nan_on_1), guard.is_finite(torch.tensor(1.0), grad_inf_on_0),
                 guard.is_finite(torch.tensor(2.0), [torch.ones(3)])]
    Path(out, f"rank{rank}").write_text(repr(decisions))
    dist.destroy_process_group()


@pytest.mark.parametrize(("local", "other", "applied"), [(1.0, 1.0, True), (1.0, NAN, False), (INF, 1.0, False)])
def test_the_decision_is_the_reduced_flag(monkeypatch, local, other, applied):
    """One rank's view: the other rank's flag (1 when its loss is not finite) enters through the all-reduce."""
    other_flag = float(not math.isfinite(other))
    monkeypatch.setattr("crosskd.engine.training.nonfinite.reduce_mean", lambda flag: (flag + other_flag) / 2)
    assert NonFiniteGuard().is_finite(torch.tensor(local)) is applied


@pytest.mark.slow
def test_every_rank_takes_the_same_decision(tmp_path):
    """Two gloo processes: a NaN loss on rank 1 only, an Inf gradient on rank 0 only; both skip both steps."""
    mp.spawn(decide_on_rank, args=(str(tmp_path),), nprocs=2)
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "[False, False, True]"
