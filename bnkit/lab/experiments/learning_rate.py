"""``learning-rate``: batch norm lets a network train at much higher learning rates.

Ioffe & Szegedy (2015), Section 4.2 and Figure 3: on Inception, BN-x5 (batch norm, 5
times the learning rate) reached Inception's final 72.2% in 2.1M steps instead of 31.0M
(14 times fewer); BN-x30 reached a higher 74.8%. Section 3.3 explains why: without
batch norm, large learning rates make gradients explode or vanish, or the model gets
stuck; with it, a layer's output does not change with the scale of its weights.

Measured here: a ReLU MLP (3 hidden layers of 100, SGD with momentum 0.9) with and
without BN at 1, 5 and 30 times a baseline learning rate, from the same initial weights
and batch order. For each run: the test accuracy curve, the final accuracy, the steps it
needs to reach the baseline's (no BN, x1) final accuracy, and divergence (a NaN,
infinite or exploding loss stops the run, which is reported as diverged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import percent, ratio_text, steps_text
from bnkit.lab.models import batch_norm_implementation, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed, steps_to_target, train

__all__ = ["EXPERIMENT", "LearningRateConfig", "claims", "run"]

ARMS: dict[str, str] = {"plain": "without BN", "bn": "with BN"}


@dataclass(frozen=True)
class LearningRateConfig:
    """The ``learning-rate`` configuration.

    Args:
        steps: SGD steps per run.
        batch_size: the mini-batch size.
        base_lr: the baseline learning rate (x1).
        multipliers: the learning rates tried, as multiples of ``base_lr`` (the paper: 1,
            5, 30).
        momentum: SGD momentum.
        hidden: the hidden layer widths.
        activation: the hidden nonlinearity.
        evaluations: evaluations after step 0.
        divergence_factor: a loss above this times ln(classes) counts as divergence.
    """

    steps: int = 4000
    batch_size: int = 60
    base_lr: float = 0.01
    multipliers: tuple[float, ...] = (1.0, 5.0, 30.0)
    momentum: float = 0.9
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    evaluations: int = 50
    divergence_factor: float = 10.0


def run_key(arm: str, multiplier: float) -> str:
    """The results key of one run, e.g. ``"bn-x5"``.

    Example:
        >>> run_key("bn", 5.0), run_key("plain", 0.5)
        ('bn-x5', 'plain-x0.5')
    """
    return f"{arm}-x{multiplier:g}"


def run(config: LearningRateConfig, context: RunContext) -> dict[str, Any]:
    """Train with and without BN at each learning rate; return curves and summaries."""
    data = context.dataset
    runs: dict[str, Any] = {}
    for multiplier in config.multipliers:
        for arm, label in ARMS.items():
            torch.manual_seed(derive_seed(context.seed, "learning-rate", "weights"))
            model = mlp(
                data.num_features,
                data.num_classes,
                hidden=config.hidden,
                activation=config.activation,
                use_batch_norm=arm == "bn",
            )
            lr = config.base_lr * multiplier
            history = train(
                model,
                data,
                steps=config.steps,
                batch_size=config.batch_size,
                lr=lr,
                momentum=config.momentum,
                seed=derive_seed(context.seed, "learning-rate", "batches"),
                evaluations=config.evaluations,
                progress=context.progress,
                desc=f"learning-rate {label} x{multiplier:g}",
                divergence_factor=config.divergence_factor,
            )
            runs[run_key(arm, multiplier)] = {
                "arm": arm,
                "multiplier": multiplier,
                "lr": lr,
                **history.to_json(),
            }
    baseline_key = run_key("plain", config.multipliers[0])
    target = runs[baseline_key]["final_test_accuracy"]
    for run_ in runs.values():
        run_["steps_to_target"] = steps_to_target(run_["steps"], run_["test_accuracy"], target)
    baseline_steps = runs[baseline_key]["steps_to_target"]
    for run_ in runs.values():
        reached = run_["steps_to_target"]
        run_["speedup"] = round(baseline_steps / reached, 4) if baseline_steps and reached else None
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "multipliers": list(config.multipliers),
        "baseline": baseline_key,
        "target_accuracy": target,
        "total_steps": config.steps,
        "runs": runs,
    }


def _outcome(run_: Mapping[str, Any]) -> str:
    if run_["diverged_at"] is not None:
        return f"diverged at {steps_text(run_['diverged_at'])}"
    return f"final {percent(run_['final_test_accuracy'])}"


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The claims of Section 4.2 and Figure 3, decided from the results."""
    runs = results["runs"]
    multipliers = results["multipliers"]
    base = runs[results["baseline"]]
    base_final = base["final_test_accuracy"]
    middle, top = multipliers[len(multipliers) // 2], multipliers[-1]
    bn_mid, bn_top = runs[run_key("bn", middle)], runs[run_key("bn", top)]
    plain_mid, plain_top = runs[run_key("plain", middle)], runs[run_key("plain", top)]
    faster = bn_mid["steps_to_target"] is not None and (
        base["steps_to_target"] is None or bn_mid["steps_to_target"] < base["steps_to_target"]
    )
    top_better = (
        bn_top["diverged_at"] is None
        and bn_top["final_test_accuracy"] is not None
        and (base_final is None or bn_top["final_test_accuracy"] > base_final)
    )
    plain_fails = plain_top["diverged_at"] is not None or (
        plain_top["final_test_accuracy"] is not None
        and base_final is not None
        and plain_top["final_test_accuracy"] < base_final
    )
    return [
        Claim(
            claim=f"With batch normalization at {middle:g}x the learning rate, the network "
            "reaches the baseline's final accuracy in fewer steps than the baseline.",
            anchor="Ioffe & Szegedy 2015, Figure 3: BN-x5 reached Inception's 72.2% in 2.1M "
            "steps instead of 31.0M (14x fewer): a large initial learning rate still "
            "trains, so training is faster.",
            measured=f"Target {percent(results['target_accuracy'])} (no BN, x{multipliers[0]:g}, "
            f"final): BN x{middle:g} reached it at {steps_text(bn_mid['steps_to_target'])}, "
            f"the baseline at {steps_text(base['steps_to_target'])} "
            f"({ratio_text(bn_mid['speedup'])} fewer steps); no BN at x{middle:g}: "
            f"{steps_text(plain_mid['steps_to_target'])}.",
            holds=faster,
        ),
        Claim(
            claim=f"With batch normalization, {top:g}x the learning rate trains without "
            "diverging and ends above the baseline's accuracy.",
            anchor="Ioffe & Szegedy 2015, Figure 3: BN-x30 reached 74.8% against Inception's "
            "72.2%.",
            measured=f"BN x{top:g}: {_outcome(bn_top)}; baseline (no BN, x{multipliers[0]:g}): "
            f"final {percent(base_final)}.",
            holds=top_better,
        ),
        Claim(
            claim=f"Without batch normalization, {top:g}x the learning rate diverges or ends "
            "below the baseline.",
            anchor="Ioffe & Szegedy 2015, Section 3.3: in traditional deep networks a too-high "
            "learning rate makes gradients explode or vanish, or gets the model stuck in poor "
            "local minima.",
            measured=f"No BN x{top:g}: {_outcome(plain_top)}; baseline final "
            f"{percent(base_final)}.",
            holds=plain_fails,
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Each run's outcome in one line."""
    runs = results["runs"]
    parts = []
    for multiplier in results["multipliers"]:
        bn, plain = runs[run_key("bn", multiplier)], runs[run_key("plain", multiplier)]
        parts.append(f"x{multiplier:g}: BN {_short(bn)} / no BN {_short(plain)}")
    return "; ".join(parts)


def _short(run_: Mapping[str, Any]) -> str:
    return "diverged" if run_["diverged_at"] is not None else percent(run_["final_test_accuracy"])


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Accuracy curves per learning rate, and final accuracies as bars."""
    runs = results["runs"]
    multipliers = results["multipliers"]
    styles = ["-", "--", ":", "-."]
    figure, axes = new_figure(columns=2, width=8.5, height=3.2)
    for ax, (arm, label) in zip(axes, ARMS.items(), strict=True):
        for index, multiplier in enumerate(multipliers):
            run_ = runs[run_key(arm, multiplier)]
            line_style = styles[index % len(styles)]
            ax.plot(
                run_["steps"],
                run_["test_accuracy"],
                color=COLORS[arm],
                linestyle=line_style,
                alpha=1.0 - 0.2 * index,
                label=f"x{multiplier:g} (lr {run_['lr']:g})",
            )
            if run_["diverged_at"] is not None:
                ax.plot(
                    run_["steps"][-1],
                    run_["test_accuracy"][-1],
                    marker="X",
                    color="black",
                    markersize=8,
                )
                ax.annotate(
                    f"diverged at {run_['diverged_at']:,}",
                    (run_["steps"][-1], run_["test_accuracy"][-1]),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                )
        if results["target_accuracy"] is not None:
            ax.axhline(
                results["target_accuracy"], color=COLORS["gray"], linestyle="--", linewidth=1
            )
        ax.set_xlim(0, results["total_steps"])
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.legend(loc="lower right")
    file = f"{prefix}curves.png"
    save_figure(figure, out_dir / file)
    figures = [
        Figure(
            file,
            "Test accuracy at 1x, 5x and 30x the baseline learning rate, without and "
            "with BN; X: the run diverged there; dashed: the baseline's final accuracy.",
        )
    ]

    figure, ax = new_figure(height=3.0)
    width = 0.38
    for offset, (arm, label) in zip((-width / 2, width / 2), ARMS.items(), strict=True):
        for index, multiplier in enumerate(multipliers):
            run_ = runs[run_key(arm, multiplier)]
            value = run_["final_test_accuracy"]
            diverged = run_["diverged_at"] is not None
            ax.bar(
                index + offset,
                0.0 if value is None else value,
                width,
                color=COLORS[arm],
                label=label if index == 0 else None,
                hatch="//" if diverged else None,
            )
            ax.annotate(
                "diverged" if diverged else percent(value),
                (index + offset, 0.0 if value is None else value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(multipliers)), [f"x{m:g}" for m in multipliers])
    ax.set_xlabel("learning rate (multiple of the baseline)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    file = f"{prefix}final.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "Final test accuracy (mean of the last 3 evaluations) at each "
            "learning rate; a diverged run has none.",
        )
    )
    return figures


EXPERIMENT = Experiment(
    name="learning-rate",
    title="Higher learning rates (BN-x5, BN-x30)",
    section="advantages",
    description=(
        "A ReLU MLP with 3 hidden layers of 100, SGD with momentum 0.9 on mini-batches of 60, "
        "with and without batch norm, at 1x, 5x and 30x a baseline learning rate, from the same "
        "initial weights and batch order. A loss that is NaN, infinite or above ten times that "
        "of a uniform guess stops a run and is reported as divergence."
    ),
    quick=LearningRateConfig(steps=2000),
    full=LearningRateConfig(steps=20_000),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    curves=lambda results: {str(name): history for name, history in results["runs"].items()},
)
