"""DDP setup: find_unused_parameters from one dry check, clipping over every parameter group, lost-node helpers."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from test_distill import kd_args, tiny_detector
from torch import nn

from crosskd.config import get_args
from crosskd.distill import Distiller
from crosskd.engine.training import ddp
from crosskd.engine.training.trainer import DetectorLoss, Trainer
from crosskd.errors import ConfigError
from crosskd.models import build_detector

CPU = torch.device("cpu")


@pytest.mark.parametrize("model", ["gfl_r18t.yaml", "retinanet_r18s.yaml", "fcos_r18s.yaml", "atss_r18s.yaml",
                                   "gfl_mobilenetv2.yaml", "faster_rcnn_r18s.yaml"])
def test_plain_training_reaches_every_trainable_parameter(model):
    detector = build_detector(model, nc=3).train()
    assert ddp.unused_parameters(DetectorLoss(detector), ddp.probe_batch(max(detector.strides), CPU)) == []


ADAPTER = "methods.crosskd.adapter"


@pytest.mark.parametrize(("kd_branch", "unused"), [("both", []),
                                                   ("cls", [f"{ADAPTER}.reg.weight", f"{ADAPTER}.reg.bias"]),
                                                   ("reg", [f"{ADAPTER}.cls.weight", f"{ADAPTER}.cls.bias"])])
def test_kd_branch_leaves_one_side_of_the_width_adapter_unused(kd_branch, unused):
    student, teacher = tiny_detector("gfl", feat=16, seed=0), tiny_detector("gfl", feat=32, seed=1)
    distiller = Distiller.from_args(student, teacher, kd_args(kd_branch=kd_branch)).train()
    assert distiller.methods["crosskd"].adapter is not None
    assert ddp.unused_parameters(distiller, ddp.probe_batch(128, CPU)) == unused


@pytest.mark.parametrize("model", ["retinanet_r18s.yaml", "faster_rcnn_r18s.yaml"])  # R-CNN: RPN and RoI samplers
def test_dry_check_changes_no_state(model):
    """No .grad, no BatchNorm statistic, no RNG draw and the module's mode kept: the run is as without the check."""
    detector = build_detector(model, nc=3).train()
    buffers = {k: v.clone() for k, v in detector.state_dict().items()}
    rng = torch.get_rng_state()
    ddp.unused_parameters(DetectorLoss(detector), ddp.probe_batch(128, CPU))
    assert detector.training
    assert all(p.grad is None for p in detector.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in detector.state_dict().items():
        assert torch.equal(value, buffers[key]), key


class TwoGroupLoss(nn.Module):
    """loss = 10·Σa + 10·Σb: each of the two parameters gets gradient 10 everywhere."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))

    def forward(self, batch):
        return {"loss_a": 10 * self.a.sum(), "loss_b": 10 * self.b.sum()}


def test_clip_grad_covers_every_parameter_group():
    trainer = Trainer(get_args({"clip_grad": 1.0, "device": "cpu"}, "train"))
    module = TwoGroupLoss()
    trainer.device, trainer.amp, trainer.ema = CPU, False, None
    trainer.train_module = module
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
    trainer.optimizer = torch.optim.SGD([{"params": [module.a]}, {"params": [module.b]}], lr=1.0)
    batch = torch.zeros(1)  # anything with .to(device)
    trainer.train_step(batch)
    step = torch.cat([module.a.detach(), module.b.detach()])  # -lr x clipped gradient
    assert step.norm().item() == pytest.approx(1.0, rel=1e-5)  # the global norm over both groups is clip_grad
    assert torch.allclose(module.a, module.b)  # the same gradient in both groups, so the same clipped step


def test_ddp_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(ddp.TIMEOUT_ENV, raising=False)
    assert ddp.ddp_timeout() == timedelta(hours=3)
    monkeypatch.setenv(ddp.TIMEOUT_ENV, "30")
    assert ddp.ddp_timeout() == timedelta(seconds=30)
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv(ddp.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"CROSSKD_DDP_TIMEOUT='{bad}' is not a number of seconds above 0"):
            ddp.ddp_timeout()


@pytest.mark.parametrize(("world", "local", "node", "text"), [
    (2, 1, 0, "node 1 of 2 (peer 10.0.0.2:41237)"),
    (16, 8, 1, "node 0 of 2 (peer 10.0.0.2:41237)"),
    (3, 1, 1, "one of nodes 0, 2 of 3 (peer 10.0.0.2:41237)"),
    (4, 4, 0, "a process of this node (peer 10.0.0.2:41237)"),
])
def test_lost_node_text_names_the_other_nodes(monkeypatch, world, local, node, text):
    for key, value in {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": local, "GROUP_RANK": node}.items():
        monkeypatch.setenv(key, str(value))
    error = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:41237: Connection "
                         "reset by peer.")
    assert ddp.lost_node_text(error) == text


def test_peer_failures_are_told_from_bugs(tmp_path):
    gloo_error = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer")
    assert not ddp.is_peer_failure(gloo_error)  # no process group: nothing to lose
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert ddp.is_peer_failure(gloo_error)
        assert ddp.is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
        assert not ddp.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        assert not ddp.is_peer_failure(ValueError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
        assert not ddp.is_peer_failure(RuntimeError("ProcessGroupGloo does not support this reduce op"))
    finally:
        dist.destroy_process_group()
