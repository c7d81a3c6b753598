"""A second, independent implementation of batch normalization's equations.

Written differently from ``bnkit.reference`` on purpose: plain Python loops over one
feature's values with exactly rounded sums (``math.fsum``; the mean in exact rational
arithmetic), and a backward pass that walks the computational graph node by node
(x -> mu -> x - mu -> var -> 1/sqrt -> x_hat -> y) instead of the closed-form gradient.
Agreement between the two is evidence that both implement the equations, not that they
share a mistake.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _features(x: np.ndarray) -> list[list[float]]:
    """One list of values per feature (channel), in a fixed order."""
    c = x.shape[1]
    return [[float(v) for v in np.take(x, j, axis=1).ravel()] for j in range(c)]


def _scatter(rows: list[list[float]], like: np.ndarray) -> np.ndarray:
    out = np.empty_like(like, dtype=np.float64)
    for j, row in enumerate(rows):
        index = (slice(None), j)
        out[index] = np.array(row).reshape(np.take(like, j, axis=1).shape)
    return out


def _mean(values: list[float]) -> float:
    """The correctly rounded mean: exact rational arithmetic, one rounding at the end."""
    return float(sum(map(Fraction, values)) / len(values))


def forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float
) -> tuple[np.ndarray, list[float], list[float]]:
    """Training forward; returns (y, batch means, biased batch variances)."""
    ys, means, variances = [], [], []
    for j, values in enumerate(_features(x)):
        m = len(values)
        mu = _mean(values)
        var = math.fsum((v - mu) ** 2 for v in values) / m
        std = math.sqrt(var + eps)
        ys.append([float(gamma[j]) * (v - mu) / std + float(beta[j]) for v in values])
        means.append(mu)
        variances.append(var)
    return _scatter(ys, x), means, variances


def backward(
    dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradient by the chain rule through each node of the graph, one feature at a time."""
    dxs, dgammas, dbetas = [], [], []
    for j, (values, grads) in enumerate(zip(_features(x), _features(dy), strict=True)):
        m = len(values)
        # forward, keeping every intermediate node
        mu = _mean(values)
        centered = [v - mu for v in values]
        var = math.fsum(c * c for c in centered) / m
        std = math.sqrt(var + eps)
        inv_std = 1.0 / std
        x_hat = [c * inv_std for c in centered]
        # y = gamma * x_hat + beta
        dbetas.append(math.fsum(grads))
        dgammas.append(math.fsum(g * h for g, h in zip(grads, x_hat, strict=True)))
        d_x_hat = [float(gamma[j]) * g for g in grads]
        # x_hat = centered * inv_std
        d_inv_std = math.fsum(d * c for d, c in zip(d_x_hat, centered, strict=True))
        d_centered = [d * inv_std for d in d_x_hat]
        # inv_std = (var + eps) ** -0.5
        d_var = d_inv_std * -0.5 * (var + eps) ** -1.5
        # var = sum(centered ** 2) / m
        d_centered = [d + d_var * 2.0 * c / m for d, c in zip(d_centered, centered, strict=True)]
        # centered = x - mu, mu = sum(x) / m
        d_mu = -math.fsum(d_centered)
        dxs.append([d + d_mu / m for d in d_centered])
    return _scatter(dxs, x), np.array(dgammas), np.array(dbetas)
