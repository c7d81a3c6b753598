"""Fold batch norm layers into the layers next to them, for inference: :func:`fold`."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.tools._common import (
    ChannelAffine,
    batch_norm_layers,
    describe,
    eval_affine,
    eval_changing_extras,
    has_running_stats,
    set_submodule,
    trace,
)

__all__ = ["ChannelAffine", "FoldEntry", "FoldReport", "fold"]

Action = Literal["into_producer", "into_consumer", "affine", "kept", "unused"]
Role = Literal["producer", "consumer"]

# Exact classes: a subclass (a parametrized conv, a quantized one) may compute something
# else from its weight, which folding would then break.
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONVS, *_TRANSPOSED, nn.Linear)
_CONSUMERS = (*_CONVS, nn.Linear)


@dataclass(frozen=True)
class FoldEntry:
    """What :func:`fold` did with one batch norm layer.

    Attributes:
        name: the layer's module path in the original model.
        action: ``"into_producer"`` (merged into the Conv/ConvTranspose/Linear before it),
            ``"into_consumer"`` (merged into the Linear/Conv after it), ``"affine"``
            (replaced by a :class:`ChannelAffine`), ``"kept"`` (left as it is) or
            ``"unused"`` (never called by the traced forward, so absent from the result).
        target: the module path of the layer it was merged into, else None.
        reason: why, in words; for "affine" and "kept", why it could not be merged.
    """

    name: str
    action: Action
    target: str | None
    reason: str

    @property
    def folded(self) -> bool:
        """Whether the layer was merged into a neighbour (it costs nothing any more)."""
        return self.action in ("into_producer", "into_consumer")

    def __str__(self) -> str:
        verb = {
            "into_producer": f"folded into '{self.target}'",
            "into_consumer": f"folded into '{self.target}'",
            "affine": "replaced by a per-channel affine",
            "kept": "kept",
            "unused": "unused",
        }[self.action]
        return f"{self.name or '<root>'}: {verb}: {self.reason}"


@dataclass
class FoldReport:
    """What :func:`fold` did with every batch norm layer of the model.

    Attributes:
        entries: one :class:`FoldEntry` per layer, in graph (or module) order.
        method: ``"fx"`` (the forward was traced with torch.fx) or ``"module order"``
            (tracing failed: layers next to each other in an ``nn.Sequential`` were merged).
        trace_error: why tracing failed, with ``method="module order"``.
    """

    entries: list[FoldEntry] = field(default_factory=list)
    method: Literal["fx", "module order"] = "fx"
    trace_error: str | None = None

    @property
    def folded(self) -> list[FoldEntry]:
        """The entries of the layers merged into a neighbour."""
        return [entry for entry in self.entries if entry.folded]

    @property
    def not_folded(self) -> list[FoldEntry]:
        """The entries of the layers that were not merged (affine, kept or unused)."""
        return [entry for entry in self.entries if not entry.folded]

    def __getitem__(self, name: str) -> FoldEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no batch norm layer named {name!r} in the fold report")

    def __iter__(self) -> Iterator[FoldEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        head = f"fold ({self.method}): {len(self.folded)} of {len(self.entries)} folded"
        if self.trace_error:
            head += f"; torch.fx could not trace the forward ({self.trace_error})"
        return "\n".join([head, *(f"  {entry}" for entry in self.entries)])


@overload
def fold(
    model: nn.Module,
    *,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    return_report: Literal[False] = False,
) -> nn.Module: ...


@overload
def fold(
    model: nn.Module,
    *,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    return_report: Literal[True],
) -> tuple[nn.Module, FoldReport]: ...


def fold(
    model: nn.Module,
    *,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    r"""An eval-mode copy of ``model`` with its batch norm layers merged into their neighbours.

    In eval mode a batch norm layer is a per-channel affine map,
    y = scale * x + shift with scale = gamma / sqrt(running_var + eps) and
    shift = beta - running_mean * scale, so it can be merged into a neighbouring layer:

    - **into the layer before it** (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear): that
      layer's output channel c is scaled by scale[c] and shifted by shift[c]. Allowed when
      the BN's input is that layer's output and nothing else uses that output.
    - **into the layer after it** (Linear, Conv1d/2d/3d), when there is no layer before
      it to merge into: W' = W * scale over the input channels, b' = b + W applied to
      shift. Allowed when the BN's output goes to that layer only and, for a Conv, the
      merge is exact: no zero padding (padding 0, or a reflect/replicate/circular
      ``padding_mode``, which pads with copies of values) or a zero shift. A zero-padded
      border would have to hold -shift/scale instead of 0, which a bias cannot express.

    Any other layer becomes a :class:`ChannelAffine` (the same map, as cheap as it gets).
    A bnkit layer with a fused ``activation=`` folds the same way (into the layer before
    it only), its activation left in its place as the torch module (``nn.ReLU``,
    ``nn.LeakyReLU``, ``nn.ELU``). Layers without running statistics, or with another
    extra that changes the eval output, are kept. Every decision is recorded in a
    :class:`FoldReport`.

    The forward is traced with ``torch.fx`` (batch norm layers as leaves), so functional
    code (residual blocks with ``+``) is handled, and the result is a
    ``torch.fx.GraphModule`` (the forward's graph; the model's other methods are not
    kept). When tracing fails, layers next to each other inside an ``nn.Sequential`` are
    merged (module order) and the result keeps the model's class.

    Args:
        model: any module with torch's or bnkit's batch norm layers. Not modified.
        example_input: an input (or tuple of inputs) to run once, to learn the rank of each
            batch norm input: a Linear is merged only when it acts on (N, C) features. Without
            it, a Linear next to a BN of matching size is assumed to act on (N, C).
        return_report: return ``(model, report)`` instead of the model alone.

    Returns:
        The folded model, in eval mode, with the report also at its ``fold_report``
        attribute; or ``(model, report)`` with ``return_report=True``.

    Raises:
        Exception: whatever the model's forward raises on ``example_input``.

    Example:
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        ... )
        >>> folded, report = fold(model, return_report=True)
        >>> [type(m).__name__ for m in folded.modules()][1:]
        ['Conv2d', 'ReLU']
        >>> print(report)
        fold (fx): 1 of 1 folded
          1: folded into '0': merged into the output channels of '0' (Conv2d)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), model.eval()(x), atol=1e-6)
        True

    Note:
        The result computes the eval model: training it would not train batch norm. The
        weights are merged in float64 and stored in their own dtype. In module order (no
        trace) each ``nn.Sequential`` is assumed to be called as a whole.
    """
    folded = copy.deepcopy(model).eval()
    ranks = _input_ranks(folded, example_input) if example_input is not None else {}
    graph_module: fx.GraphModule | None = None
    trace_error: str | None = None  # a batch norm model needs no tracing: it becomes affine
    if not isinstance(folded, _BatchNorm):
        graph_module, trace_error = trace(folded)
    if graph_module is not None:
        result: nn.Module = graph_module
        report = FoldReport(_fold_graph(graph_module, folded, ranks), "fx")
    else:
        result, entries = _fold_module_order(folded, ranks)
        report = FoldReport(entries, "module order", trace_error)
    result.eval()
    setattr(result, "fold_report", report)  # noqa: B010  # a plain attribute on a Module
    if return_report:
        return result, report
    return result


def _input_ranks(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> dict[int, int]:
    """``{id(bn): rank of its input}`` from one eval forward (the copy's, so no harm done)."""
    ranks: dict[int, int] = {}
    handles = []
    for _, bn in batch_norm_layers(model):

        def record(module: nn.Module, args: tuple[object, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                ranks[id(module)] = args[0].dim()

        handles.append(bn.register_forward_pre_hook(record))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


# bnkit's fused activations (the ``activation=`` extra) as the torch modules that follow
# a folded layer: name -> module, from ``activation_param``.
_ACTIVATIONS: dict[str, Callable[[Any], nn.Module]] = {
    "identity": lambda _: nn.Identity(),
    "relu": lambda _: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "elu": lambda alpha: nn.ELU(alpha),
}


def _eval_form(bn: _BatchNorm) -> tuple[nn.Module | None, str | None]:
    """How the layer computes in eval mode: ``(activation, None)`` for an affine map followed
    by ``activation`` (None: nothing), or ``(None, why)`` when it is not that."""
    if not has_running_stats(bn):
        return None, (
            "no running statistics (track_running_stats=False): eval mode uses batch statistics"
        )
    changing = eval_changing_extras(bn)
    names = {text.partition("=")[0] for text in changing}
    activation = getattr(bn, "activation", None)
    if names <= {"activation", "activation_param"} and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation](getattr(bn, "activation_param", None)), None
    if changing:
        return None, f"{', '.join(changing)} changes its eval output beyond an affine map"
    return None, None


def _affine(scale: Tensor, shift: Tensor, activation: nn.Module | None) -> nn.Module:
    """The layer's eval map as modules: a :class:`ChannelAffine`, then the activation."""
    affine = ChannelAffine(scale, shift)
    return affine if activation is None else nn.Sequential(affine, activation)


def _then(activation: nn.Module | None) -> str:
    return "" if activation is None else f", then its activation as {activation}"


def _node_text(node: object) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model's input '{node.target}'"
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "call_method":
        return f"a .{node.target}() call"
    if node.op == "get_attr":
        return f"the attribute '{node.target}'"
    if node.op == "output":
        return "the model's output"
    return f"a {getattr(node.target, '__name__', str(node.target))}() call"


def _layer_problem(
    layer: nn.Module,
    layer_name: str,
    bn: _BatchNorm,
    rank: int | None,
    role: Role,
    shift: Tensor,
) -> str | None:
    """Why ``layer`` (known to be of a foldable class) cannot absorb ``bn``, or None."""
    text = describe(layer_name, layer)
    if isinstance(layer, nn.Linear):
        size = layer.out_features if role == "producer" else layer.in_features
        if rank is not None and rank != 2:
            return (
                f"{text} acts on the last dimension of a {rank}D tensor, while batch norm "
                f"normalizes dimension 1"
            )
    else:
        assert isinstance(layer, (*_CONVS, *_TRANSPOSED))
        size = layer.out_channels if role == "producer" else layer.in_channels
    if size != bn.num_features:
        return f"{text} has {size} channels where the layer has {bn.num_features}"
    if role == "consumer" and isinstance(layer, _CONVS):
        padding = _zero_padding(layer)
        if padding and bool((shift != 0).any()):
            return (
                f"{text} zero-pads its input (padding={layer.padding}): the padded border would "
                f"have to hold -shift/scale instead of 0, which its bias cannot express"
            )
    return None


def _zero_padding(conv: nn.Module) -> bool:
    """Whether the conv pads its input with zeros (a non-zero padding in 'zeros' mode)."""
    assert isinstance(conv, _CONVS)
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular pad with copies of the values
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        # "same": a total of dilation * (kernel - 1) per dimension
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return any(p != 0 for p in conv.padding)


def _merge_into_producer(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Scale and shift the output channels of a Conv, ConvTranspose or Linear."""
    assert isinstance(layer, _PRODUCERS)
    weight = layer.weight.detach().to(torch.float64)
    if isinstance(layer, _TRANSPOSED):
        # weight (C_in, C_out / groups, *k): output channel g * C_out/groups + j is column j
        # of group g's rows.
        groups = layer.groups
        grouped = weight.view(groups, weight.shape[0] // groups, weight.shape[1], -1)
        grouped = grouped * scale.view(groups, 1, weight.shape[1], 1)
        new_weight = grouped.view(weight.shape)
    else:
        new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))  # (C_out, ...)
    bias = (
        layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(scale)
    )
    _assign(layer, new_weight, bias * scale + shift)


def _merge_into_consumer(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Fold y = W(scale * x + shift) + b into the weights of a Linear or Conv."""
    assert isinstance(layer, _CONSUMERS)
    weight = layer.weight.detach().to(torch.float64)
    bias = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    )
    if isinstance(layer, nn.Linear):
        new_weight = weight * scale.view(1, -1)  # (out, in)
        new_bias = bias + weight @ shift
    else:
        # weight (C_out, C_in / groups, *k): input channel c of output channel o in group g
        # is g * C_in/groups + c.
        groups = layer.groups
        out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, out_per_group, in_per_group, -1)  # (G, O, I, K)
        new_weight = (grouped * scale.view(groups, 1, in_per_group, 1)).view(weight.shape)
        new_bias = bias + (grouped * shift.view(groups, 1, in_per_group, 1)).sum((2, 3)).view(-1)
    _assign(layer, new_weight, new_bias)


def _assign(layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    old_weight = layer.weight
    assert isinstance(old_weight, Tensor)
    requires_grad = old_weight.requires_grad
    layer.weight = nn.Parameter(weight.to(old_weight.dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(old_weight.dtype), requires_grad=requires_grad)


def _fold_graph(
    graph_module: fx.GraphModule, model: nn.Module, ranks: dict[int, int]
) -> list[FoldEntry]:
    """Fold along the traced graph, in place; one entry per batch norm layer."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    attribute_owners = {
        str(node.target).rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"
    }
    entries: list[FoldEntry] = []
    handled: set[str] = set()
    removed: list[str] = []

    def usable(node: fx.Node, kinds: tuple[type[nn.Module], ...], what: str) -> str | None:
        """Why the module called by ``node`` cannot absorb a batch norm, or None."""
        if node.op != "call_module":
            return f"it is {_node_text(node)}, not a {what} layer"
        module = modules[str(node.target)]
        if type(module) not in kinds:
            return f"{describe(str(node.target), module)} is not a {what} layer"
        if calls[node.target] > 1:
            return f"{describe(str(node.target), module)} is called at {calls[node.target]} places"
        if node.target in attribute_owners:
            return f"the parameters of '{node.target}' are also used directly"
        return None

    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[str(node.target)], _BatchNorm):
            continue
        name = str(node.target)
        if name in handled:
            continue
        handled.add(name)
        bn = modules[name]
        assert isinstance(bn, _BatchNorm)
        activation, problem = _eval_form(bn)
        if problem is not None:
            entries.append(FoldEntry(name, "kept", None, problem))
            continue
        scale, shift = eval_affine(bn)
        if calls[name] > 1 or len(node.args) != 1 or node.kwargs:
            why = (
                f"called at {calls[name]} places"
                if calls[name] > 1
                else "called with more than its input"
            )
            set_submodule(graph_module, name, _affine(scale, shift, activation))
            entries.append(FoldEntry(name, "affine", None, why))
            continue
        rank = ranks.get(id(bn))

        # 1. into the layer before it
        source = node.args[0]
        before: str | None
        if not isinstance(source, fx.Node):
            before = f"its input is {_node_text(source)}"
        else:
            before = usable(source, _PRODUCERS, "Conv, ConvTranspose or Linear")
            if before is None and len(source.users) > 1:
                others = [_node_text(user) for user in source.users if user is not node]
                before = (
                    f"the output of '{source.target}' also goes to {', '.join(others)}, "
                    f"which merging would change"
                )
            if before is None:
                before = _layer_problem(
                    modules[str(source.target)], str(source.target), bn, rank, "producer", shift
                )
            if before is None:
                producer = modules[str(source.target)]
                _merge_into_producer(producer, scale, shift)
                if activation is None:
                    node.replace_all_uses_with(source)
                    graph.erase_node(node)
                    removed.append(name)
                else:  # the node now calls the activation alone
                    set_submodule(graph_module, name, activation)
                what = describe(str(source.target), producer)
                entries.append(
                    FoldEntry(
                        name,
                        "into_producer",
                        str(source.target),
                        f"merged into the output channels of {what}{_then(activation)}",
                    )
                )
                continue

        # 2. into the layer after it
        users = list(node.users)
        after: str | None
        if activation is not None:
            after = "its activation comes between it and the next layer"
        elif len(users) != 1:
            after = f"its output goes to {len(users)} places"
        else:
            user = users[0]
            after = usable(user, _CONSUMERS, "Linear or Conv")
            if after is None and not isinstance(source, fx.Node):
                after = f"its input is {_node_text(source)}"
            if after is None and (user.args != (node,) or user.kwargs):
                after = f"'{user.target}' is called with more than this input"
            if after is None:
                after = _layer_problem(
                    modules[str(user.target)], str(user.target), bn, rank, "consumer", shift
                )
            if after is None and isinstance(source, fx.Node):
                consumer = modules[str(user.target)]
                _merge_into_consumer(consumer, scale, shift)
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                removed.append(name)
                what = describe(str(user.target), consumer)
                entries.append(
                    FoldEntry(
                        name,
                        "into_consumer",
                        str(user.target),
                        f"merged into the input channels of {what}",
                    )
                )
                continue

        set_submodule(graph_module, name, _affine(scale, shift, activation))
        entries.append(
            FoldEntry(
                name,
                "affine",
                None,
                f"not into the layer before ({before}); not into the layer after ({after})",
            )
        )

    for name in removed:
        graph_module.delete_submodule(name)
    for name, _ in batch_norm_layers(model):
        if name not in handled:
            entries.append(FoldEntry(name, "unused", None, "the traced forward never calls it"))
    graph.lint()
    graph_module.recompile()
    return entries


def _fold_module_order(
    model: nn.Module, ranks: dict[int, int]
) -> tuple[nn.Module, list[FoldEntry]]:
    """Fold neighbours inside each nn.Sequential, in place; the rest becomes affine."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): name for name, m in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    placeholders: set[int] = set()
    entries: dict[str, FoldEntry] = {}
    root: nn.Module = model

    def affine(name: str, bn: _BatchNorm, activation: nn.Module | None, reason: str) -> None:
        nonlocal root
        scale, shift = eval_affine(bn)
        if name:
            set_submodule(model, name, _affine(scale, shift, activation))
        else:
            root = _affine(scale, shift, activation)
        entries[name] = FoldEntry(name, "affine", None, reason)

    for sequence in list(model.modules()):
        if not isinstance(sequence, nn.Sequential):
            continue
        keys = list(sequence._modules)
        for index, key in enumerate(keys):
            bn = sequence._modules[key]
            if not isinstance(bn, _BatchNorm) or names.get(id(bn)) in entries:
                continue
            name = names[id(bn)]
            activation, problem = _eval_form(bn)
            if problem is not None:
                entries[name] = FoldEntry(name, "kept", None, problem)
                continue
            if uses[id(bn)] > 1:
                affine(name, bn, activation, f"used at {uses[id(bn)]} places in the model")
                continue
            scale, shift = eval_affine(bn)
            rank = ranks.get(id(bn))
            previous = index - 1
            while previous >= 0 and id(sequence._modules[keys[previous]]) in placeholders:
                previous -= 1
            reasons = []
            candidates: tuple[tuple[Role, int, tuple[type[nn.Module], ...]], ...] = (
                ("producer", previous, _PRODUCERS),
                ("consumer", index + 1, _CONSUMERS),
            )
            for role, position, kinds in candidates:
                if role == "consumer" and activation is not None:
                    reasons.append("its activation comes between it and the next layer")
                    continue
                if not 0 <= position < len(keys):
                    reasons.append(f"nothing {'before' if role == 'producer' else 'after'} it")
                    continue
                layer = sequence._modules[keys[position]]
                assert layer is not None
                layer_name = names[id(layer)]
                if type(layer) not in kinds:
                    reasons.append(f"{describe(layer_name, layer)} cannot absorb it")
                    continue
                if uses[id(layer)] > 1:
                    reasons.append(f"{describe(layer_name, layer)} is used at several places")
                    continue
                why = _layer_problem(layer, layer_name, bn, rank, role, shift)
                if why is not None:
                    reasons.append(why)
                    continue
                if role == "producer":
                    _merge_into_producer(layer, scale, shift)
                else:
                    _merge_into_consumer(layer, scale, shift)
                if activation is None:
                    placeholder = nn.Identity()
                    placeholders.add(id(placeholder))
                    sequence._modules[key] = placeholder
                else:
                    sequence._modules[key] = activation
                action: Action = "into_producer" if role == "producer" else "into_consumer"
                entries[name] = FoldEntry(
                    name,
                    action,
                    layer_name,
                    f"next to {describe(layer_name, layer)} in an nn.Sequential{_then(activation)}",
                )
                break
            else:
                affine(
                    name,
                    bn,
                    activation,
                    f"not into the layer before ({reasons[0]}); not into the layer after "
                    f"({reasons[1]})",
                )

    for name, bn in batch_norm_layers(model):
        if name in entries:
            continue
        activation, problem = _eval_form(bn)
        if problem is not None:
            entries[name] = FoldEntry(name, "kept", None, problem)
        else:
            why = "not inside an nn.Sequential, and the forward could not be traced"
            affine(name, bn, activation, why)
    return root, sorted(entries.values(), key=lambda entry: order.get(entry.name, -1))
