"""load_mapped: every source tensor lands where the key map says, and every problem is one counted line."""

import pytest
import torch
from torch import nn

from crosskd.errors import CheckpointError
from crosskd.models.foreign.mapping import load_mapped


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def source_for(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"src.{k}": torch.full_like(v, i + 1.0) for i, (k, v) in enumerate(model.state_dict().items())}


def test_every_tensor_lands_on_its_mapped_target():
    model = small_model()
    source = source_for(model)
    key_map = {f"src.{k}": k for k in model.state_dict()}
    assert load_mapped(model, source, key_map, "x.pth") == len(source)
    for key, tensor in source.items():
        assert torch.equal(model.state_dict()[key_map[key]], tensor.to(model.state_dict()[key_map[key]].dtype))


def test_problems_are_counted_in_one_line():
    model = small_model()
    source = source_for(model)
    source["src.extra"] = torch.zeros(1)
    source["src.0.weight"] = torch.zeros(2, 3, 3, 3)
    del source["src.1.running_var"]
    key_map = {f"src.{k}": k for k in model.state_dict()}
    with pytest.raises(CheckpointError) as error:
        load_mapped(model, source, key_map, "x.pth")
    message = str(error.value)
    assert "\n" not in message
    assert "1 unexpected (src.extra)" in message
    assert "1 mis-shaped (src.0.weight (2, 3, 3, 3)->(4, 3, 3, 3))" in message
    assert "1 missing (1.running_var)" in message


def test_optional_targets_may_stay_and_transforms_apply():
    model = small_model()
    source = {k: v for k, v in source_for(model).items() if not k.endswith("num_batches_tracked")}
    key_map = {f"src.{k}": k for k in model.state_dict()}
    weight = torch.arange(4.0).flip(0)
    source["src.1.weight"] = weight.flip(0)
    load_mapped(model, source, key_map, "x.pth", optional=lambda name: name.endswith("num_batches_tracked"),
                transforms={"src.1.weight": lambda t: t.flip(0)})
    assert torch.equal(model[1].weight.detach(), weight)
