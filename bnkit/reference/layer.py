"""A small stateful batch-norm layer: the whole story of training and test time in NumPy."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from bnkit.errors import ConfigError, ShapeError, format_choices, format_shape
from bnkit.reference._checks import Array, as_input, check_eps, check_momentum
from bnkit.reference.core import (
    Cache,
    _eval,
    _train,
    batch_norm_backward,
    update_running_stats,
)

RUNNING_VAR_ESTIMATORS = ("unbiased", "biased")


class BatchNorm:
    """Batch normalization with learned gamma, beta and population statistics.

    In training, each feature is normalized with the batch's mean and biased variance and
    the population statistics (``running_mean``, ``running_var``) are updated from them;
    at test time the population statistics are used instead, so one sample is enough.

    Args:
        num_features: C, the number of features (channels).
        eps: added to the variance, > 0.
        momentum: the running statistics' update rate in [0, 1] (PyTorch's convention:
            new = (1 - m) * old + m * batch), or None for the cumulative average.
        affine: learn gamma and beta; otherwise gamma = 1, beta = 0 and their gradients
            are not recorded.
        running_var_estimator: "unbiased" (PyTorch) or "biased" (Keras, flax): which
            batch variance ``running_var`` accumulates.

    Attributes:
        gamma, beta: scale and shift, shape (C,), initialized to 1 and 0.
        running_mean, running_var: population statistics, initialized to 0 and 1.
        num_batches_tracked: training batches folded into the running statistics.
        dgamma, dbeta: gradients left by the last :meth:`backward` (None before).

    Shape:
        input (N, C) or (N, C, *spatial); output the same.

    Example:
        >>> bn = BatchNorm(1)
        >>> d = np.array([[1.0], [2.0], [3.0], [4.0]])  # one node, a batch of four
        >>> z = bn.forward(d)  # training: batch statistics, mean 0 and variance 1
        >>> dx = bn.backward(np.ones_like(z))
        >>> bn.running_mean, bn.running_var  # 0.9 * (0, 1) + 0.1 * (2.5, 5/3)
        (array([0.25]), array([1.06666667]))
        >>> bn.forward(np.array([[5.0]]), training=False).shape  # one test sample
        (1, 1)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        running_var_estimator: str = "unbiased",
    ) -> None:
        where = f"BatchNorm({num_features})"
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise ConfigError(f"BatchNorm: expected an integer num_features, got {num_features!r}")
        if num_features < 1:
            raise ConfigError(f"BatchNorm: expected num_features >= 1, got {num_features}")
        if running_var_estimator not in RUNNING_VAR_ESTIMATORS:
            raise ConfigError(
                f"{where}: expected running_var_estimator in "
                f"{format_choices(RUNNING_VAR_ESTIMATORS)}, got {running_var_estimator!r}"
            )
        self.num_features = int(num_features)
        self.eps = check_eps(eps, where)
        self.momentum = check_momentum(momentum, where)
        self.affine = affine
        self.running_var_estimator = running_var_estimator
        self.gamma: Array = np.ones(num_features)
        self.beta: Array = np.zeros(num_features)
        self.running_mean: Array = np.zeros(num_features)
        self.running_var: Array = np.ones(num_features)
        self.num_batches_tracked = 0
        self.dgamma: Array | None = None
        self.dbeta: Array | None = None
        self._cache: Cache | None = None

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine})"
        )

    def forward(self, x: ArrayLike, training: bool = True) -> Array:
        """Normalize x: with batch statistics (training) or population statistics (test).

        Raises:
            ShapeError: x not (N, C, ...) with C == num_features.
            SingleValueError: training on one value per feature (use training=False).
        """
        x = as_input(x, repr(self))
        if x.shape[1] != self.num_features:
            raise ShapeError(
                f"{self!r}: expected input with {self.num_features} channels (N, "
                f"{self.num_features}, ...), got shape {format_shape(x.shape)}"
            )
        if not training:
            y, self._cache = _eval(
                x, self.running_mean, self.running_var, self.gamma, self.beta, self.eps, repr(self)
            )
            return y

        y, self._cache = _train(x, self.gamma, self.beta, self.eps, None, repr(self))
        stats = self._cache.stats
        assert stats is not None
        self.running_mean, self.running_var = update_running_stats(
            self.running_mean,
            self.running_var,
            stats.mean,
            stats.var,
            stats.count,
            self.momentum,
            self.num_batches_tracked,
            unbiased=self.running_var_estimator == "unbiased",
        )
        self.num_batches_tracked += 1
        return y

    def backward(self, dy: ArrayLike) -> Array:
        """Back-propagate dL/dy through the last forward pass; returns dL/dx.

        Leaves dL/dgamma and dL/dbeta in ``dgamma`` and ``dbeta`` (when affine).
        """
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward() called before forward()")
        dx, dgamma, dbeta = batch_norm_backward(dy, self._cache)
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx
