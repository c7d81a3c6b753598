"""``covariate-shift``: test inputs from another distribution, and AdaBN.

Batch norm fixes the population statistics at the end of training; when the test
inputs come from a shifted distribution (another camera, another sensor gain), every
layer normalizes with statistics that no longer fit. Li et al. (2016, "Revisiting Batch
Normalization For Practical Domain Adaptation", AdaBN) recompute the statistics on
unlabeled data of the new domain and keep the weights.

Measured here: a small CNN with batch norm trained on clean data; its test accuracy on
clean inputs, and on shifted inputs (scaled, offset, scaled and offset, Gaussian noise)
with the training statistics and with statistics recalibrated (``bnkit.tools.recalibrate``)
on the shifted *training* inputs, unlabeled (so the test examples are never seen).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import percent
from bnkit.lab.models import batch_norm_implementation, bnkit_norm, conv_net
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import accuracy, derive_seed, subsample, train

__all__ = ["EXPERIMENT", "SHIFTS", "CovariateShiftConfig", "claims", "run", "shift"]

#: The shifts: name -> (scale, offset, noise std), applied to the standardized input as
#: ``scale * x + offset + noise``.
SHIFTS: dict[str, tuple[float, float, float]] = {
    "scaled x2": (2.0, 0.0, 0.0),
    "offset +1": (1.0, 1.0, 0.0),
    "scaled x0.5, offset -0.5": (0.5, -0.5, 0.0),
    "noise 0.5": (1.0, 0.0, 0.5),
}

#: The shifts that are affine maps of the input; a first BN layer with recalibrated
#: statistics undoes those (up to the zero padding of the first convolution).
AFFINE = ("scaled x2", "offset +1", "scaled x0.5, offset -0.5")

#: How much a shift must cost, and how close AdaBN must come back, in accuracy.
HURTS = 0.02
RECOVERS = 0.02


@dataclass(frozen=True)
class CovariateShiftConfig:
    """The ``covariate-shift`` configuration.

    Args:
        steps: SGD steps of the training on clean data.
        batch_size: the training batch.
        lr: the learning rate.
        momentum: SGD momentum.
        recalibration_batch_size: the batch size of AdaBN's passes over the shifted
            training inputs.
        train_samples: training examples used (a seeded subset).
        test_samples: test examples used.
    """

    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    recalibration_batch_size: int = 100
    train_samples: int = 4000
    test_samples: int = 1000


def shift(x: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """``x`` shifted by :data:`SHIFTS` ``[name]`` (noise seeded by ``seed``).

    Example:
        >>> shift(torch.ones(2, 3), "offset +1", 0).tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    scale, offset, noise = SHIFTS[name]
    out = scale * x + offset
    if noise:
        generator = torch.Generator().manual_seed(derive_seed(seed, "shift", name))
        out = out + noise * torch.randn(x.shape, generator=generator)
    return out


def run(config: CovariateShiftConfig, context: RunContext) -> dict[str, Any]:
    """Train on clean data; test on each shift with training and AdaBN statistics."""
    from bnkit.tools import recalibrate

    data = subsample(context.dataset, config.train_samples, config.test_samples, context.seed)
    torch.manual_seed(derive_seed(context.seed, "covariate-shift", "weights"))
    model = conv_net(data.sample_shape, data.num_classes, bnkit_norm())
    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        seed=derive_seed(context.seed, "covariate-shift", "batches"),
        evaluations=5,
        progress=context.progress,
        desc="covariate-shift",
    )
    clean = accuracy(model, data.x_test, data.y_test)
    size = config.recalibration_batch_size
    order = np.random.default_rng(derive_seed(context.seed, "covariate-shift", "recal"))
    shuffled = data.x_train[torch.from_numpy(order.permutation(len(data.y_train)))]
    shifts: dict[str, Any] = {}
    for name in SHIFTS:
        x_test = shift(data.x_test, name, derive_seed(context.seed, "test"))
        x_unlabeled = shift(shuffled, name, derive_seed(context.seed, "train"))
        adapted = recalibrate(copy.deepcopy(model), list(torch.split(x_unlabeled, size)))
        shifts[name] = {
            "training_stats": accuracy(model, x_test, data.y_test),
            "adabn": accuracy(adapted, x_test, data.y_test),
        }
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "diverged_at": history.diverged_at,
        "clean": clean,
        "shifts": shifts,
    }


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """A shift hurts; AdaBN recovers it; fully for affine shifts."""
    clean = float(results["clean"])
    shifts = results["shifts"]
    costs = {name: clean - float(v["training_stats"]) for name, v in shifts.items()}
    gains = {name: float(v["adabn"]) - float(v["training_stats"]) for name, v in shifts.items()}
    affine = [name for name in AFFINE if name in shifts]
    affine_gaps = {name: clean - float(shifts[name]["adabn"]) for name in affine}
    anchor = (
        "Li et al. 2016 (AdaBN): recomputing the BN statistics on the target domain's "
        "unlabeled data adapts a trained network to it (qualitative)."
    )

    def listing(values: Mapping[str, float], sign: bool = False) -> str:
        return ", ".join(
            f"{name} {100 * v:+.1f}" if sign else f"{name} {100 * v:.1f}"
            for name, v in values.items()
        )

    return [
        Claim(
            claim=f"Shifted test inputs cost accuracy with the training statistics (more "
            f"than {100 * HURTS:g} points for every shift).",
            anchor="Ioffe & Szegedy 2015, Section 3.1: the population statistics are fixed "
            "from the training data; covariate shift (Shimodaira 2000) between training and "
            "test data.",
            measured=f"Clean accuracy {percent(clean)}; loss in points: {listing(costs)}.",
            holds=bool(costs) and all(cost > HURTS for cost in costs.values()),
        ),
        Claim(
            claim="AdaBN (statistics recalibrated on the unlabeled shifted inputs) improves "
            "on the training statistics for every shift.",
            anchor=anchor,
            measured=f"AdaBN gain in points: {listing(gains, sign=True)}.",
            holds=bool(gains) and all(gain > 0 for gain in gains.values()),
        ),
        Claim(
            claim=f"For affine shifts (scale, offset) AdaBN recovers the clean accuracy to "
            f"within {100 * RECOVERS:g} points: the first BN layer undoes them.",
            anchor=anchor + " A per-channel affine change of a BN layer's input does not "
            "change its output (Ioffe & Szegedy 2015).",
            measured=f"Clean minus AdaBN accuracy, in points: {listing(affine_gaps)}.",
            holds=bool(affine_gaps) and all(gap < RECOVERS for gap in affine_gaps.values()),
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Clean accuracy and each shift's accuracy with training / AdaBN statistics."""
    parts = [f"clean {percent(results['clean'])}"]
    for name, values in results["shifts"].items():
        parts.append(f"{name} {percent(values['training_stats'])} -> {percent(values['adabn'])}")
    return "; ".join(parts)


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Grouped bars: each shift with training statistics and with AdaBN, and clean."""
    names = list(results["shifts"])
    figure, ax = new_figure(width=7.5, height=3.4)
    positions = np.arange(len(names))
    width = 0.38
    for offset, key, label, color in (
        (-width / 2, "training_stats", "training statistics", COLORS["plain"]),
        (width / 2, "adabn", "AdaBN (recalibrated)", COLORS["bn"]),
    ):
        ax.bar(
            positions + offset,
            [100 * results["shifts"][name][key] for name in names],
            width,
            label=label,
            color=color,
        )
    ax.axhline(100 * results["clean"], color=COLORS["gray"], linestyle="--", label="clean test")
    ax.set_xticks(positions, names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Shifted test inputs: training statistics against AdaBN")
    ax.legend(loc="lower left")
    file = f"{prefix}accuracy.png"
    save_figure(figure, out_dir / file)
    return [
        Figure(
            file,
            "Test accuracy on shifted inputs with the population statistics of training "
            "and with statistics recalibrated on the shifted, unlabeled training inputs "
            "(AdaBN); dashed: accuracy on clean test inputs.",
        )
    ]


EXPERIMENT = Experiment(
    name="covariate-shift",
    title="Covariate shift at test time, and AdaBN",
    section="population-stats",
    description=(
        "The small CNN of batch-size, with bnkit batch norm, trained on clean data (batch "
        "32, SGD with momentum). Test inputs are shifted after standardization: scaled, "
        "offset, both, or with Gaussian noise added. AdaBN recalibrates the population "
        "statistics (bnkit.tools.recalibrate) on the shifted training inputs, without "
        "their labels, and keeps the weights."
    ),
    quick=CovariateShiftConfig(),
    full=CovariateShiftConfig(steps=10_000),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
)
