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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from bnkit.errors import ShapeError

__all__ = ["BatchStats", "Primitives", "Update", "compute_dtype", "merge_stats"]


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


class Update(NamedTuple):
    """One update of the running statistics: the batch's statistics, what they are
    folded into (each may be None), and how (see
    :meth:`bnkit.kernels.pipeline.Kernel.update_running_stats`)."""

    stats: BatchStats
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None
    unbiased: bool
    skip_nonfinite: bool


@dataclass(frozen=True)
class Primitives:
    """One kernel's four passes over memory; :mod:`bnkit.kernels.primitive` writes the
    autograd formulas over them once. Each takes and returns tensors in the input's
    memory format; per-channel vectors and sums are in the compute dtype.

    Attributes:
        name: what runs them, for messages ("C loops", "Triton", "torch operations").
        supports: whether the passes take ``(x, mask)`` at all.
        batch_stats: ``(x, mask) -> BatchStats``, one read of x.
        affine: ``(x, shift, alpha, beta, activation, param) -> y``,
            y = act((x - shift) * alpha + beta); one read, one write.
        backward_reduce: ``(g, src, shift, shifted_mean, activation, param, from_output,
            z_alpha, z_beta) -> (sum g', sum g' * (v - shift - shifted_mean))`` with
            g' = g * act'(z); src is x (z = (x - shift) * z_alpha + z_beta) or, with
            ``from_output``, the output y of the fused activation (v = z = act^-1(y)).
        backward_input: ``(g, src, shift, alpha, k1, k0, activation, param, from_output,
            mask, z_alpha, z_beta) -> dx = g' * alpha + (v - shift) * k1 + k0`` (g' * alpha
            where ``mask`` is False).
        masked_activation: whether ``backward_input`` takes a mask with an activation.
        ghost_batches: whether every pass takes ``ghosts=k``: k ghost batches of N / k
            samples, each with its own statistics, in one launch; per-channel vectors
            then hold k * C values, ghost batch j's at [j * C, (j + 1) * C).
    """

    name: str
    supports: Callable[[Tensor, Tensor | None], bool]
    batch_stats: Callable[..., BatchStats]
    affine: Callable[..., Tensor]
    backward_reduce: Callable[..., tuple[Tensor, Tensor]]
    backward_input: Callable[..., Tensor]
    masked_activation: bool
    ghost_batches: bool = False


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


def input_gradient_coefficients(
    alpha: Tensor,
    sum_g: Tensor,
    sum_g_x_hat: Tensor,
    count: Tensor,
    per_unit: Tensor | None = None,
    centre: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(k1, k0) such that the input gradient of batch norm with batch statistics is
    ``dx = alpha * g + v * k1 + k0``, for whichever per-channel ``v`` the caller's pass
    reads, with ``x_hat = (v - centre) * per_unit``.

    The formula: dx = alpha * (g - mean(g) - x_hat * mean(g * x_hat)), the two subtracted
    terms being the paths through the batch mean and the batch variance, with
    alpha = invstd * weight and the means over the ``count`` values of each channel. Every
    kernel evaluates it this way: v = x_hat itself (no ``per_unit`` or ``centre``),
    v = x - shift (``per_unit`` = invstd, ``centre`` = shifted_mean), or v = z - bias
    recovered from a fused activation's output (``per_unit`` = 1 / weight).

    Args:
        alpha: invstd * weight, (C,). sum_g, sum_g_x_hat: per-channel sums of g and of
        g * x_hat (over every process of a synchronized layer). count: values per channel.
    """
    k1 = -alpha * sum_g_x_hat / count
    if per_unit is not None:
        k1 = k1 * per_unit
    k0 = -alpha * sum_g / count
    if centre is not None:
        k0 = k0 - centre * k1
    return k1, k0
