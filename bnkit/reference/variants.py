"""The oracles of batch normalization's remedies for small and awkward batches.

- Ghost batch normalization (Hoffer, Hubara and Soudry, 2017): each consecutive chunk of
  ``ghost_batch_size`` samples is normalized with its own statistics.
- Batch renormalization (Ioffe, 2017): the batch-normalized values are corrected towards
  what the population statistics would give, x_hat = x_hat_B * r + d, with r and d
  clipped and held constant in the backward pass.

Masks (padded positions) are a keyword of :func:`~bnkit.reference.batch_norm_train`;
the statistics of shards merge with :func:`~bnkit.reference.merge_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from bnkit.errors import ConfigError
from bnkit.reference._checks import Array, as_input, as_mask, as_per_feature, check_eps
from bnkit.reference.core import (
    Cache,
    _train,
    batch_norm_backward,
    batch_norm_train,
    feature_view,
)
from bnkit.reference.stats import Stats, merge_stats

# --------------------------------------------------------------------------- ghost batches


@dataclass(frozen=True)
class GhostCache:
    """The per-chunk caches of a ghost-batch forward pass, and the merged statistics.

    Attributes:
        chunks: one :class:`Cache` per ghost batch, in batch order.
        stats: the statistics of all chunks merged, i.e. of the whole batch: what the
            running statistics are updated from (once per call, weighted by counts).
    """

    chunks: list[Cache]
    stats: Stats


def ghost_batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    ghost_batch_size: int,
    eps: float = 1e-5,
    *,
    mask: ArrayLike | None = None,
) -> tuple[Array, GhostCache]:
    """Ghost batch normalization: normalize each chunk of ``ghost_batch_size`` samples alone.

    The batch is cut along its first axis into consecutive chunks of ghost_batch_size
    samples; when N is not a multiple, the last chunk is smaller (it must still hold two
    values per feature). Each chunk is batch-normalized with its own statistics, which
    adds the noise of a small batch (its regularizing effect) to a large batch's step.
    ghost_batch_size >= N is plain batch normalization.

    The running statistics are updated once per call from ``cache.stats``: the chunks'
    (count, mean, M2) merged with Chan's formula, which equals the whole batch's
    statistics; the unbiased correction uses the total count.

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        gamma, beta: shape (C,).
        ghost_batch_size: samples per chunk, >= 1.
        eps: > 0.
        mask: optional boolean (N, *spatial) array of valid positions, cut like x.

    Returns:
        (y, cache) for :func:`ghost_batch_norm_backward`.
    """
    where = "ghost_batch_norm_train"
    x = as_input(x, where)
    valid = as_mask(mask, x, where)
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, (int, np.integer)):
        raise ConfigError(
            f"{where}: expected an integer ghost_batch_size, got {ghost_batch_size!r}"
        )
    if ghost_batch_size < 1:
        raise ConfigError(f"{where}: expected ghost_batch_size >= 1, got {ghost_batch_size}")

    outputs, chunks = [], []
    starts = range(0, max(x.shape[0], 1), ghost_batch_size)
    for number, start in enumerate(starts, 1):
        part = slice(start, start + ghost_batch_size)
        chunk = f"{where} (ghost batch {number} of {len(starts)})"
        y, cache = _train(x[part], gamma, beta, eps, None if valid is None else valid[part], chunk)
        outputs.append(y)
        chunks.append(cache)
    stats = merge_stats(c.stats for c in chunks if c.stats is not None)
    return np.concatenate(outputs, axis=0), GhostCache(chunks, stats)


def ghost_batch_norm_backward(dy: ArrayLike, cache: GhostCache) -> tuple[Array, Array, Array]:
    """The gradient of ghost batch normalization: each chunk's own, dgamma and dbeta summed."""
    dy = np.asarray(dy, dtype=np.float64)
    channels = cache.stats.mean.shape[0]
    dxs, dgamma, dbeta = [], np.zeros(channels), np.zeros(channels)
    start = 0
    for chunk in cache.chunks:
        stop = start + chunk.x_hat.shape[0]
        dx, dg, db = batch_norm_backward(dy[start:stop], chunk)
        dxs.append(dx)
        dgamma, dbeta = dgamma + dg, dbeta + db
        start = stop
    return np.concatenate(dxs, axis=0), dgamma, dbeta


# ------------------------------------------------------------------------ batch renorm


@dataclass(frozen=True)
class RenormCache:
    """A batch-renorm forward pass: the plain batch-norm cache and the corrections.

    Attributes:
        batch: the cache of the plain batch normalization (x_hat_B, the batch statistics).
        r: per-feature scale correction, clipped, shape (C,).
        d: per-feature shift correction, clipped, shape (C,).
    """

    batch: Cache
    r: Array
    d: Array

    @property
    def stats(self) -> Stats | None:
        return self.batch.stats


def renorm_limits(
    step: int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> tuple[float, float]:
    """The clipping limits (r_max, d_max) of batch renorm at a training step.

    The schedule of Ioffe (2017): plain batch normalization (r_max = 1, d_max = 0) for the
    first ``warmup_steps`` steps, then r_max grows linearly to its final value at step
    ``r_max_steps`` and d_max to its final value at step ``d_max_steps``. A final step at
    or before the warm-up's end means the final value right after the warm-up, so
    ``warmup_steps = r_max_steps = d_max_steps = 0`` gives the final limits from the start.

    Args:
        step: the number of training batches seen before this one (num_batches_tracked).

    Example:
        >>> renorm_limits(0), renorm_limits(5000), renorm_limits(22500), renorm_limits(10**6)
        ((1.0, 0.0), (1.0, 0.0), (2.0, 4.375), (3.0, 5.0))
    """
    if r_max < 1.0:
        raise ConfigError(f"renorm_limits: expected r_max >= 1, got {r_max}")
    if d_max < 0.0:
        raise ConfigError(f"renorm_limits: expected d_max >= 0, got {d_max}")
    steps = {"warmup_steps": warmup_steps, "r_max_steps": r_max_steps, "d_max_steps": d_max_steps}
    for name, value in steps.items():
        if value < 0:
            raise ConfigError(f"renorm_limits: expected {name} >= 0, got {value}")

    if step < warmup_steps:
        return 1.0, 0.0

    def progress(final_step: int) -> float:
        """From 0 at the end of the warm-up, linearly up to 1 at final_step."""
        if final_step <= warmup_steps:
            return 1.0
        return min(1.0, (step - warmup_steps) / (final_step - warmup_steps))

    return 1.0 + (r_max - 1.0) * progress(r_max_steps), d_max * progress(d_max_steps)


def batch_renorm_train(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    r_max: float,
    d_max: float,
    eps: float = 1e-5,
    *,
    mask: ArrayLike | None = None,
) -> tuple[Array, RenormCache]:
    """Batch renormalization (Ioffe, 2017) in training.

    With the batch's sigma_B = sqrt(var_B + eps) and the population's
    sigma = sqrt(running_var + eps):

        r     = clip(sigma_B / sigma, 1 / r_max, r_max)
        d     = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mu_B) / sigma_B * r + d
        y     = gamma * x_hat + beta

    Unclipped, x_hat = (x - running_mean) / sigma: training then normalizes as inference
    will. r and d are treated as constants in the backward pass (the gradient still flows
    through mu_B and sigma_B). r_max = 1, d_max = 0 is plain batch normalization.

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        gamma, beta: shape (C,).
        running_mean, running_var: the population statistics before this batch, (C,).
        r_max: >= 1. d_max: >= 0 (see :func:`renorm_limits` for the schedule).
        eps: > 0.
        mask: optional boolean (N, *spatial) array of valid positions.

    Returns:
        (y, cache) for :func:`batch_renorm_backward`; ``cache.stats`` are the batch
        statistics the running statistics are updated from, as in plain batch norm.
    """
    where = "batch_renorm_train"
    if r_max < 1.0:
        raise ConfigError(f"{where}: expected r_max >= 1, got {r_max}")
    if d_max < 0.0:
        raise ConfigError(f"{where}: expected d_max >= 0, got {d_max}")
    x = as_input(x, where)
    channels = x.shape[1]
    gamma = as_per_feature(gamma, channels, "gamma", where)
    beta = as_per_feature(beta, channels, "beta", where)
    running_mean = as_per_feature(running_mean, channels, "running_mean", where)
    running_var = as_per_feature(running_var, channels, "running_var", where)
    eps = check_eps(eps, where)

    # Plain batch norm first (gamma = 1, beta = 0 gives x_hat_B itself), then correct it.
    _, batch = batch_norm_train(x, np.ones(channels), np.zeros(channels), eps, mask=mask)
    assert batch.stats is not None
    sigma_batch = np.sqrt(batch.stats.var + eps)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
    d = np.clip((batch.stats.mean - running_mean) / sigma, -d_max, d_max)

    x_hat = batch.x_hat * feature_view(r, x.ndim) + feature_view(d, x.ndim)
    y = feature_view(gamma, x.ndim) * x_hat + feature_view(beta, x.ndim)
    batch = Cache(batch.x_hat, batch.inv_std, gamma, batch.stats, batch.mask)
    return y, RenormCache(batch, r, d)


def batch_renorm_backward(dy: ArrayLike, cache: RenormCache) -> tuple[Array, Array, Array]:
    """The gradient of batch renorm with r and d held constant: returns (dx, dgamma, dbeta).

    With r and d constant, y = (gamma * r) * x_hat_B + (beta + gamma * d): plain batch
    norm with scale gamma * r. So dx is batch norm's dx for that scale, while
    dgamma = sum(dy * (x_hat_B * r + d)) and dbeta = sum(dy).
    """
    batch = cache.batch
    scaled = Cache(batch.x_hat, batch.inv_std, batch.gamma * cache.r, batch.stats, batch.mask)
    dx, dgamma_scaled, dbeta = batch_norm_backward(dy, scaled)
    # d/dgamma of gamma * (r * x_hat_B + d): r * sum(dy * x_hat_B) + d * sum(dy)
    dgamma = cache.r * dgamma_scaled + cache.d * dbeta
    return dx, dgamma, dbeta
