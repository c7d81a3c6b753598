"""The compute behind :func:`bnkit.functional.batch_norm`: one pipeline, swappable kernels.

:mod:`.pipeline` runs the steps every variant shares (statistics, merge, normalize,
update) on a kernel: the operators of :mod:`.ops` (the C loops, the Triton kernels) or
the portable one (:mod:`.portable`, plain torch operations for every device,
``torch.compile`` and ``torch.func``).

The modules, each importing only those below it: :mod:`.stats` (:class:`BatchStats`,
:class:`Update`, :func:`merge_stats`), :mod:`bnkit.distributed`, :mod:`.portable`,
:mod:`.primitive` (the autograd functions of the native kernels), :mod:`.cpu` (with
:mod:`.native` and :mod:`.outputs`) and :mod:`.gpu`, :mod:`.ops`, :mod:`.pipeline` (the
steps and :func:`select_kernel`), then :mod:`.express`. This package
re-exports the names of :mod:`.stats` and :mod:`.pipeline`, loading them on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Activation",
    "BatchNormResult",
    "BatchStats",
    "Call",
    "Chunk",
    "Kernel",
    "Plan",
    "Update",
    "batch_norm",
    "compute_dtype",
    "ghost_chunks",
    "merge_stats",
    "renorm_affine",
    "select_kernel",
]

#: where each name lives: :mod:`.stats` (no kernel imports) or :mod:`.pipeline` (all of
#: them). Loaded on first use, so that a kernel importing :mod:`.stats` loads no other.
_HOMES = dict.fromkeys(("BatchStats", "Update", "compute_dtype", "merge_stats"), "stats")


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"bnkit.kernels.{_HOMES.get(name, 'pipeline')}")
        return getattr(module, name)
    raise AttributeError(f"module 'bnkit.kernels' has no attribute {name!r}")
