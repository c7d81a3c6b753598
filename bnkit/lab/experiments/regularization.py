"""``regularization``: batch norm narrows the gap between training and test accuracy.

Ioffe & Szegedy (2015), Section 3.4: with batch norm a training example is seen together
with the others of its mini-batch, so the network no longer produces a deterministic
value for it; this helped generalization, and dropout "can be either removed or reduced
in strength" (Section 4.2.1, "Remove Dropout"). The regularization effect is the first
of batch norm's advantages usually listed.

Measured here: the same ReLU MLP trained on a fixed subset of the training set (small,
so that it overfits within minutes) without BN, with BN, and without BN but with
dropout after each hidden layer (the reference regularizer); training and test accuracy
(both in eval mode) over training, and the final gap between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import percent
from bnkit.lab.models import batch_norm_implementation, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed, train

__all__ = ["EXPERIMENT", "RegularizationConfig", "claims", "run"]

#: The arms: results keys and their labels.
ARMS: dict[str, str] = {"plain": "no BN", "bn": "BN", "dropout": "no BN, dropout"}

#: How close (in accuracy) BN alone must come to dropout for "dropout can be removed".
DROPOUT_MARGIN = 0.01


@dataclass(frozen=True)
class RegularizationConfig:
    """The ``regularization`` configuration.

    Args:
        steps: SGD steps per network.
        batch_size: the mini-batch size.
        lr: the learning rate.
        momentum: SGD momentum.
        hidden: the hidden layer widths.
        activation: the hidden nonlinearity.
        dropout: the drop probability of the dropout arm.
        train_samples: the size of the training subset (a seeded choice); fewer if the
            dataset has fewer.
        evaluations: evaluations after step 0.
    """

    steps: int = 6000
    batch_size: int = 60
    lr: float = 0.01
    momentum: float = 0.9
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    dropout: float = 0.3
    train_samples: int = 4000
    evaluations: int = 40


def run(config: RegularizationConfig, context: RunContext) -> dict[str, Any]:
    """Train without BN, with BN and with dropout; return train/test curves and gaps."""
    data = context.dataset
    count = min(config.train_samples, len(data.y_train))
    order = np.random.default_rng(derive_seed(context.seed, "regularization", "subset"))
    subset = torch.from_numpy(np.sort(order.permutation(len(data.y_train))[:count]))
    runs: dict[str, Any] = {}
    for arm, label in ARMS.items():
        torch.manual_seed(derive_seed(context.seed, "regularization", "weights"))
        model = mlp(
            data.num_features,
            data.num_classes,
            hidden=config.hidden,
            activation=config.activation,
            use_batch_norm=arm == "bn",
            dropout=config.dropout if arm == "dropout" else 0.0,
        )
        history = train(
            model,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            seed=derive_seed(context.seed, "regularization", "batches"),
            evaluations=config.evaluations,
            train_subset=subset,
            eval_train=True,
            progress=context.progress,
            desc=f"regularization {label}",
        )
        summary = history.to_json()
        train_acc, test_acc = summary["final_train_accuracy"], summary["final_test_accuracy"]
        summary["gap"] = (
            None if train_acc is None or test_acc is None else round(train_acc - test_acc, 6)
        )
        runs[arm] = summary
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "train_samples": count,
        "dropout": config.dropout,
        "runs": runs,
    }


def _describe(run_: Mapping[str, Any]) -> str:
    train_acc, test_acc = run_["final_train_accuracy"], run_["final_test_accuracy"]
    return f"train {percent(train_acc)}, test {percent(test_acc)}, gap {percent(run_['gap'])}"


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The claims of Section 3.4, decided from the results."""
    runs = results["runs"]
    plain, bn, dropout = runs["plain"], runs["bn"], runs["dropout"]
    narrower = bn["gap"] is not None and plain["gap"] is not None and bn["gap"] < plain["gap"]
    better = (
        bn["final_test_accuracy"] is not None
        and plain["final_test_accuracy"] is not None
        and bn["final_test_accuracy"] > plain["final_test_accuracy"]
    )
    replaces_dropout = (
        bn["final_test_accuracy"] is not None
        and dropout["final_test_accuracy"] is not None
        and bn["final_test_accuracy"] >= dropout["final_test_accuracy"] - DROPOUT_MARGIN
    )
    subset = f"{results['train_samples']} training examples"
    return [
        Claim(
            claim="Batch normalization regularizes: the gap between training and test accuracy "
            "is smaller with BN.",
            anchor="Ioffe & Szegedy 2015, Section 3.4: a training example is seen with the "
            "others of its mini-batch, which was advantageous to generalization: a "
            "regularization effect.",
            measured=f"On {subset}: with BN {_describe(bn)}; without {_describe(plain)}.",
            holds=narrower,
        ),
        Claim(
            claim="The network with BN tests better than the same network without it.",
            anchor="Ioffe & Szegedy 2015, Figure 3: BN-Baseline 72.7% against Inception's "
            "72.2%, same architecture.",
            measured=f"Final test accuracy: {percent(bn['final_test_accuracy'])} with BN, "
            f"{percent(plain['final_test_accuracy'])} without.",
            holds=better,
        ),
        Claim(
            claim="With BN, dropout can be removed: BN alone tests at least as well as dropout "
            f"(within {100 * DROPOUT_MARGIN:g} point).",
            anchor="Ioffe & Szegedy 2015, Sections 3.4 and 4.2.1: in a batch-normalized "
            "network dropout can be removed or reduced in strength.",
            measured=f"Test accuracy: BN {percent(bn['final_test_accuracy'])}, dropout "
            f"p={results['dropout']:g} without BN {percent(dropout['final_test_accuracy'])} "
            f"(dropout gap {percent(dropout['gap'])}).",
            holds=replaces_dropout,
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Each arm's gap in one line."""
    return "; ".join(
        f"{label} gap {percent(results['runs'][arm]['gap'])}" for arm, label in ARMS.items()
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Training and test accuracy over training, and the final gaps."""
    runs = results["runs"]
    figure, axes = new_figure(columns=2, width=9.0, height=3.2, width_ratios=(2, 1))
    ax = axes[0]
    for arm, label in ARMS.items():
        run_ = runs[arm]
        ax.plot(
            run_["steps"],
            run_["train_accuracy"],
            color=COLORS[arm],
            linestyle="--",
            label=f"{label}, train",
        )
        ax.plot(run_["steps"], run_["test_accuracy"], color=COLORS[arm], label=f"{label}, test")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Training ({results['train_samples']} examples) and test accuracy")
    ax.legend(loc="lower right", ncols=2)
    ax = axes[1]
    gaps = [runs[arm]["gap"] for arm in ARMS]
    ax.bar(
        range(len(ARMS)),
        [0.0 if g is None else g for g in gaps],
        color=[COLORS[arm] for arm in ARMS],
    )
    for index, gap in enumerate(gaps):
        ax.annotate(
            percent(gap), (index, 0.0 if gap is None else gap), ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(range(len(ARMS)), list(ARMS.values()))
    ax.set_ylabel("train - test accuracy")
    ax.set_title("Generalization gap")
    file = f"{prefix}gap.png"
    save_figure(figure, out_dir / file)
    return [
        Figure(
            file,
            "Left: training (dashed) and test (solid) accuracy over training, without "
            "BN, with BN, and with dropout instead. Right: the final gap between them.",
        )
    ]


EXPERIMENT = Experiment(
    name="regularization",
    title="The regularization effect",
    section="advantages",
    description=(
        "A ReLU MLP with 3 hidden layers of 100, SGD with momentum 0.9, trained on a fixed "
        "subset of the training set without BN, with BN, and without BN but with dropout after "
        "each hidden layer. Training and test accuracy are both measured in eval mode."
    ),
    quick=RegularizationConfig(steps=4000),
    full=RegularizationConfig(steps=20_000),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    curves=lambda results: {str(name): history for name, history in results["runs"].items()},
)
