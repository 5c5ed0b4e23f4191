"""KD methods as registered objects: a toy method registered in this file alone distils through `kd=` like the
built-in ones, with its learnable state saved for resume; older checkpoints' width adapter still restores; PKD
between FPN widths trains a connector that never reaches the student."""

import pytest
import torch
import torch.nn.functional as F
from test_distill import grad_norm, tiny_batch
from test_distill_trainer import NC, StopAfterFirstEpoch, distill_args, model_yaml, results_columns, teacher_pt
from torch import Tensor, nn

from crosskd.config import get_args
from crosskd.distill import Distiller, KDMethod, register
from crosskd.distill.adapters import feature_channels
from crosskd.distill.registry import unregister
from crosskd.engine.deployment.checkpoint import (
    KD_STATE_KEY,
    load_checkpoint,
    make_checkpoint,
    read_kd_state,
    save_checkpoint,
)
from crosskd.engine.deployment.exporter import run as export_run
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.errors import ConfigError
from crosskd.models import build_detector
from crosskd.settings import SETTINGS


class NeckL2(KDMethod):
    """Toy method: mean squared error between the student's FPN outputs, through a learned 1x1 conv, and the
    teacher's, times the feat weight."""

    needs = frozenset({"neck"})

    def __init__(self, student, teacher, setup) -> None:
        super().__init__(student, teacher, setup)
        self.proj = nn.Conv2d(feature_channels(student), feature_channels(teacher), kernel_size=1)

    def losses(self, ctx) -> dict[str, Tensor]:
        pairs = zip(ctx.student.feats, ctx.teacher.feats, strict=True)
        return {"kd_l2": sum(F.mse_loss(self.proj(s), t) for s, t in pairs) * self.setup.weights.feat}


def stop_after_first_epoch(trainer) -> None:
    raise StopAfterFirstEpoch


@pytest.fixture
def neck_l2():
    """`kd=neck_l2` while the test runs."""
    register("neck_l2")(NeckL2)
    yield "neck_l2"
    unregister("neck_l2")


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml):
    root = tmp_path_factory.mktemp("methods")
    write_digits_yaml(root, num_train=8, num_val=4)
    return root


def test_a_registered_method_is_a_kd_choice_of_the_settings(neck_l2):
    assert neck_l2 in SETTINGS["kd"].choices
    assert get_args({"kd": "Neck_L2", "teacher": "t.pt", "model": "gfl_r18t.yaml"}, mode="distill").kd == neck_l2
    with pytest.raises(ValueError, match="taken"):
        register("crosskd")(NeckL2)


def test_an_unregistered_name_is_refused_in_one_line():
    assert "neck_l2" not in SETTINGS["kd"].choices
    with pytest.raises(ConfigError, match="'kd=neck_l2' is invalid: 'kd' must be one of crosskd, pm, ld, pkd"):
        get_args({"kd": "neck_l2"}, mode="distill")


def test_a_toy_method_distils_resumes_and_stays_out_of_best_pt(work, neck_l2):
    teacher = teacher_pt(work, "gfl", feat=64)
    args = distill_args(work, "toy", teacher=str(teacher), model=str(model_yaml(work, "gfl")), kd=neck_l2, epochs=2)
    first = DistillTrainer(args)
    first.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(StopAfterFirstEpoch):
        first.train()
    assert "train/kd_l2_loss" in results_columns(first.save_dir)
    last = first.weights_dir / "last.pt"
    saved = load_checkpoint(last)[KD_STATE_KEY]
    assert set(saved) == {"neck_l2"} and saved["neck_l2"]["proj.weight"].shape == (64, 32, 1, 1)
    restored = {}
    resumed = DistillTrainer(distill_args(work, "toy", resume=str(last)))
    resumed.add_callback("on_train_start", lambda t: restored.update(t.loss_module.kd_state()["neck_l2"]))
    resumed.train()
    assert all(torch.equal(restored[k], v) for k, v in saved["neck_l2"].items())
    assert torch.isfinite(torch.tensor(resumed.epoch_losses["kd_l2"]))
    best = load_checkpoint(resumed.weights_dir / "best.pt")
    assert KD_STATE_KEY not in best
    assert set(best["model"]) == set(build_detector(model_yaml(work, "gfl"), NC).state_dict())


def test_an_older_checkpoints_width_adapter_restores_into_crosskd(work):
    student, teacher = build_detector(model_yaml(work, "gfl"), NC), build_detector(model_yaml(work, "gfl", 64), NC)
    adapter = {"cls.weight": torch.randn(64, 32, 1, 1), "cls.bias": torch.randn(64),
               "reg.weight": torch.randn(64, 32, 1, 1), "reg.bias": torch.randn(64)}
    old = make_checkpoint(student, epoch=0, best_fitness=None, names={}, train_args={}, kd_adapter=adapter)
    path = save_checkpoint(old, work / "old_format.pt")
    states = read_kd_state(load_checkpoint(path))
    assert set(states) == {"crosskd"} and set(states["crosskd"]) == {f"adapter.{k}" for k in adapter}
    distiller = Distiller(student, teacher, kd_idx=1)
    distiller.load_kd_state(states)
    loaded = distiller.methods["crosskd"].adapter
    assert torch.equal(loaded.cls.weight, adapter["cls.weight"]) and torch.equal(loaded.reg.bias, adapter["reg.bias"])


def test_pkd_from_a_wider_fpn_teacher_lowers_its_loss():
    """gfl_r18s (FPN 64) teaches gfl_r18t (FPN 32): PKD compares through the 1x1 connector and goes down."""
    torch.manual_seed(0)
    student, teacher = build_detector("gfl_r18t.yaml", nc=3), build_detector("gfl_r18s.yaml", nc=3)
    distiller = Distiller(student, teacher, kd="pkd")
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = distiller(tiny_batch())["kd_feat"]
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history))) and history[-1] < history[0]
    assert grad_norm(distiller.methods["pkd"].connector) > 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_pkd_from_gfl_r18s_to_gfl_r18t_distils_and_exports_without_the_connector(work):
    teacher = build_detector("gfl_r18s.yaml", NC)
    ckpt = make_checkpoint(teacher, epoch=-1, best_fitness=None, names={i: str(i) for i in range(NC)}, train_args={})
    teacher_path = save_checkpoint(ckpt, work / "gfl_r18s_teacher.pt")
    trainer = DistillTrainer(distill_args(work, "pkd_widths", teacher=str(teacher_path), model="gfl_r18t.yaml",
                                          kd="pkd"))
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.epoch_losses["kd_feat"]))
    last = load_checkpoint(trainer.weights_dir / "last.pt")
    assert last[KD_STATE_KEY]["pkd"]["connector.weight"].shape == (64, 32, 1, 1)
    best_path = trainer.weights_dir / "best.pt"
    best = load_checkpoint(best_path)
    student_keys = set(build_detector("gfl_r18t.yaml", NC).state_dict())
    assert KD_STATE_KEY not in best and set(best["model"]) == student_keys
    exported = export_run(get_args({"model": str(best_path), "format": "torchscript", "imgsz": 64, "device": "cpu"},
                                   mode="export"))
    names = set(torch.jit.load(str(exported)).state_dict())
    assert not any("connector" in name for name in names)
    graph_keys = {name.removeprefix("detector.") for name in names if name.startswith("detector.")}
    assert graph_keys - {"mean", "std"} == student_keys  # the student and its input normalisation, nothing else
