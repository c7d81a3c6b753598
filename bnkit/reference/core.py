"""Batch normalization, step by step: training forward, its gradient, inference, running stats.

Notation (per feature c, over the m values of that feature in the batch):

    mu      = (1/m) * sum_i x_i                     batch mean
    var     = (1/m) * sum_i (x_i - mu)**2           batch variance (biased)
    x_hat_i = (x_i - mu) / sqrt(var + eps)          the Z-transform
    y_i     = gamma * x_hat_i + beta                scale and shift, learned per feature

beta takes the place of the bias of the layer before (the Z-transform removes any
constant), gamma restores whatever scale the network wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from bnkit.errors import ShapeError, SingleValueError, format_shape
from bnkit.reference._checks import (
    Array,
    as_input,
    as_mask,
    as_per_feature,
    check_count,
    check_eps,
    check_momentum,
)
from bnkit.reference.stats import Stats, batch_stats


@dataclass(frozen=True)
class Cache:
    """What the backward pass needs from the forward pass.

    Attributes:
        x_hat: the normalized input, shape (N, C, *spatial).
        inv_std: 1 / sqrt(var + eps) per feature, shape (C,).
        gamma: the scale per feature, shape (C,).
        stats: the batch statistics (training) or None (inference: constants).
        mask: the valid positions, shape (N, *spatial), or None for all of them.
    """

    x_hat: Array
    inv_std: Array
    gamma: Array
    stats: Stats | None
    mask: np.ndarray | None = None


def feature_view(v: Array, ndim: int) -> Array:
    """Shape a per-feature vector (C,) to broadcast against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def normalize(
    x: Array, mean: Array, var: Array, gamma: Array, beta: Array, eps: float
) -> tuple[Array, Array, Array]:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per feature. Returns (y, x_hat, inv_std)."""
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - feature_view(mean, x.ndim)) * feature_view(inv_std, x.ndim)
    y = feature_view(gamma, x.ndim) * x_hat + feature_view(beta, x.ndim)
    return y, x_hat, inv_std


def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    eps: float = 1e-5,
    *,
    mask: ArrayLike | None = None,
) -> tuple[Array, Cache]:
    """Batch normalization in training: normalize each feature with the batch's statistics.

    y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, with mu_B and the biased var_B
    taken per feature over the batch axis and all spatial axes.

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        gamma: scale, shape (C,).
        beta: shift, shape (C,).
        eps: added to the variance for numerical safety, > 0.
        mask: optional boolean array of shape (N, *spatial), True marking valid positions.
            The statistics come from the valid positions only; every position, padding
            included, goes through the same per-feature affine map.

    Returns:
        (y, cache): y has x's shape; ``cache.stats`` holds the batch statistics (for the
        running statistics) and the rest is what :func:`batch_norm_backward` needs.

    Raises:
        ShapeError: x not at least 2D, gamma or beta not of shape (C,), a bad mask.
        SingleValueError: one (valid) value per feature: the variance is undefined.
        EmptyBatchError: no (valid) values at all.
        ConfigError: eps <= 0.

    Example:
        >>> x = np.array([[1.0], [2.0], [3.0], [4.0]])  # four outputs of one node
        >>> y, _ = batch_norm_train(x, gamma=[1.0], beta=[0.0])
        >>> np.round(y.ravel(), 3)
        array([-1.342, -0.447,  0.447,  1.342])
    """
    return _train(x, gamma, beta, eps, mask, where="batch_norm_train")


def _train(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    eps: float,
    mask: ArrayLike | None,
    where: str,
) -> tuple[Array, Cache]:
    """batch_norm_train, with errors attributed to ``where`` (a layer, a ghost batch)."""
    x = as_input(x, where)
    channels = x.shape[1]
    gamma = as_per_feature(gamma, channels, "gamma", where)
    beta = as_per_feature(beta, channels, "beta", where)
    eps = check_eps(eps, where)
    valid = as_mask(mask, x, where)

    stats = batch_stats(x, valid)
    check_count(stats.count, x.shape, where, masked=valid is not None)
    y, x_hat, inv_std = normalize(x, stats.mean, stats.var, gamma, beta, eps)
    return y, Cache(x_hat, inv_std, gamma, stats, valid)


def batch_norm_backward(dy: ArrayLike, cache: Cache) -> tuple[Array, Array, Array]:
    """The gradient of batch normalization, given dL/dy: returns (dx, dgamma, dbeta).

    With g = gamma * dy (the gradient reaching x_hat), per feature over its m values:

        dbeta  = sum_i dy_i
        dgamma = sum_i dy_i * x_hat_i
        dx_i   = (1 / sqrt(var + eps)) * (g_i - mean_j(g_j) - x_hat_i * mean_j(g_j * x_hat_j))

    The two subtracted terms are the paths through mu_B and var_B: every output depends
    on every input of its feature. In inference (``cache.stats is None``) the statistics
    are constants, those terms vanish and dx_i = g_i / sqrt(var + eps).

    With a mask, mu_B and var_B depend on the valid inputs only (m = valid count), so the
    two terms apply to valid positions only, while the sums still run over all outputs.
    """
    x_hat = cache.x_hat
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != x_hat.shape:
        raise ShapeError(
            f"batch_norm_backward: expected dy of the output's shape {format_shape(x_hat.shape)}, "
            f"got {format_shape(dy.shape)}"
        )
    axes = (0, *range(2, x_hat.ndim))  # every axis but the feature axis
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)

    g = dy * feature_view(cache.gamma, x_hat.ndim)  # dL/dx_hat
    inv_std = feature_view(cache.inv_std, x_hat.ndim)
    if cache.stats is None:
        return g * inv_std, dgamma, dbeta

    m = cache.stats.count
    mean_g = feature_view(g.sum(axis=axes) / m, x_hat.ndim)
    mean_g_x_hat = feature_view((g * x_hat).sum(axis=axes) / m, x_hat.ndim)
    through_stats = mean_g + x_hat * mean_g_x_hat
    if cache.mask is not None:
        through_stats = through_stats * np.expand_dims(cache.mask, 1)
    dx = inv_std * (g - through_stats)
    return dx, dgamma, dbeta


def batch_norm_eval(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    eps: float = 1e-5,
) -> Array:
    """Batch normalization at test time: normalize with population statistics.

    y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta, one fixed affine map per feature,
    so any batch size works, a single sample included.

    Args:
        x: input of shape (N, C) or (N, C, *spatial); N may be 1.
        mean, var: population statistics per feature (e.g. running_mean, running_var).
        gamma, beta: scale and shift, shape (C,).
        eps: > 0.

    Example:
        >>> batch_norm_eval([[5.0]], mean=[2.5], var=[1.25], gamma=[1.0], beta=[0.0]).item()
        2.23605...
    """
    y, _ = _eval(x, mean, var, gamma, beta, eps, where="batch_norm_eval")
    return y


def _eval(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    eps: float,
    where: str,
) -> tuple[Array, Cache]:
    x = as_input(x, where)
    channels = x.shape[1]
    mean = as_per_feature(mean, channels, "mean", where)
    var = as_per_feature(var, channels, "var", where)
    gamma = as_per_feature(gamma, channels, "gamma", where)
    beta = as_per_feature(beta, channels, "beta", where)
    y, x_hat, inv_std = normalize(x, mean, var, gamma, beta, check_eps(eps, where))
    return y, Cache(x_hat, inv_std, gamma, stats=None)


def update_running_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    count: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    *,
    unbiased: bool = True,
) -> tuple[Array, Array]:
    """Fold one training batch's statistics into the population (running) statistics.

    With a momentum m (PyTorch's convention; Keras and flax use 1 - m):

        running_mean = (1 - m) * running_mean + m * batch_mean
        running_var  = (1 - m) * running_var  + m * batch_var'

    With ``momentum=None``, m = 1 / (num_batches_tracked + 1): the cumulative average,
    i.e. the mean of all batch means and the mean of all batch variances, as in the
    original paper's inference procedure.

    batch_var' is the unbiased variance count / (count - 1) * batch_var by default (an
    unbiased estimate of the population's), or batch_var itself with ``unbiased=False``.

    Args:
        running_mean, running_var: the current population statistics, shape (C,).
        batch_mean, batch_var: this batch's mean and *biased* variance, shape (C,).
        count: how many values per feature the batch statistics came from (>= 2 when
            unbiased).
        momentum: in [0, 1], or None for the cumulative average.
        num_batches_tracked: how many batches the running statistics already hold.
        unbiased: store the unbiased (True) or the biased (False) batch variance.

    Returns:
        (new_running_mean, new_running_var); the inputs are not modified.

    Note:
        PyTorch's momentum=0.1 is Keras' and flax's momentum=0.9.
    """
    where = "update_running_stats"
    running_mean = np.asarray(running_mean, dtype=np.float64)
    channels = running_mean.shape[0] if running_mean.ndim == 1 else -1
    running_var = as_per_feature(running_var, channels, "running_var", where)
    batch_mean = as_per_feature(batch_mean, channels, "batch_mean", where)
    batch_var = as_per_feature(batch_var, channels, "batch_var", where)
    momentum = check_momentum(momentum, where)
    if unbiased and count < 2:
        raise SingleValueError(
            f"{where}: expected count >= 2 for the unbiased variance count / (count - 1), "
            f"got {count}"
        )
    if momentum is None:
        momentum = 1.0 / (num_batches_tracked + 1)
    if unbiased:
        batch_var = batch_var * count / (count - 1)
    new_mean = (1.0 - momentum) * running_mean + momentum * batch_mean
    new_var = (1.0 - momentum) * running_var + momentum * batch_var
    return new_mean, new_var
