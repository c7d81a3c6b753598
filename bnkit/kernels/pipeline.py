"""The pipeline behind :func:`bnkit.functional.batch_norm`: statistics, merge, normalize,
update, on whichever kernel :func:`select_kernel` picks.

Every variant of batch normalization runs the same four steps::

    stats = kernel.batch_stats(x, mask)                # per channel (count, shift, mean, var)
    y = kernel.normalize_batch(x, stats, weight, bias, eps, mask)     # training
    y = kernel.normalize_population(x, mean, var, weight, bias, eps)  # inference
    stats = merge_stats([...])                         # ghost batches, micro-batches, shards
    kernel.update_running_stats(Update(stats, running_mean, running_var, ...))

The variants are parameters of :func:`batch_norm`, not copies of it: a mask restricts
the statistics to valid positions, ghost batches are chunks normalized with their own
statistics and merged for the update, batch renormalization is a change of the affine
parameters (:func:`renorm_affine`), and micro-batch accumulation defers the update.

A kernel is any object with those four methods (:class:`Kernel`). Every kernel bnkit
has is a :class:`bnkit.kernels.primitive.PrimitiveKernel`: the same autograd functions
over a set of passes, the operators of :mod:`.ops` (C loops, Triton) or the torch
operations of :mod:`.portable`, which run on every device and under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from bnkit import distributed
from bnkit.kernels import ops, portable, primitive
from bnkit.kernels.activation import activate
from bnkit.kernels.stats import BatchStats, Update, compute_dtype, merge_stats

__all__ = [
    "Activation",
    "BatchNormResult",
    "Call",
    "Chunk",
    "Kernel",
    "Plan",
    "batch_norm",
    "ghost_chunks",
    "renorm_affine",
    "select_kernel",
]


class Kernel(Protocol):
    """The four steps of batch normalization; implementations must agree to rounding.

    A kernel that also has ``ghost_passes(x, mask)`` (see
    :meth:`bnkit.kernels.primitive.PrimitiveKernel.ghost_passes`) is given ``ghosts=k``
    by the first three methods where that returns passes: k ghost batches in one launch,
    statistics and parameters as vectors of k * C values. Others never see it.
    """

    def batch_stats(self, x: Tensor, mask: Tensor | None = None) -> BatchStats:
        """Per-channel statistics of ``x`` (N, C, *) over every dimension but 1, over the
        positions where ``mask`` ((N, *), bool) is True when one is given."""
        ...

    def normalize_batch(
        self,
        x: Tensor,
        stats: BatchStats,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
        group: Any = None,
    ) -> Tensor:
        """Training: y = weight * (x - mean) / sqrt(var + eps) + bias, differentiable
        through the batch statistics (dx includes the paths through mean and var; with a
        mask, through the valid inputs only). Every position gets the same affine map.
        With a process ``group`` the backward pass sums its reductions over the group."""
        ...

    def normalize_batch_activation(
        self,
        x: Tensor,
        stats: BatchStats,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None,
        group: Any,
        activation: str,
        param: float | None,
        memory_efficient: bool,
    ) -> Tensor:
        """Training, fused with an activation: y = act(normalize_batch(...)) in one
        autograd node that, if ``memory_efficient``, saves its output rather than x."""
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

    def update_running_stats(self, update: Update) -> Tensor | None:
        """Fold the batch statistics into the running ones, in place, without a host sync.

        Returns a 0-d bool tensor (were the statistics finite, i.e. recorded?) when
        ``skip_nonfinite``, else None.
        """
        ...


def select_kernel(x: Tensor, mask: Tensor | None = None) -> Kernel:
    """The kernel for a call on (x, mask), decided once per call: the operators' kernel
    (:mod:`.ops`) where a native pass takes them (:func:`bnkit.kernels.ops.native_passes`:
    the Triton kernels for a CUDA tensor where Triton is installed, or any tensor under
    ``BNKIT_KERNEL=triton``; the C loops for a CPU floating-point tensor they handle) in
    eager mode, and inside torch.func transforms and forward-mode AD where x's device and
    dtype have native passes (the operators' vmap rules hand them plain tensors); else the
    portable kernel: the same autograd functions on passes in torch operations, which
    ``torch.compile`` compiles. Which native implementation runs is the operators'
    dispatch, by device; each runs torch operations for a pass its loops do not take (a
    ghost batch below their size, say).

    Example:
        >>> select_kernel(torch.randn(4, 3, 8, 8)[:, :, ::2]).__class__.__name__  # strided
        'PortableKernel'
    """
    if torch.compiler.is_compiling():
        return primitive.PORTABLE
    if portable.transformed():
        return ops.KERNEL if ops.native_device(x) else primitive.PORTABLE
    return ops.KERNEL if ops.native_passes(x, mask) is not None else primitive.PORTABLE


class Call(NamedTuple):
    """The tensors of one call: the input, the population statistics and their counter,
    the affine parameters, and the mask (each but the input may be None)."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    num_batches_tracked: Tensor | None = None
    mask: Tensor | None = None


class BatchNormResult(NamedTuple):
    """What the pipeline returns: the output, and whether the batch's statistics were
    recorded (a 0-d bool tensor, only when running statistics were updated with
    ``skip_nonfinite``; None otherwise)."""

    output: Tensor
    recorded: Tensor | None


class Chunk(NamedTuple):
    """A slice of the batch normalized with its own statistics (a ghost batch, or the
    whole batch), and what to do with it."""

    start: int
    stop: int
    #: normalize with its own statistics ("batch"), the population's ("running"), or
    #: pass it through unchanged ("identity"): the last two for a chunk with fewer than
    #: two (valid) values per channel, following ``single_sample``.
    mode: str = "batch"


def ghost_chunks(batch_size: int, ghost_batch_size: int | None) -> list[tuple[int, int]]:
    """The [start, stop) sample ranges of consecutive ghost batches (the last may be
    smaller); the whole batch when ``ghost_batch_size`` is None or >= the batch size."""
    if ghost_batch_size is None or ghost_batch_size >= batch_size:
        return [(0, batch_size)]
    return [
        (start, min(start + ghost_batch_size, batch_size))
        for start in range(0, batch_size, ghost_batch_size)
    ]


def renorm_affine(
    stats: BatchStats,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    limits: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Batch renormalization as a change of the affine parameters.

    Renorm computes y = weight * (x_hat_B * r + d) + bias with r and d constants, which is
    plain batch norm with weight' = weight * r and bias' = bias + weight * d. Autograd
    through these two products gives exactly the renorm gradients: dx as batch norm's
    with scale weight * r, d weight = r * sum(dy * x_hat_B) + d * sum(dy), d bias = sum(dy).

    Args:
        stats: the batch's statistics. running_mean, running_var: the population's (C,).
        weight, bias: (C,) or None. eps: as in the normalization.
        limits: (r_max, d_max) for this step, 0-d tensors.

    Returns:
        (weight', bias') in the statistics' compute dtype.
    """
    with torch.no_grad():
        dtype = stats.var.dtype
        r_max, d_max = (limit.to(dtype) for limit in limits)
        sigma = torch.sqrt(running_var.to(dtype) + eps)
        r = torch.clamp(torch.sqrt(stats.var + eps) / sigma, 1.0 / r_max, r_max)
        mean_gap = stats.shift - running_mean.to(dtype) + stats.shifted_mean
        d = torch.clamp(mean_gap / sigma, -d_max, d_max)
    if weight is None:
        return r, d if bias is None else bias.to(dtype) + d
    scaled = weight.to(dtype) * r
    shifted = weight.to(dtype) * d
    return scaled, shifted if bias is None else bias.to(dtype) + shifted


class Plan(NamedTuple):
    """How :func:`batch_norm` runs a call, besides its tensors (:class:`Call`): made once
    per call by :mod:`bnkit.functional`, which validates the options and plans the chunks.

    Fields:
        training: normalize with the batch's statistics and update the running ones when
            the call has them; otherwise normalize with the running statistics.
        momentum: the update factor, or None for the cumulative average (then the call's
            ``num_batches_tracked`` is required).
        eps: added to the variance.
        unbiased: store the unbiased (True) or biased batch variance in ``running_var``.
        skip_nonfinite: leave the running statistics and the counter untouched when the
            batch statistics hold NaN or Inf.
        activation: an activation applied to the output, fused with the normalization in
            training (see :class:`Activation`).
        chunks: the ghost batches (each normalized with its own statistics) and their
            modes; one chunk, the whole batch, when None.
        renorm_limits: (r_max, d_max) to apply batch renormalization with (needs the
            running statistics), or None.
        deferred: if given, the batch's merged statistics are appended to it instead of
            being folded into the running statistics (micro-batch accumulation).
        group: a process group (see :func:`bnkit.distributed.active_group`) to compute the
            statistics over. Without ghost batches (``chunks`` None) the batch is
            normalized with the global statistics (one collective forward, one backward;
            the input may be empty); with ghost batches each is normalized locally and
            only the statistics recorded in the running ones are global.
        few_values: with ``group``, called with the global number of values per channel
            once it is known; returns the mode ("batch", "running", "identity") or raises.
    """

    training: bool
    momentum: float | None = 0.1
    eps: float = 1e-5
    unbiased: bool = True
    skip_nonfinite: bool = False
    activation: Activation | None = None
    chunks: Sequence[Chunk] | None = None
    renorm_limits: tuple[Tensor, Tensor] | None = None
    deferred: list[BatchStats] | None = None
    group: Any = None
    few_values: Callable[[int], str] | None = None


def batch_norm(call: Call, plan: Plan, kernel: Kernel | None = None) -> BatchNormResult:
    """The pipeline: statistics -> (merge) -> normalize -> update running statistics.

    Inputs are assumed valid (:mod:`bnkit.functional` checks them and plans the chunks);
    the input has at least one value, unless ``plan.group`` is set.

    Args:
        call: the tensors. The running statistics are updated in place in training when
            given, and normalize the input otherwise; the counter is incremented when they
            are updated; the mask ((N, *) bool, True at valid positions) restricts the
            statistics to those positions.
        plan: everything else (:class:`Plan`).
        kernel: the kernel to use; :func:`select_kernel` by default.

    Returns:
        A :class:`BatchNormResult`.

    Example:
        >>> x = torch.randn(8, 3, 4)
        >>> out = batch_norm(Call(x, None, None, None, None), Plan(training=True))
        >>> torch.allclose(out.output.mean(dim=(0, 2)), torch.zeros(3), atol=1e-6)
        True
    """
    x, running_mean, running_var, weight, bias, counter, mask = call
    k = kernel if kernel is not None else select_kernel(x, mask)
    norm = _Normalization(
        k, running_mean, running_var, weight, bias, plan.eps, plan.renorm_limits, plan.activation
    )
    if not plan.training:
        return BatchNormResult(norm.fallback(x, "running"), None)
    group = plan.group
    if group is not None and plan.chunks is None:
        output, merged = norm.synchronized(x, mask, group, plan.few_values)
    else:
        output, merged = norm.chunked(x, mask, plan.chunks)
        if group is not None:  # ghost batches: local normalization, global running stats
            merged = distributed.gather_stats(
                merged, x.shape[1], compute_dtype(x.dtype), x.device, group
            )
    if merged is None or (running_mean is None and running_var is None):
        return BatchNormResult(output, None)
    if plan.deferred is not None:
        plan.deferred.append(merged)
        return BatchNormResult(output, None)
    update = Update(
        merged, running_mean, running_var, counter, plan.momentum, plan.unbiased,
        plan.skip_nonfinite,
    )  # fmt: skip
    recorded = k.update_running_stats(update)
    return BatchNormResult(output, recorded)


def _repeat(v: Tensor | None, times: int) -> Tensor | None:
    """A (C,) vector repeated for ``times`` ghost batches (itself for one)."""
    return v if v is None or times == 1 else v.repeat(times)


def _split(stats: BatchStats, ghosts: int) -> list[BatchStats]:
    """Statistics of ``ghosts`` ghost batches (vectors of ghosts * C values) as one
    :class:`BatchStats` per ghost batch."""
    fields = (stats.count, stats.shift, stats.shifted_mean, stats.var)
    parts = [t.chunk(ghosts) for t in fields]
    return [BatchStats(*(part[j] for part in parts)) for j in range(ghosts)]


class Activation(NamedTuple):
    """An activation fused with batch norm: its name, parameter, and whether training
    saves the output (memory-efficient) rather than the input for the backward pass."""

    name: str
    param: float | None = None
    memory_efficient: bool = True


def _activate(output: Tensor, activation: Activation | None) -> Tensor:
    """The activation as plain (unfused) operations: inference and fallbacks."""
    if activation is None:
        return output
    return activate(output, activation.name, activation.param)


@dataclass(frozen=True)
class _Normalization:
    """What every part of one pipeline call shares: the kernel, the population statistics,
    the affine parameters, eps, the renorm limits and the activation."""

    kernel: Kernel
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    renorm_limits: tuple[Tensor, Tensor] | None
    activation: Activation | None

    def with_batch_stats(
        self,
        x: Tensor,
        stats: BatchStats,
        mask: Tensor | None,
        group: Any = None,
        ghosts: int = 1,
    ) -> Tensor:
        """Normalize with batch statistics, renormalized towards the running ones if asked,
        and fused with the activation if there is one. With ``ghosts`` > 1 the statistics
        are the ghost batches' (ghosts * C values) and the (C,) parameters are repeated
        to match; autograd sums their gradients back."""
        scale, shift = _repeat(self.weight, ghosts), _repeat(self.bias, ghosts)
        if self.renorm_limits is not None:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("batch_norm pipeline: renorm needs the running statistics")
            scale, shift = renorm_affine(
                stats,
                self.running_mean.repeat(ghosts),
                self.running_var.repeat(ghosts),
                scale,
                shift,
                self.eps,
                self.renorm_limits,
            )
        many: dict[str, Any] = {} if ghosts == 1 else {"ghosts": ghosts}
        if self.activation is None:
            return self.kernel.normalize_batch(
                x, stats, scale, shift, self.eps, mask, group, **many
            )
        name, param, memory_efficient = self.activation
        return self.kernel.normalize_batch_activation(
            x, stats, scale, shift, self.eps, mask, group, name, param, memory_efficient, **many
        )

    def fallback(self, x: Tensor, mode: str) -> Tensor:
        """Without batch statistics: the population's ("running"), or none at all
        ("identity": a batch too small for statistics passes through), then the activation."""
        if mode == "identity":
            output = x.clone()
        elif self.running_mean is None or self.running_var is None:
            raise ValueError("batch_norm pipeline: population statistics are required")
        else:
            output = self.kernel.normalize_population(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        return _activate(output, self.activation)

    def chunked(
        self, x: Tensor, mask: Tensor | None, chunks: Sequence[Chunk] | None
    ) -> tuple[Tensor, BatchStats | None]:
        """Each chunk (ghost batch, or the whole batch) normalized with its own statistics;
        returns the output and the chunks' statistics merged (None if no chunk had any)."""
        plan = list(chunks) if chunks is not None else [Chunk(0, x.shape[0])]
        ghosts = self._one_launch(x, mask, plan)
        if ghosts > 1:
            stats = self.kernel.batch_stats(x, mask, ghosts=ghosts)  # type: ignore[call-arg]
            output = self.with_batch_stats(x, stats, mask, ghosts=ghosts)
            return output, merge_stats(_split(stats, ghosts))
        whole = len(plan) == 1
        outputs, parts = [], []
        for chunk in plan:
            part = x if whole else x[chunk.start : chunk.stop]
            part_mask = mask if whole or mask is None else mask[chunk.start : chunk.stop]
            if chunk.mode != "batch":
                outputs.append(self.fallback(part, chunk.mode))
                continue
            stats = self.kernel.batch_stats(part, part_mask)
            outputs.append(self.with_batch_stats(part, stats, part_mask))
            parts.append(stats)
        if not outputs:  # an empty batch (of a synchronized layer: it still takes part)
            return x.clone(), None
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        if not parts:
            return output, None
        return output, parts[0] if len(parts) == 1 else merge_stats(parts)

    def _one_launch(self, x: Tensor, mask: Tensor | None, plan: Sequence[Chunk]) -> int:
        """How many ghost batches the kernel normalizes in one launch: all of them where
        they are equal, each has its own statistics, and the kernel's passes take ghost
        batches for (x, mask) (the Triton kernels); else 1, one at a time."""
        size = plan[0].stop - plan[0].start
        if len(plan) < 2 or any(c.mode != "batch" or c.stop - c.start != size for c in plan):
            return 1
        ghost_passes = getattr(self.kernel, "ghost_passes", None)
        return len(plan) if ghost_passes is not None and ghost_passes(x, mask) else 1

    def synchronized(
        self,
        x: Tensor,
        mask: Tensor | None,
        group: Any,
        few_values: Callable[[int], str] | None,
    ) -> tuple[Tensor, BatchStats | None]:
        """The whole batch normalized with statistics over every process of ``group``."""
        local = self.kernel.batch_stats(x, mask) if x.numel() > 0 else None
        stats = distributed.gather_stats(local, x.shape[1], compute_dtype(x.dtype), x.device, group)
        mode = "batch" if few_values is None else few_values(int(stats.count[0].item()))
        if mode != "batch":
            return self.fallback(x, mode), None
        return self.with_batch_stats(x, stats, mask, group), stats
