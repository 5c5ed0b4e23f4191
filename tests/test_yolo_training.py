"""YOLO models train as Ultralytics 8.4 trains them: the `ultralytics` recipe's optimisation (three parameter groups,
nominal-batch accumulation and scaled decay, epoch warm-up with the biases' and momentum's ramps, per-epoch linear
decay, Ultralytics' optimizer=auto), the loss back-propagated times the batch, resume inside an accumulation window,
and the paper's recipe exactly as before."""

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from test_overfit import coco_ap50, digits  # noqa: F401  (digits: the fixture)
from torch import nn

from crosskd import cli
from crosskd.config import get_args, load_defaults
from crosskd.data.recipes import PAPER_OPTIMIZATION, ULTRALYTICS_OPTIMIZATION
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training.optim import (
    Accumulation,
    EpochSchedule,
    LRSchedule,
    build_accumulation,
    build_optimizer,
    build_schedule,
    effective_weight_decay,
    nominal_accumulation,
    parameter_groups,
    resolve_run_length_defaults,
)
from crosskd.engine.training.recipe import apply_recipe
from crosskd.engine.training.trainer import Trainer, scales_loss_by_batch
from crosskd.models import build_detector
from crosskd.paths import CFG_DIR

TINY_WIDTH = 0.0625  # yolo11n's width 0.25 divided by 4: every layer 8 or 16 channels wide (331k parameters)


def tiny_yolo11n(folder: Path, width: float = TINY_WIDTH) -> Path:
    """`folder/yolo11n.yaml`, i.e. a copy of yolo11.yaml whose scale n is `width` wide, at scale n."""
    cfg = yaml.safe_load((CFG_DIR / "models" / "yolo11.yaml").read_text())
    cfg["scales"]["n"] = [0.5, width, 1024]
    (folder / "yolo11.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "yolo11n.yaml"


def test_three_parameter_groups_as_ultralytics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.GroupNorm(1, 2))
    groups = parameter_groups(model, 5e-4, norm_bias_decay=False)
    assert [(g["param_group"], g["weight_decay"]) for g in groups] == [("weight", 5e-4), ("bn", 0.0), ("bias", 0.0)]
    by_group = [{id(p) for p in g["params"]} for g in groups]
    assert by_group == [{id(model[0].weight), id(model[2].weight)}, {id(model[1].weight), id(model[3].weight)},
                        {id(model[1].bias), id(model[2].bias), id(model[3].bias)}]
    optimizer = build_optimizer(groups, "SGD", 0.01, 0.937, 5e-4, nesterov=True)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0, 0.0]
    assert all(g["nesterov"] for g in optimizer.param_groups)
    yolo = build_detector("yolo11n.yaml", nc=10)
    counts = [len(g["params"]) for g in parameter_groups(yolo, 5e-4, norm_bias_decay=False)]
    assert counts == [87, 81, 87]  # Ultralytics' 88/81/87 for yolo11n, less its frozen DFL conv (our dfl_bins)


def test_the_papers_optimiser_is_one_group_of_every_trainable_parameter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    params = parameter_groups(model, 1e-4, norm_bias_decay=True)
    assert params == [model[0].weight, model[0].bias, model[1].bias]
    optimizer = build_optimizer(params, "SGD", 0.01, 0.9, 1e-4)
    assert len(optimizer.param_groups) == 1 and "param_group" not in optimizer.param_groups[0]
    assert not optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize(("batch", "accumulate", "decay"), [
    (8, 8, 5e-4), (16, 4, 5e-4), (24, 3, 5e-4 * 24 * 3 / 64), (128, 1, 1e-3), (48, 1, 5e-4 * 48 / 64),
])
def test_accumulation_count_and_scaled_weight_decay(batch, accumulate, decay):
    args = get_args({"batch": batch, "nbs": 64, "weight_decay": 5e-4}, "train")
    assert nominal_accumulation(batch, 64) == accumulate
    assert effective_weight_decay(args) == pytest.approx(decay)
    assert effective_weight_decay(get_args({"batch": batch, "weight_decay": 5e-4}, "train")) == 5e-4  # nbs=0
    assert build_accumulation(args, iters_per_epoch=2, warmup_iters=0).nominal == min(accumulate, 2 * args.epochs)


def ultralytics_step_iterations(nominal: int, warmup: int, iterations: int) -> list[int]:
    """The iterations after which Ultralytics 8.4's _do_train steps: its loop transcribed with numpy.interp."""
    steps, last, accumulate = [], -1, nominal
    for ni in range(iterations):
        if warmup and ni <= warmup:
            accumulate = max(1, int(np.interp(ni, [0, warmup], [1, nominal]).round()))
        if ni - last >= accumulate:
            steps.append(ni)
            last = ni
    return steps


@pytest.mark.parametrize(("nominal", "warmup"), [(8, 0), (8, 30), (4, 7), (3, 4), (16, 5), (1, 10), (5, 300)])
def test_accumulation_steps_where_ultralytics_steps(nominal, warmup):
    accumulation = Accumulation(nominal, warmup)
    ours = [i for i in range(400) if accumulation.steps_at(i)]
    assert ours == ultralytics_step_iterations(nominal, warmup, 400)


def test_epoch_schedule_lr_and_momentum_against_ultralytics_formulas():
    schedule = EpochSchedule(base_lr=0.01, iters_per_epoch=10, epochs=5, warmup_iters=30, lrf=0.01,
                             warmup_bias_lr=0.1, warmup_momentum=0.8, momentum=0.937)
    lf = [(1 - e / 5) * 0.99 + 0.01 for e in range(5)]  # 1.0, 0.802, 0.604, 0.406, 0.208
    assert schedule(0) == 0.0 and schedule(0, bias=True) == 0.1 and schedule.momentum_at(0) == 0.8
    assert schedule(15) == pytest.approx(0.01 * lf[1] * 15 / 30)
    assert schedule(15, bias=True) == pytest.approx(0.1 + (0.01 * lf[1] - 0.1) * 15 / 30)
    assert schedule.momentum_at(15) == pytest.approx(0.8 + 0.137 * 15 / 30)
    assert schedule(30) == schedule(30, bias=True) == pytest.approx(0.01 * lf[3]) and schedule.momentum_at(30) == 0.937
    assert schedule(45) == schedule(45, bias=True) == pytest.approx(0.01 * lf[4])
    cosine = EpochSchedule(base_lr=0.01, iters_per_epoch=10, epochs=5, cos_lr=True, lrf=0.01)
    assert cosine(45) == pytest.approx(0.01 * ((1 - math.cos(4 * math.pi / 5)) / 2 * (0.01 - 1) + 1))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    sgd = build_optimizer(parameter_groups(model, 5e-4, False), "SGD", 0.01, 0.937, 5e-4, nesterov=True)
    assert schedule.apply(sgd, 15) == schedule(15)
    assert [g["lr"] for g in sgd.param_groups] == [schedule(15), schedule(15), schedule(15, bias=True)]
    assert {g["momentum"] for g in sgd.param_groups} == {schedule.momentum_at(15)}
    adamw = build_optimizer(parameter_groups(model, 5e-4, False), "AdamW", 0.01, 0.9, 5e-4)
    schedule.apply(adamw, 15)
    assert {g["betas"] for g in adamw.param_groups} == {(0.9, 0.999)}  # Ultralytics ramps SGD's momentum only


def test_ultralytics_warmup_leaves_the_last_epoch_and_lr0_is_not_scaled():
    args = apply_recipe(get_args({"epochs": 2, "batch": 8}, "train"), {"recipe": "ultralytics"})
    schedule = build_schedule(args, iters_per_epoch=20)
    assert isinstance(schedule, EpochSchedule) and schedule.warmup_iters == 20  # min(3, epochs - 1) epochs
    assert schedule.base_lr == 0.01 and build_schedule(args.with_values(epochs=10), 20).warmup_iters == 60
    assert build_schedule(args.with_values(epochs=1), 20).warmup_iters == 0


def test_auto_follows_ultralytics_rule_with_a_nominal_batch():
    args = apply_recipe(get_args({"epochs": 100, "batch": 16}, "train"), {"recipe": "ultralytics"})
    short = resolve_run_length_defaults(args, 63, num_images=1000, nc=10)  # ceil(1000 / 64) x 100 = 1600 steps
    assert (short.optimizer, short.lr0, short.momentum, short.warmup_bias_lr) == ("AdamW", 0.000714, 0.9, 0.0)
    coco = resolve_run_length_defaults(args, 7393, num_images=118287, nc=80)  # 184900 steps
    assert (coco.optimizer, coco.lr0, coco.momentum, coco.warmup_bias_lr) == ("MuSGD", 0.01, 0.937, 0.0)
    typed = apply_recipe(get_args({"epochs": 100, "lr0": 0.002, "warmup_bias_lr": 0.05}, "train"),
                         {"recipe": "ultralytics"})
    kept = resolve_run_length_defaults(typed, 63, num_images=1000, nc=10)
    assert (kept.optimizer, kept.lr0, kept.warmup_bias_lr) == ("AdamW", 0.002, 0.05)
    explicit = resolve_run_length_defaults(args.with_values(optimizer="SGD"), 63, num_images=1000, nc=10)
    assert (explicit.optimizer, explicit.lr0, explicit.warmup_bias_lr) == ("SGD", 0.01, 0.1)
    again = resolve_run_length_defaults(get_args(short.to_dict(), "train"), 63, num_images=1000, nc=10)
    assert again.to_dict() == short.to_dict()  # a resumed run resolves nothing


def test_the_papers_recipe_is_todays_optimisation():
    defaults = load_defaults()
    assert PAPER_OPTIMIZATION == {key: defaults[key] for key in PAPER_OPTIMIZATION}
    assert set(PAPER_OPTIMIZATION) == set(ULTRALYTICS_OPTIMIZATION)
    args = resolve_run_length_defaults(apply_recipe(get_args({"batch": 8}, "train"), {}), iters_per_epoch=64)
    assert {key: getattr(args, key) for key in PAPER_OPTIMIZATION if key != "lr0"} == {
        key: value for key, value in PAPER_OPTIMIZATION.items() if key != "lr0"}
    schedule = build_schedule(args, iters_per_epoch=64)
    assert schedule == LRSchedule(base_lr=0.004 * 8 / 16, iters_per_epoch=64, epochs=12, warmup_iters=77,
                                  warmup_ratio=0.001, lr_steps=(8, 11), cos_lr=False, lrf=0.01)
    accumulation = build_accumulation(args, 64, schedule.warmup_iters)
    assert accumulation.nominal == 1 and all(accumulation.steps_at(i) for i in range(200))


def test_a_yolo_loss_is_back_propagated_times_the_images_on_all_ranks():
    scaled = [scales_loss_by_batch(build_detector(name, nc=2)) for name in ("yolo11n.yaml", "gfl_r18t.yaml")]
    assert scaled == [True, False]
    total, batch = torch.tensor(2.5), SimpleNamespace(images=torch.zeros(6, 3, 8, 8))
    yolo, gfl = (SimpleNamespace(batch_scaled_loss=flag, world_size=2) for flag in scaled)
    assert Trainer.loss_for_backward(yolo, total, batch) == 2.5 * 6 * 2
    assert Trainer.loss_for_backward(gfl, total, batch) is total


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_crosskd_train_yolo11n_runs_two_epochs_with_the_ultralytics_recipe(tmp_path, write_digits_yaml):
    data = write_digits_yaml(tmp_path, num_train=16, num_val=4)
    model = tiny_yolo11n(tmp_path)
    cli.main(["train", f"model={model}", f"data={data}", "epochs=2", "batch=4", "imgsz=64", "workers=0",
              "device=cpu", "plots=false", f"project={tmp_path}", "name=run"])
    rows = read_rows(tmp_path / "run")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        for column in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, column
    assert {"lr/pg0", "lr/pg1", "lr/pg2"} <= set(rows[0])  # weights, norm weights, biases
    assert float(rows[0]["lr/pg0"]) == pytest.approx(0.000714 * 3 / 4)  # warm-up: 4 iterations, the last at 3
    args = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert (args["optimizer"], args["lr0"], args["nbs"], args["lr_schedule"]) == ("AdamW", 0.000714, 64, "ultralytics")
    assert (args["ema"], args["ema_decay"], args["clip_grad"], args["norm_bias_decay"]) == (True, 0.9999, 10.0, False)


RESUME_SETTINGS = {"epochs": 2, "batch": 4, "imgsz": 64, "workers": 0, "device": "cpu", "val": False, "plots": False,
                   "seed": 0, "nbs": 12}  # 16 images: 4 iterations per epoch; 3 batches per step, ramping in warm-up


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, write_digits_yaml):
    root = tmp_path_factory.mktemp("accumulate")
    data, model = write_digits_yaml(root, num_train=16, num_val=4), tiny_yolo11n(root)
    trainer = Trainer(get_args({**RESUME_SETTINGS, "model": str(model), "data": str(data), "project": str(root),
                                "name": "reference"}, "train"))
    trainer.train()
    assert [i for i in range(8) if trainer.accumulation.steps_at(i)] == [0, 2, 5]
    weights = {"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()}
    return SimpleNamespace(root=root, data=data, model=model, weights=weights, rows=read_rows(root / "reference"))


class Crash(Exception):
    """A job killed without warning, simulated in-process."""


@pytest.mark.parametrize(("name", "period", "crash_at", "partial"), [
    ("epoch-end", 0, 4, None),  # last.pt of epoch 1: iteration 3's gradients pending (the step comes at 5)
    ("mid-window", 5, 5, 1),  # last.pt after iteration 4: iterations 3 and 4 pending
])
def test_resume_inside_an_accumulation_window_equals_the_uninterrupted_run(uninterrupted, name, period, crash_at,
                                                                           partial):
    ref = uninterrupted

    def crash(trainer: Trainer) -> None:
        if trainer.iteration == crash_at:
            raise Crash

    settings = {**RESUME_SETTINGS, "model": str(ref.model), "data": str(ref.data), "project": str(ref.root),
                "save_period_iters": period}
    killed = Trainer(get_args({**settings, "name": name}, "train"))
    killed.add_callback("on_train_batch_end", crash)
    with pytest.raises(Crash):
        killed.train()
    last = ref.root / name / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    assert (ckpt["partial_epoch"] or {}).get("batches") == partial
    assert ckpt["scheduler"]["pending_gradients"]  # saved inside the window
    resumed = Trainer(get_args({**settings, "name": "ignored", "resume": str(last)}, "train"))
    resumed.train()
    for part, module in (("model", resumed.model), ("ema", resumed.ema.module)):
        for key, value in ref.weights[part].items():
            torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-5, atol=1e-7)
    columns = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "lr/pg0", "lr/pg2")
    assert [[r[c] for c in columns] for r in read_rows(ref.root / name)] == [[r[c] for c in columns] for r in ref.rows]


OVERFIT_ITERATIONS = 250  # BatchNorm's running statistics (momentum 0.03) catch up with the weights by then


@pytest.mark.slow
def test_a_tiny_yolo11n_overfits_a_digits_batch(digits, tmp_path):  # noqa: F811  (digits: the fixture)
    """Ultralytics' parameter groups, the loss times the batch, clipping at 10 and AdamW: COCO mAP50 >= 0.9."""
    dataset, batch = digits
    torch.manual_seed(0)
    detector = build_detector(tiny_yolo11n(tmp_path, width=0.125), nc=len(dataset.names)).train()
    optimizer = torch.optim.AdamW(parameter_groups(detector, 0.0, norm_bias_decay=False), lr=5e-3)
    first = None
    for _ in range(OVERFIT_ITERATIONS):
        total = sum(detector.loss(batch).values())
        first = total.item() if first is None else first
        optimizer.zero_grad()
        (total * len(batch.images)).backward()
        nn.utils.clip_grad_norm_(detector.parameters(), 10.0)
        optimizer.step()
    assert total.item() < 0.3 * first
    assert coco_ap50(detector, dataset, batch) >= 0.9
