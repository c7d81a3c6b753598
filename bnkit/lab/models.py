"""The networks the lab trains, and the one place that picks the batch norm layer.

Every experiment builds its batch norm layers with :func:`batch_norm`, so the lab
measures :class:`bnkit.nn.BatchNorm1d`; should that import fail, :func:`batch_norm`
falls back to :class:`torch.nn.BatchNorm1d` (same signature and results), and
:func:`batch_norm_implementation` says which one ran (the results record it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.errors import ConfigError, format_choices

__all__ = [
    "ACTIVATIONS",
    "NormFactory",
    "activation_layers",
    "batch_norm",
    "batch_norm_implementation",
    "batch_norm_layers",
    "bnkit_norm",
    "conv_net",
    "group_norm",
    "mlp",
]

#: Hidden-layer nonlinearities by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def _bnkit_batch_norm1d() -> type[nn.Module] | None:
    try:
        from bnkit.nn import BatchNorm1d
    except ImportError:
        return None
    return BatchNorm1d


def batch_norm(num_features: int, **kwargs: Any) -> nn.Module:
    """The batch normalization layer of the lab's networks: ``bnkit.nn.BatchNorm1d``.

    Falls back to ``torch.nn.BatchNorm1d`` when ``bnkit.nn`` cannot be imported.

    Args:
        num_features: the number of features C of the (N, C) input.
        **kwargs: passed on (``eps``, ``momentum``, ``affine``...).

    Example:
        >>> batch_norm(4, momentum=None)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """
    layer = _bnkit_batch_norm1d()
    if layer is None:
        return nn.BatchNorm1d(num_features, **kwargs)
    return layer(num_features, **kwargs)


def batch_norm_implementation() -> str:
    """The qualified name of the class :func:`batch_norm` builds.

    Example:
        >>> batch_norm_implementation()
        'bnkit.nn.BatchNorm1d'
    """
    layer = _bnkit_batch_norm1d() or nn.BatchNorm1d
    module = "torch.nn" if layer is nn.BatchNorm1d else layer.__module__
    return f"{module}.{layer.__name__}"


def mlp(
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (100, 100, 100),
    activation: str = "sigmoid",
    use_batch_norm: bool = False,
    dropout: float = 0.0,
    bn_momentum: float | None = 0.1,
    init_std: float | None = None,
) -> nn.Sequential:
    """A fully connected classifier: Flatten, then per hidden layer Linear -> [BN] ->
    activation -> [Dropout], then a Linear to the class logits.

    With batch norm, each hidden Linear has no bias: BN's beta takes its place (a bias
    before the Z-transform would be subtracted away with the mean). Weights start as
    small Gaussians, N(0, init_std^2) with init_std = 1/sqrt(fan_in) by default, biases
    at zero.

    Args:
        in_features: the number of input values (inputs are flattened first).
        num_classes: the number of logits.
        hidden: the widths of the hidden layers.
        activation: ``"sigmoid"`` or ``"relu"``.
        use_batch_norm: insert :func:`batch_norm` after each hidden Linear.
        dropout: the drop probability after each hidden activation (0: no dropout).
        bn_momentum: the batch norm layers' momentum (None: cumulative average).
        init_std: the standard deviation of the initial weights; None: 1/sqrt(fan_in).

    Returns:
        The network; its layers are found with :func:`activation_layers` and
        :func:`batch_norm_layers`.

    Raises:
        ConfigError: an unknown activation or a dropout outside [0, 1).

    Example:
        >>> net = mlp(40, 10, use_batch_norm=True)
        >>> net(torch.randn(60, 40)).shape, len(batch_norm_layers(net))
        (torch.Size([60, 10]), 3)
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"mlp: unknown activation {activation!r}; expected one of {format_choices(ACTIVATIONS)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mlp: expected dropout in [0, 1), got {dropout!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        linear = nn.Linear(width, size, bias=not use_batch_norm)
        layers.append(linear)
        if use_batch_norm:
            layers.append(batch_norm(size, momentum=bn_momentum))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                std = init_std if init_std is not None else 1.0 / math.sqrt(layer.in_features)
                layer.weight.normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias.zero_()
    return nn.Sequential(*layers)


def activation_layers(model: nn.Module) -> list[nn.Module]:
    """The hidden activations of ``model`` (sigmoid or ReLU modules), first to last."""
    kinds = tuple(ACTIVATIONS.values())
    return [module for module in model.modules() if isinstance(module, kinds)]


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The batch norm layers of ``model`` (bnkit's or torch's), first to last."""
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


#: Makes the normalization after a convolution: ``norm(channels, spatial_dims)``.
NormFactory = Callable[[int, int], nn.Module]


def bnkit_norm(**kwargs: Any) -> NormFactory:
    """A :data:`NormFactory` of ``bnkit.BatchNorm1d``/``2d`` (by spatial rank) with ``kwargs``.

    Example:
        >>> layer = bnkit_norm(momentum=None)(8, 2)
        >>> type(layer).__name__, layer.momentum
        ('BatchNorm2d', None)
    """
    from bnkit.nn import BatchNorm1d, BatchNorm2d

    def make(channels: int, dims: int) -> nn.Module:
        layer = BatchNorm1d if dims == 1 else BatchNorm2d
        return layer(channels, **kwargs)

    return make


def group_norm(groups: int = 8) -> NormFactory:
    """A :data:`NormFactory` of ``torch.nn.GroupNorm`` (Wu & He 2018) with ``groups`` groups.

    Example:
        >>> layer = group_norm(4)(16, 1)
        >>> layer.num_groups, layer.num_channels
        (4, 16)
    """
    return lambda channels, dims: nn.GroupNorm(min(groups, channels), channels)


def conv_net(
    sample_shape: Sequence[int],
    num_classes: int,
    norm: NormFactory | None,
    *,
    widths: Sequence[int] = (16, 32, 32),
) -> nn.Sequential:
    """A small CNN: 1D convolutions for (L,) samples, 2D for (H, W) images.

    Unflatten to one input channel, then per width a convolution (kernel 5 for the first,
    3 and stride 2 after; no bias when a normalization follows) -> ``norm`` -> ReLU, then
    global average pooling and a Linear to the logits. Weights use torch's default
    initialization (seed it before the call).

    Args:
        sample_shape: the shape of one input, ``(L,)`` or ``(H, W)``.
        num_classes: the number of logits.
        norm: makes each normalization layer; None: no normalization (convolutions keep
            their bias).
        widths: the channels of the convolutions.

    Raises:
        ConfigError: a sample shape of another rank.

    Example:
        >>> net = conv_net((40,), 10, bnkit_norm())
        >>> net(torch.randn(4, 40)).shape, len(batch_norm_layers(net))
        (torch.Size([4, 10]), 3)
    """
    dims = len(sample_shape)
    if dims not in (1, 2):
        raise ConfigError(
            f"conv_net: expected samples of shape (L,) or (H, W), got {tuple(sample_shape)}"
        )
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, sample_shape[0]))]  # (N, *S) -> (N, 1, *S)
    channels = 1
    for index, width in enumerate(widths):
        kernel, stride = (5, 1) if index == 0 else (3, 2)
        layers.append(
            conv(channels, width, kernel, stride=stride, padding=kernel // 2, bias=norm is None)
        )
        if norm is not None:
            layers.append(norm(width, dims))
        layers.append(nn.ReLU())
        channels = width
    layers += [pool, nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
