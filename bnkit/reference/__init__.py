"""An exact NumPy float64 reference of batch normalization: the oracle for everything else.

Read it in this order:

1. :mod:`~bnkit.reference.stats`: each feature's (count, mean, M2) over the batch and
   all spatial positions, and how shards' statistics merge into the whole batch's.
2. :mod:`~bnkit.reference.core`: training forward (normalize with the batch's mean and
   biased variance, then scale by gamma and shift by beta), its analytic gradient,
   inference with population statistics, and the update of those statistics.
3. :mod:`~bnkit.reference.layer`: :class:`BatchNorm`, a stateful layer that ties them
   together: train on batches, then test on a single sample.
4. :mod:`~bnkit.reference.variants`: ghost batches and batch renormalization.

Everything computes in float64 and depends on NumPy only (never on torch), so that it
shares no code, and no bug, with the implementations it checks.

Example:
    >>> import numpy as np
    >>> from bnkit import reference as ref
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(32, 4))
    >>> y, cache = ref.batch_norm_train(x, gamma=np.ones(4), beta=np.zeros(4))
    >>> bool(np.allclose(y.mean(axis=0), 0) and np.allclose(y.var(axis=0), 1, atol=1e-4))
    True
    >>> dx, dgamma, dbeta = ref.batch_norm_backward(np.ones_like(y), cache)
"""

from bnkit.reference.core import (
    Cache,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    update_running_stats,
)
from bnkit.reference.layer import BatchNorm
from bnkit.reference.stats import Stats, batch_stats, merge_stats
from bnkit.reference.variants import (
    GhostCache,
    RenormCache,
    batch_renorm_backward,
    batch_renorm_train,
    ghost_batch_norm_backward,
    ghost_batch_norm_train,
    renorm_limits,
)

__all__ = [
    "BatchNorm",
    "Cache",
    "GhostCache",
    "RenormCache",
    "Stats",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "batch_renorm_backward",
    "batch_renorm_train",
    "batch_stats",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_train",
    "merge_stats",
    "renorm_limits",
    "update_running_stats",
]
