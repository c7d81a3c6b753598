"""``ics``: Figure 1 of the batch normalization paper, internal covariate shift.

Ioffe & Szegedy (2015), Figure 1: a fully connected network with three hidden layers of
100 sigmoid units, trained with SGD on mini-batches of 60, with and without batch norm
after each hidden linear layer (which then has no bias: beta replaces it). The figure
shows (a) test accuracy against training steps and (b, c) the 15th, 50th and 85th
percentiles of the input to a typical sigmoid of the last hidden layer over training:
without BN they drift in mean and spread, with BN they stay put.

The paper gives neither the learning rate nor the initial weights' scale beyond "small
random Gaussian values"; here SGD runs at 0.1 and every weight starts from N(0, 0.05^2).
The size of the effect depends on that scale (see :class:`IcsConfig`).

Measured here:

- test accuracy at evenly spaced steps for both networks;
- the steps each needs to reach a target accuracy, by default the final accuracy of the
  network without BN (the paper's own yardstick in its Inception comparison), and their
  ratio;
- for each of the 100 sigmoids of the last hidden layer, the percentiles of its input
  over a fixed probe set (the first test examples, the network in eval mode) at each
  evaluation, and their *drift*: the mean over the three percentiles of the range
  (max - min) each covers during training, divided by the unit's mean 15-85 spread. The
  typical unit plotted is the one with the median drift;
- the Z-transform, gamma and beta at work: on a training batch at the end, each BN
  node's output has the batch mean beta and standard deviation gamma.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.lines import Line2D
from torch import nn

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import number, percent, ratio_text, steps_text
from bnkit.lab.models import activation_layers, batch_norm_implementation, batch_norm_layers, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed, steps_to_target, train

__all__ = ["EXPERIMENT", "IcsConfig", "claims", "drift", "run"]

#: The arms: results keys and their labels.
ARMS: dict[str, str] = {"plain": "without BN", "bn": "with BN"}

#: A Z-transform deviation below this (relative to the largest |gamma| or |beta|) is
#: float32 rounding.
Z_TOLERANCE = 1e-4


@dataclass(frozen=True)
class IcsConfig:
    """The ``ics`` configuration (the paper's network; SGD without momentum).

    Args:
        steps: SGD steps per network (the paper: 50,000).
        batch_size: the mini-batch size (the paper: 60).
        lr: the learning rate (the paper does not give it).
        hidden: the hidden layer widths (the paper: 100, 100, 100).
        activation: the hidden nonlinearity (the paper: sigmoid).
        init_std: the initial weights' standard deviation. The paper says "small random
            Gaussian values"; 0.05 for every layer is a reading of that. None: 1/sqrt(fan_in),
            the other experiments' choice, with which the network without BN starts out
            better conditioned and the gap shrinks (on Fashion-MNIST, 50k steps: 1.3x
            fewer steps and a drift of 0.29 against 0.38).
        evaluations: evaluations after step 0.
        probe_samples: test examples whose sigmoid inputs give the percentiles.
        target_accuracy: the accuracy to reach; None: the final accuracy without BN.
    """

    steps: int = 8000
    batch_size: int = 60
    lr: float = 0.1
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_std: float | None = 0.05
    evaluations: int = 100
    probe_samples: int = 1000
    target_accuracy: float | None = None


PERCENTILES = (15.0, 50.0, 85.0)


def drift(tracks: np.ndarray) -> np.ndarray:
    """How far each unit's input percentiles move over training, relative to their spread.

    drift = mean over the percentiles p of (max_t q_p(t) - min_t q_p(t)), divided by the
    mean over t of (q_85(t) - q_15(t)).

    Args:
        tracks: (T, 3, U) the 15th, 50th and 85th percentiles of U units at T times.

    Returns:
        (U,) the drift of each unit; 0 for a distribution that never moves.

    Example:
        >>> t = np.array([[[-1.0], [0.0], [1.0]], [[0.0], [1.0], [2.0]]])  # shifts by 1
        >>> drift(t)
        array([0.5])
    """
    ranges = tracks.max(axis=0) - tracks.min(axis=0)  # (3, U)
    spread = (tracks[:, -1, :] - tracks[:, 0, :]).mean(axis=0)  # (U,)
    result: np.ndarray = ranges.mean(axis=0) / np.maximum(spread, 1e-12)
    return result


def _z_transform_check(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Per node of the last BN layer, on one training batch: the output's batch mean and
    (biased) std against beta and |gamma| * sqrt(var / (var + eps))."""
    model = copy.deepcopy(model).train()  # batch statistics; the copy's buffers absorb the update
    layer = batch_norm_layers(model)[-1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, inputs, output: seen.update(input=inputs[0], output=output)
        )
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    inputs = seen["input"].double()  # (N, C)
    outputs = seen["output"].double()  # (N, C)
    gamma = layer.weight.detach().double()
    beta = layer.bias.detach().double()
    var = inputs.var(dim=0, unbiased=False)
    expected_std = gamma.abs() * torch.sqrt(var / (var + layer.eps))
    mean_error = float((outputs.mean(dim=0) - beta).abs().max())
    std_error = float((outputs.std(dim=0, unbiased=False) - expected_std).abs().max())
    scale = max(1.0, float(gamma.abs().max()), float(beta.abs().max()))

    # The seed note's calculation with real numbers: node 0 of the last BN layer, a batch
    # of four (d_1..d_4), its outputs o_i before BN, mu, sigma, z_i and gamma * z_i + beta.
    seen.clear()
    hook = layer.register_forward_hook(
        lambda _m, inputs, output: seen.update(input=inputs[0], output=output)
    )
    with torch.no_grad():
        model(x[:4])
    hook.remove()
    o = seen["input"][:, 0].double()
    mu = o.mean()
    sigma2 = o.var(unbiased=False)
    z = (o - mu) / torch.sqrt(sigma2 + layer.eps)
    by_hand = gamma[0] * z + beta[0]
    layer_output = seen["output"][:, 0].double()
    worked = {
        "o": [round(float(v), 6) for v in o],
        "mu": round(float(mu), 6),
        "sigma": round(float(sigma2.sqrt()), 6),
        "z": [round(float(v), 6) for v in z],
        "gamma": round(float(gamma[0]), 6),
        "beta": round(float(beta[0]), 6),
        "by_hand": [round(float(v), 6) for v in by_hand],
        "layer": [round(float(v), 6) for v in layer_output],
        "max_error": float((by_hand - layer_output).abs().max()),
    }
    return {
        "worked_example": worked,
        "batch_size": len(x),
        "nodes": len(gamma),
        "max_mean_error": mean_error,
        "max_std_error": std_error,
        "scale": scale,
        "gamma": [round(float(v), 5) for v in gamma],
        "beta": [round(float(v), 5) for v in beta],
    }


def _percentile_summary(records: list[np.ndarray], steps: list[int]) -> dict[str, Any]:
    """The typical unit's percentile tracks and the drift, or None for a run that diverged
    before its first record or whose inputs became non-finite."""
    summary: dict[str, Any] = {
        "percentile_steps": steps,
        "typical_unit": None,
        "typical_percentiles": [],
        "drift_median": None,
        "drift_typical": None,
    }
    if not records:
        return summary
    tracks = np.stack(records)  # (T, 3, U)
    unit_drift = drift(tracks)
    if not np.isfinite(unit_drift).all():
        return summary
    typical = int(np.argsort(unit_drift, kind="stable")[len(unit_drift) // 2])
    summary.update(
        typical_unit=typical,
        typical_percentiles=np.round(tracks[:, :, typical], 5).tolist(),
        drift_median=round(float(np.median(unit_drift)), 6),
        drift_typical=round(float(unit_drift[typical]), 6),
    )
    return summary


def run(config: IcsConfig, context: RunContext) -> dict[str, Any]:
    """Train the network with and without BN; return curves, percentiles and checks."""
    data = context.dataset
    probe = data.x_test[: config.probe_samples]
    results: dict[str, Any] = {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "percentiles": list(PERCENTILES),
    }
    last_biases: list[float] = []
    for arm, label in ARMS.items():
        torch.manual_seed(derive_seed(context.seed, "ics", "weights"))
        model = mlp(
            data.num_features,
            data.num_classes,
            hidden=config.hidden,
            activation=config.activation,
            use_batch_norm=arm == "bn",
            init_std=config.init_std,
        )
        last_activation = activation_layers(model)[-1]
        records: list[np.ndarray] = []
        record_steps: list[int] = []

        def probe_sigmoid(
            step: int,
            net: nn.Module,
            where: nn.Module = last_activation,
            records: list[np.ndarray] = records,
            record_steps: list[int] = record_steps,
        ) -> None:
            if step == 0:
                return  # BN's running statistics are still their initial (0, 1) here
            seen: list[torch.Tensor] = []
            hook = where.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
            net(probe)
            hook.remove()
            records.append(np.percentile(seen[0].double().numpy(), PERCENTILES, axis=0))
            record_steps.append(step)

        history = train(
            model,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=derive_seed(context.seed, "ics", "batches"),
            evaluations=config.evaluations,
            on_evaluate=probe_sigmoid,
            progress=context.progress,
            desc=f"ics {label}",
        )
        results[arm] = {**history.to_json(), **_percentile_summary(records, record_steps)}
        if arm == "bn":
            batch = data.x_train[: config.batch_size]
            results["z_transform"] = _z_transform_check(model, batch)
        else:
            hidden_linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
            last_bias = hidden_linears[-1].bias
            if last_bias is not None:
                last_biases = [round(float(v), 5) for v in last_bias.detach()]
    results["plain_last_hidden_bias"] = last_biases

    plain, _bn = results["plain"], results["bn"]
    target = config.target_accuracy
    results["target_rule"] = "configured" if target is not None else "final accuracy without BN"
    if target is None:
        target = plain["final_test_accuracy"]
    results["target_accuracy"] = target
    reach = {
        arm: steps_to_target(results[arm]["steps"], results[arm]["test_accuracy"], target)
        for arm in ARMS
    }
    results["steps_to_target"] = reach
    results["speedup"] = (
        round(reach["plain"] / reach["bn"], 4)
        if reach["plain"] is not None and reach["bn"] not in (None, 0)
        else None
    )
    return results


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The claims of Figure 1, decided from the results."""
    plain, bn = results["plain"], results["bn"]
    reach = results["steps_to_target"]
    target = results["target_accuracy"]
    faster = reach["bn"] is not None and (reach["plain"] is None or reach["bn"] < reach["plain"])
    plain_final, bn_final = plain["final_test_accuracy"], bn["final_test_accuracy"]
    higher = bn_final is not None and (plain_final is None or bn_final > plain_final)
    drift_plain, drift_bn = plain["drift_median"], bn["drift_median"]
    z = results["z_transform"]
    z_errors = (z["max_mean_error"], z["max_std_error"])
    z_holds = None not in z_errors and max(z_errors) / z["scale"] < Z_TOLERANCE
    worked = z["worked_example"]
    worked_holds = worked["max_error"] is not None and worked["max_error"] < Z_TOLERANCE * max(
        1.0, *(abs(v) for v in worked["by_hand"] if v is not None)
    )
    return [
        Claim(
            claim="With batch normalization the network reaches a given test accuracy in fewer "
            "training steps.",
            anchor="Ioffe & Szegedy 2015, Figure 1(a): on MNIST, 3 hidden layers of 100 "
            "sigmoids, batch 60, 50k steps, the BN network's test accuracy rises faster.",
            measured=f"Target {percent(target)} ({results['target_rule']}): reached at "
            f"{steps_text(reach['bn'])} with BN, {steps_text(reach['plain'])} without "
            f"({ratio_text(results['speedup'])} fewer steps).",
            holds=faster,
        ),
        Claim(
            claim="With batch normalization the network ends at a higher test accuracy.",
            anchor="Ioffe & Szegedy 2015, Figure 1(a): the BN curve stays above the other one.",
            measured=f"Final test accuracy (mean of the last 3 evaluations): "
            f"{percent(bn_final)} with BN, {percent(plain_final)} without.",
            holds=higher,
        ),
        Claim(
            claim="Batch normalization keeps the distribution of a sigmoid's input stable "
            "during training (less internal covariate shift).",
            anchor="Ioffe & Szegedy 2015, Figure 1(b, c): the 15th, 50th and 85th percentiles "
            "of a typical last-layer sigmoid input change a lot without BN, little with BN.",
            measured=f"Drift of the percentiles (their range over training divided by the "
            f"15-85 spread; median over the {len(z['gamma'])} last-layer units): "
            f"{number(drift_bn)} with BN, {number(drift_plain)} without.",
            holds=drift_bn is not None and drift_plain is not None and drift_bn < drift_plain,
        ),
        Claim(
            claim="In training, each node's BN output has the mini-batch mean beta and "
            "standard deviation gamma: the Z-transform, then the learned scale and shift.",
            anchor="Ioffe & Szegedy 2015, Algorithm 1; the seed note's batch-of-four "
            "calculation (z_i = (o_i - mu) / sigma, then gamma * z_i + beta).",
            measured=f"On a batch of {z['batch_size']} after training, over "
            f"{z['nodes']} nodes: max |mean - beta| = {number(z['max_mean_error'], '.2g')}, "
            f"max |std - |gamma| sqrt(var / (var + eps))| = "
            f"{number(z['max_std_error'], '.2g')} (tolerance "
            f"{Z_TOLERANCE:g} x {z['scale']:.3g}).",
            holds=z_holds,
            section="calculation",
        ),
        Claim(
            claim="For a mini-batch of four, the layer computes what the seed note computes by "
            "hand: z_i = (o_i - mu) / sqrt(sigma^2 + eps), then gamma * z_i + beta.",
            anchor="The seed note's calculation process (a batch of four, d_1..d_4, one node "
            "n); Ioffe & Szegedy 2015, Algorithm 1.",
            measured=f"Node 0 of the last BN layer: o = {_numbers(worked['o'])}, mu = "
            f"{worked['mu']:.4g}, sigma = {worked['sigma']:.4g}, z = {_numbers(worked['z'])}; "
            f"gamma = {worked['gamma']:.4g}, beta = {worked['beta']:.4g}: by hand "
            f"{_numbers(worked['by_hand'])}, the layer {_numbers(worked['layer'])} (max "
            f"difference {number(worked['max_error'], '.2g')}).",
            holds=worked_holds,
            section="calculation",
        ),
    ]


def _numbers(values: list[float | None]) -> str:
    return "[" + ", ".join(number(v, ".3f") for v in values) + "]"


def headline(results: Mapping[str, Any]) -> str:
    """Final accuracies, the speed-up and the drift, in one line."""
    plain, bn = results["plain"], results["bn"]
    return (
        f"acc {percent(bn['final_test_accuracy'])} BN vs {percent(plain['final_test_accuracy'])}; "
        f"{ratio_text(results['speedup'])} fewer steps; drift {number(bn['drift_median'], '.2f')} "
        f"vs {number(plain['drift_median'], '.2f')}"
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Test accuracy curves, the percentile tracks, and gamma and beta."""
    figures: list[Figure] = []
    name = results["dataset"]["name"]

    figure, ax = new_figure(height=3.2)
    for arm, label in ARMS.items():
        run_ = results[arm]
        ax.plot(run_["steps"], run_["test_accuracy"], color=COLORS[arm], label=label)
        reached = results["steps_to_target"][arm]
        if reached is not None:
            ax.axvline(reached, color=COLORS[arm], linestyle=":", linewidth=1)
    if results["target_accuracy"] is not None:
        ax.axhline(
            results["target_accuracy"],
            color=COLORS["gray"],
            linestyle="--",
            linewidth=1,
            label=f"target {percent(results['target_accuracy'])}",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy, 3x100 sigmoid MLP on {name}")
    ax.legend(loc="lower right")
    file = f"{prefix}accuracy.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "Test accuracy against training steps, with and without BN "
            "(cf. the paper's Figure 1(a)); dotted lines: the step each reaches the "
            "target.",
        )
    )

    figure, axes = new_figure(columns=2, width=8.0, height=3.2)
    for ax, (arm, label) in zip(axes, ARMS.items(), strict=True):
        run_ = results[arm]
        if run_["typical_unit"] is None:
            ax.set_title(f"{label}: no finite record")
        else:
            tracks = np.asarray(run_["typical_percentiles"])  # (T, 3)
            steps = run_["percentile_steps"]
            ax.fill_between(steps, tracks[:, 0], tracks[:, 2], color=COLORS[arm], alpha=0.15)
            for column, style in enumerate((":", "-", "--")):
                ax.plot(steps, tracks[:, column], color=COLORS[arm], linestyle=style)
            ax.set_title(f"{label}: unit {run_['typical_unit']}, drift {run_['drift_typical']:.2f}")
        ax.set_xlabel("training step")
        ax.set_ylabel("input to the sigmoid")
    handles = [Line2D([], [], color="black", linestyle=style) for style in (":", "-", "--")]
    labels = [f"{p:g}th percentile" for p in PERCENTILES]
    figure.legend(handles, labels, loc="outside lower center", ncols=3)
    file = f"{prefix}percentiles.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "The input to a typical sigmoid of the last hidden layer over "
            "training: its 15th, 50th and 85th percentiles over the probe set "
            "(cf. Figure 1(b, c)). The typical unit is the one with the median "
            "drift.",
        )
    )

    z = results["z_transform"]
    figure, axes = new_figure(columns=3, width=8.5, height=2.8)
    panels = [
        ("gamma (BN scale)", z["gamma"], COLORS["bn"]),
        ("beta (BN shift)", z["beta"], COLORS["bn"]),
        ("bias without BN", results["plain_last_hidden_bias"], COLORS["plain"]),
    ]
    for ax, (title, values, color) in zip(axes, panels, strict=True):
        if values:
            ax.hist(values, bins=20, color=color, alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("value")
    axes[0].set_ylabel("nodes of the last hidden layer")
    file = f"{prefix}gamma-beta.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "The learned per-node gamma and beta of the last BN layer, and "
            "for comparison the biases the network without BN learned: beta takes "
            "the bias's place, gamma sets the scale the Z-transform removed.",
            section="calculation",
        )
    )
    return figures


EXPERIMENT = Experiment(
    name="ics",
    title="Figure 1: internal covariate shift in a sigmoid MLP",
    section="covariate-shift",
    description=(
        "A fully connected network with 3 hidden layers of 100 sigmoids, SGD on mini-batches "
        "of 60, with and without batch norm after each hidden linear layer (no bias before "
        "BN), weights initialized from N(0, 0.05^2) (the paper: small random Gaussian values). "
        "Test accuracy is measured at 100 evenly spaced steps; the input to each sigmoid "
        "of the last hidden layer is recorded on a fixed probe set of test examples "
        "(eval mode) and summarized by its 15th, 50th and 85th percentiles."
    ),
    quick=IcsConfig(),
    full=IcsConfig(steps=50_000),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
)
