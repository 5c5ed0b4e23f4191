"""MuSGD (Ultralytics 8.4's optimiser for long runs): the Newton–Schulz orthogonalisation, the SGD and Muon steps by
hand, equality with Ultralytics' own MuSGD and its parameter groups (the peer), optimizer=musgd in any case, and a YOLO
training with it that resumes like an uninterrupted run."""

import json

import pytest
import torch
import yaml
from test_yolo_training import tiny_yolo11n
from ultralytics_peer import run_peer

from crosskd.config import get_args
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training.musgd import MuSGD, muon_updates, orthogonalize
from crosskd.engine.training.optim import parameter_groups, resolve_run_length_defaults
from crosskd.engine.training.trainer import Trainer
from crosskd.models import build_detector

LR, MOMENTUM, DECAY = 0.01, 0.9, 5e-4


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_orthogonalize_pushes_singular_values_towards_one(shape):
    torch.manual_seed(0)
    matrix = torch.randn(*shape) * torch.logspace(-1, 0, shape[1])  # columns over a decade of scales
    result = orthogonalize(matrix[None])[0].float()
    assert result.dtype == torch.float32 and result.shape == matrix.shape
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.5
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(result.flatten(), (u @ vh).flatten(), dim=0)
    assert cosine > 0.95  # ≈ U Vᵀ


def test_an_sgd_group_steps_as_torch_sgd_with_nesterov():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    theirs.data.copy_(ours.data)
    musgd = MuSGD([{"params": [ours], "use_muon": False}], lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    sgd = torch.optim.SGD([theirs], lr=LR, momentum=MOMENTUM, weight_decay=DECAY, nesterov=True)
    for _ in range(3):
        grad = torch.randn(4, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        musgd.step()
        sgd.step()
    torch.testing.assert_close(ours.data, theirs.data, rtol=0, atol=1e-7)


def test_a_muon_group_steps_by_hand():
    """Two steps of a conv weight: −lr·0.2·orthogonalize(β·m + (1 − β)·g) with m ← β·m + (1 − β)·g, then the SGD step
    at lr·1.0 whose weight decay reads the weights the Muon step moved."""
    torch.manual_seed(0)
    start = torch.randn(6, 2, 3, 3)
    weight = torch.nn.Parameter(start.clone())
    optimizer = MuSGD([{"params": [weight], "use_muon": True}], lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    expected, muon_buffer, sgd_buffer = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for _ in range(2):
        grad = torch.randn_like(start)
        weight.grad = grad.clone()
        optimizer.step()
        muon_buffer = MOMENTUM * muon_buffer + (1 - MOMENTUM) * grad
        nesterov = MOMENTUM * muon_buffer + (1 - MOMENTUM) * grad
        expected = expected - LR * 0.2 * orthogonalize(nesterov.reshape(1, 6, 18))[0].float().reshape(start.shape)
        decayed = grad + DECAY * expected
        sgd_buffer = MOMENTUM * sgd_buffer + decayed
        expected = expected - LR * (decayed + MOMENTUM * sgd_buffer)
    torch.testing.assert_close(weight.data, expected, rtol=0, atol=1e-6)


def test_muon_updates_scale_a_tall_matrix_and_batch_equal_shapes():
    torch.manual_seed(0)
    tall, square, twin = torch.randn(16, 4), torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    out = muon_updates([tall, square, twin])
    torch.testing.assert_close(out[0], orthogonalize(tall[None])[0].float() * 2.0)  # √(16 / 4)
    torch.testing.assert_close(out[2], orthogonalize(twin.reshape(1, 3, 12))[0].float().reshape(3, 3, 2, 2))


PEER_STEPS = """
import sys, torch
from ultralytics.optim import MuSGD
data = torch.load(sys.argv[1])
params = [torch.nn.Parameter(t.clone()) for t in data["params"]]
groups = [{"params": [params[i] for i in g["index"]], "lr": g["lr"], "momentum": g["momentum"], "nesterov": True,
           "weight_decay": g["weight_decay"], "use_muon": g["use_muon"]} for g in data["groups"]]
optimizer = MuSGD(groups, muon=0.2, sgd=1.0)
for grads in data["grads"]:
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
torch.save([p.detach() for p in params], sys.argv[2])
"""


def test_musgd_steps_as_ultralytics_musgd(tmp_path):
    """Three steps over conv, linear and 1-D parameters in Muon and SGD groups (two convs of one shape, so ours
    batches them, and a tall linear weight) end where Ultralytics' MuSGD ends."""
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (24, 6), (6, 24), (8,), (8,)]
    start = [torch.randn(shape) for shape in shapes]
    group_specs = [{"index": [0, 1, 2, 3], "use_muon": True, "lr": LR, "weight_decay": DECAY},
                   {"index": [4], "use_muon": False, "lr": LR * 3, "weight_decay": 0.0},
                   {"index": [5], "use_muon": False, "lr": LR, "weight_decay": DECAY}]
    group_specs = [{**spec, "momentum": MOMENTUM} for spec in group_specs]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(3)]
    torch.save({"params": start, "groups": group_specs, "grads": grads}, tmp_path / "in.pt")
    run_peer(PEER_STEPS, tmp_path / "in.pt", tmp_path / "out.pt")
    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = MuSGD([{"params": [params[i] for i in spec.pop("index")], **spec} for spec in group_specs])
    for step in grads:
        for param, grad in zip(params, step, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    for ours, theirs in zip(params, torch.load(tmp_path / "out.pt"), strict=True):
        torch.testing.assert_close(ours.data, theirs, rtol=0, atol=2e-6)


PEER_GROUPS = """
import json, sys
from types import SimpleNamespace
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.nn.tasks import DetectionModel
model = DetectionModel("yolo11n.yaml", nc=10, verbose=False)
owner = SimpleNamespace(args=SimpleNamespace(lr0=0.01, warmup_bias_lr=0.1), data={"nc": 10})
optimizer = BaseTrainer.build_optimizer(owner, model, name="MuSGD", lr=0.01, momentum=0.9, decay=5e-4)
groups = [{"param_group": g["param_group"], "use_muon": bool(g.get("use_muon")), "lr": g["lr"],
           "weight_decay": g["weight_decay"], "shapes": sorted(list(p.shape) for p in g["params"] if p.requires_grad)}
          for g in optimizer.param_groups if g["params"]]
json.dump(groups, open(sys.argv[1], "w"))
"""


def test_yolo11n_groups_are_ultralytics_musgd_groups(tmp_path):
    """The groups of Ultralytics' build_optimizer for MuSGD on YOLO11n, in its order: weight/bn/bias/muon, each
    with its class branches (`cv3`) first at 3x lr; the same tensor shapes in each (its frozen DFL conv left out)."""
    run_peer(PEER_GROUPS, tmp_path / "groups.json")
    peer = json.loads((tmp_path / "groups.json").read_text())
    model = build_detector("yolo11n.yaml", nc=10)
    boosted = frozenset(map(id, model.head.musgd_boosted_parameters()))
    groups = parameter_groups(model, 5e-4, norm_bias_decay=False, muon=True, boosted=boosted)
    optimizer = MuSGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for group in optimizer.param_groups:
        group["lr"] = 0.01 * group["lr_scale"]
    ours = [{"param_group": g["param_group"], "use_muon": g["use_muon"], "lr": g["lr"],
             "weight_decay": g["weight_decay"], "shapes": sorted(list(p.shape) for p in g["params"])}
            for g in optimizer.param_groups]
    assert [(g["param_group"], g["lr"]) for g in ours] == [(g["param_group"], g["lr"]) for g in peer]
    assert ours == peer


def test_optimizer_key_takes_musgd_in_any_case():
    assert get_args({"optimizer": "musgd"}, "train").optimizer.lower() == "musgd"
    args = get_args({"optimizer": "musgd", "epochs": 1}, "train")
    assert resolve_run_length_defaults(args, 10).optimizer == "MuSGD"  # canonical, lr0 by optimizer: 0.01
    assert resolve_run_length_defaults(args, 10).lr0 == 0.01


SETTINGS = {"epochs": 2, "batch": 4, "imgsz": 64, "workers": 0, "device": "cpu", "val": False, "plots": False,
            "seed": 0, "optimizer": "MuSGD"}


class Crash(Exception):
    """A job killed without warning, simulated in-process."""


def test_a_musgd_yolo_run_resumes_like_the_uninterrupted_run(tmp_path, write_digits_yaml):
    """yolo11n (tiny) with optimizer=MuSGD: the class branches train at 3x lr (results.csv's lr columns), and a run
    killed after iteration 5 and resumed from its mid-epoch last.pt (both momentum buffers of every Muon weight in
    it) ends with the uninterrupted run's weights."""
    data, model = write_digits_yaml(tmp_path, num_train=16, num_val=4), tiny_yolo11n(tmp_path)
    settings = {**SETTINGS, "model": str(model), "data": str(data), "project": str(tmp_path)}
    reference = Trainer(get_args({**settings, "name": "reference"}, "train"))
    reference.train()
    groups = reference.optimizer.param_groups
    assert {(g["param_group"], g["lr_scale"]) for g in groups} == {
        (kind, scale) for kind in ("bn", "bias", "muon") for scale in (1.0, 3.0)}
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * groups[-1]["lr"]) for g in groups if g["param_group"] != "bias")
    args = yaml.safe_load((tmp_path / "reference" / "args.yaml").read_text())
    assert args["optimizer"] == "MuSGD"

    def crash(trainer: Trainer) -> None:
        if trainer.iteration == 5:
            raise Crash

    killed = Trainer(get_args({**settings, "name": "killed", "save_period_iters": 5}, "train"))
    killed.add_callback("on_train_batch_end", crash)
    with pytest.raises(Crash):
        killed.train()
    last = tmp_path / "killed" / "weights" / "last.pt"
    state = load_checkpoint(last)["optimizer"]["state"]
    assert any({"muon_momentum", "momentum_buffer"} <= set(s) for s in state.values())
    resumed = Trainer(get_args({**settings, "name": "ignored", "resume": str(last)}, "train"))
    resumed.train()
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-7)
