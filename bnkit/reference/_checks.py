"""Input validation for the reference: every error says where, what was expected, what came."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bnkit.errors import ConfigError, EmptyBatchError, ShapeError, SingleValueError, format_shape

Array = NDArray[np.float64]


def as_input(x: ArrayLike, where: str) -> Array:
    """The input as a float64 array of shape (N, C, *spatial)."""
    if np.iscomplexobj(x):
        raise ShapeError(f"{where}: expected a real input, got a complex array")
    array = np.asarray(x, dtype=np.float64)
    if array.ndim < 2:
        raise ShapeError(
            f"{where}: expected an input of shape (N, C) or (N, C, *spatial), "
            f"got {array.ndim}D input of shape {format_shape(array.shape)}"
        )
    return array


def as_per_feature(value: ArrayLike, channels: int, name: str, where: str) -> Array:
    """A per-feature vector (gamma, beta, a running statistic) of shape (C,)."""
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (channels,):
        raise ShapeError(
            f"{where}: expected {name} of shape ({channels},) to match the input's "
            f"{channels} channels, got shape {format_shape(array.shape)}"
        )
    return array


def as_mask(mask: ArrayLike | None, x: Array, where: str) -> NDArray[np.bool_] | None:
    """A boolean mask over the (N, *spatial) positions of x, True where values are valid."""
    if mask is None:
        return None
    array = np.asarray(mask)
    expected = (x.shape[0], *x.shape[2:])
    if array.dtype != np.bool_:
        raise ShapeError(
            f"{where}: expected a boolean mask (True = valid), got dtype {array.dtype}"
        )
    if array.shape != expected:
        raise ShapeError(
            f"{where}: expected a mask of shape (N, *spatial) = {format_shape(expected)} "
            f"for input of shape {format_shape(x.shape)}, got {format_shape(array.shape)}"
        )
    return array


def check_eps(eps: float, where: str) -> float:
    if not eps > 0:  # also rejects NaN
        raise ConfigError(
            f"{where}: expected eps > 0 (it keeps 1/sqrt(var + eps) finite), got {eps}"
        )
    return float(eps)


def check_momentum(momentum: float | None, where: str) -> float | None:
    if momentum is None:
        return None
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(
            f"{where}: expected momentum in [0, 1] (new = (1 - m) * old + m * batch) or None "
            f"(cumulative average), got {momentum}"
        )
    return float(momentum)


def check_count(count: int, shape: tuple[int, ...], where: str, masked: bool) -> None:
    """Training needs at least two values per feature for a variance."""
    values = "valid values" if masked else "values"
    if count == 0:
        raise EmptyBatchError(
            f"{where}: expected at least two {values} per feature to compute batch statistics, "
            f"got none (input of shape {format_shape(shape)})"
        )
    if count == 1:
        raise SingleValueError(
            f"{where}: expected at least two {values} per feature in training, got one "
            f"(input of shape {format_shape(shape)}): the variance of a single value is "
            "undefined. Use a batch of two or more samples, or normalize with the population "
            "statistics (evaluation mode)."
        )
