"""The behaviours PyTorch's own batch norm tests check, run against bnkit's layers.

Each test states a behaviour of ``torch.nn.BatchNorm*d`` / ``F.batch_norm`` (the cases
torch's test suite covers: too few values, mismatched sizes, statistics not tracked,
the cumulative average, eval, half-precision overflow, version-1 checkpoints, zero-size
batches) and checks that bnkit's layer behaves the same way, raising exceptions that
``except`` clauses written for torch still catch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import bnkit
from bnkit.functional import batch_norm


@pytest.mark.parametrize(
    ("call", "torch_type"),
    [
        (lambda bn, f: bn[1](3)(torch.randn(1, 3)), ValueError),  # one value per channel
        (lambda bn, f: bn[1](3)(torch.randn(1, 3, 1)), ValueError),
        (lambda bn, f: bn[2](3)(torch.randn(2, 3, 4)), ValueError),  # wrong rank
        (lambda bn, f: bn[1](3)(torch.randn(3)), ValueError),
        (lambda bn, f: bn[2](3)(torch.randn(2, 4, 4, 4)), RuntimeError),  # channel count
        (
            lambda bn, f: f(torch.randn(4, 3), torch.zeros(4), torch.ones(3), training=True),
            RuntimeError,
        ),
        (
            lambda bn, f: f(torch.randn(4, 3), torch.zeros(3), torch.ones(4), training=True),
            RuntimeError,
        ),
        (
            lambda bn, f: f(
                torch.randn(4, 3), torch.zeros(3), torch.ones(3), torch.ones(4), training=True
            ),
            RuntimeError,
        ),
        (
            lambda bn, f: f(
                torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, torch.ones(4), training=True
            ),
            RuntimeError,
        ),
        (lambda bn, f: f(torch.randn(4, 3), None, None, training=True, eps=0.0), ValueError),
        (lambda bn, f: bn[1](3, eps=-1.0)(torch.randn(4, 3)), ValueError),
        (lambda bn, f: f(torch.randn(4, 3), None, None, training=False), RuntimeError),
    ],
    ids=[
        "single-value",
        "single-value-3d",
        "rank-2d",
        "rank-1d",
        "channels",
        "running-mean-size",
        "running-var-size",
        "weight-size",
        "bias-size",
        "eps-zero",
        "eps-negative",
        "eval-without-statistics",
    ],
)
def test_rejects_what_torch_rejects_with_the_same_exception_type(
    call: Any, torch_type: type[Exception]
) -> None:
    torch_layers = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}
    bnkit_layers = {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d}
    with pytest.raises(torch_type):
        call(torch_layers, F.batch_norm)
    with pytest.raises(torch_type) as raised:
        call(bnkit_layers, batch_norm)
    assert isinstance(raised.value, bnkit.errors.BatchNormError)


def test_statistics_not_tracked_use_the_batch_in_train_and_eval() -> None:
    layer = bnkit.BatchNorm2d(3, track_running_stats=False)
    assert layer.running_mean is None
    assert layer.running_var is None
    assert layer.num_batches_tracked is None
    x = torch.randn(4, 3, 2, 2)
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)


def test_cumulative_average_with_momentum_none() -> None:
    layer, reference = bnkit.BatchNorm1d(5, momentum=None), torch.nn.BatchNorm1d(5, momentum=None)
    batches = [torch.randn(8, 5) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
        reference(x)
    means = torch.stack([x.mean(0) for x in batches]).mean(0)
    variances = torch.stack([x.var(0) for x in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, means)
    torch.testing.assert_close(layer.running_var, variances)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == 4


def test_update_stats_and_eval_formula() -> None:
    layer = bnkit.BatchNorm2d(3, momentum=0.3)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.3 * x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * x.var((0, 2, 3)))
    layer.eval()
    y = layer(x)
    view = (1, 3, 1, 1)
    expected = (x - layer.running_mean.view(view)) / torch.sqrt(layer.running_var.view(view) + 1e-5)
    torch.testing.assert_close(y, expected * layer.weight.view(view) + layer.bias.view(view))


def test_half_precision_does_not_overflow() -> None:
    """Values whose squares overflow float16 still give finite, correct statistics."""
    x = torch.linspace(-300, 300, 4 * 2 * 64).view(4, 2, 64).half()  # 300**2 > 65504
    layer = bnkit.BatchNorm1d(2).half()
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(
        y.float(), F.batch_norm(x.float(), None, None, training=True), atol=5e-3, rtol=0
    )


def test_loads_version_one_checkpoint_without_counter() -> None:
    old = torch.nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    layer = bnkit.BatchNorm2d(3)
    layer._load_from_state_dict(old, "", {"version": 1}, True, [], [], [])
    assert int(layer.num_batches_tracked) == 0


def test_zero_size_batch_gives_empty_output_and_zero_gradients() -> None:
    for torch_layer, bnkit_layer, shape in [
        (torch.nn.BatchNorm1d(4), bnkit.BatchNorm1d(4), (0, 4)),
        (torch.nn.BatchNorm2d(4), bnkit.BatchNorm2d(4), (0, 4, 3, 3)),
    ]:
        x = torch.randn(shape, requires_grad=True)
        y, y_torch = bnkit_layer(x), torch_layer(x)
        assert y.shape == y_torch.shape == shape
        y.sum().backward()
        torch.testing.assert_close(bnkit_layer.weight.grad, torch.zeros(4))
        assert int(bnkit_layer.num_batches_tracked) == int(torch_layer.num_batches_tracked)
