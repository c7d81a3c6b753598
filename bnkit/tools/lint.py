"""Find batch norm mistakes in a model: :func:`lint`."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.errors import format_shape
from bnkit.nn import BatchNormNd
from bnkit.tools._common import batch_norm_layers, has_running_stats, trace

__all__ = ["CHECKS", "Finding", "lint"]

#: The codes of the findings :func:`lint` reports, with what each one is about.
CHECKS = {
    "redundant-bias": "a Conv/Linear bias feeding a batch norm layer",
    "small-batch": "too few values per channel in a training batch",
    "keras-momentum": "a momentum in Keras/flax's convention",
    "train-mode-at-inference": "a batch norm layer in train mode inside an eval model",
    "no-running-stats": "a layer that normalizes with batch statistics in eval mode too",
    "nonfinite-stats": "running statistics that are NaN, Inf or negative",
}

_BIASED = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(frozen=True)
class Finding:
    """One problem :func:`lint` found.

    Attributes:
        path: the module path of the layer to change ("" for the model itself).
        code: the kind of problem, a key of :data:`CHECKS` (``"redundant-bias"``...).
        problem: what is wrong.
        why: why it matters.
        fix: what to do.
    """

    path: str
    code: str
    problem: str
    why: str
    fix: str

    def __str__(self) -> str:
        return (
            f"{self.path or '<model>'}: [{self.code}] {self.problem}. {self.why}. Fix: {self.fix}."
        )


def lint(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    *,
    min_values_per_channel: int = 8,
) -> list[Finding]:
    """Check a model for the common batch norm mistakes.

    - **redundant-bias**: a Conv/ConvTranspose/Linear with a bias whose output goes only to
      batch norm (found by tracing the forward with torch.fx, else by neighbours in an
      ``nn.Sequential``);
    - **small-batch** (needs ``example_input``, a training batch): a layer whose training
      batch holds fewer than ``min_values_per_channel`` values per channel (N times the
      spatial size);
    - **keras-momentum**: momentum >= 0.9, Keras/flax's convention (the weight of the old
      value) in a layer that uses PyTorch's (the weight of the new batch);
    - **train-mode-at-inference**: the model is in eval mode but a layer is in train mode;
    - **no-running-stats**: ``track_running_stats=False``, so eval outputs depend on the batch;
    - **nonfinite-stats**: ``running_mean`` or ``running_var`` holding NaN or Inf, or a
      negative variance.

    Nothing is changed: ``example_input`` runs once in eval mode (shapes are all it needs)
    under ``torch.no_grad``, and buffers and modes are restored afterwards.

    Args:
        model: any module with torch's or bnkit's batch norm layers.
        example_input: one training batch (a tensor or a tuple of the forward's arguments).
        min_values_per_channel: the smallest number of values per channel a training
            batch should give each layer. Default 8.

    Returns:
        The findings, in module order; empty when all is well.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> for finding in lint(model, torch.randn(2, 3, 3, 3)):
        ...     print(finding.path, finding.code)
        0 redundant-bias
        1 small-batch
        >>> print(lint(model)[0])  # doctest: +ELLIPSIS
        0: [redundant-bias] '0' (Conv2d) has a bias and feeds batch norm '1'... Fix: ...
    """
    shapes = _input_shapes(model, example_input) if example_input is not None else {}
    findings = _redundant_biases(model, shapes)
    # A frozen layer normalizes with its running statistics, whatever the batch.
    frozen = {
        name for name, bn in batch_norm_layers(model) if isinstance(bn, BatchNormNd) and bn.frozen
    }
    training_shapes = {name: shape for name, shape in shapes.items() if name not in frozen}
    findings += _small_batches(training_shapes, min_values_per_channel)
    for name, bn in batch_norm_layers(model):
        findings += _layer_findings(model, name, bn)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    codes = list(CHECKS)
    findings.sort(key=lambda f: (order.get(f.path, -1), codes.index(f.code)))
    return findings


def _redundant_bias(name: str, layer: nn.Module, bn_name: str) -> Finding:
    return Finding(
        name,
        "redundant-bias",
        f"'{name}' ({type(layer).__name__}) has a bias and feeds batch norm '{bn_name}'",
        "Batch norm subtracts each channel's mean, which removes a constant bias, and its "
        "beta takes the bias's place: the bias costs parameters, memory and weight decay "
        "for nothing",
        f"construct '{name}' with bias=False",
    )


def _redundant_biases(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[Finding]:
    findings: list[Finding] = []
    graph_module, _ = trace(model) if not isinstance(model, _BatchNorm) else (None, None)
    if graph_module is not None:
        modules = dict(graph_module.named_modules())
        calls = [node for node in graph_module.graph.nodes if node.op == "call_module"]
        for node in calls:
            layer = modules[str(node.target)]
            if type(layer) not in _BIASED or getattr(layer, "bias", None) is None:
                continue
            if any(other.target == node.target for other in calls if other is not node):
                continue  # called twice: judged per call would be guesswork
            users = list(node.users)
            feeds = [
                user
                for user in users
                if user.op == "call_module"
                and isinstance(modules[str(user.target)], _BatchNorm)
                and user.args[:1] == (node,)
            ]
            if not users or len(feeds) != len(users):
                continue
            bn = modules[str(feeds[0].target)]
            assert isinstance(bn, _BatchNorm)
            bn_name = str(feeds[0].target)
            if _feeds_channels(layer, bn, shapes.get(bn_name)):
                findings.append(_redundant_bias(str(node.target), layer, bn_name))
        return findings
    names = {id(m): name for name, m in model.named_modules()}
    for sequence in model.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        children = [m for m in sequence._modules.values() if m is not None]
        for layer, bn in itertools.pairwise(children):
            if (
                type(layer) in _BIASED
                and getattr(layer, "bias", None) is not None
                and isinstance(bn, _BatchNorm)
                and _feeds_channels(layer, bn, shapes.get(names[id(bn)]))
            ):
                findings.append(_redundant_bias(names[id(layer)], layer, names[id(bn)]))
    return findings


def _feeds_channels(layer: nn.Module, bn: _BatchNorm, shape: tuple[int, ...] | None) -> bool:
    """Whether the layer's output channels are the batch norm's channels: a Linear's are
    the last dimension, batch norm's dimension 1, the same only for (N, C) features."""
    if isinstance(layer, nn.Linear) and shape is not None and len(shape) != 2:
        return False
    size = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, "out_channels", 0)
    return bool(size == bn.num_features)


def _input_shapes(
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...]
) -> dict[str, tuple[int, ...]]:
    """The input shape of every batch norm layer (its first call) on ``example_input``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, bn in batch_norm_layers(model):

        def record(module: nn.Module, args: tuple[object, ...], name: str = name) -> None:
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        handles.append(bn.register_forward_pre_hook(record))
    modes = [(module, module.training) for module in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()  # shapes do not depend on the mode, and eval updates no statistics
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return shapes


def _small_batches(shapes: dict[str, tuple[int, ...]], minimum: int) -> list[Finding]:
    findings = []
    for name, shape in shapes.items():
        values = math.prod((shape[0], *shape[2:])) if len(shape) >= 2 else 0
        if values < minimum:
            findings.append(
                Finding(
                    name,
                    "small-batch",
                    f"a training batch gives it {values} value{'s' * (values != 1)} per "
                    f"channel (input of shape {format_shape(shape)})",
                    f"Batch statistics from fewer than {minimum} values are noisy (one value "
                    f"has no variance at all): training is erratic and eval outputs differ "
                    f"from training outputs",
                    "use larger batches, or freeze the layer (bnkit.tools.freeze), or use "
                    "GroupNorm/LayerNorm here",
                )
            )
    return findings


def _layer_findings(model: nn.Module, name: str, bn: _BatchNorm) -> list[Finding]:
    findings = []
    frozen = isinstance(bn, BatchNormNd) and bn.frozen
    momentum = bn.momentum
    if momentum is not None and 0.9 <= momentum < 1:
        findings.append(
            Finding(
                name,
                "keras-momentum",
                f"momentum={momentum} weighs each new batch by {momentum}",
                f"PyTorch's momentum is the weight of the new batch, Keras/flax's the weight of "
                f"the old value: {momentum} looks like theirs, and makes the running "
                f"statistics little more than the last batch's",
                f"use momentum={round(1 - momentum, 6)}",
            )
        )
    if not model.training and bn.training and not frozen and has_running_stats(bn):
        findings.append(
            Finding(
                name,
                "train-mode-at-inference",
                "the model is in eval mode but this layer is in train mode",
                "It normalizes with the statistics of each inference batch and updates its "
                "running statistics from them: outputs depend on the batch, and a batch of "
                "one fails",
                "call model.eval() after the last model.train() (or the layer's .eval())",
            )
        )
    if not has_running_stats(bn):
        findings.append(
            Finding(
                name,
                "no-running-stats",
                "track_running_stats=False: it normalizes with batch statistics in eval mode too",
                "Inference outputs depend on the other samples of the batch, and a batch of "
                "one fails",
                "construct it with track_running_stats=True and recalibrate "
                "(bnkit.tools.recalibrate)",
            )
        )
    else:
        assert bn.running_mean is not None
        assert bn.running_var is not None
        bad = [
            what
            for what, ok in (
                ("running_mean is not finite", bool(torch.isfinite(bn.running_mean).all())),
                ("running_var is not finite", bool(torch.isfinite(bn.running_var).all())),
                ("running_var is negative", not bool((bn.running_var < 0).any())),
            )
            if not ok
        ]
        if bad:
            findings.append(
                Finding(
                    name,
                    "nonfinite-stats",
                    "; ".join(bad),
                    "Every eval output of this layer, and after it, is NaN or wrong",
                    "recompute the statistics (bnkit.tools.recalibrate) and look for the NaN "
                    "or Inf batch; bnkit layers skip such batches (skip_nonfinite=True)",
                )
            )
    return findings
