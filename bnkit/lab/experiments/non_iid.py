"""``non-iid``: mini-batches that are not samples of the whole distribution.

Ioffe (2017, "Batch Renormalization"): when the examples of a mini-batch
are not independent (there, several images of the same class in a batch), the batch
statistics differ from the population's; a network trained with batch norm learns to
rely on the batch statistics, and at test time, with the population statistics, it does
worse. Batch renormalization, which corrects each batch toward the population statistics
during training, improved the accuracy substantially.

Measured here, with a more extreme sampler: every training batch holds examples of only
two classes (half each). The ReLU MLP with batch norm, and with batch renorm (the
paper's schedule scaled to the run), is trained on such batches and evaluated in eval
mode; the same MLP with batch norm on ordinary (i.i.d.) batches is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.lab.datasets import Dataset
from bnkit.lab.experiment import Claim, Experiment, Figure, ProgressFactory, RunContext
from bnkit.lab.experiments.batch_size import scaled_renorm
from bnkit.lab.formatting import percent
from bnkit.lab.models import batch_norm_implementation, batch_norm_layers, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import (
    History,
    accuracy,
    derive_seed,
    evaluation_steps,
    subsample,
)

__all__ = ["EXPERIMENT", "NonIIDConfig", "claims", "run", "two_class_batches"]

#: The arms: results keys and their labels.
ARMS: dict[str, str] = {
    "bn_iid": "BN, i.i.d. batches",
    "bn": "BN, 2-class batches",
    "renorm": "batch renorm, 2-class batches",
}

_COLORS = {"bn_iid": COLORS["gray"], "bn": COLORS["plain"], "renorm": COLORS["bn"]}

#: How much the 2-class batches must cost BN to count as hurting (accuracy).
HURTS = 0.02


@dataclass(frozen=True)
class NonIIDConfig:
    """The ``non-iid`` configuration.

    Args:
        steps: SGD steps.
        batch_size: the training batch (half from each of its two classes).
        lr: the learning rate.
        momentum: SGD momentum.
        hidden: the MLP's hidden widths.
        evaluations: evaluations after step 0.
        renorm_momentum: the running statistics' momentum with renorm (they enter the
            training forward pass, so they must average over many batches of 2 classes).
        train_samples: training examples used (a seeded subset).
        test_samples: test examples used.
    """

    steps: int = 3000
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    hidden: tuple[int, ...] = (100, 100, 100)
    evaluations: int = 20
    renorm_momentum: float = 0.01
    train_samples: int = 4000
    test_samples: int = 1000


def two_class_batches(
    labels: torch.Tensor, batch_size: int, steps: int, seed: int
) -> list[torch.Tensor]:
    """Indices of ``steps`` batches, each of two random classes, half from each.

    Example:
        >>> labels = torch.arange(40) % 4
        >>> batches = two_class_batches(labels, 6, 5, seed=0)
        >>> [len(set(labels[b].tolist())) for b in batches]
        [2, 2, 2, 2, 2]
    """
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(int(labels.max()) + 1)]
    classes = [c for c, members in enumerate(by_class) if len(members) > 0]
    half = max(1, batch_size // 2)
    batches = []
    for _ in range(steps):
        pair = rng.choice(classes, size=2, replace=False) if len(classes) > 1 else classes * 2
        picked = [rng.choice(by_class[c], size=half, replace=len(by_class[c]) < half) for c in pair]
        batches.append(torch.from_numpy(np.concatenate(picked)))
    return batches


def _train(
    model: nn.Module,
    data: Dataset,
    batches: list[torch.Tensor],
    config: NonIIDConfig,
    progress: ProgressFactory,
    desc: str,
) -> History:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    checkpoints = set(evaluation_steps(len(batches), config.evaluations))
    history = History()
    history.steps.append(0)
    history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
    history.train_loss.append(None)
    limit = 10 * math.log(data.num_classes)
    bar = progress(len(batches), desc)
    model.train()
    try:
        for step, index in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            value = float(loss.detach())
            if not math.isfinite(value) or value > limit:
                history.diverged_at = step
                break
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizer.step()
            bar.update(1)
            if step in checkpoints:
                history.steps.append(step)
                history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
                history.train_loss.append(round(value, 6))
    finally:
        bar.close()
    return history


def run(config: NonIIDConfig, context: RunContext) -> dict[str, Any]:
    """Train BN on i.i.d. batches, BN and renorm on 2-class batches; test accuracy."""
    data = subsample(context.dataset, config.train_samples, config.test_samples, context.seed)
    count = len(data.y_train)
    iid_rng = np.random.default_rng(derive_seed(context.seed, "non-iid", "iid"))
    size = min(config.batch_size, count)
    iid: list[torch.Tensor] = []
    while len(iid) < config.steps:
        order = iid_rng.permutation(count)
        iid += [torch.from_numpy(order[i : i + size]) for i in range(0, count - size + 1, size)]
    iid = iid[: config.steps]
    paired = two_class_batches(
        data.y_train, config.batch_size, config.steps, derive_seed(context.seed, "non-iid", "pairs")
    )
    runs: dict[str, Any] = {}
    for arm, label in ARMS.items():
        torch.manual_seed(derive_seed(context.seed, "non-iid", "weights"))
        model = mlp(
            data.num_features,
            data.num_classes,
            hidden=config.hidden,
            activation="relu",
            use_batch_norm=True,
        )
        if arm == "renorm":
            from bnkit.tools import convert

            convert(model, renorm=scaled_renorm(config.steps))
            for layer in batch_norm_layers(model):
                layer.momentum = config.renorm_momentum
        history = _train(
            model,
            data,
            iid if arm == "bn_iid" else paired,
            config,
            context.progress,
            f"non-iid {label}",
        )
        runs[arm] = history.to_json()
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "batch_size": config.batch_size,
        "runs": runs,
    }


def _final(results: Mapping[str, Any], arm: str) -> float | None:
    value = results["runs"][arm]["final_test_accuracy"]
    return None if value is None else float(value)


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """Non-i.i.d. batches hurt BN at test time; renorm recovers."""
    iid, bn, renorm = (_final(results, arm) for arm in ARMS)
    anchor = (
        "Ioffe 2017 (Batch Renormalization): with non-i.i.d. mini-batches "
        "batch norm tested markedly worse and batch renorm recovered most of the loss "
        "(qualitative; there, batches held several images per class)."
    )
    recovered = None
    if iid is not None and bn is not None and renorm is not None and iid - bn > 0:
        recovered = (renorm - bn) / (iid - bn)
    return [
        Claim(
            claim=f"Training batch norm on batches of only two classes costs test accuracy "
            f"(more than {100 * HURTS:g} points against i.i.d. batches).",
            anchor=anchor,
            measured=f"Test accuracy (eval mode): BN on 2-class batches {percent(bn)}, "
            f"on i.i.d. batches {percent(iid)}.",
            holds=iid is not None and bn is not None and iid - bn > HURTS,
        ),
        Claim(
            claim="Batch renormalization tests better than batch norm on the same 2-class batches.",
            anchor=anchor,
            measured=f"Renorm {percent(renorm)}, BN {percent(bn)}.",
            holds=renorm is not None and bn is not None and renorm > bn,
        ),
        Claim(
            claim="Batch renormalization recovers at least half of the accuracy the 2-class "
            "batches cost.",
            anchor=anchor,
            measured="Recovered: "
            + ("n/a" if recovered is None else f"{100 * recovered:.0f}% of the loss")
            + f" (i.i.d. {percent(iid)}, BN {percent(bn)}, renorm {percent(renorm)}).",
            holds=recovered is not None and recovered >= 0.5,
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Each arm's final test accuracy."""
    return "; ".join(f"{label} {percent(_final(results, arm))}" for arm, label in ARMS.items())


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Test accuracy over training for each arm."""
    figure, ax = new_figure(width=7.0, height=3.4)
    for arm, label in ARMS.items():
        run_ = results["runs"][arm]
        ax.plot(
            run_["steps"], [100 * a for a in run_["test_accuracy"]], color=_COLORS[arm], label=label
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Batches of {results['batch_size']} from two classes each")
    ax.legend(loc="lower right")
    file = f"{prefix}accuracy.png"
    save_figure(figure, out_dir / file)
    return [
        Figure(
            file,
            "Test accuracy (eval mode, population statistics) over training: BN on i.i.d. "
            "batches, and BN and batch renorm on batches drawn from two classes each.",
        )
    ]


EXPERIMENT = Experiment(
    name="non-iid",
    title="Non-i.i.d. mini-batches: batch norm against batch renorm",
    section="small-batches",
    description=(
        "A ReLU MLP (3 hidden layers of 100) with bnkit batch norm, SGD with momentum 0.9. "
        "Each training batch of the non-i.i.d. arms holds examples of two random classes, "
        "half each. Batch renorm (bnkit.Renorm) follows the paper's schedule scaled to the "
        "run: plain BN for the first 5% of steps, r_max reaching 3 at 40%, d_max 5 at 25%."
    ),
    quick=NonIIDConfig(steps=1500),
    full=NonIIDConfig(steps=20_000, evaluations=40),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    curves=lambda results: {str(name): history for name, history in results["runs"].items()},
)
