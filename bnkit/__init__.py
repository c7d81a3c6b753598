"""bnkit: batch normalization done completely.

- :mod:`bnkit.reference`: an exact NumPy float64 reference, the oracle for everything else.
- :class:`bnkit.BatchNorm1d`, :class:`~bnkit.BatchNorm2d`, :class:`~bnkit.BatchNorm3d`:
  drop-in replacements for ``torch.nn.BatchNorm*d``; :mod:`bnkit.functional` underneath.
- :mod:`bnkit.errors`: the error types bnkit raises for bad input.

The torch-based parts load on first use, so ``import bnkit.reference`` works (and stays
light) where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnkit import errors, reference

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily: these modules import torch)
_LAZY = {
    "Renorm": "bnkit.functional",
    "accumulate_stats": "bnkit.nn",
    "BatchNorm1d": "bnkit.nn",
    "BatchNorm2d": "bnkit.nn",
    "BatchNorm3d": "bnkit.nn",
    "functional": "bnkit.functional",
    "nn": "bnkit.nn",
}

if TYPE_CHECKING:
    from bnkit import functional, nn
    from bnkit.functional import Renorm
    from bnkit.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, accumulate_stats

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Renorm",
    "__version__",
    "accumulate_stats",
    "errors",
    "functional",
    "nn",
    "reference",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'bnkit' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"bnkit.{name}" else getattr(module, name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
