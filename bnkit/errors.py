"""Error and warning types raised by bnkit.

Every error bnkit raises for bad input is a :class:`BatchNormError`, which is a
:class:`ValueError`, so ``except ValueError`` keeps working for code written against
``torch.nn.BatchNorm*d``. The subclasses let callers (and tests) tell the cases apart.

Messages follow one pattern: *where* (the layer or function), *what was expected*, and
*what came*, e.g.::

    BatchNorm2d(64): expected 4D input (N, C, H, W), got 3D input of shape (8, 64, 32)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BatchNormError",
    "ConfigError",
    "DTypeError",
    "DamagedResultWarning",
    "DatasetError",
    "EmptyBatchError",
    "FusionError",
    "MissingStatsError",
    "NonFiniteStatsWarning",
    "ShapeError",
    "SingleValueError",
    "SizeMismatchError",
    "format_choices",
    "format_shape",
]


class BatchNormError(ValueError):
    """Base class of every input or configuration error raised by bnkit."""


class ShapeError(BatchNormError):
    """The input (or a mask, or a parameter) has the wrong rank or size."""


class ConfigError(BatchNormError):
    """An option is out of range: eps <= 0, momentum outside [0, 1], an unknown choice..."""


class SizeMismatchError(ShapeError, RuntimeError):
    """The input's channels and a per-channel tensor (running statistics, weight, bias) or
    the layer's num_features disagree.

    Also a :class:`RuntimeError`, the type torch raises in these cases, so code written
    against ``torch.nn.BatchNorm*d`` catches it either way.
    """


class MissingStatsError(ConfigError, RuntimeError):
    """Population statistics are needed (evaluation) but none were given.

    Also a :class:`RuntimeError`, as torch raises there.
    """


class DTypeError(BatchNormError, TypeError):
    """The input has a dtype batch normalization cannot handle (an integer or complex tensor).

    Also a :class:`TypeError`: the problem is the kind of value, not its size.
    """


class DeviceMismatchError(BatchNormError, RuntimeError):
    """The tensors of one call are on different devices.

    Also a :class:`RuntimeError`, which is what torch raises for it.
    """


class ConfigWarning(UserWarning):
    """An option that is accepted, as torch accepts it, but makes little sense (a momentum
    outside [0, 1])."""


class EmptyBatchError(BatchNormError):
    """Batch statistics were asked of a batch with no values at all."""


class FusionError(BatchNormError):
    """A layer with a fused ``activation=`` met a tool that would fold it into a
    convolution or linear layer without its activation (torch's
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and ``fuse_linear_bn_eval``): the folded
    layer would compute a different function. ``bnkit.tools.fold`` folds such a layer and
    keeps its activation."""


class SingleValueError(BatchNormError):
    """A training batch holds a single value per feature, so its variance is undefined."""


class NonFiniteStatsWarning(RuntimeWarning):
    """A training batch produced NaN or Inf statistics and they were not recorded."""


class DatasetError(BatchNormError):
    """A dataset's files are damaged or hold data the lab cannot train on (a bad header,
    too few bytes, labels out of range, no samples, NaN or Inf values...)."""


class DamagedResultWarning(UserWarning):
    """A saved lab result is unreadable or has the wrong structure; it is treated as
    missing (``bnkit lab`` runs the experiment again, ``bnkit report`` leaves it out)."""


def format_shape(shape: Iterable[int]) -> str:
    """Render a shape the way users write it: ``(8, 64, 32)``, ``(8,)``, ``()``."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return f"({dims[0]},)"
    return "(" + ", ".join(str(d) for d in dims) + ")"


def format_choices(choices: Iterable[object]) -> str:
    """Render a fixed set of option values for an error message: ``'raise', 'running'``."""
    return ", ".join(repr(c) for c in choices)
