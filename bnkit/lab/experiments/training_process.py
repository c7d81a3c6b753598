"""``training-process``: in training, an example's output and gradient depend on its batch.

Ioffe & Szegedy (2015), Section 3 and Algorithm 1: in training, batch norm normalizes
each node's output with the mean mu_B and variance sigma_B^2 of the mini-batch, and the
backward pass differentiates through mu_B and sigma_B^2 ("the gradient ... must account
for the normalization"; left out, the updates and the normalization cancel and a bias
can grow without bound, their Section 2). So the normalized value of one example, and the
gradient that reaches it, change with the other examples drawn with it; at test time the
population statistics make both fixed.

Measured here, on the ``ics`` MLP with BN after a short training run: one fixed training
example is put into many mini-batches of m examples (the others drawn at random), for
several m. For each mini-batch:

- the first BN layer's output for that example, at a few nodes (train mode);
- the gradient of the mini-batch's loss with respect to that example's input, once
  through the batch statistics (what training computes) and once with the same
  statistics held constant (the network in eval mode with the batch's mean and biased
  variance as its population statistics: the same forward values, no path through
  mu_B and sigma_B^2). Their difference is the part of the gradient that flows through
  the statistics.

In eval mode (population statistics) the output is the same in every batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext, Table
from bnkit.lab.formatting import number, percent
from bnkit.lab.models import batch_norm_implementation, batch_norm_layers, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed, train

__all__ = ["EXPERIMENT", "TrainingProcessConfig", "claims", "run"]

#: The part of the gradient through the batch statistics "matters" above this share of
#: the gradient's norm (mean over the mini-batches).
STATISTICS_SHARE = 0.01


@dataclass(frozen=True)
class TrainingProcessConfig:
    """The ``training-process`` configuration.

    Args:
        steps: SGD steps before the measurement.
        batch_size: the training mini-batch size.
        lr: the learning rate.
        hidden: the hidden layer widths.
        activation: the hidden nonlinearity.
        batch_sizes: the mini-batch sizes m the example is measured in.
        draws: mini-batches drawn per size.
        nodes: the first BN layer's nodes followed.
    """

    steps: int = 300
    batch_size: int = 60
    lr: float = 0.1
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    batch_sizes: tuple[int, ...] = (4, 16, 60)
    draws: int = 30
    nodes: int = 3


def _with_constant_statistics(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """An eval-mode copy whose population statistics are ``batch``'s own (mean and biased
    variance at every BN layer): the train-mode forward values, with no gradient path
    through the statistics."""
    frozen = copy.deepcopy(model).train()
    layers = batch_norm_layers(frozen)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, index=index: seen.__setitem__(index, args[0].detach())
        )
        for index, layer in enumerate(layers)
    ]
    saved = [(layer.running_mean, layer.running_var) for layer in layers]
    with torch.no_grad():
        frozen(batch)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for index, _layer in enumerate(layers):
            values = seen[index].double()
            mean, var = saved[index]
            assert mean is not None
            assert var is not None
            mean.copy_(values.mean(dim=0))
            var.copy_(values.var(dim=0, unbiased=False))
    return frozen.eval()


def _input_gradient(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d(mean cross-entropy of the batch) / d(the first example's input)."""
    inputs = batch.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(inputs), labels)
    (gradient,) = torch.autograd.grad(loss, inputs)
    return gradient[0].double().reshape(-1)


def _measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainingProcessConfig,
    seed: int,
) -> dict[str, Any]:
    first_bn = batch_norm_layers(model)[0]
    nodes = list(range(config.nodes))
    seen: list[torch.Tensor] = []
    hook = first_bn.register_forward_hook(lambda _m, _i, output: seen.append(output.detach()))
    rng = np.random.default_rng(seed)
    example = 0
    others = np.arange(1, len(x))
    by_size: dict[str, Any] = {}
    try:
        model.eval()
        seen.clear()
        with torch.no_grad():
            model(x[:1])
        eval_output = [round(float(v), 6) for v in seen[-1][0, nodes]]
        model.train()
        for size in config.batch_sizes:
            outputs: list[list[float]] = []
            shares: list[float] = []
            full_gradients: list[torch.Tensor] = []
            for _ in range(config.draws):
                index = torch.from_numpy(
                    np.concatenate([[example], rng.choice(others, size - 1, replace=False)])
                )
                batch, labels = x[index], y[index]
                state = copy.deepcopy(model.state_dict())  # train-mode calls move buffers
                seen.clear()
                full = _input_gradient(model, batch, labels)
                outputs.append([round(float(v), 6) for v in seen[-1][0, nodes]])
                model.load_state_dict(state)
                constant = _input_gradient(_with_constant_statistics(model, batch), batch, labels)
                model.load_state_dict(state)
                norm = float(full.norm())
                shares.append(float((full - constant).norm()) / norm if norm > 0 else 0.0)
                full_gradients.append(full / max(norm, 1e-30))
            directions = torch.stack(full_gradients)
            mean_direction = directions.mean(dim=0)
            cosines = directions @ (mean_direction / max(float(mean_direction.norm()), 1e-30))
            spread = np.asarray(outputs).std(axis=0)
            by_size[str(size)] = {
                "outputs": outputs,
                "output_std": [round(float(v), 6) for v in spread],
                "statistics_share": [round(v, 6) for v in shares],
                "statistics_share_mean": round(float(np.mean(shares)), 6),
                "gradient_cosine_to_mean": [round(float(v), 6) for v in cosines],
            }
    finally:
        hook.remove()
    # Population statistics: the same example in two different batches, eval mode.
    model.eval()
    with torch.no_grad():
        a = model(x[:8])[0]
        b = model(torch.cat([x[:1], x[100:107]]))[0]
    model.train()
    return {
        "nodes": nodes,
        "eval_output": eval_output,
        "by_size": by_size,
        "eval_difference": float((a - b).abs().max()),
    }


def run(config: TrainingProcessConfig, context: RunContext) -> dict[str, Any]:
    """Train the BN MLP briefly; measure one example in many mini-batches."""
    data = context.dataset
    torch.manual_seed(derive_seed(context.seed, "training-process", "weights"))
    model = mlp(
        data.num_features,
        data.num_classes,
        hidden=config.hidden,
        activation=config.activation,
        use_batch_norm=True,
    )
    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=derive_seed(context.seed, "training-process", "batches"),
        evaluations=5,
        progress=context.progress,
        desc="training-process BN",
    )
    sizes = [size for size in config.batch_sizes if size <= len(data.y_train)]
    measured = _measure(
        model,
        data.x_train,
        data.y_train,
        TrainingProcessConfig(**{**config.__dict__, "batch_sizes": tuple(sizes)}),
        derive_seed(context.seed, "training-process", "draws"),
    )
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "training": history.to_json(),
        "batch_sizes": sizes,
        "draws": config.draws,
        **measured,
    }


def _std(results: Mapping[str, Any], size: int) -> float:
    return float(np.mean(results["by_size"][str(size)]["output_std"]))


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The training process's batch dependence, decided from the results."""
    sizes = results["batch_sizes"]
    small, large = min(sizes), max(sizes)
    std_small, std_large = _std(results, small), _std(results, large)
    shares = {size: results["by_size"][str(size)]["statistics_share_mean"] for size in sizes}
    depends = std_large > 0 and std_small > std_large
    through = all(share > STATISTICS_SHARE for share in shares.values())
    fixed = results["eval_difference"] is not None and results["eval_difference"] < 1e-5
    return [
        Claim(
            claim="In training, an example's normalized output depends on the other examples "
            "of its mini-batch, and the more so the smaller the batch.",
            anchor="Ioffe & Szegedy 2015, Section 3 and Algorithm 1: the training output of "
            "an example depends on the mini-batch through mu_B and sigma_B; Section 3.4: "
            "'the training network no longer produces deterministic values for a given "
            "training example'.",
            measured=f"One training example in {results['draws']} random mini-batches per "
            f"size: the standard deviation of its first-layer BN output (mean over "
            f"{len(results['nodes'])} nodes) is {number(std_small)} at batch {small}, "
            f"{number(std_large)} at batch {large}.",
            holds=depends,
        ),
        Claim(
            claim="The training gradient flows through the batch mean and variance: holding "
            "them constant changes the gradient that reaches an example.",
            anchor="Ioffe & Szegedy 2015, Section 2: an update that ignores the normalization's "
            "dependence on the batch lets a bias grow without bound; Section 3: the backward "
            "pass differentiates through mu_B and sigma_B^2.",
            measured="The part of the gradient with respect to the example's input that flows "
            "through mu_B and sigma_B^2, as a share of the gradient's norm (mean over the "
            "mini-batches): "
            + ", ".join(f"batch {size}: {percent(shares[size])}" for size in sizes)
            + f" (counted above {percent(STATISTICS_SHARE)}).",
            holds=through,
        ),
        Claim(
            claim="With population statistics (eval mode) the example's output is the same in "
            "any batch.",
            anchor="Ioffe & Szegedy 2015, Section 3.1: at inference the output depends only on "
            "the input.",
            measured=f"The example's logits in two different batches of 8, eval mode: max "
            f"difference {number(results['eval_difference'], '.2g')}.",
            holds=fixed,
            section="test",
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """The output's spread and the statistics' share of the gradient, per batch size."""
    return "; ".join(
        f"batch {size}: output std {_std(results, size):.3f}, "
        f"grad via stats {percent(results['by_size'][str(size)]['statistics_share_mean'])}"
        for size in results["batch_sizes"]
    )


def curves(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The short training run before the measurement."""
    return {"BN MLP": results["training"]}


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """The example's output across mini-batches, and the gradient's share through the
    statistics, per batch size."""
    sizes = results["batch_sizes"]
    figure, axes = new_figure(columns=2, width=9.0, height=3.3)
    ax = axes[0]
    node = 0
    for position, size in enumerate(sizes):
        values = [row[node] for row in results["by_size"][str(size)]["outputs"]]
        jitter = np.linspace(-0.15, 0.15, len(values))
        ax.scatter(position + jitter, values, s=10, color=COLORS["bn"], alpha=0.7)
    ax.axhline(
        results["eval_output"][node],
        color=COLORS["plain"],
        linestyle="--",
        label="eval mode (population statistics), any batch",
    )
    ax.set_xticks(range(len(sizes)), [f"batch {size}" for size in sizes])
    ax.set_ylabel(f"BN output of node {node}, layer 1")
    ax.set_title("One example, many mini-batches: its normalized output")
    ax.legend(loc="lower right")
    ax = axes[1]
    shares = [100 * np.asarray(results["by_size"][str(s)]["statistics_share"]) for s in sizes]
    ax.boxplot(shares, tick_labels=[f"batch {s}" for s in sizes], widths=0.5)
    ax.set_ylabel("% of the gradient's norm")
    ax.set_title("Gradient through mu_B and sigma_B")
    file = f"{prefix}batch-dependence.png"
    save_figure(figure, out_dir / file)
    spread = ", ".join(f"{_std(results, s):.3f} at batch {s}" for s in sizes)
    return [
        Figure(
            file,
            "Left: the first BN layer's output (node 0) for one fixed training example, put "
            f"into {results['draws']} random mini-batches of each size (train mode); dashed: "
            "its value in eval mode, the same in any batch. Right: the share of the gradient "
            "with respect to that example's input that flows through the batch mean and "
            "variance (the gradient minus the one with the statistics held constant).",
            alt="Scatter plot: one example's normalized output varies across random "
            f"mini-batches (standard deviation {spread}); box plot: the part of its gradient "
            "through the batch statistics at each batch size.",
        )
    ]


def tables(results: Mapping[str, Any]) -> list[Table]:
    """Per batch size: the output's spread and the gradient's share through the statistics."""
    rows = []
    for size in results["batch_sizes"]:
        entry = results["by_size"][str(size)]
        rows.append(
            [
                str(size),
                f"{_std(results, size):.4f}",
                percent(entry["statistics_share_mean"]),
                f"{float(np.min(entry['gradient_cosine_to_mean'])):.3f}",
            ]
        )
    return [
        Table(
            f"One training example in {results['draws']} random mini-batches of each size.",
            [
                "batch size",
                "std of its BN output",
                "gradient share through mu_B, sigma_B",
                "lowest cosine of its gradient to the mean direction",
            ],
            rows,
        )
    ]


EXPERIMENT = Experiment(
    name="training-process",
    title="The training process: one example, many mini-batches",
    section="training",
    description=(
        "The MLP of ics (3 hidden layers of 100 sigmoids, BN after each hidden linear layer) "
        "trained for a few hundred SGD steps; then one fixed training example is put into "
        "random mini-batches of 4, 16 and 60 examples. For each, in train mode: the first BN "
        "layer's output for that example, and the gradient of the mini-batch's loss with "
        "respect to that example's input, with and without the path through the batch mean "
        "and variance (the second: the same forward values, the batch's statistics held "
        "constant)."
    ),
    quick=TrainingProcessConfig(),
    full=TrainingProcessConfig(steps=3000, draws=200),
    step_fields=("steps", "draws"),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    tables=tables,
    curves=curves,
)
