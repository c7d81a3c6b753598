"""Freeze every batch norm layer's statistics, whatever mode the model is in."""

from __future__ import annotations

from torch import nn

from bnkit.errors import ConfigError
from bnkit.nn import BatchNormNd
from bnkit.tools._common import batch_norm_layers, describe, has_running_stats
from bnkit.tools.convert import _TO_BNKIT, convert

__all__ = ["freeze", "unfreeze"]


def freeze(model: nn.Module, *, affine: bool = False) -> nn.Module:
    """Make every batch norm layer normalize with its running statistics and keep them,
    even under ``model.train()``.

    torch's layers are first converted to bnkit's (:func:`convert`: same parameters and
    buffers, in place), which have a ``frozen`` state that ``train()`` does not undo; then
    every layer's :meth:`~bnkit.nn.BatchNormNd.freeze` is called. The usual setting for
    fine-tuning with small batches (detection backbones).

    Args:
        model: any module; modified in place.
        affine: also stop training gamma and beta (``requires_grad_(False)``).

    Returns:
        ``model``, or its replacement when ``model`` itself is a torch batch norm layer.

    Raises:
        ConfigError: a layer without running statistics (``track_running_stats=False``:
            nothing to freeze to), or a subclass of torch's layer that :func:`convert`
            leaves alone; nothing is modified then. The message names the layers.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> model = freeze(model).train()
        >>> _ = model(torch.randn(8, 4))
        >>> model[1].frozen, int(model[1].num_batches_tracked), model[1].running_mean.tolist()
        (True, 0, [0.0, 0.0, 0.0])
    """
    problems = []
    for name, bn in batch_norm_layers(model):
        if not has_running_stats(bn):
            problems.append(f"{describe(name, bn)} keeps no running statistics")
        elif not isinstance(bn, BatchNormNd) and type(bn) not in _TO_BNKIT:
            problems.append(
                f"{describe(name, bn)} is a subclass of torch's batch norm that convert "
                f"leaves alone"
            )
    if problems:
        raise ConfigError(f"freeze: cannot freeze {'; '.join(problems)}")
    model = convert(model)
    for _, bn in batch_norm_layers(model):
        assert isinstance(bn, BatchNormNd)
        bn.freeze()
        if affine:
            for parameter in bn.parameters(recurse=False):
                parameter.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, *, affine: bool = False) -> nn.Module:
    """Undo :func:`freeze`: batch norm layers use and update batch statistics in train mode.

    Layers stay bnkit's (convert them back with :func:`to_torch` if needed).

    Args:
        model: any module; modified in place.
        affine: also make gamma and beta trainable again (``requires_grad_(True)``).

    Returns:
        ``model``.

    Example:
        >>> import torch
        >>> model = freeze(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
        >>> unfreeze(model)[0].frozen
        False
    """
    for _, bn in batch_norm_layers(model):
        if isinstance(bn, BatchNormNd):
            bn.unfreeze()
        if affine:
            for parameter in bn.parameters(recurse=False):
                parameter.requires_grad_(True)
    return model
