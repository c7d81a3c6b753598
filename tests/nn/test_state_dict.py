"""Checkpoints load either way: torch -> bnkit, bnkit -> torch, and torch's version-1 format."""

from __future__ import annotations

import copy
import io
from collections import OrderedDict
from typing import Any

import pytest
import torch

from tests.nn.util import assert_matches, twin_layers

OPTIONS: list[dict[str, Any]] = [
    {},
    {"momentum": None},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
]


def _train(layer: torch.nn.Module, rank: int, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (6, 3) + (4,) * (rank - 2)
    layer.train()
    with torch.no_grad():
        for _ in range(steps):
            layer(2 + 3 * torch.randn(shape, generator=g, dtype=torch.float64))
        if getattr(layer, "weight", None) is not None:
            layer.weight.uniform_(0.5, 2.0, generator=g)
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(generator=g)


def _roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Through torch.save/torch.load, as a checkpoint file would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, torch.Tensor] = torch.load(buffer, weights_only=True)
    return loaded


def _same_behaviour(a: torch.nn.Module, b: torch.nn.Module, rank: int) -> None:
    x = torch.randn((5, 3) + (4,) * (rank - 2), dtype=torch.float64)
    for training in (False, True, False):  # eval, one more training step, eval again
        a.train(training)
        b.train(training)
        assert_matches(b(x), a(x))
        for key, value in a.state_dict().items():
            assert_matches(b.state_dict()[key].double(), value.double(), what=key)


@pytest.mark.parametrize("rank", [2, 4, 5])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
@pytest.mark.parametrize("direction", ["torch->bnkit", "bnkit->torch"])
@pytest.mark.slow
def test_checkpoint_loads_either_way(direction: str, options: dict[str, Any], rank: int) -> None:
    theirs, ours = twin_layers(rank, 3, torch.float64, torch_kwargs=options)
    source, target = (theirs, ours) if direction == "torch->bnkit" else (ours, theirs)
    _train(source, rank, steps=3, seed=rank)
    state = _roundtrip(source.state_dict())
    assert list(state) == list(target.state_dict())
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    _same_behaviour(source, target, rank)


@pytest.mark.parametrize("rank", [2, 4])
def test_version_one_checkpoint_without_num_batches_tracked(rank: int) -> None:
    """Checkpoints written before num_batches_tracked existed (version 1) load with strict=True
    in both, and the counter is kept as it was, as torch does."""
    theirs, ours = twin_layers(rank, 3, torch.float64)
    source = copy.deepcopy(theirs)
    _train(source, rank, steps=2, seed=7)
    old = OrderedDict((k, v) for k, v in source.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    for target in (theirs, ours):
        _train(target, rank, steps=1, seed=8)  # a counter that should survive loading
        target.load_state_dict(copy.deepcopy(old), strict=True)
        assert int(target.num_batches_tracked) == 1
    _same_behaviour(theirs, ours, rank)


def test_version_one_checkpoint_inside_a_model() -> None:
    """The same through a parent module's prefix, which is how checkpoints usually come."""

    def model(bn: type[torch.nn.Module]) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3), bn(3)).double()

    import bnkit.nn as bnn

    theirs, ours = model(torch.nn.BatchNorm1d), model(bnn.BatchNorm1d)
    state = theirs.state_dict()
    del state["1.num_batches_tracked"]
    state._metadata["1"]["version"] = 1  # type: ignore[attr-defined]
    ours.load_state_dict(state, strict=True)
    assert int(ours[1].num_batches_tracked) == 0
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_matches(ours(x), theirs(x))


def test_state_dict_metadata_version_is_two() -> None:
    import bnkit.nn as bnn

    state = bnn.BatchNorm2d(3).state_dict()
    assert state._metadata[""]["version"] == 2  # type: ignore[attr-defined]
