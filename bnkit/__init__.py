"""bnkit: batch normalization done completely.

- :mod:`bnkit.reference`: an exact NumPy float64 reference (the oracle for everything else).
- :mod:`bnkit.errors`: the error types bnkit raises for bad input.
"""

from __future__ import annotations

from bnkit import errors, reference

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "reference"]
