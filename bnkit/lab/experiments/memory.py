"""``memory``: what batch norm keeps for the backward pass, and the fused layer's saving.

"More memory" is among batch norm's disadvantages: in training, a batch
norm layer keeps its input for the backward pass, and the activation after it keeps its
own input (the batch norm output) too. In-Place ABN (Rota Bulo et al. 2018) fuses the two
and keeps only the output, recovering the normalized values by inverting the activation
in the backward pass: up to 50% less memory for the activations. bnkit's
``BatchNorm1d/2d(c, activation=...)`` does this (``memory_efficient=True``, the default).

Measured here: the bytes autograd saves for backward (``saved_tensors_hooks``, each
storage counted once, parameters included; :func:`bnkit.bench.memory.saved_bytes`) for one
normalization + activation layer and for a whole network: the MLP of ``ics`` (3 hidden
layers of 100, batch 60) and the small CNN of ``batch-size`` (batch 32), each without batch
norm, with torch's ``BatchNorm`` followed by the activation module, and with bnkit's fused
layer; for leaky ReLU (invertible) and ReLU (not invertible where it outputs 0, so the
fused ReLU keeps its pre-activation instead of its output). The counts depend on the
shapes only, so they are exact and deterministic. So does the peak memory of a training
step (forward and backward, from no gradients), measured by counting, operator by
operator, the bytes of the tensors the step creates that are alive at once
(:class:`bnkit.bench.memory.StorageTracker`): what the choice of layers changes, without
the allocator's noise that sampling the resident memory of a CPU process would add.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.models import batch_norm_implementation
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed

__all__ = ["EXPERIMENT", "MemoryConfig", "claims", "measure", "network", "run"]

#: The ways to normalize and activate: results keys and their labels.
KINDS: dict[str, str] = {
    "none": "no BN",
    "torch": "torch BN + activation",
    "fused": "bnkit fused BN + activation",
}

#: The activations compared.
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "relu")

#: The networks: results keys and their labels.
NETWORKS: dict[str, str] = {"mlp": "MLP of ics", "cnn": "CNN of batch-size"}

#: A fused leaky ReLU network must keep at most this fraction of torch's bytes.
SAVING = 0.75


@dataclass(frozen=True)
class MemoryConfig:
    """The ``memory`` configuration.

    Args:
        mlp_batch: the MLP's batch (that of ``ics``).
        mlp_hidden: the MLP's hidden widths.
        cnn_batch: the CNN's batch.
        cnn_widths: the CNN's channels.
    """

    mlp_batch: int = 60
    mlp_hidden: tuple[int, ...] = (100, 100, 100)
    cnn_batch: int = 32
    cnn_widths: tuple[int, ...] = (16, 32, 32)


def _activation(name: str) -> nn.Module:
    return nn.LeakyReLU(0.01) if name == "leaky_relu" else nn.ReLU()


def _norm_act(kind: str, activation: str, channels: int, dims: int) -> list[nn.Module]:
    import bnkit

    if kind == "none":
        return [_activation(activation)]
    if kind == "torch":
        norm: nn.Module = nn.BatchNorm1d(channels) if dims <= 1 else nn.BatchNorm2d(channels)
        return [norm, _activation(activation)]
    layer = bnkit.BatchNorm1d if dims <= 1 else bnkit.BatchNorm2d
    if activation == "leaky_relu":
        return [layer(channels, activation=activation, activation_param=0.01)]
    return [layer(channels, activation=activation)]


def network(
    name: str,
    kind: str,
    activation: str,
    sample_shape: Sequence[int],
    num_classes: int,
    config: MemoryConfig,
) -> nn.Sequential:
    """The MLP or the CNN with normalization ``kind`` and ``activation``.

    Example:
        >>> net = network("mlp", "fused", "relu", (40,), 10, MemoryConfig())
        >>> net(torch.randn(4, 40)).shape
        torch.Size([4, 10])
    """
    layers: list[nn.Module] = []
    if name == "mlp":
        width = int(np.prod(sample_shape))
        layers.append(nn.Flatten())
        for size in config.mlp_hidden:
            layers.append(nn.Linear(width, size, bias=kind == "none"))
            layers += _norm_act(kind, activation, size, 0)
            width = size
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    dims = len(sample_shape)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    layers.append(nn.Unflatten(1, (1, sample_shape[0])))  # (N, *S) -> (N, 1, *S)
    channels = 1
    for index, width in enumerate(config.cnn_widths):
        kernel, stride = (5, 1) if index == 0 else (3, 2)
        layers.append(
            conv(channels, width, kernel, stride=stride, padding=kernel // 2, bias=kind == "none")
        )
        layers += _norm_act(kind, activation, width, dims)
        channels = width
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    layers += [pool, nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def measure(
    name: str, sample_shape: Sequence[int], num_classes: int, config: MemoryConfig, seed: int
) -> dict[str, Any]:
    """Saved-for-backward bytes of each (activation, kind), for one layer and the network,
    and the peak bytes of a training step of each."""
    from bnkit.bench.memory import peak_bytes, saved_bytes

    def step(module: nn.Module, inputs: torch.Tensor, upstream: torch.Tensor) -> None:
        module(inputs).backward(upstream)

    def upstream(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """A gradient for the output that exists before the step, as a loss's would."""
        with torch.no_grad():
            return torch.ones_like(module(inputs))

    batch = config.mlp_batch if name == "mlp" else config.cnn_batch
    generator = torch.Generator().manual_seed(derive_seed(seed, "memory", name))
    x = torch.randn(batch, *sample_shape, generator=generator)
    results: dict[str, Any] = {
        "batch": batch,
        "layer": {},
        "model": {},
        "peak_layer": {},
        "peak_model": {},
    }
    for activation in ACTIVATIONS:
        for kind in KINDS:
            torch.manual_seed(derive_seed(seed, "memory", "weights"))
            model = network(name, kind, activation, sample_shape, num_classes, config)
            model.train()
            key = f"{activation}/{kind}"
            results["model"][key] = saved_bytes(functools.partial(model, x))
            results.setdefault("per_layer", {})[key] = per_layer_bytes(model, x)
            step(model, x[:2], upstream(model, x[:2]))  # lazy initialization, unmeasured
            model.zero_grad(set_to_none=True)
            results["peak_model"][key] = peak_bytes(
                functools.partial(step, model, x, upstream(model, x))
            )
            # One normalization + activation, on the first hidden layer's output.
            # (Flatten or Unflatten, then the first Linear or convolution.)
            with torch.no_grad():
                hidden = model[:2](x)
            results["activation_bytes"] = hidden.numel() * hidden.element_size()
            layer = nn.Sequential(*list(model)[2 : 2 + (2 if kind == "torch" else 1)])
            inputs = hidden.detach().requires_grad_(True)
            results["layer"][key] = saved_bytes(functools.partial(layer, inputs))
            results["peak_layer"][key] = peak_bytes(
                functools.partial(step, layer, inputs, upstream(layer, inputs))
            )
    return results


def per_layer_bytes(model: nn.Sequential, x: torch.Tensor) -> list[int]:
    """Bytes autograd saves for backward in each hidden layer of ``model`` (a Linear or
    convolution with the normalization and activation after it; the last entry is the
    classifier head), each storage counted once, for the layer that saved it first."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    block_of: list[int] = []
    block = 0
    for module in model:
        if (
            isinstance(module, kinds)
            and block_of
            and any(isinstance(m, kinds) for m in list(model)[: len(block_of)])
        ):
            block += 1
        block_of.append(block)
    current = [0]
    totals = [0] * (block + 1)
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            totals[current[0]] += storage.nbytes()
        return tensor

    hooks = [
        module.register_forward_pre_hook(
            lambda _m, _a, index=index: current.__setitem__(0, block_of[index])
        )
        for index, module in enumerate(model)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(x)
        del output
    finally:
        for hook in hooks:
            hook.remove()
    return totals


def run(config: MemoryConfig, context: RunContext) -> dict[str, Any]:
    """Count the saved bytes of both networks."""
    data = context.dataset
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "networks": {
            name: measure(name, data.sample_shape, data.num_classes, config, context.seed)
            for name in NETWORKS
        },
    }


def _bytes(results: Mapping[str, Any], net: str, scope: str, key: str) -> int:
    return int(results["networks"][net][scope][key])


def _kb(value: float) -> str:
    return f"{value / 1e3:.1f} kB"


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """Batch norm costs memory; the fused layer saves it, in the step's peak too; less so
    for ReLU."""
    nets = list(results["networks"])

    def ratio(net: str, activation: str, a: str, b: str, scope: str = "model") -> float:
        return _bytes(results, net, scope, f"{activation}/{a}") / max(
            1, _bytes(results, net, scope, f"{activation}/{b}")
        )

    def each(activation: str, a: str, b: str, scope: str = "model") -> str:
        return ", ".join(
            f"{NETWORKS[net]} {_kb(_bytes(results, net, scope, f'{activation}/{a}'))} "
            f"against {_kb(_bytes(results, net, scope, f'{activation}/{b}'))} "
            f"({ratio(net, activation, a, b, scope):.2f}x)"
            for net in nets
        )

    inplace = (
        "Rota Bulo et al. 2018 (In-Place ABN): fusing BN with an invertible activation "
        "and keeping only the output saves up to 50% of the activations' memory."
    )
    return [
        Claim(
            claim="Batch norm costs memory in training: with torch's BN and a leaky ReLU "
            "a network keeps more for backward than without BN.",
            anchor="Ioffe & Szegedy 2015, Algorithm 1: the backward pass needs the "
            "normalized values and the batch statistics; In-Place ABN (Rota Bulo et al. "
            "2018): BN and its activation each keep a tensor for backward.",
            measured="Saved for backward, torch BN against no BN: "
            + each("leaky_relu", "torch", "none")
            + ".",
            holds=bool(nets) and all(ratio(n, "leaky_relu", "torch", "none") > 1 for n in nets),
        ),
        Claim(
            claim=f"bnkit's fused memory-efficient BN + leaky ReLU keeps at most "
            f"{SAVING:g}x what torch's BN + leaky ReLU keep, in every network.",
            anchor=inplace,
            measured="Saved for backward, fused against torch: "
            + each("leaky_relu", "fused", "torch")
            + ".",
            holds=bool(nets)
            and all(ratio(n, "leaky_relu", "fused", "torch") <= SAVING for n in nets),
        ),
        Claim(
            claim="With the fused layer batch norm costs no memory: the network keeps no "
            "more than the same network without BN.",
            anchor=inplace + " The activation's own saved tensor replaces BN's.",
            measured="Saved for backward, fused against no BN: "
            + each("leaky_relu", "fused", "none")
            + ".",
            holds=bool(nets) and all(ratio(n, "leaky_relu", "fused", "none") <= 1 for n in nets),
        ),
        Claim(
            claim="ReLU is not invertible: the fused ReLU saves less than the fused leaky "
            "ReLU, in every network (it keeps the pre-activation).",
            anchor="In-Place ABN: the activation must be invertible (they use leaky ReLU).",
            measured="Fused against torch, ReLU: "
            + each("relu", "fused", "torch")
            + "; leaky ReLU: "
            + ", ".join(f"{ratio(n, 'leaky_relu', 'fused', 'torch'):.2f}x" for n in nets)
            + ".",
            holds=bool(nets)
            and all(
                ratio(n, "relu", "fused", "torch") > ratio(n, "leaky_relu", "fused", "torch")
                for n in nets
            ),
        ),
        Claim(
            claim=f"The saving shows in the peak memory of a training step: with the fused "
            f"BN + leaky ReLU the step's peak is at most {SAVING:g}x torch's, in every "
            f"network.",
            anchor="In-Place ABN: the activations kept for backward dominate the memory of "
            "training; saving half of them lets larger batches fit.",
            measured="Peak bytes of a training step, fused against torch: "
            + each("leaky_relu", "fused", "torch", scope="peak_model")
            + ".",
            holds=bool(nets)
            and all(
                ratio(n, "leaky_relu", "fused", "torch", scope="peak_model") <= SAVING for n in nets
            ),
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Each network's fused/torch and torch/none ratios (leaky ReLU)."""
    parts = []
    for net in results["networks"]:
        torch_bytes = _bytes(results, net, "model", "leaky_relu/torch")
        none_bytes = _bytes(results, net, "model", "leaky_relu/none")
        fused_bytes = _bytes(results, net, "model", "leaky_relu/fused")
        parts.append(
            f"{net}: torch BN {torch_bytes / max(1, none_bytes):.2f}x no BN, "
            f"fused {fused_bytes / max(1, torch_bytes):.2f}x torch BN"
        )
    return "; ".join(parts)


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Grouped bars per kind, for each network and activation: saved bytes of a layer and
    of the network, and the peak of a training step of the network."""
    nets = list(results["networks"])
    figure, axes = new_figure(columns=3, rows=len(nets), width=14.0, height=2.8 * len(nets))
    axes = np.asarray(axes).reshape(len(nets), 3)
    colors = {"none": COLORS["plain"], "torch": COLORS["dropout"], "fused": COLORS["bn"]}
    width = 0.26
    for row, net in enumerate(nets):
        for column, scope in enumerate(("layer", "model", "peak_model")):
            ax = axes[row, column]
            positions = np.arange(len(ACTIVATIONS))
            for index, (kind, label) in enumerate(KINDS.items()):
                values = [_bytes(results, net, scope, f"{a}/{kind}") / 1e3 for a in ACTIVATIONS]
                ax.bar(
                    positions + (index - 1) * width, values, width, color=colors[kind], label=label
                )
            ax.set_xticks(positions, [a.replace("_", " ") for a in ACTIVATIONS])
            ax.set_ylabel("peak of a step (kB)" if scope == "peak_model" else "saved (kB)")
            where = {
                "layer": "one norm + activation, saved",
                "model": "network, saved",
                "peak_model": "network, peak of a step",
            }[scope]
            ax.set_title(f"{NETWORKS[net]}: {where}", fontsize="medium")
            if row == 0 and column == 0:
                ax.legend(loc="upper right")
    file = f"{prefix}saved.png"
    save_figure(figure, out_dir / file)
    figures = _per_layer_figure(results, out_dir, prefix)
    return [
        *figures,
        Figure(
            file,
            "Bytes autograd keeps for the backward pass (distinct storages, parameters "
            "included), for one normalization + activation layer (left) and the whole "
            "network (middle), and the peak bytes of the tensors a training step of the "
            "network holds at once (right): without BN, torch's BN followed by the "
            "activation, and bnkit's fused memory-efficient layer.",
            alt="Grouped bars of bytes kept for backward by one layer, by the whole network, "
            "and the peak of a training step, for the MLP and the CNN, each without batch "
            "norm, with torch's batch norm and activation, and with bnkit's fused layer.",
        ),
    ]


def _per_layer_figure(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """The MLP's bytes kept for backward per layer, with and without BN (training section)."""
    per_layer = results["networks"].get("mlp", {}).get("per_layer")
    if not per_layer:
        return []
    figure, ax = new_figure(width=6.5, height=3.0)
    kinds = [k for k in KINDS if f"leaky_relu/{k}" in per_layer]
    colors = {"none": COLORS["plain"], "torch": COLORS["dropout"], "fused": COLORS["bn"]}
    count = len(per_layer[f"leaky_relu/{kinds[0]}"])
    labels = [f"hidden {i + 1}" for i in range(count - 1)] + ["output"]
    width = 0.8 / len(kinds)
    for index, kind in enumerate(kinds):
        values = [v / 1e3 for v in per_layer[f"leaky_relu/{kind}"]]
        ax.bar(
            np.arange(count) + (index - (len(kinds) - 1) / 2) * width,
            values,
            width,
            color=colors[kind],
            label=KINDS[kind],
        )
    ax.set_xticks(range(count), labels)
    ax.set_ylabel("kept for backward (kB)")
    batch = results["networks"]["mlp"]["batch"]
    ax.set_title(f"What a training step keeps, per layer (MLP of ics, batch {batch})")
    ax.legend(loc="upper right")
    file = f"{prefix}per-layer.png"
    save_figure(figure, out_dir / file)
    totals = {
        kind: sum(per_layer[f"leaky_relu/{kind}"]) / max(1, sum(per_layer["leaky_relu/none"]))
        for kind in kinds
    }
    return [
        Figure(
            file,
            "The bytes autograd keeps for the backward pass in each layer of the ics MLP "
            "(leaky ReLU; the layer's weights included, each storage counted once for the "
            "layer that saves it first): without BN, with torch's BN and the activation "
            "(BN keeps its input, the activation its own), and with bnkit's fused layer. "
            "From the memory experiment.",
            section="training",
            alt="Bar chart per layer of the bytes kept for backward: with torch's batch norm "
            f"the network keeps {totals.get('torch', 0):.2f}x what it keeps without, with "
            f"the fused layer {totals.get('fused', 0):.2f}x.",
        )
    ]


EXPERIMENT = Experiment(
    name="memory",
    title="Memory: what batch norm keeps for backward, and the fused layer",
    section="memory",
    description=(
        "Bytes saved for the backward pass (torch.autograd.graph.saved_tensors_hooks, "
        "distinct storages, parameters included) by the MLP of ics and the CNN of "
        "batch-size, without BN, with torch's BatchNorm followed by the activation module, "
        "and with bnkit's fused BatchNorm(activation=...) in its memory-efficient mode. "
        "And the peak memory of one training step (forward + backward): the most bytes of "
        "tensors created by the step alive at once, counted operator by operator. Exact "
        "counts from the shapes; no training."
    ),
    quick=MemoryConfig(),
    full=MemoryConfig(mlp_batch=600, cnn_batch=256),
    step_fields=(),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
)
