"""Per-channel batch statistics (:class:`BatchStats`) and their exact merge across
shards (:func:`merge_stats`): what every kernel computes and the pipeline combines.

Statistics are kept as a per-channel count, a *shift* (one value taken from the data),
the mean of ``x - shift`` and the biased variance. Carrying the shift separately is what
keeps float32 (and float16) inputs far from zero accurate: ``x - shift`` is exact for
such data (Sterbenz's lemma), so neither the statistics nor the normalization ever
subtract two large, nearly equal numbers. The mean itself, ``shift + shifted_mean``, is
only formed for the running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnkit.errors import ShapeError

__all__ = ["BatchStats", "compute_dtype", "merge_stats"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed and accumulated in: float64 for float64, else float32.

    float16 and bfloat16 inputs are normalized with float32 statistics, as cuDNN does.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BatchStats:
    """Per-channel statistics of a batch, in a form that merges across shards without loss.

    Attributes:
        count: number of values each channel's statistics come from, shape (C,).
        shift: a value subtracted from every input before accumulating, shape (C,). Any
            value works mathematically; one close to the data (a sample of it) keeps the
            subtraction exact. Never differentiated: the output does not depend on it.
        shifted_mean: mean of ``x - shift``, shape (C,).
        var: biased variance (mean squared deviation from the mean), shape (C,).

    All four are in the compute dtype (:func:`compute_dtype`) and carry no autograd graph.
    """

    count: Tensor
    shift: Tensor
    shifted_mean: Tensor
    var: Tensor

    @property
    def mean(self) -> Tensor:
        """The batch mean, shape (C,)."""
        return self.shift + self.shifted_mean

    @property
    def m2(self) -> Tensor:
        """Sum of squared deviations from the mean (count * var), shape (C,)."""
        return self.var * self.count

    @property
    def unbiased_var(self) -> Tensor:
        """The sample variance M2 / (count - 1): what ``running_var`` stores by default."""
        return self.m2 / (self.count - 1)


def merge_stats(parts: Sequence[BatchStats]) -> BatchStats:
    """The statistics of the union of several shards (processes, ghost or micro-batches).

    The parallel form of Chan, Golub and LeVeque's update, per channel::

        count = sum_i n_i
        mean  = sum_i n_i * mean_i / count
        M2    = sum_i M2_i + sum_i n_i * (mean_i - mean)**2

    Means are taken relative to the first shard's shift, so shards far from zero merge
    without cancellation.

    Args:
        parts: at least one shard's statistics, all with the same number of channels.

    Returns:
        The merged statistics, with the first shard's shift.

    Raises:
        ShapeError: no shards, or shards with different numbers of channels.

    Example:
        >>> from bnkit.kernels import portable
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> both = merge_stats([portable.batch_stats(x[:5]), portable.batch_stats(x[5:])])
        >>> torch.allclose(both.mean, x.mean(0))
        True
        >>> torch.allclose(both.var, x.var(0, correction=0))
        True
    """
    if not parts:
        raise ShapeError("merge_stats: expected at least one shard, got none")
    channels = {tuple(p.count.shape) for p in parts}
    if len(channels) != 1:
        raise ShapeError(
            "merge_stats: expected shards with the same number of channels, got "
            + ", ".join(str(p.count.shape[0]) for p in parts)
        )
    shift = parts[0].shift
    counts = torch.stack([p.count for p in parts])  # (P, C)
    # Each shard's mean relative to the common shift: (shift_i - shift) is small when the
    # shards come from the same data, so this keeps the precision of shifted_mean.
    means = torch.stack([(p.shift - shift) + p.shifted_mean for p in parts])  # (P, C)
    variances = torch.stack([p.var for p in parts])  # (P, C)
    count = counts.sum(0)
    shifted_mean = (counts * means).sum(0) / count
    m2 = (counts * variances).sum(0) + (counts * (means - shifted_mean) ** 2).sum(0)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=m2 / count)
