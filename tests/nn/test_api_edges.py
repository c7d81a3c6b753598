"""Bad arguments get a bnkit error naming the layer or function, what was expected and
what came; integer-like NumPy scalars are accepted where an integer is expected."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import bnkit
from bnkit import errors
from bnkit.functional import Renorm, batch_norm

X = torch.randn(8, 3)


def _layer(**options: object) -> bnkit.BatchNorm1d:
    return bnkit.BatchNorm1d(3, **options)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("numpy input", lambda: _layer()(np.zeros((8, 3))), errors.DTypeError, "BatchNorm1d(3)"),
    (
        "list weight",
        lambda: batch_norm(X, None, None, [1.0, 1.0, 1.0], None, training=True),
        errors.DTypeError,
        "weight to be a torch.Tensor",
    ),
    (
        "numpy bias",
        lambda: batch_norm(X, None, None, None, np.ones(3), training=True),
        errors.DTypeError,
        "got ndarray",
    ),
    (
        "int counter",
        lambda: batch_norm(
            X,
            torch.zeros(3),
            torch.ones(3),
            training=True,
            momentum=None,
            num_batches_tracked=3,
        ),
        errors.DTypeError,
        "num_batches_tracked",
    ),
    (
        "counter of shape (2,)",
        lambda: batch_norm(
            X,
            torch.zeros(3),
            torch.ones(3),
            training=True,
            momentum=None,
            num_batches_tracked=torch.zeros(2, dtype=torch.long),
        ),
        errors.ShapeError,
        "got shape (2,)",
    ),
    (
        "devices",
        lambda: batch_norm(
            X, torch.zeros(3, device="meta"), torch.ones(3, device="meta"), training=True
        ),
        errors.DeviceMismatchError,
        "running_mean on the input's device cpu, got meta",
    ),
    (
        "Renorm r_max string",
        lambda: Renorm(r_max="3"),
        errors.ConfigError,
        "Renorm: expected r_max",
    ),
    (
        "infinite activation_param",
        lambda: _layer(activation="elu", activation_param=float("inf")),
        errors.ConfigError,
        "finite",
    ),
    (
        "complex weight",
        lambda: batch_norm(
            X, None, None, torch.ones(3, dtype=torch.complex64), None, training=True
        ),
        errors.DTypeError,
        "complex64",
    ),
    ("complex layer", lambda: _layer(dtype=torch.complex64), errors.DTypeError, "complex64"),
    ("frozen='yes'", lambda: _layer(frozen="yes"), errors.ConfigError, "frozen"),
    (
        "functional sync=1",
        lambda: batch_norm(X, None, None, training=True, sync=1),
        errors.ConfigError,
        "sync to be True or False",
    ),
    ("NaN momentum", lambda: _layer(momentum=float("nan")), errors.ConfigError, "momentum"),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_argument_gets_a_named_error(
    case: str, call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_numpy_integers_are_integers() -> None:
    layer = _layer(ghost_batch_size=np.int64(4))
    assert layer.ghost_batch_size == 4
    assert type(layer.ghost_batch_size) is int
    reference = _layer(ghost_batch_size=4)
    torch.testing.assert_close(layer(X), reference(X))
    functional = batch_norm(X, None, None, training=True, ghost_batch_size=np.int64(4))
    torch.testing.assert_close(functional, reference(X))
    renorm = Renorm(warmup_steps=np.int64(0), r_max_steps=np.int64(0), d_max_steps=np.int64(0))
    assert renorm == Renorm(warmup_steps=0, r_max_steps=0, d_max_steps=0)


def test_layer_settings_are_validated_again_when_set() -> None:
    """A layer's extras are one Options object, made again after a setting changes."""
    import dataclasses

    from bnkit.functional import Options
    from bnkit.nn import OPTION_NAMES

    assert tuple(f.name for f in dataclasses.fields(Options))[1:] == OPTION_NAMES
    layer = _layer(ghost_batch_size=4)
    first = layer.options
    assert first is layer.options  # kept while nothing changes
    assert first.where == "BatchNorm1d(3)"
    layer.ghost_batch_size = 2
    assert layer.options.ghost_batch_size == 2
    layer.activation = "swish"
    with pytest.raises(errors.ConfigError, match=r"^BatchNorm1d\(3\): unknown activation"):
        layer(X)
