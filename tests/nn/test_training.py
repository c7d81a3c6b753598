"""A small CNN trained with torch's batch norm and with bnkit's, from the same start."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bnkit.nn as bnn


def _cnn(bn1d: Any, bn2d: Any, **options: Any) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn2d(8, **options),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        bn2d(8, **options),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 16),
        bn1d(16, **options),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    ).double()


@pytest.mark.parametrize("options", [{}, {"momentum": None}], ids=["default", "cumulative"])
@pytest.mark.slow
def test_training_gives_identical_parameters(options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    theirs = _cnn(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, **options)
    ours = _cnn(bnn.BatchNorm1d, bnn.BatchNorm2d, **options)
    ours.load_state_dict(theirs.state_dict())
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for m in (theirs, ours)
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
        target = torch.randint(0, 4, (8,), generator=g)
        for model, optimizer in zip((theirs, ours), optimizers, strict=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
    state_theirs, state_ours = theirs.state_dict(), ours.state_dict()
    assert list(state_ours) == list(state_theirs)
    for key, value in state_theirs.items():
        if value.dtype == torch.long:
            assert torch.equal(state_ours[key], value), key
        else:
            assert torch.allclose(state_ours[key], value, rtol=1e-11, atol=1e-13), key
    theirs.eval()
    ours.eval()
    x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-11, atol=1e-13)
