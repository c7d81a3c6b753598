"""Numerical helpers shared by the tests: finite differences and error measures."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| relative to the larger of the two max norms."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(actual).max(initial=0.0), np.abs(expected).max(initial=0.0), 1e-300)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, step: np.ndarray | float
) -> np.ndarray:
    """dF/dx by the fourth-order central difference, one element at a time.

    f'(x) ~ (-f(x + 2h) + 8 f(x + h) - 8 f(x - h) + f(x - 2h)) / (12 h): truncation error
    O(h^4), so h can be large enough that rounding in f does not dominate.
    """
    x = np.array(x, dtype=np.float64)
    steps = np.broadcast_to(np.asarray(step, np.float64), x.shape)
    grad = np.empty_like(x)
    for index in np.ndindex(x.shape):
        h = steps[index]
        original = x[index]
        values = []
        for offset in (2 * h, h, -h, -2 * h):
            x[index] = original + offset
            values.append(f(x))
        x[index] = original
        grad[index] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * h)
    return grad


def per_feature_step(x: np.ndarray, fraction: float = 1e-3) -> np.ndarray:
    """A finite-difference step per element: a fraction of its feature's spread."""
    axes = (0, *range(2, x.ndim))
    spread = x.std(axis=axes, keepdims=True)
    spread = np.where(spread > 0, spread, 1.0)
    return np.broadcast_to(fraction * spread, x.shape)


def condition(x: np.ndarray, eps: float = 0.0) -> float:
    """How many times larger the values are than their spread, at worst over the features.

    Normalizing loses log10(condition) digits to the subtraction x - mu: inputs at 1e3 with
    a spread of 1e-2 keep 11 of float64's 16 digits, 2 of float32's 7. The spread is
    sqrt(var + eps), what x - mu is divided by.
    """
    axes = (0, *range(2, x.ndim))
    spread = np.sqrt(x.var(axis=axes) + eps)
    magnitude = np.abs(x).max(axis=axes)
    return float(np.max(np.where(spread > 0, magnitude / np.where(spread > 0, spread, 1), 0)))


def assert_close_to_scale(
    ours: torch.Tensor | None, theirs: torch.Tensor | None, tolerance: float
) -> None:
    """Same shape and dtype, and max |ours - theirs| <= tolerance * max(1, max |theirs|)."""
    assert ours is not None
    assert theirs is not None
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype
    scale = max(1.0, theirs.detach().double().abs().max().item())
    error = (ours.detach().double() - theirs.detach().double()).abs().max().item()
    assert error <= tolerance * scale, f"error {error:.3g} (scale {scale:.3g})"
