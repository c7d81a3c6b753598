"""The compute behind :func:`bnkit.functional.batch_norm`: one pipeline, swappable kernels.

Every variant of batch normalization runs the same four steps::

    stats = kernel.batch_stats(x)                     # per channel (count, shift, mean, var)
    # (statistics of several shards merge here: merge_stats)
    y = kernel.normalize_batch(x, stats, weight, bias, eps)       # training
    y = kernel.normalize_population(x, mean, var, weight, bias, eps)  # inference
    kernel.update_running_stats(running_mean, running_var, stats, momentum, ...)

A kernel is any object with those four methods (:class:`Kernel`). :mod:`.portable` is
written with plain torch operations, so it runs on every device and under
``torch.compile``; faster CPU and GPU kernels only have to implement the same methods.

Statistics are kept as :class:`BatchStats`: a per-channel count, a *shift* (one value
taken from the data), the mean of ``x - shift`` and the biased variance. Carrying the
shift separately is what keeps float32 (and float16) inputs far from zero accurate:
``x - shift`` is exact for such data (Sterbenz's lemma), so neither the statistics nor
the normalization ever subtract two large, nearly equal numbers. The mean itself,
``shift + shifted_mean``, is only formed for the running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from bnkit.errors import ShapeError

__all__ = [
    "BatchNormResult",
    "BatchStats",
    "Kernel",
    "batch_norm",
    "compute_dtype",
    "merge_stats",
    "select_kernel",
]


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


class Kernel(Protocol):
    """The four steps of batch normalization; implementations must agree to rounding."""

    def batch_stats(self, x: Tensor) -> BatchStats:
        """Per-channel statistics of ``x`` (N, C, *) over every dimension but 1."""
        ...

    def normalize_batch(
        self,
        x: Tensor,
        stats: BatchStats,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Training: y = weight * (x - mean) / sqrt(var + eps) + bias, differentiable
        through the batch statistics (dx includes the paths through mean and var)."""
        ...

    def normalize_population(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """Inference: the same map with fixed statistics (a per-channel affine map)."""
        ...

    def update_running_stats(
        self,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        stats: BatchStats,
        momentum: float | None,
        *,
        num_batches_tracked: Tensor | None,
        unbiased: bool,
        skip_nonfinite: bool,
    ) -> Tensor | None:
        """Fold the batch statistics into the running ones, in place, without a host sync.

        Returns a 0-d bool tensor (were the statistics finite, i.e. recorded?) when
        ``skip_nonfinite``, else None.
        """
        ...


def select_kernel(x: Tensor) -> Kernel:
    """The kernel for this input. Only the portable kernel exists so far."""
    from bnkit.kernels import portable

    return portable.KERNEL


class BatchNormResult(NamedTuple):
    """What the pipeline returns: the output, and whether the batch's statistics were
    recorded (a 0-d bool tensor, only when running statistics were updated with
    ``skip_nonfinite``; None otherwise)."""

    output: Tensor
    recorded: Tensor | None


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    skip_nonfinite: bool = False,
    kernel: Kernel | None = None,
) -> BatchNormResult:
    """The pipeline: statistics -> normalize -> update running statistics.

    Inputs are assumed valid (:mod:`bnkit.functional` checks them); ``x`` has at least one
    value and, with ``use_batch_stats``, at least two values per channel.

    Args:
        x: input (N, C, *).
        running_mean, running_var: (C,) population statistics. With ``use_batch_stats``
            they are updated in place when given; otherwise they normalize ``x``.
        weight, bias: (C,) affine parameters or None.
        use_batch_stats: normalize with the batch's statistics (training).
        momentum: the update factor, or None for the cumulative average (then
            ``num_batches_tracked`` is required).
        eps: added to the variance.
        num_batches_tracked: 0-d integer tensor, incremented in place when the running
            statistics are updated.
        unbiased: store the unbiased (True) or biased batch variance in ``running_var``.
        skip_nonfinite: leave the running statistics and the counter untouched when the
            batch statistics hold NaN or Inf.
        kernel: the kernel to use; :func:`select_kernel` by default.

    Returns:
        A :class:`BatchNormResult`.
    """
    k = kernel if kernel is not None else select_kernel(x)
    if not use_batch_stats:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm pipeline: population statistics are required")
        return BatchNormResult(
            k.normalize_population(x, running_mean, running_var, weight, bias, eps), None
        )
    stats = k.batch_stats(x)
    # Cross-process synchronization will merge the shards' statistics here (merge_stats).
    output = k.normalize_batch(x, stats, weight, bias, eps)
    recorded = None
    if running_mean is not None or running_var is not None:
        recorded = k.update_running_stats(
            running_mean,
            running_var,
            stats,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased,
            skip_nonfinite=skip_nonfinite,
        )
    return BatchNormResult(output, recorded)
