"""The compute behind :func:`bnkit.functional.batch_norm`: one pipeline, swappable kernels.

Every variant of batch normalization runs the same four steps::

    stats = kernel.batch_stats(x, mask)                # per channel (count, shift, mean, var)
    y = kernel.normalize_batch(x, stats, weight, bias, eps, mask)     # training
    y = kernel.normalize_population(x, mean, var, weight, bias, eps)  # inference
    stats = merge_stats([...])                         # ghost batches, micro-batches, shards
    kernel.update_running_stats(running_mean, running_var, stats, momentum, ...)

The variants are parameters of :func:`batch_norm`, not copies of it: a mask restricts
the statistics to valid positions, ghost batches are chunks normalized with their own
statistics and merged for the update, batch renormalization is a change of the affine
parameters (:func:`renorm_affine`), and micro-batch accumulation defers the update.

A kernel is any object with those four methods (:class:`Kernel`). :mod:`.portable` is
written with plain torch operations, so it runs on every device and under
``torch.compile``; faster CPU and GPU kernels only have to implement the same methods.

The modules, each importing only those below it: :mod:`.stats` (:class:`BatchStats`,
:func:`merge_stats`), then the kernels (:mod:`.portable`, :mod:`.cpu` with :mod:`.native`
and :mod:`.outputs`, :mod:`.gpu`) and :mod:`bnkit.distributed`, then :mod:`.pipeline`
(the steps above and :func:`select_kernel`), then :mod:`.express`. This package
re-exports the names of :mod:`.stats` and :mod:`.pipeline`, loading them on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Activation",
    "BatchNormResult",
    "BatchStats",
    "Chunk",
    "Kernel",
    "batch_norm",
    "compute_dtype",
    "ghost_chunks",
    "merge_stats",
    "renorm_affine",
    "select_kernel",
]

#: where each name lives: :mod:`.stats` (no kernel imports) or :mod:`.pipeline` (all of
#: them). Loaded on first use, so that a kernel importing :mod:`.stats` loads no other.
_HOMES = dict.fromkeys(("BatchStats", "compute_dtype", "merge_stats"), "stats")


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"bnkit.kernels.{_HOMES.get(name, 'pipeline')}")
        return getattr(module, name)
    raise AttributeError(f"module 'bnkit.kernels' has no attribute {name!r}")
