"""Helpers shared by the tools: finding batch norm layers, their options, their eval map,
module paths, batches, and tracing a model with torch.fx."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.nn import BatchNormNd

__all__ = [
    "EVAL_NEUTRAL_EXTRAS",
    "ChannelAffine",
    "batch_input",
    "batch_norm_layers",
    "describe",
    "eval_affine",
    "eval_changing_extras",
    "extra_options",
    "has_running_stats",
    "is_batch_norm",
    "restore_buffers",
    "save_buffers",
    "set_submodule",
    "trace",
]

#: bnkit extras that only change training (the statistics used or recorded, errors, warnings,
#: synchronization): in eval mode a layer with any of them computes plain batch norm with
#: its running statistics. Any other extra with a non-default value is assumed to change
#: the eval output (``activation=`` does) until it is listed here.
EVAL_NEUTRAL_EXTRAS = frozenset(
    {
        "running_var_estimator",
        "single_sample",
        "skip_nonfinite",
        "frozen",
        "renorm",
        "ghost_batch_size",
        "sync",
        "process_group",
        "memory_efficient",
    }
)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm layer: torch's (any ``_BatchNorm``) or bnkit's."""
    return isinstance(module, _BatchNorm)


def batch_norm_layers(model: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    """``(path, layer)`` for every batch norm layer of ``model`` (the root included, as "")."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            yield name, module


def has_running_stats(bn: _BatchNorm) -> bool:
    """Whether the layer keeps running statistics (so eval mode uses them)."""
    return bn.running_mean is not None and bn.running_var is not None


def describe(path: str, module: nn.Module) -> str:
    """``'layer1.bn1' (BatchNorm2d(64))``: a module path for messages, the root as 'the model'."""
    kind = type(module).__name__
    size = getattr(module, "num_features", None)
    label = f"{kind}({size})" if isinstance(size, int) else kind
    return f"'{path}' ({label})" if path else f"the model ({label})"


def extra_options(bn: nn.Module) -> dict[str, tuple[Any, Any]]:
    """The keyword-only constructor options of a bnkit layer: ``{name: (value, default)}``.

    Read from the signatures of every ``__init__`` in the class's MRO (so subclasses that
    add options through ``**kwargs`` are covered) and from the attributes of the same name,
    the convention of :class:`bnkit.nn.BatchNormNd`. torch's own keyword ``bias`` is not an
    extra. An option with no attribute of its name is left out: its value cannot be read.
    """
    options: dict[str, tuple[Any, Any]] = {}
    if not isinstance(bn, BatchNormNd):
        return options
    for cls in type(bn).__mro__:
        if cls is _BatchNorm:
            break
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name == "bias":
                continue
            if parameter.name not in options and hasattr(bn, parameter.name):
                options[parameter.name] = (getattr(bn, parameter.name), parameter.default)
    return options


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except Exception:  # an option whose == is not a plain truth value
        return False


def eval_changing_extras(bn: nn.Module) -> list[str]:
    """``["activation='relu'", ...]``: the extras set on ``bn`` that change its eval output."""
    return [
        f"{name}={value!r}"
        for name, (value, default) in extra_options(bn).items()
        if name not in EVAL_NEUTRAL_EXTRAS and not _same(value, default)
    ]


def eval_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    r"""The per-channel map of a layer in eval mode, in float64: ``y = scale * x + shift``.

    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale.

    Returns:
        ``(scale, shift)``, each (C,) float64 on the layer's device.
    """
    assert bn.running_mean is not None
    assert bn.running_var is not None
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    scale = torch.rsqrt(var + float(bn.eps))  # plain: a fused activation guards eps (bnkit.nn)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted, not empty) inside ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def save_buffers(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every buffer of ``model``, by name, for :func:`restore_buffers`."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def restore_buffers(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """Copy the values saved by :func:`save_buffers` back, in place (same tensor objects)."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def batch_input(batch: object, where: str, index: int) -> Tensor:
    """The input tensor of a batch: the batch itself, its first element (tuple or list), or
    its ``"input"`` entry (dict).

    Raises:
        TypeError: anything else.
    """
    value: object = batch
    if isinstance(batch, (tuple, list)) and batch:
        value = batch[0]
    elif isinstance(batch, Mapping):
        value = batch.get("input")
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{where}: expected each batch to be a tensor, a tuple or list whose first element "
            f"is the input tensor, or a dict with an 'input' tensor; batch {index} is "
            f"{_kind(batch)}"
        )
    return value


def _kind(value: object) -> str:
    if isinstance(value, (tuple, list)):
        first = _kind(value[0]) if value else "nothing"
        return f"a {type(value).__name__} starting with {first}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


class ChannelAffine(nn.Module):
    r"""A fixed per-channel affine map, y = scale * x + shift over dimension 1.

    What :func:`fold` puts where a batch norm layer cannot be merged into a neighbour: the
    layer's eval-mode computation, one multiply and one add.

    Args:
        scale, shift: (C,) tensors, stored as buffers (in the state_dict).

    Shape:
        - Input: (N, C, \*)
        - Output: same shape.

    Example:
        >>> affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
        >>> affine(torch.ones(1, 2))
        tensor([[2., 4.]])
    """

    scale: Tensor
    shift: Tensor

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, input: Tensor) -> Tensor:
        """Apply the map to channel dimension 1 of ``input``."""
        view = (1, -1) + (1,) * (input.dim() - 2)
        return input * self.scale.to(input.dtype).view(view) + self.shift.to(input.dtype).view(view)

    def extra_repr(self) -> str:
        return str(self.scale.numel())


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every batch norm layer (bnkit's too) and every
    :class:`ChannelAffine` as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_BatchNorm, ChannelAffine)):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    """Trace ``model`` with torch.fx, batch norm layers as leaves.

    Returns:
        ``(graph_module, None)``, or ``(None, reason)`` when tracing fails (data-dependent
        control flow, unsupported calls...). The graph module shares ``model``'s submodules.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many kinds; each one means "not traceable"
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return fx.GraphModule(tracer.root, graph, type(model).__name__), None
