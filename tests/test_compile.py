"""compile=True: torch.compile on backbone, neck and head, the one-warning eager fallback, plain checkpoint keys."""

import copy
import logging

import pytest
import torch
import yaml

from crosskd.config import get_args
from crosskd.data.digits import generate_digits
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training import compile as compile_module
from crosskd.engine.training.compile import compile_detector, is_compiled
from crosskd.engine.training.distill_trainer import DistillTrainer
from crosskd.engine.training.trainer import Trainer
from crosskd.models import build_detector


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    """Dynamo traces for real, without inductor's C++ code generation (minutes on these CPUs); warnings reset."""
    monkeypatch.setattr(compile_module, "BACKEND", "eager")
    monkeypatch.setattr(compile_module, "_warned", False)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found")


def tiny_detector(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector("gfl_r18t.yaml", 10).eval()


def test_compiled_detector_matches_eager_and_keeps_state_dict_keys():
    model = tiny_detector()
    reference = copy.deepcopy(model)
    compile_detector(model, True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs, expected = model(images), reference(images)
    assert all(is_compiled(getattr(model, part)) for part in ("backbone", "neck", "head"))
    assert not isinstance(model.backbone.forward, type(reference.backbone.forward))  # the wrapper is in place
    assert list(model.state_dict()) == list(reference.state_dict())  # no _orig_mod. prefixes
    for got, want in zip(outputs.cls_scores + outputs.bbox_preds, expected.cls_scores + expected.bbox_preds,
                         strict=True):
        torch.testing.assert_close(got, want)


def test_deepcopy_of_compiled_model_runs_its_own_weights():
    """The EMA is a deepcopy: its compiled forward must use the copy's weights, not the original's."""
    model = compile_detector(tiny_detector(), True)
    ema = copy.deepcopy(model)
    assert is_compiled(ema.backbone) and ema.backbone.forward.module is ema.backbone
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
        images = torch.rand(1, 3, 64, 64)
        assert not torch.allclose(ema(images).cls_scores[0], model(images).cls_scores[0])


def test_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    model = tiny_detector()
    reference = copy.deepcopy(model)
    compile_detector(model, True, backend=failing_backend)
    images = torch.rand(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="crosskd"), torch.no_grad():
        first, second, expected = model(images), model(images), reference(images)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "running eager PyTorch" in warnings[0].getMessage()
    assert all(getattr(model, part).forward.failed for part in ("backbone", "neck", "head"))
    torch.testing.assert_close(first.cls_scores[0], expected.cls_scores[0])
    torch.testing.assert_close(second.bbox_preds[-1], expected.bbox_preds[-1])


def test_compile_false_leaves_the_model_alone():
    model = compile_detector(tiny_detector(), False)
    assert not any(is_compiled(getattr(model, part)) for part in ("backbone", "neck", "head"))


def test_train_and_distill_with_compile_save_plain_checkpoints(tmp_path):
    data_root = generate_digits(tmp_path / "digits", num_train=8, num_val=4, imgsz=64, seed=0)
    data = tmp_path / "digits.yaml"
    data.write_text(yaml.safe_dump({"path": str(data_root), "train": "annotations/instances_train.json",
                                    "val": "annotations/instances_val.json", "names": {i: str(i) for i in range(10)}}))
    settings = {"model": "gfl_r18t.yaml", "data": str(data), "epochs": 1, "batch": 4, "imgsz": 64, "workers": 0,
                "device": "cpu", "project": str(tmp_path / "runs"), "plots": False, "compile": True, "ema": True}
    trainer = Trainer(get_args({**settings, "name": "train"}, "train"))
    trainer.train()
    assert is_compiled(trainer.model.backbone) and is_compiled(trainer.ema.module.backbone)
    ckpt = load_checkpoint(trainer.weights_dir / "last.pt")
    assert not any("_orig_mod" in key for key in ckpt["model"])
    build_detector("gfl_r18t.yaml", 10).load_state_dict(ckpt["model"])  # strict: every key matches a plain model

    distill = DistillTrainer(get_args({**settings, "name": "distill", "teacher": str(trainer.weights_dir / "last.pt")},
                                      "distill"))
    distill.setup()
    assert is_compiled(distill.model.backbone) and is_compiled(distill.teacher.backbone)
    assert not any("_orig_mod" in key for key in distill.state.checkpoint()["model"])
