"""Batch statistics over all processes of a ``torch.distributed`` group, on any backend.

Synchronized batch norm needs two exchanges per training step:

- forward: each process's per-channel (count, mean, M2), gathered by every process and
  merged with Chan et al.'s count-weighted formula in float64, so every process
  normalizes with, and records, the statistics of the global batch. Exchanging M2 (not
  an inverse standard deviation) keeps the merge exact for uneven and empty batches.
- backward: the two per-channel sums the input gradient needs, sum(dy) and
  sum(dy * x_hat), added up over the processes.

Both are plain collectives (``all_gather``, ``all_reduce``), so gloo (CPU),
nccl (GPU) and any other backend work. Without an initialized process group, or with a
group of one process, nothing is exchanged and the statistics are the local ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnkit.kernels.stats import BatchStats

__all__ = ["active_group", "all_reduce_sum", "gather_stats", "world_size"]


def active_group(process_group: Any = None) -> Any | None:
    """The group to synchronize over, or None when there is nobody to talk to.

    None when torch.distributed is unavailable or not initialized, or when the group
    (the world by default) has a single process: then local statistics are the global
    ones and no collective is needed.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def world_size(group: Any) -> int:
    """The number of processes in ``group``."""
    return int(dist.get_world_size(group))


def gather_stats(
    local: BatchStats | None,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
    group: Any,
) -> BatchStats:
    """Merge every process's statistics into the global batch's (one collective).

    Args:
        local: this process's statistics, or None for an empty local batch (it still
            takes part, with count 0).
        channels: C. dtype: the compute dtype of the returned statistics.
        device: where the input lives (and the collective runs).
        group: the process group (see :func:`active_group`).

    Returns:
        The global statistics, identical on every process.
    """
    packed = torch.zeros(3, channels, dtype=torch.float64, device=device)  # count, mean, M2
    if local is not None:
        packed[0] = local.count.to(torch.float64)
        packed[1] = local.shift.to(torch.float64) + local.shifted_mean.to(torch.float64)
        packed[2] = local.var.to(torch.float64) * packed[0]
    gathered = [torch.empty_like(packed) for _ in range(world_size(group))]
    dist.all_gather(gathered, packed, group=group)  # the one API every backend and release has
    counts, means, m2s = torch.stack(gathered).unbind(1)  # each (P, C)
    count = counts.sum(0)
    # Chan et al., parallel form: the count-weighted mean, then the within-process M2 plus
    # each process's between-process term. Empty processes weigh nothing.
    mean = (counts * means).sum(0) / count
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    # The global mean, split into a shift in the compute dtype and the float64 remainder:
    # x - shift stays exact for data near the mean, and every process holds bit-for-bit
    # the same statistics (so the running statistics stay identical everywhere).
    shift = mean.to(dtype)
    return BatchStats(
        count=count.to(dtype),
        shift=shift,
        shifted_mean=(mean - shift.to(torch.float64)).to(dtype),
        var=(m2 / count).to(dtype),
    )


def all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` over the processes of ``group``, in float64; returns the sum in the
    tensor's dtype (a new tensor)."""
    total = tensor.to(torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(tensor.dtype)
