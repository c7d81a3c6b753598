"""Training and evaluation loops shared by the experiments.

One loop: mini-batches drawn without replacement (a new permutation per epoch, the
last partial batch dropped so batch norm never sees a batch of one), SGD with optional
momentum, cross-entropy, evaluation at evenly spaced steps, and divergence detection:
a run whose loss is NaN or infinite, or exceeds ``divergence_factor * ln(num_classes)``
(ten times the loss of a uniform guess by default), is stopped and reported as diverged
at that step instead of crashing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.errors import NonFiniteStatsWarning
from bnkit.lab.datasets import Dataset
from bnkit.lab.experiment import ProgressFactory, no_progress

__all__ = [
    "History",
    "accuracy",
    "derive_seed",
    "evaluation_steps",
    "final_accuracy",
    "predict",
    "steps_to_target",
    "subsample",
    "tail_rise",
    "train",
    "verdict",
]

#: How many of the last evaluations "final accuracy" averages (test accuracy on a
#: thousand samples moves by a point or two from one evaluation to the next).
FINAL_WINDOW = 3


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one part of a run, derived from the run's seed and labels.

    Example:
        >>> derive_seed(0, "ics") == derive_seed(0, "ics") != derive_seed(1, "ics")
        True
    """
    text = "/".join(str(part) for part in (seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """``evaluations`` evenly spaced steps ending at ``steps``, preceded by step 0.

    Example:
        >>> evaluation_steps(1000, 4)
        [0, 250, 500, 750, 1000]
        >>> evaluation_steps(3, 10)
        [0, 1, 2, 3]
    """
    count = max(1, min(evaluations, steps))
    return [0, *sorted({round(steps * (i + 1) / count) for i in range(count)})]


def final_accuracy(accuracies: Sequence[float | None], window: int = FINAL_WINDOW) -> float | None:
    """The mean of the last ``window`` accuracies; None if any of them is missing.

    Example:
        >>> final_accuracy([0.1, 0.5, 0.6, 0.7])
        0.6
    """
    tail = list(accuracies[-window:])
    if not tail or any(value is None for value in tail):
        return None
    return round(float(np.mean([float(v) for v in tail if v is not None])), 6)


#: The last part of a training curve that decides whether a run is still improving.
TAIL_FRACTION = 0.2
#: A run whose test accuracy still rises by more than this over the last
#: :data:`TAIL_FRACTION` of its steps is "still improving": too short to decide a claim.
TAIL_RISE = 0.01


def tail_rise(
    steps: Sequence[int], accuracies: Sequence[float | None], fraction: float = TAIL_FRACTION
) -> float | None:
    """How much the test accuracy rises over the last ``fraction`` of the steps.

    The rise of the least-squares line through the evaluations in that part of the curve
    (at least three), across its span: robust to the point-to-point noise of a test
    accuracy. None when fewer than three evaluations are known there.

    Example:
        >>> tail_rise([0, 20, 40, 60, 80, 100], [0.1, 0.5, 0.7, 0.8, 0.85, 0.9])
        0.1
        >>> tail_rise([0, 20, 40, 60, 80, 100], [0.1, 0.5, 0.7, 0.9, 0.9, 0.9])
        0.0
    """
    points = [(s, a) for s, a in zip(steps, accuracies, strict=True) if a is not None]
    if len(points) < 3:
        return None
    last = points[-1][0]
    start = last - fraction * (last - points[0][0])
    tail = [(s, a) for s, a in points if s >= start]
    if len(tail) < 3:
        tail = points[-3:]
    x = np.array([s for s, _ in tail], dtype=np.float64)
    y = np.array([a for _, a in tail], dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    return round(slope * float(x[-1] - x[0]), 6)


def verdict(curves: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Whether the runs behind a claim were trained long enough to decide it, in words.

    A run is still improving when its test accuracy rises by more than :data:`TAIL_RISE`
    over the last :data:`TAIL_FRACTION` of its curve (:func:`tail_rise`); a diverged run
    is a result, not an undertrained one, and is left out.

    Args:
        curves: run label -> ``{"steps", "test_accuracy", "diverged_at"}``.

    Returns:
        The verdict, starting "too short to decide" or "trained to a plateau"; None when
        no curve could be judged.

    Example:
        >>> verdict({"BN": {"steps": [0, 50, 80, 90, 100],
        ...                 "test_accuracy": [0.1, 0.5, 0.6, 0.7, 0.8]}})[:19]
        'too short to decide'
    """
    rises: dict[str, float] = {}
    for label, curve in curves.items():
        if curve.get("diverged_at") is not None:
            continue
        rise = tail_rise(curve["steps"], curve["test_accuracy"])
        if rise is not None:
            rises[label] = rise
    if not rises:
        return None
    span = f"the last {100 * TAIL_FRACTION:g}% of its curve"
    rising = {label: rise for label, rise in rises.items() if rise > TAIL_RISE}
    if rising:
        listed = ", ".join(f"{label} {100 * rise:+.1f}" for label, rise in rising.items())
        return (
            f"too short to decide: {len(rising)} of {len(rises)} runs still improving "
            f"(test accuracy rose by more than {100 * TAIL_RISE:g} point over {span}: "
            f"{listed} points)"
        )
    top = max(rises, key=lambda label: rises[label])
    return (
        f"trained to a plateau: no run's test accuracy rose by more than "
        f"{100 * TAIL_RISE:g} point over {span} (largest {top} {100 * rises[top]:+.1f})"
    )


def steps_to_target(
    steps: Sequence[int], accuracies: Sequence[float | None], target: float | None
) -> int | None:
    """The first evaluated step whose accuracy reaches ``target``; None if none does.

    Example:
        >>> steps_to_target([0, 100, 200], [0.1, 0.5, 0.8], 0.5)
        100
        >>> steps_to_target([0, 100, 200], [0.1, 0.5, 0.8], 0.9) is None
        True
    """
    if target is None:
        return None
    for step, value in zip(steps, accuracies, strict=True):
        if value is not None and value >= target:
            return int(step)
    return None


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The logits of ``model`` in eval mode, computed ``batch_size`` inputs at a time.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """The fraction of ``x`` that ``model`` (in eval mode) classifies as ``y``."""
    logits = predict(model, x, batch_size)
    return round(float((logits.argmax(dim=1) == y).float().mean()), 6)


@dataclass
class History:
    """What one training run measured.

    Attributes:
        steps: the evaluated steps, 0 first.
        test_accuracy: test accuracy at each evaluated step (eval mode).
        train_accuracy: training accuracy at each evaluated step, if asked for.
        train_loss: the mean training loss since the previous evaluation (None at step 0).
        diverged_at: the step whose loss was non-finite or exploding; None if none was.
    """

    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_accuracy: list[float] | None = None
    train_loss: list[float | None] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def final_test_accuracy(self) -> float | None:
        """The mean of the last evaluations' test accuracies; None if the run diverged."""
        return None if self.diverged_at is not None else final_accuracy(self.test_accuracy)

    @property
    def final_train_accuracy(self) -> float | None:
        """The mean of the last evaluations' training accuracies (None if not measured)."""
        if self.diverged_at is not None or self.train_accuracy is None:
            return None
        return final_accuracy(self.train_accuracy)

    def to_json(self) -> dict[str, Any]:
        """The curves and summary numbers, JSON-ready."""
        return {
            "steps": self.steps,
            "test_accuracy": self.test_accuracy,
            "train_accuracy": self.train_accuracy,
            "train_loss": self.train_loss,
            "diverged_at": self.diverged_at,
            "final_test_accuracy": self.final_test_accuracy,
            "final_train_accuracy": self.final_train_accuracy,
        }


def train(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    evaluations: int = 50,
    train_subset: torch.Tensor | None = None,
    eval_train: bool = False,
    on_evaluate: Callable[[int, nn.Module], None] | None = None,
    progress: ProgressFactory = no_progress,
    desc: str = "",
    divergence_factor: float = 10.0,
) -> History:
    """Train ``model`` with SGD on cross-entropy; evaluate at evenly spaced steps.

    Args:
        model: the network, in any mode; left in train mode.
        data: the dataset.
        steps: the number of SGD steps.
        batch_size: the mini-batch size.
        lr: the learning rate.
        seed: seeds the batch order (the caller seeds the initial weights).
        momentum: SGD momentum.
        evaluations: how many evaluations after step 0 (see :func:`evaluation_steps`).
        train_subset: indices of the training examples to use (default: all).
        eval_train: also measure accuracy on the (used) training examples.
        on_evaluate: called as ``on_evaluate(step, model)`` after each evaluation, with
            the model in eval mode and gradients off (probes of hidden layers).
        progress: makes the progress bar.
        desc: the progress bar's label.
        divergence_factor: a loss above ``divergence_factor * ln(num_classes)`` counts as
            divergence.

    Returns:
        The :class:`History`.
    """
    x_all, y_all = data.x_train, data.y_train
    if train_subset is not None:
        x_all, y_all = x_all[train_subset], y_all[train_subset]
    count = len(y_all)
    batch_size = min(batch_size, count)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rng = np.random.default_rng(seed)
    limit = divergence_factor * math.log(data.num_classes)
    checkpoints = evaluation_steps(steps, evaluations)
    history = History(train_accuracy=[] if eval_train else None)

    def evaluate(step: int, mean_loss: float | None) -> None:
        history.steps.append(step)
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if history.train_accuracy is not None:
            history.train_accuracy.append(accuracy(model, x_all, y_all))
        history.train_loss.append(None if mean_loss is None else round(mean_loss, 6))
        if on_evaluate is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                on_evaluate(step, model)
            model.train(was_training)

    bar = progress(steps, desc)
    order = np.empty(0, dtype=np.int64)
    position = 0
    loss_sum, loss_count = 0.0, 0
    model.train()
    evaluate(0, None)
    next_checkpoint = 1
    try:
        with warnings.catch_warnings():
            # A diverging run makes batch statistics non-finite; the loss check below
            # reports it, so bnkit's warning about skipping those statistics is noise here.
            warnings.simplefilter("ignore", NonFiniteStatsWarning)
            for step in range(1, steps + 1):
                if position + batch_size > len(order):
                    order = rng.permutation(count)
                    position = 0
                index = torch.from_numpy(order[position : position + batch_size])
                position += batch_size
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x_all[index]), y_all[index])
                value = float(loss.detach())
                if not math.isfinite(value) or value > limit:
                    history.diverged_at = step
                    bar.update(steps - step + 1)
                    break
                loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
                optimizer.step()
                loss_sum += value
                loss_count += 1
                bar.update(1)
                if step == checkpoints[next_checkpoint]:
                    evaluate(step, loss_sum / max(loss_count, 1))
                    loss_sum, loss_count = 0.0, 0
                    next_checkpoint += 1
    finally:
        bar.close()
    return history


def subsample(data: Dataset, train_samples: int, test_samples: int, seed: int) -> Dataset:
    """``data`` with at most ``train_samples`` / ``test_samples`` examples, a seeded choice.

    Keeps the experiments' cost the same on every dataset (60,000 Fashion-MNIST images
    would otherwise take 15 times as long as MNIST-1D's 4000). Order is kept.

    Example:
        >>> import torch
        >>> from bnkit.lab.datasets import Dataset
        >>> x, y = torch.zeros(10, 3), torch.arange(10)
        >>> small = subsample(Dataset("d", x, y, x, y, 10, "", 0.0, 1.0), 4, 20, seed=0)
        >>> tuple(small.x_train.shape), tuple(small.x_test.shape)
        ((4, 3), (10, 3))
    """
    rng = np.random.default_rng(derive_seed(seed, "subsample"))

    def pick(count: int, limit: int) -> torch.Tensor:
        return torch.from_numpy(np.sort(rng.permutation(count)[: min(count, limit)]))

    train_index = pick(len(data.y_train), train_samples)
    test_index = pick(len(data.y_test), test_samples)
    return dataclasses.replace(
        data,
        x_train=data.x_train[train_index],
        y_train=data.y_train[train_index],
        x_test=data.x_test[test_index],
        y_test=data.y_test[test_index],
    )
