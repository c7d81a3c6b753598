"""Swap batch norm layers between torch and bnkit: :func:`convert` and :func:`to_torch`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnkit.errors import BatchNormError, ConfigError, ShapeError, format_shape
from bnkit.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormNd
from bnkit.tools._common import describe, eval_changing_extras, extra_options

__all__ = ["AnyRankBatchNorm", "convert", "to_torch"]


class AnyRankBatchNorm(BatchNormNd):
    r"""Batch normalization of any (N, C, \*) input: what :func:`convert` makes of a
    ``torch.nn.SyncBatchNorm``, which accepts every rank from 2 up.

    Otherwise the same layer as :class:`bnkit.BatchNorm2d` (same arguments, extras and
    state_dict keys); see :class:`bnkit.nn.BatchNormNd`.

    Example:
        >>> import torch
        >>> bn = AnyRankBatchNorm(3)
        >>> bn(torch.randn(4, 3)).shape, bn(torch.randn(4, 3, 5, 5)).shape
        (torch.Size([4, 3]), torch.Size([4, 3, 5, 5]))
    """

    input_layouts: ClassVar[dict[int, str]] = {
        2: "(N, C)",
        3: "(N, C, L)",
        4: "(N, C, H, W)",
        5: "(N, C, D, H, W)",
    }

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ShapeError(
                f"{self._where()}: expected input of shape (N, C, *) with 2 or more "
                f"dimensions, got {input.dim()}D input of shape {format_shape(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ShapeError(
                f"{self._where()}: expected {self.num_features} channels in dimension 1, got "
                f"{input.shape[1]} in input of shape {format_shape(input.shape)}"
            )


# torch class -> bnkit class, and back. Exact classes: a subclass of torch's layer may have
# its own forward, which a replacement would silently drop (torch.ao's quantized
# BatchNorm2d is one), so subclasses are left alone.
_TO_BNKIT: dict[type[nn.Module], type[BatchNormNd]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: AnyRankBatchNorm,
}
# Checked in this order with isinstance: AnyRankBatchNorm before the fixed ranks.
_TO_TORCH: tuple[tuple[type[BatchNormNd], type[_BatchNorm]], ...] = (
    (AnyRankBatchNorm, nn.SyncBatchNorm),
    (BatchNorm1d, nn.BatchNorm1d),
    (BatchNorm2d, nn.BatchNorm2d),
    (BatchNorm3d, nn.BatchNorm3d),
)

# Per-instance state worth carrying over to the replacement: hook dicts (shared, so the
# handles the user holds still remove them) and quantization config, as torch's
# convert_sync_batchnorm does.
_CARRIED_ATTRIBUTES = ("qconfig",)


def convert(model: nn.Module, **extras: Any) -> nn.Module:
    """Replace torch's batch norm layers by bnkit's, in place, keeping their state.

    Every ``torch.nn.BatchNorm1d/2d/3d`` becomes :class:`bnkit.BatchNorm1d/2d/3d` and every
    ``torch.nn.SyncBatchNorm`` an :class:`AnyRankBatchNorm` (``sync=True``), recursively,
    like torch's
    ``SyncBatchNorm.convert_sync_batchnorm``. ``extras`` (``running_var_estimator=``,
    ``single_sample=``, ``frozen=``...) are passed to every new layer's constructor, and
    bnkit layers already in the model are rebuilt with their current options updated by
    ``extras`` (left as they are when there are none).

    The new layers take over the old ones' ``Parameter`` and buffer objects (so an
    optimizer built on the model keeps working, with its state), their hooks, their
    train/eval mode and their device, dtype and ``requires_grad``. Outputs, gradients and
    running statistics stay those of the old layers (to rounding: bnkit computes the
    variance in two passes).

    Args:
        model: any module; it is modified in place (deep-copy it first to keep it).
        **extras: keyword-only options of :class:`bnkit.nn.BatchNormNd`, not checked here:
            the constructor rejects unknown ones.

    Returns:
        ``model``, or the new layer when ``model`` itself is a batch norm layer.

    Raises:
        ConfigError: an extra the constructor rejects, or a lazy batch norm layer that has
            not seen an input yet (its size is unknown); the message names the layer.
            Nothing is modified then.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = convert(model, single_sample="running")
        >>> type(model[1]).__name__, model[1].single_sample
        ('BatchNorm2d', 'running')
        >>> isinstance(model[1], bnkit.BatchNorm2d)
        True

    Note:
        Subclasses of torch's layers (torch.ao's quantized ``BatchNorm2d``, user classes
        with their own ``forward``) are left alone. A ``SyncBatchNorm`` becomes an
        :class:`AnyRankBatchNorm` with ``sync=True`` and its ``process_group`` (unless
        ``extras`` say otherwise): it accepts any rank and synchronizes like the original.
    """

    def replace(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, _BatchNorm):
            return module
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ConfigError(
                f"convert: {describe(path, module)} has not seen an input yet, so its "
                f"number of channels is unknown; run one forward pass first"
            )
        target = _TO_BNKIT.get(type(module))
        if target is not None:
            options: dict[str, Any] = {}
            if isinstance(module, nn.SyncBatchNorm) and _accepted(target) >= _SYNC_OPTIONS:
                options = {"sync": True, "process_group": module.process_group}
            return _rebuild(target, module, {**options, **extras}, path, "convert")
        if isinstance(module, BatchNormNd) and extras:  # rebuilt with the new options
            current = {name: value for name, (value, _) in extra_options(module).items()}
            return _rebuild(type(module), module, {**current, **extras}, path, "convert")
        return module

    return _replace_modules(model, replace)


def to_torch(model: nn.Module) -> nn.Module:
    """Replace bnkit's batch norm layers by torch's, in place: for export (ONNX, TorchScript).

    :class:`bnkit.BatchNorm1d/2d/3d` become ``torch.nn.BatchNorm1d/2d/3d``, and an
    :class:`AnyRankBatchNorm` or any layer with ``sync=True`` a ``torch.nn.SyncBatchNorm``
    (the torch layer that accepts any rank; outside distributed training it is plain
    batch norm; it gets the layer's ``process_group``), taking over the same
    ``Parameter`` and buffer objects, hooks, mode, device and dtype. Eval outputs are
    unchanged.

    Args:
        model: any module; it is modified in place (deep-copy it first to keep it).

    Returns:
        ``model``, or the new layer when ``model`` itself is a batch norm layer.

    Raises:
        ConfigError: a layer uses an extra that changes its eval output, which torch's
            layer cannot express (``activation=``, or an option unknown to this function),
            or a bnkit layer class without a torch counterpart; the message names the
            layer. Nothing is modified then.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bnkit.BatchNorm1d(8))
        >>> type(to_torch(model)[1])
        <class 'torch.nn.modules.batchnorm.BatchNorm1d'>

    Note:
        Extras that act only in training are dropped: ``running_var_estimator``
        (torch's layer records the unbiased variance), ``single_sample`` (torch raises),
        ``skip_nonfinite`` (torch records NaN statistics), ghost batches and renorm.
        A *frozen* layer becomes a
        torch layer in eval mode, which keeps its statistics until something calls
        ``.train()`` on it.
    """
    problems = []
    for path, module in model.named_modules():
        if not isinstance(module, BatchNormNd):
            continue
        changing = eval_changing_extras(module)
        if changing:
            problems.append(
                f"{describe(path, module)} uses {', '.join(changing)}, which changes its eval "
                f"output and torch's batch norm cannot express"
            )
        elif _torch_class(module) is None:
            problems.append(f"{describe(path, module)} has no torch counterpart")
    if problems:
        raise ConfigError(
            "to_torch: cannot convert " + "; ".join(problems) + ". Remove those options "
            "(or keep the bnkit layer) before exporting"
        )

    def replace(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, BatchNormNd):
            return module
        target = _torch_class(module)
        assert target is not None  # checked above
        options = {}
        if target is nn.SyncBatchNorm:
            options["process_group"] = getattr(module, "process_group", None)
        new = _rebuild(target, module, options, path, "to_torch")
        if module.frozen:
            new.train(False)
        return new

    return _replace_modules(model, replace)


_SYNC_OPTIONS = frozenset({"sync", "process_group"})


def _accepted(cls: type[nn.Module]) -> set[str]:
    """The keyword arguments ``cls``'s constructor takes."""
    return set(inspect.signature(cls.__init__).parameters)


def _torch_class(module: BatchNormNd) -> type[_BatchNorm] | None:
    if getattr(module, "sync", False):  # synchronized: torch's synchronized layer
        return nn.SyncBatchNorm
    for bnkit_class, torch_class in _TO_TORCH:
        if isinstance(module, bnkit_class):
            return torch_class
    return None


def _replace_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Apply ``replace(path, module)`` to every module, top-down, once per module object
    (a module reachable by two paths is replaced by the same new module at both).

    All replacements are built before any is installed, so an error leaves ``model`` as it
    was."""
    done: dict[int, nn.Module] = {}
    installs: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(path: str, module: nn.Module) -> nn.Module:
        key = id(module)
        if key in done:
            return done[key]
        new = replace(path, module)
        done[key] = new
        if new is module:
            for name, child in module._modules.items():
                if child is None:
                    continue
                new_child = visit(f"{path}.{name}" if path else name, child)
                if new_child is not child:
                    installs.append((module, name, new_child))
        return new

    root = visit("", model)
    for parent, name, child in installs:
        parent._modules[name] = child
    return root


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """device and dtype of the layer's floating-point state (None: torch's defaults)."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _rebuild(
    cls: type[_BatchNorm], old: _BatchNorm, extras: dict[str, Any], path: str, where: str
) -> _BatchNorm:
    """A ``cls`` layer with ``old``'s configuration and ``extras``, adopting its state."""
    kwargs: dict[str, Any] = {
        "eps": old.eps,
        "momentum": old.momentum,
        "affine": old.affine,
        "track_running_stats": old.track_running_stats,
        **_factory_kwargs(old),
    }
    if old.affine:
        kwargs["bias"] = old.bias is not None
    try:
        new = cls(old.num_features, **kwargs, **extras)
    except (TypeError, BatchNormError) as error:
        raise ConfigError(
            f"{where}: cannot build {cls.__name__} for {describe(path, old)}: {error}"
        ) from error
    # Take over the very Parameter and buffer objects: optimizers hold them.
    for name in list(new._parameters):
        if name in old._parameters:
            new._parameters[name] = old._parameters[name]
    for name in list(new._buffers):
        if name in old._buffers:
            new._buffers[name] = old._buffers[name]
    _carry_hooks(old, new)
    for name in _CARRIED_ATTRIBUTES:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s hooks to ``new``. A hook dict the new layer left empty is replaced by
    the old one itself, so the handles the user holds still remove the hooks."""
    for name, value in vars(old).items():
        if "hook" not in name or not isinstance(value, (dict, set)) or not value:
            continue
        current = getattr(new, name, None)
        if isinstance(current, (dict, set)) and current:
            current.update(value)
        else:
            setattr(new, name, value)
