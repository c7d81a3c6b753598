"""Every error names where it happened, what was expected and what came."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import bnkit.nn as bnn
from bnkit.errors import (
    BatchNormError,
    ConfigError,
    DTypeError,
    ShapeError,
    SingleValueError,
)
from bnkit.functional import batch_norm


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (
            bnn.BatchNorm2d(64),
            (8, 64, 32),
            "BatchNorm2d(64): expected 4D input (N, C, H, W), got 3D input of shape (8, 64, 32)",
        ),
        (
            bnn.BatchNorm1d(5),
            (2, 5, 3, 3),
            "BatchNorm1d(5): expected 2D input (N, C) or 3D input (N, C, L), "
            "got 4D input of shape (2, 5, 3, 3)",
        ),
        (
            bnn.BatchNorm3d(2),
            (2, 2, 3, 3),
            "BatchNorm3d(2): expected 5D input (N, C, D, H, W), got 4D input of shape (2, 2, 3, 3)",
        ),
        (
            bnn.BatchNorm1d(5),
            (7,),
            "BatchNorm1d(5): expected 2D input (N, C) or 3D input (N, C, L), "
            "got 1D input of shape (7,)",
        ),
    ],
)
def test_wrong_rank(layer: bnn.BatchNormNd, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ShapeError) as info:
        layer(torch.randn(shape))
    assert str(info.value) == message


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channels(training: bool) -> None:
    layer = bnn.BatchNorm2d(64).train(training)
    with pytest.raises(ShapeError) as info:
        layer(torch.randn(8, 32, 4, 4))
    assert str(info.value) == (
        "BatchNorm2d(64): expected 64 channels in dimension 1, "
        "got 32 in input of shape (8, 32, 4, 4)"
    )


def test_wrong_channels_without_any_per_channel_tensor() -> None:
    # torch accepts any channel count here (nothing to mismatch); the declared size is checked.
    layer = bnn.BatchNorm1d(3, affine=False, track_running_stats=False)
    with pytest.raises(ShapeError, match=r"expected 3 channels in dimension 1, got 4"):
        layer(torch.randn(5, 4))


def test_eps_rules_match_torch_with_better_errors() -> None:
    with pytest.raises(ConfigError, match=r"^BatchNorm2d\(3\): expected eps >= 0, got eps=-0.001$"):
        bnn.BatchNorm2d(3, eps=-1e-3)
    with pytest.raises(ConfigError, match="expected eps >= 0"):
        bnn.BatchNorm2d(3, eps=float("nan"))
    layer = bnn.BatchNorm2d(3, eps=0.0)  # like torch: valid for eval
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ConfigError) as info:
        layer(x)
    assert str(info.value).startswith(
        "BatchNorm2d(3): expected eps > 0 when normalizing with batch"
    )
    assert "got eps=0.0" in str(info.value)
    with pytest.raises(ValueError, match="eps must be positive"):  # torch rejects it too
        torch.nn.BatchNorm2d(3, eps=0.0)(x)
    layer.eval()
    assert torch.isfinite(layer(x)).all()
    assert torch.isfinite(layer.freeze().train()(x)).all()  # frozen: population statistics
    with pytest.raises(ConfigError, match=r"^batch_norm: expected eps >= 0"):
        batch_norm(x, torch.zeros(3), torch.ones(3), eps=-1.0)


@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), "0.1", True])
def test_momentum_not_a_finite_number(momentum: Any) -> None:
    # Finite values outside [0, 1] are accepted, as torch accepts them, with a warning
    # when they are used (tests/nn/test_transforms.py).
    with pytest.raises(ConfigError) as info:
        bnn.BatchNorm1d(3, momentum=momentum)
    assert str(info.value).startswith("BatchNorm1d(3): expected momentum to be a number")
    assert repr(momentum) in str(info.value)
    with pytest.raises(ConfigError, match=r"^batch_norm: expected momentum to be a number"):
        batch_norm(torch.randn(4, 3), None, None, training=True, momentum=momentum)


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("running_var_estimator", "sample", "'unbiased', 'biased'"),
        ("single_sample", "skip", "'raise', 'running', 'identity'"),
        ("single_sample", None, "'raise', 'running', 'identity'"),
    ],
)
def test_unknown_option_values_list_the_allowed_ones(option: str, value: Any, choices: str) -> None:
    with pytest.raises(ConfigError) as info:
        bnn.BatchNorm2d(8, **{option: value})
    assert (
        str(info.value) == f"BatchNorm2d(8): unknown {option}={value!r}; expected one of {choices}"
    )
    # Options changed after construction are checked at the next call.
    layer = bnn.BatchNorm2d(8)
    setattr(layer, option, value)
    with pytest.raises(ConfigError, match=re.escape(f"unknown {option}={value!r}")):
        layer(torch.randn(2, 8, 2, 2))


def test_skip_nonfinite_must_be_a_bool() -> None:
    with pytest.raises(
        ConfigError, match=r"expected skip_nonfinite to be True or False, got 'yes'"
    ):
        bnn.BatchNorm1d(2, skip_nonfinite="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("num_features", [-1, 2.5, True])
def test_bad_num_features(num_features: Any) -> None:
    with pytest.raises(ConfigError, match="expected num_features to be an int >= 0"):
        bnn.BatchNorm1d(num_features)


def test_integer_input() -> None:
    with pytest.raises(DTypeError) as info:
        bnn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    assert str(info.value) == (
        "BatchNorm1d(3): expected a floating-point input (float16, bfloat16, float32, float64), "
        "got dtype torch.int64"
    )
    assert isinstance(info.value, TypeError)


def test_functional_shape_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ShapeError) as info:
        batch_norm(x, torch.zeros(5), torch.ones(3))
    assert str(info.value) == (
        "batch_norm: expected running_mean of shape (3,) to match the 3 channels of the input "
        "of shape (4, 3), got shape (5,)"
    )
    with pytest.raises(ShapeError, match=r"expected weight of shape \(3,\).*got shape \(3, 1\)"):
        batch_norm(x, None, None, torch.ones(3, 1), training=True)
    with pytest.raises(ShapeError, match=r"got 1D input of shape \(4,\)"):
        batch_norm(torch.randn(4), None, None, training=True)
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor input, got list"):
        batch_norm([[1.0, 2.0]], None, None)  # type: ignore[arg-type]


def test_functional_missing_statistics() -> None:
    with pytest.raises(ConfigError, match=r"expected running_mean and running_var .* got None"):
        batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(ConfigError, match=r"momentum=None .* needs num_batches_tracked"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


def test_single_value_error_names_layer_shape_and_options() -> None:
    with pytest.raises(SingleValueError) as info:
        bnn.BatchNorm2d(16)(torch.randn(1, 16, 1, 1))
    message = str(info.value)
    assert message.startswith(
        "BatchNorm2d(16): expected more than 1 value per channel when training, "
        "got input of shape (1, 16, 1, 1)"
    )
    assert "single_sample= from 'raise', 'running', 'identity'" in message


def test_every_error_is_a_value_error() -> None:
    for error in (ConfigError, DTypeError, ShapeError, SingleValueError):
        assert issubclass(error, BatchNormError)
        assert issubclass(error, ValueError)
