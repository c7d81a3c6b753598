"""The training loop: determinism, divergence detection, evaluation schedule, models."""

from __future__ import annotations

import pytest
import torch

from bnkit.errors import ConfigError
from bnkit.lab.datasets import Dataset
from bnkit.lab.models import activation_layers, batch_norm_layers, mlp
from bnkit.lab.training import (
    History,
    evaluation_steps,
    final_accuracy,
    steps_to_target,
    train,
)


def toy_dataset(seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=generator) * 3
    y = torch.randint(0, 3, (300,), generator=generator)
    x = centers[y] + torch.randn(300, 6, generator=generator)
    return Dataset("toy", x[:200], y[:200], x[200:], y[200:], 3, "toy", 0.0, 1.0)


def trained(use_batch_norm: bool, lr: float, seed: int = 0) -> tuple[torch.nn.Module, History]:
    torch.manual_seed(seed)
    model = mlp(6, 3, hidden=(16, 16), activation="relu", use_batch_norm=use_batch_norm)
    history = train(
        model, toy_dataset(), steps=60, batch_size=20, lr=lr, momentum=0.9, seed=seed,
        evaluations=6, eval_train=True,
    )  # fmt: skip
    return model, history


@pytest.mark.slow
def test_training_is_deterministic() -> None:
    first_model, first = trained(True, 0.05)
    second_model, second = trained(True, 0.05)
    assert first.to_json() == second.to_json()
    for a, b in zip(
        first_model.state_dict().values(), second_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert first.steps == [0, 10, 20, 30, 40, 50, 60]
    assert first.final_test_accuracy is not None
    assert first.final_test_accuracy > 0.8  # the toy problem is easy
    assert first.train_accuracy is not None
    assert len(first.train_accuracy) == len(first.steps)


def test_divergence_is_detected_and_reported() -> None:
    _, history = trained(False, 1e4)
    assert history.diverged_at is not None
    assert history.final_test_accuracy is None
    summary = history.to_json()
    assert summary["diverged_at"] == history.diverged_at
    assert summary["final_test_accuracy"] is None


def test_evaluation_schedule_and_summaries() -> None:
    assert evaluation_steps(10, 3) == [0, 3, 7, 10]
    assert evaluation_steps(1, 50) == [0, 1]
    assert final_accuracy([0.5, None, 0.7]) is None
    assert final_accuracy([]) is None
    assert steps_to_target([0, 5, 10], [0.1, 0.2, 0.9], None) is None
    assert steps_to_target([0, 5, 10], [0.1, 0.95, 0.9], 0.9) == 5


def test_mlp_layout() -> None:
    model = mlp(40, 10, use_batch_norm=True)
    assert len(batch_norm_layers(model)) == 3
    assert len(activation_layers(model)) == 3
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [linear.bias is None for linear in linears] == [True, True, True, False]
    plain = mlp(40, 10, dropout=0.2)
    assert batch_norm_layers(plain) == []
    assert sum(isinstance(m, torch.nn.Dropout) for m in plain.modules()) == 3
    with pytest.raises(ConfigError, match="'sigmoid', 'relu'"):
        mlp(4, 2, activation="tanh")
    with pytest.raises(ConfigError, match="dropout"):
        mlp(4, 2, dropout=1.0)
