"""freeze and unfreeze: statistics fixed under train(), affine parameters optional."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit
from bnkit.errors import ConfigError
from bnkit.tools import freeze, unfreeze
from tests.tools.models import resnet


def test_frozen_model_keeps_its_statistics_under_train() -> None:
    model = resnet()
    reference = copy.deepcopy(model).eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model = freeze(model).train()
    assert all(m.frozen for m in model.modules() if isinstance(m, bnkit.nn.BatchNormNd))
    x = torch.randn(4, 3, 8, 8)
    output = model(x)
    # train mode now computes what eval mode did, and records nothing
    torch.testing.assert_close(output, reference(x), rtol=1e-5, atol=1e-5)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    output.sum().backward()
    assert model.stem_bn.weight.grad is not None  # gamma and beta still train


def test_affine_parameters_freeze_and_unfreeze_too() -> None:
    model = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), affine=True)
    assert not model[1].weight.requires_grad
    assert not model[1].bias.requires_grad
    assert model[0].weight.requires_grad
    unfreeze(model, affine=True)
    assert model[1].weight.requires_grad
    assert not model[1].frozen


def test_unfreeze_lets_training_update_statistics_again() -> None:
    model = freeze(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    unfreeze(model).train()
    model(torch.randn(8, 3))
    assert int(model[1].num_batches_tracked) == 1
    assert isinstance(model[1], bnkit.BatchNorm1d)  # stays bnkit's
    assert model[1].weight.requires_grad


def test_freeze_keeps_parameter_objects_and_returns_a_converted_root() -> None:
    layer = nn.BatchNorm2d(3)
    frozen = freeze(layer)
    assert isinstance(frozen, bnkit.BatchNorm2d)
    assert frozen.frozen
    assert frozen.weight is layer.weight


def test_layers_without_statistics_cannot_be_frozen() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ConfigError, match=r"'1' \(BatchNorm1d\(3\)\) keeps no running statistics"):
        freeze(model)
    assert type(model[0]) is nn.BatchNorm1d  # nothing modified


def test_unconvertible_subclasses_are_refused() -> None:
    class Custom(nn.BatchNorm1d):
        pass

    with pytest.raises(ConfigError, match="subclass of torch's batch norm"):
        freeze(nn.Sequential(Custom(3)))
