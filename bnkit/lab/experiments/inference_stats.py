"""``inference-stats``: the population statistics used at test time, four ways.

Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm"): the exponential
moving average (EMA) that frameworks keep mixes batch statistics of weights that have
since changed; with a large learning rate (or a small batch) it lags behind the model
and is noisy, so evaluation accuracy jumps from one checkpoint to the next. PreciseBN,
statistics recomputed with the final weights on many samples, is stable and accurate.

Measured here: one ReLU MLP with batch norm trained at a high learning rate with small
batches. Batch norm in training uses the batch statistics only, so the running
statistics do not change the training: one run carries four estimators side by side.
The layers' own EMA (momentum 0.1), a shadow EMA with momentum 0.01 and a shadow
cumulative average (``momentum=None``, the paper's Algorithm 2) are updated from every
training batch (forward pre-hooks); at each checkpoint the model is evaluated with each,
and with PreciseBN (``bnkit.tools.recalibrate`` on training batches, a copy of the
model). Over the second half of training, per estimator: the lag (mean shortfall of its
accuracy against PreciseBN's) and the spread (mean absolute difference from it).
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

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import percent
from bnkit.lab.models import batch_norm_implementation, batch_norm_layers, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import accuracy, derive_seed, subsample, train

__all__ = ["EXPERIMENT", "InferenceStatsConfig", "claims", "run", "summarize"]

#: The estimators: results keys and their labels.
ESTIMATORS: dict[str, str] = {
    "ema_0.1": "EMA, momentum 0.1",
    "ema_0.01": "EMA, momentum 0.01",
    "cumulative": "cumulative average",
    "precise": "PreciseBN",
}

#: How far (in accuracy) the EMA must be off PreciseBN on average to count as noisy.
NOISE = 0.005

_COLORS = {
    "ema_0.1": COLORS["plain"],
    "ema_0.01": COLORS["dropout"],
    "cumulative": COLORS["gray"],
    "precise": COLORS["bn"],
}


@dataclass(frozen=True)
class InferenceStatsConfig:
    """The ``inference-stats`` configuration.

    Args:
        steps: SGD steps.
        batch_size: the (small) training batch.
        lr: the (high) learning rate.
        hidden: the MLP's hidden widths.
        evaluations: checkpoints after step 0.
        recalibration_batches: batches PreciseBN sees at each checkpoint.
        recalibration_batch_size: their size.
        train_samples: training examples used (a seeded subset).
        test_samples: test examples used.
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 0.3
    hidden: tuple[int, ...] = (100, 100, 100)
    evaluations: int = 20
    recalibration_batches: int = 10
    recalibration_batch_size: int = 100
    train_samples: int = 4000
    test_samples: int = 1000


class _ShadowStats:
    """EMA (momentum 0.01) and cumulative averages of a layer's batch statistics."""

    def __init__(self, layer: nn.Module, momentum: float) -> None:
        features = int(layer.num_features)  # type: ignore[arg-type]  # a BN layer
        self.momentum = momentum
        self.ema = (torch.zeros(features), torch.ones(features))
        self.sums = (torch.zeros(features, dtype=torch.float64),) * 2
        self.count = 0
        self.enabled = True
        layer.register_forward_pre_hook(self.hook)

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not (self.enabled and module.training):
            return
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=True)  # running_var is unbiased
        m = self.momentum
        self.ema = ((1 - m) * self.ema[0] + m * mean, (1 - m) * self.ema[1] + m * var)
        self.sums = (self.sums[0] + mean.double(), self.sums[1] + var.double())
        self.count += 1

    def cumulative(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = max(self.count, 1)
        return (self.sums[0] / count).float(), (self.sums[1] / count).float()


def _with_stats(model: nn.Module, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    clone = copy.deepcopy(model)
    for layer, (mean, var) in zip(batch_norm_layers(clone), stats, strict=True):
        assert layer.running_mean is not None
        assert layer.running_var is not None
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return clone


def summarize(
    steps: list[int], accuracies: Mapping[str, list[float]]
) -> dict[str, dict[str, float]]:
    """Lag and spread of each estimator against PreciseBN, over the second half of training.

    With d = PreciseBN's accuracy - the estimator's at each checkpoint of the second half:
    ``lag`` is the mean of d (positive: the estimator falls short), ``spread`` the mean of
    |d| (how far off it is either way); ``jitter`` the mean absolute change of the
    estimator's own accuracy between consecutive checkpoints; ``final`` the mean of the
    last three accuracies.

    Example:
        >>> s = summarize([1, 2, 3, 4], {"precise": [.5, .8, .8, .8], "x": [.5, .7, .8, .6]})
        >>> s["x"]["lag"], s["x"]["spread"], s["x"]["jitter"], s["precise"]["spread"]
        (0.1, 0.1, 0.2, 0.0)
    """
    half = len(steps) // 2
    precise = np.asarray(accuracies["precise"][half:])
    summary = {}
    for name, values in accuracies.items():
        tail = np.asarray(values[half:])
        difference = precise - tail
        summary[name] = {
            "lag": round(float(np.mean(difference)), 6),
            "spread": round(float(np.mean(np.abs(difference))), 6),
            "jitter": round(float(np.mean(np.abs(np.diff(tail)))) if len(tail) > 1 else 0.0, 6),
            "final": round(float(np.mean(values[-3:])), 6),
        }
    return summary


def run(config: InferenceStatsConfig, context: RunContext) -> dict[str, Any]:
    """Train once; evaluate the four estimators at every checkpoint."""
    data = subsample(context.dataset, config.train_samples, config.test_samples, context.seed)
    from bnkit.tools import recalibrate

    torch.manual_seed(derive_seed(context.seed, "inference-stats", "weights"))
    model = mlp(
        data.num_features,
        data.num_classes,
        hidden=config.hidden,
        activation="relu",
        use_batch_norm=True,
        bn_momentum=0.1,
    )
    shadows = [_ShadowStats(layer, 0.01) for layer in batch_norm_layers(model)]
    recal_rng = np.random.default_rng(derive_seed(context.seed, "inference-stats", "recal"))
    steps: list[int] = []
    accuracies: dict[str, list[float]] = {name: [] for name in ESTIMATORS}

    def evaluate(step: int, trained: nn.Module) -> None:
        if step == 0:
            return
        for shadow in shadows:
            shadow.enabled = False
        steps.append(step)
        x, y = data.x_test, data.y_test
        accuracies["ema_0.1"].append(accuracy(trained, x, y))
        ema = _with_stats(trained, [shadow.ema for shadow in shadows])
        accuracies["ema_0.01"].append(accuracy(ema, x, y))
        cumulative = _with_stats(trained, [shadow.cumulative() for shadow in shadows])
        accuracies["cumulative"].append(accuracy(cumulative, x, y))
        size = min(config.recalibration_batch_size, len(data.y_train))
        order = torch.from_numpy(recal_rng.permutation(len(data.y_train)))
        batches = [
            data.x_train[order[i : i + size]]
            for i in range(0, size * config.recalibration_batches, size)
            if i + size <= len(order)
        ]
        precise = recalibrate(copy.deepcopy(trained), batches)
        accuracies["precise"].append(accuracy(precise, x, y))
        for shadow in shadows:
            shadow.enabled = True

    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=derive_seed(context.seed, "inference-stats", "batches"),
        evaluations=config.evaluations,
        on_evaluate=evaluate,
        progress=context.progress,
        desc="inference-stats",
    )
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "diverged_at": history.diverged_at,
        "steps": steps,
        "accuracy": accuracies,
        "summary": summarize(steps, accuracies) if len(steps) >= 2 else None,
    }


def _get(results: Mapping[str, Any], name: str, key: str) -> float | None:
    summary = results.get("summary")
    if not summary:
        return None
    return float(summary[name][key])


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """Wu & Johnson's observations about EMA and PreciseBN, decided from the curves."""
    lag = {name: _get(results, name, "lag") for name in ESTIMATORS}
    spread = {name: _get(results, name, "spread") for name in ESTIMATORS}
    final = {name: _get(results, name, "final") for name in ESTIMATORS}
    anchor = (
        "Wu & Johnson 2021, 'Rethinking Batch in BatchNorm': with a large "
        "learning rate the EMA of the population statistics lags behind the weights and is "
        "noisy; PreciseBN is stable and more accurate (qualitative)."
    )
    setting = f"batch {results['batch_size']}, learning rate {results['lr']:g}"

    def pts(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:+.2f} points"

    def above(value: float | None, bound: float) -> bool:
        return value is not None and value > bound

    others = [name for name in ESTIMATORS if name != "precise"]
    return [
        Claim(
            claim=f"With a high learning rate and small batches the EMA (momentum 0.1) is "
            f"noisy: its evaluation accuracy is off PreciseBN's by more than "
            f"{100 * NOISE:g} point on average.",
            anchor=anchor,
            measured=f"{setting}: mean |PreciseBN - EMA 0.1| over the second half of "
            f"training {percent(spread['ema_0.1'], 2)}.",
            holds=above(spread["ema_0.1"], NOISE),
        ),
        Claim(
            claim="The EMA (momentum 0.1) lags behind the weights: its accuracy falls short "
            "of PreciseBN's on average.",
            anchor=anchor,
            measured=f"Mean shortfall against PreciseBN: EMA 0.1 {pts(lag['ema_0.1'])}.",
            holds=above(lag["ema_0.1"], 0.0),
        ),
        Claim(
            claim="A smaller momentum (0.01) does not fix the EMA: it falls short of "
            "PreciseBN too.",
            anchor=anchor + " A small momentum averages over weights from further back.",
            measured=f"Mean shortfall of EMA 0.01 against PreciseBN: {pts(lag['ema_0.01'])}.",
            holds=above(lag["ema_0.01"], 0.0),
        ),
        Claim(
            claim="The cumulative average of all batches (momentum=None, the original "
            "paper's estimator) lags most: it still holds the first weights' statistics.",
            anchor="Ioffe & Szegedy 2015, Algorithm 2 (statistics of a trained network) "
            "against Wu & Johnson 2021.",
            measured=f"Mean shortfall: cumulative {pts(lag['cumulative'])}, EMA 0.1 "
            f"{pts(lag['ema_0.1'])}, EMA 0.01 {pts(lag['ema_0.01'])}.",
            holds=lag["cumulative"] is not None
            and all(above(lag["cumulative"], max(float(lag[n] or 0.0), 0.0)) for n in others[:2]),
        ),
        Claim(
            claim="PreciseBN ends at least as accurate as every other estimator.",
            anchor=anchor,
            measured="Final accuracy (mean of the last 3 checkpoints): "
            + ", ".join(f"{ESTIMATORS[name]} {percent(final[name])}" for name in ESTIMATORS)
            + ".",
            holds=final["precise"] is not None
            and all(
                final[name] is not None and float(final["precise"]) >= float(final[name] or 0)
                for name in others
            ),
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Each estimator's spread and lag."""
    if not results.get("summary"):
        return "not enough checkpoints"
    return "; ".join(
        f"{name} final {percent(_get(results, name, 'final'))}"
        + (f" lag {percent(_get(results, name, 'lag'), 2)}" if name != "precise" else "")
        for name in ESTIMATORS
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Test accuracy at each checkpoint with each estimator."""
    figure, ax = new_figure(width=7.0, height=3.4)
    for name, label in ESTIMATORS.items():
        ax.plot(
            results["steps"],
            [100 * a for a in results["accuracy"][name]],
            marker=".",
            color=_COLORS[name],
            label=label,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"Population statistics at batch {results['batch_size']}, learning rate {results['lr']:g}"
    )
    ax.legend(loc="lower right")
    file = f"{prefix}accuracy.png"
    save_figure(figure, out_dir / file)
    return [
        Figure(
            file,
            "Test accuracy of the same weights at each checkpoint, evaluated with four "
            "population statistics: the EMA with momentum 0.1 and 0.01, the cumulative "
            "average, and PreciseBN (recomputed with the current weights).",
        )
    ]


EXPERIMENT = Experiment(
    name="inference-stats",
    title="Population statistics: EMA, cumulative average and PreciseBN",
    section="population-stats",
    description=(
        "A ReLU MLP (3 hidden layers of 100, bnkit batch norm) trained with plain SGD at a "
        "high learning rate with small batches. The same weights are evaluated at each "
        "checkpoint with four population statistics: the layers' EMA (momentum 0.1), a "
        "shadow EMA with momentum 0.01, a shadow cumulative average of all batch means and "
        "unbiased variances, and PreciseBN (bnkit.tools.recalibrate on training batches)."
    ),
    quick=InferenceStatsConfig(),
    full=InferenceStatsConfig(steps=20_000, evaluations=60),
    step_fields=("steps", "recalibration_batches"),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    curves=lambda results: {
        str(name): {
            "steps": results["steps"],
            "test_accuracy": accuracies,
            "diverged_at": results["diverged_at"],
        }
        for name, accuracies in results["accuracy"].items()
    },
)
