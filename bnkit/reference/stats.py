"""Per-feature batch statistics and how statistics from several shards merge into one.

A feature's statistics are kept as (count, mean, M2), M2 being the sum of squared
deviations from the mean. Unlike (sum, sum of squares) this loses no precision when the
values sit far from zero, and two sets of statistics merge exactly (Chan, Golub and
LeVeque, 1979): for shards A and B with delta = mean_B - mean_A,

    count = n_A + n_B
    mean  = mean_A + delta * n_B / count
    M2    = M2_A + M2_B + delta**2 * n_A * n_B / count

so the statistics of a batch split across processes, ghost batches or micro-batches
equal those of the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from bnkit.errors import ShapeError
from bnkit.reference._checks import Array, as_input, as_mask


@dataclass(frozen=True)
class Stats:
    """The statistics of one feature per entry: how many values, their mean, their M2.

    Attributes:
        count: number of values each feature's statistics were computed from.
        mean: per-feature mean, shape (C,).
        m2: per-feature sum of squared deviations from the mean, shape (C,).
    """

    count: int
    mean: Array
    m2: Array

    @property
    def var(self) -> Array:
        """The biased (population) variance M2 / count: what training normalizes with."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> Array:
        """The unbiased (sample) variance M2 / (count - 1): what running_var stores."""
        return self.m2 / (self.count - 1)


def per_feature_values(x: Array, mask: np.ndarray | None = None) -> Array:
    """Gather each feature's values into one row: (N, C, *spatial) -> (C, m).

    A feature (channel) of a conv layer has one value per sample and spatial position,
    so its statistics run over the batch axis and every spatial axis. With a mask of
    shape (N, *spatial), only the positions marked True are gathered.
    """
    channels = x.shape[1]
    rows = np.moveaxis(x, 1, 0).reshape(channels, -1)  # (C, N * prod(spatial))
    if mask is not None:
        rows = rows[:, mask.reshape(-1)]  # (C, number of valid positions)
    # One memory layout whatever the path, so that NumPy sums in the same order and an
    # all-True mask gives bit-for-bit the unmasked statistics.
    return np.ascontiguousarray(rows)


def batch_stats(x: ArrayLike, mask: ArrayLike | None = None) -> Stats:
    """Per-feature (count, mean, M2) of a batch, over the valid positions when masked.

    In float64: the mean (refined once), then the squared deviations from it.

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        mask: optional boolean array of shape (N, *spatial), True where values are valid.

    Returns:
        A :class:`Stats` with ``count`` values per feature (count may be 0 or 1: checking
        that there are enough values is the caller's business).
    """
    x = as_input(x, "batch_stats")
    values = per_feature_values(x, as_mask(mask, x, "batch_stats"))  # (C, m)
    count = values.shape[1]
    if count == 0:
        return Stats(0, np.zeros(x.shape[1]), np.zeros(x.shape[1]))
    mean = values.mean(axis=1)
    # One correction pass (the "corrected two-pass" algorithm): the mean of the residuals
    # is the rounding error of the first mean, so a constant feature gets its exact mean
    # and x - mu its exact zero.
    mean = mean + (values - mean[:, None]).mean(axis=1)
    m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
    return Stats(count, mean, m2)


def merge_two(a: Stats, b: Stats) -> Stats:
    """Chan et al.'s pairwise merge of two shards' statistics (either may be empty)."""
    if a.mean.shape != b.mean.shape:
        raise ShapeError(
            f"merge_stats: expected shards with the same number of features, "
            f"got {a.mean.shape[0]} and {b.mean.shape[0]}"
        )
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    count = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    m2 = a.m2 + b.m2 + delta**2 * (a.count * b.count / count)
    return Stats(count, mean, m2)


def merge_stats(shards: Iterable[Stats]) -> Stats:
    """Merge the statistics of several shards into those of their union.

    Args:
        shards: the per-shard statistics (at least one; empty shards are allowed).

    Returns:
        The statistics of all the shards' values together.

    Example:
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> merged = merge_stats([batch_stats(x[:2]), batch_stats(x[2:])])
        >>> bool(np.allclose(merged.mean, batch_stats(x).mean))
        True
    """
    shards = list(shards)
    if not shards:
        raise ShapeError("merge_stats: expected at least one shard, got none")
    merged = shards[0]
    for shard in shards[1:]:
        merged = merge_two(merged, shard)
    return merged
