"""``test-process``: at test time batch norm uses population statistics.

At test time the mini-batch is usually a single example, whose mean and standard
deviation mean nothing, so the training data's "mean of the means and mean of the
variances" are used instead. Ioffe & Szegedy (2015), Section 3.1 and Algorithm 2: at
inference the normalization uses the population statistics E[x] = E_B[mu_B] and
Var[x] = m/(m-1) E_B[sigma_B^2], which makes the output a fixed function of the input:
each BN layer is then an affine map per feature, which can be folded into the linear
layer before it (:func:`bnkit.tools.fold`), so that it costs nothing at inference.

Measured here, on a ReLU MLP with BN trained with SGD:

- with population statistics (eval mode), test inputs one at a time give the same
  logits as batches of 1000, up to float rounding;
- with batch statistics (train mode), a batch of one raises an error (its variance is
  undefined; the message is shown), and accuracy falls as the test batch shrinks;
- three ways of getting the population statistics: the exponential moving average
  during training (momentum 0.1, PyTorch's default), the cumulative average of every
  training batch (``momentum=None`` during training, statistics of early weights
  included), and the paper's Algorithm 2: after training, the cumulative average over
  training batches with the final weights;
- folding: the folded network's logits against the eval network's (max difference), the
  batch norm layers left after folding, and the time of inference with and without them
  (timings vary from run to run: they go to ``test-process.timings.json`` and the
  figure, not to the results).
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
from bnkit.lab.training import derive_seed, predict, train

__all__ = ["EXPERIMENT", "TestProcessConfig", "claims", "run"]

#: Logits of batch 1 and batch 1000 agree if within this, relative to the largest logit.
ROUNDING_TOLERANCE = 1e-4
#: Population statistics "agree" if their test accuracies are this close.
AGREEMENT = 0.01
#: Small-batch statistics "lose accuracy" if they test this much lower.
SMALL_BATCH_LOSS = 0.02
#: A batch of one "fails" if it tests at most this much above chance.
CHANCE_MARGIN = 0.05
#: The folded network "equals" the eval network if its logits are within this, relative
#: to the largest logit (float32 rounding of the merged weights).
FOLD_TOLERANCE = 1e-4

#: The ways to get population statistics: results keys and their labels.
VARIANTS: dict[str, str] = {
    "ema": "moving average (momentum 0.1)",
    "cumulative_training": "cumulative, all of training (momentum=None)",
    "recalibrated": "Algorithm 2: cumulative, after training",
}


@dataclass(frozen=True)
class TestProcessConfig:
    """The ``test-process`` configuration.

    Args:
        steps: SGD steps.
        batch_size: the training mini-batch size.
        lr: the learning rate.
        momentum: SGD momentum.
        hidden: the hidden layer widths.
        activation: the hidden nonlinearity.
        evaluations: evaluations after step 0.
        bn_momentum: the moving average's momentum.
        single_samples: test examples evaluated one at a time.
        eval_batch_sizes: test batch sizes evaluated with batch statistics.
        recalibration_batches: training batches Algorithm 2 averages over.
    """

    __test__ = False  # not a pytest test class, whatever its name

    steps: int = 3000
    batch_size: int = 60
    lr: float = 0.01
    momentum: float = 0.9
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    evaluations: int = 20
    bn_momentum: float = 0.1
    single_samples: int = 1000
    eval_batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 64, 256, 1000)
    recalibration_batches: int = 100


def _trained(
    config: TestProcessConfig, context: RunContext, bn_momentum: float | None
) -> nn.Module:
    data = context.dataset
    torch.manual_seed(derive_seed(context.seed, "test-process", "weights"))
    model = mlp(
        data.num_features,
        data.num_classes,
        hidden=config.hidden,
        activation=config.activation,
        use_batch_norm=True,
        bn_momentum=bn_momentum,
    )
    label = "EMA" if bn_momentum is not None else "cumulative"
    train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        seed=derive_seed(context.seed, "test-process", "batches"),
        evaluations=config.evaluations,
        progress=context.progress,
        desc=f"test-process BN, {label} statistics",
    )
    return model


def _recalibrated(
    model: nn.Module, x: torch.Tensor, batches: int, batch_size: int, seed: int
) -> nn.Module:
    """Algorithm 2: forget the running statistics, then average those of ``batches``
    training batches, with the final weights (momentum=None: a cumulative average)."""
    model = copy.deepcopy(model)
    for layer in batch_norm_layers(model):
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    position = 0
    with torch.no_grad():
        for _ in range(batches):
            if position + batch_size > len(order):
                order, position = rng.permutation(len(x)), 0
            model(x[torch.from_numpy(order[position : position + batch_size])])
            position += batch_size
    return model.eval()


def _stats_distance(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """How far ``model``'s running statistics are from ``reference``'s, averaged over all
    BN nodes: |mean difference| in reference standard deviations, |variance ratio - 1|."""
    mean_gaps, var_gaps = [], []
    for layer, ref in zip(batch_norm_layers(model), batch_norm_layers(reference), strict=True):
        assert layer.running_mean is not None
        assert layer.running_var is not None
        assert ref.running_mean is not None
        assert ref.running_var is not None
        scale = ref.running_var.double().clamp_min(1e-12).sqrt()
        mean_gaps.append((layer.running_mean.double() - ref.running_mean.double()).abs() / scale)
        var_gaps.append(
            (layer.running_var.double() / ref.running_var.double().clamp_min(1e-12) - 1).abs()
        )
    return {
        "mean_gap_in_std": round(float(torch.cat(mean_gaps).mean()), 6),
        "var_ratio_gap": round(float(torch.cat(var_gaps).mean()), 6),
    }


def _batch_statistics_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int
) -> float:
    """Test accuracy when every test batch of ``size`` is normalized by its own statistics
    (train mode on a copy; a last batch of one is left out)."""
    model = copy.deepcopy(model).train()
    correct, seen = 0, 0
    with torch.no_grad():
        for start in range(0, len(x), size):
            chunk = x[start : start + size]
            if len(chunk) < 2:
                continue
            correct += int((model(chunk).argmax(dim=1) == y[start : start + size]).sum())
            seen += len(chunk)
    return round(correct / max(seen, 1), 6)


def _single_batch_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Try to classify test examples one at a time with batch statistics."""
    model = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            predictions = [int(model(x[i : i + 1]).argmax(dim=1)) for i in range(len(x))]
    except ValueError as error:  # bnkit's SingleValueError, torch's ValueError
        return {"error": f"{type(error).__name__}: {error}", "accuracy": None}
    correct = sum(int(p == int(label)) for p, label in zip(predictions, y, strict=True))
    return {"error": None, "accuracy": round(correct / len(x), 6)}


def _median_seconds(call: Any, repeats: int = 15) -> float:
    import time

    call()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _folding(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fold the eval network; (deterministic results, timings)."""
    from bnkit.tools import fold

    model = copy.deepcopy(model).eval()
    folded, report = fold(model, return_report=True)
    with torch.no_grad():
        reference = model(x)
        output = folded(x)
    layers = batch_norm_layers(model)
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for layer in layers]
    single = x[:1]
    with torch.no_grad():
        model(single)
    for hook in hooks:
        hook.remove()

    def bn_only() -> None:
        with torch.no_grad():
            for layer, value in zip(layers, inputs, strict=True):
                layer(value)

    def run_model(net: nn.Module) -> Any:
        def call() -> None:
            with torch.no_grad():
                net(single)

        return call

    results = {
        "max_logit_difference": float((reference - output).abs().max()),
        "logit_scale": round(max(1.0, float(reference.abs().max())), 6),
        "bn_layers_before": len(layers),
        "bn_layers_after": len(batch_norm_layers(folded)),
        "predictions_differ": int((reference.argmax(dim=1) != output.argmax(dim=1)).sum()),
        "report": [str(line) for line in str(report).splitlines()][:12],
    }
    timings = {
        "eval_seconds": _median_seconds(run_model(model)),
        "folded_seconds": _median_seconds(run_model(folded)),
        "bn_layers_seconds": _median_seconds(bn_only),
        "batch": 1,
    }
    return results, timings


def run(config: TestProcessConfig, context: RunContext) -> dict[str, Any]:
    """Train with BN; evaluate with population and batch statistics at several batch sizes."""
    data = context.dataset
    ema_model = _trained(config, context, config.bn_momentum)
    cumulative_model = _trained(config, context, None)
    # Training normalizes with batch statistics, so the running statistics never feed
    # back: both runs must have learned exactly the same weights.
    same_weights = all(
        torch.equal(a, b)
        for a, b in zip(ema_model.parameters(), cumulative_model.parameters(), strict=True)
    )
    recalibrated = _recalibrated(
        ema_model,
        data.x_train,
        config.recalibration_batches,
        config.batch_size,
        derive_seed(context.seed, "test-process", "recalibration"),
    )
    x = data.x_test[: config.single_samples]
    y = data.y_test[: config.single_samples]
    batched = predict(ema_model, x, batch_size=1000)
    single = predict(ema_model, x, batch_size=1)
    difference = float((batched - single).abs().max())
    scale = max(1.0, float(batched.abs().max()))
    accuracy_batched = float((batched.argmax(dim=1) == y).float().mean())
    accuracy_single = float((single.argmax(dim=1) == y).float().mean())
    population_accuracy = {
        "ema": accuracy_batched,
        "cumulative_training": float(
            (predict(cumulative_model, x).argmax(dim=1) == y).float().mean()
        ),
        "recalibrated": float((predict(recalibrated, x).argmax(dim=1) == y).float().mean()),
    }
    sizes = [size for size in config.eval_batch_sizes if size <= len(x)]
    folding, timings = _folding(ema_model, x)
    return {
        "folding": folding,
        "timings": timings,
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "chance": round(1.0 / data.num_classes, 6),
        "samples": len(x),
        "same_weights": same_weights,
        "population": {
            "accuracy_batch_1000": round(accuracy_batched, 6),
            "accuracy_batch_1": round(accuracy_single, 6),
            "max_logit_difference": difference,
            "logit_scale": round(scale, 6),
            "predictions_differ": int((batched.argmax(dim=1) != single.argmax(dim=1)).sum()),
        },
        "batch_statistics": {
            "batch_1": _single_batch_statistics(ema_model, x, y),
            "sizes": sizes,
            "accuracy": [_batch_statistics_accuracy(ema_model, x, y, size) for size in sizes],
        },
        "population_variants": {
            "accuracy": {key: round(value, 6) for key, value in population_accuracy.items()},
            "distance_to_recalibrated": {
                "ema": _stats_distance(ema_model, recalibrated),
                "cumulative_training": _stats_distance(cumulative_model, recalibrated),
            },
            "recalibration_batches": config.recalibration_batches,
        },
    }


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The claims of the test process, decided from the results."""
    population = results["population"]
    batch_stats = results["batch_statistics"]
    variants = results["population_variants"]["accuracy"]
    chance = results["chance"]
    tolerance = ROUNDING_TOLERANCE * population["logit_scale"]
    difference = population["max_logit_difference"]  # None: NaN logits
    same_output = (
        difference is not None and difference <= tolerance and population["predictions_differ"] == 0
    )
    single = batch_stats["batch_1"]
    single_fails = single["error"] is not None or (
        single["accuracy"] is not None and single["accuracy"] <= chance + CHANCE_MARGIN
    )
    single_text = (
        f"raised {single['error'].split('. ')[0]}"
        if single["error"] is not None
        else f"accuracy {percent(single['accuracy'])} (chance {percent(chance)})"
    )
    sizes, accuracies = batch_stats["sizes"], batch_stats["accuracy"]
    smallest = accuracies[0] if accuracies else None
    small_loses = smallest is not None and smallest < variants["ema"] - SMALL_BATCH_LOSS
    agree = (
        variants["recalibrated"] is not None
        and variants["ema"] is not None
        and abs(variants["recalibrated"] - variants["ema"]) <= AGREEMENT
    )
    same_weights = bool(results["same_weights"])
    folding = results["folding"]
    fold_difference = folding["max_logit_difference"]
    folds = (
        fold_difference is not None
        and fold_difference <= FOLD_TOLERANCE * folding["logit_scale"]
        and folding["predictions_differ"] == 0
        and folding["bn_layers_after"] == 0
    )
    return [
        Claim(
            claim="In training, batch norm normalizes with the mini-batch's own statistics: "
            "the running (population) statistics never feed back into training.",
            anchor="Ioffe & Szegedy 2015, Algorithm 1: training normalizes with the mini-batch "
            "mean mu_B and variance sigma_B^2.",
            measured="Two networks trained from the same weights on the same batches, one "
            "keeping a moving average of the statistics (momentum 0.1), one their cumulative "
            f"average (momentum=None), learned {'identical' if same_weights else 'different'} "
            "weights.",
            holds=same_weights,
            section="training",
        ),
        Claim(
            claim="With population statistics the output does not depend on the batch: test "
            "examples one at a time give the same result as batches of 1000.",
            anchor="Ioffe & Szegedy 2015, Section 3.1: at inference the normalization uses "
            "population statistics, so the output depends only on the input (at test time "
            "the mini-batch is usually a single example).",
            measured=f"{results['samples']} test examples: max |logit difference| "
            f"{number(difference, '.2g')} (tolerance {tolerance:.2g}), "
            f"{population['predictions_differ']} predictions differ; accuracy "
            f"{percent(population['accuracy_batch_1'])} at batch 1, "
            f"{percent(population['accuracy_batch_1000'])} at batch 1000.",
            holds=same_output,
        ),
        Claim(
            claim="With batch statistics a single test example cannot be normalized.",
            anchor="Ioffe & Szegedy 2015, Section 3.1: normalizing by the mini-batch is "
            "neither necessary nor desirable at inference; with a mini-batch of 1 the mean "
            "and standard deviation are meaningless.",
            measured=f"Batch statistics at batch size 1: {single_text}.",
            holds=single_fails,
        ),
        Claim(
            claim="Normalizing with the statistics of small test batches loses accuracy.",
            anchor="Ioffe 2017 (Batch Renormalization), Section 1: with small mini-batches "
            "the batch statistics are poor estimates of the population's.",
            measured=(
                f"Batch statistics: {percent(smallest)} at batch size {sizes[0]}, "
                f"{percent(accuracies[-1])} at {sizes[-1]}; population statistics "
                f"{percent(variants['ema'])} (loss counted above "
                f"{100 * SMALL_BATCH_LOSS:g} points)."
                if sizes
                else "No batch size fit the test set."
            ),
            holds=small_loses,
        ),
        Claim(
            claim="The paper's population statistics, the mean of the training batches' means "
            "and variances, classify as well as the moving average implementations keep "
            f"(within {100 * AGREEMENT:g} point).",
            anchor="Ioffe & Szegedy 2015, Algorithm 2: E[x] = E_B[mu_B], Var[x] = m/(m-1) "
            "E_B[sigma_B^2]: the mean of the means and the mean of the variances of the "
            "training batches.",
            measured=f"Test accuracy: {percent(variants['recalibrated'])} with Algorithm 2 "
            f"({results['population_variants']['recalibration_batches']} batches, final "
            f"weights), {percent(variants['ema'])} with the moving average, "
            f"{percent(variants['cumulative_training'])} with the cumulative average over all "
            "of training.",
            holds=agree,
        ),
        Claim(
            claim="At inference each batch norm layer is a fixed affine map, so it can be folded "
            "into the linear layer before it: the folded network has no batch norm layer left "
            "and computes the eval network's function.",
            anchor="Ioffe & Szegedy 2015, Section 3.1 and Algorithm 2: with population "
            "statistics the normalization is a linear transform, which can be composed with "
            "the preceding linear layer.",
            measured=f"{folding['bn_layers_before']} BN layers before folding, "
            f"{folding['bn_layers_after']} after; on {results['samples']} test examples max "
            f"|logit difference| {number(fold_difference, '.2g')} (tolerance "
            f"{FOLD_TOLERANCE * folding['logit_scale']:.2g}), "
            f"{folding['predictions_differ']} predictions differ.",
            holds=folds,
        ),
    ]


def headline(results: Mapping[str, Any]) -> str:
    """Batch 1 against batch 1000, and the population statistics variants."""
    population = results["population"]
    variants = results["population_variants"]["accuracy"]
    return (
        f"batch 1 {percent(population['accuracy_batch_1'])} = batch 1000 "
        f"{percent(population['accuracy_batch_1000'])} (max diff "
        f"{number(population['max_logit_difference'], '.1g')}); EMA {percent(variants['ema'])}, "
        f"Alg. 2 {percent(variants['recalibrated'])}"
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Accuracy against test batch size; population statistics variants."""
    batch_stats = results["batch_statistics"]
    variants = results["population_variants"]["accuracy"]
    figure, axes = new_figure(columns=2, width=9.0, height=3.2, width_ratios=(3, 2))
    ax = axes[0]
    ax.plot(
        batch_stats["sizes"],
        batch_stats["accuracy"],
        marker="o",
        color=COLORS["plain"],
        label="batch statistics (train mode)",
    )
    ax.axhline(
        results["population"]["accuracy_batch_1"],
        color=COLORS["bn"],
        label="population statistics, any batch size (1 included)",
    )
    ax.axhline(results["chance"], color=COLORS["gray"], linestyle=":", label="chance")
    if batch_stats["batch_1"]["error"] is not None:
        ax.plot([1], [results["chance"]], marker="X", color="black", markersize=8, linestyle="")
        ax.annotate(
            "batch size 1: error\n(variance undefined)",
            (1, results["chance"]),
            textcoords="offset points",
            xytext=(6, 8),
            fontsize=8,
        )
    elif batch_stats["batch_1"]["accuracy"] is not None:
        ax.plot([1], [batch_stats["batch_1"]["accuracy"]], marker="o", color=COLORS["plain"])
    sizes = [1, *batch_stats["sizes"]]
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlim(0.8, sizes[-1] * 1.3)
    ax.set_ylim(0, 1)
    ax.set_xlabel("test batch size")
    ax.set_ylabel("test accuracy")
    ax.set_title("Normalizing test examples by their own batch")
    ax.legend(loc="upper left")
    ax = axes[1]
    keys = list(VARIANTS)
    values = [variants[key] for key in keys]
    colors = [COLORS["bn"], COLORS["gray"], COLORS["other"]]
    ax.barh(range(len(keys)), values, color=colors)
    for index, value in enumerate(values):
        ax.annotate(
            percent(value),
            (value, index),
            va="center",
            ha="right",
            fontsize=8,
            color="white",
            xytext=(-4, 0),
            textcoords="offset points",
        )
    ax.set_yticks(
        range(len(keys)),
        [
            "moving average\n(momentum 0.1)",
            "cumulative over\nall of training",
            "Algorithm 2\n(after training)",
        ],
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title("Population statistics")
    file = f"{prefix}batch-size.png"
    save_figure(figure, out_dir / file)
    sizes_text = ", ".join(
        f"{percent(a)} at {b}"
        for b, a in zip(batch_stats["sizes"], batch_stats["accuracy"], strict=True)
    )
    figures = [
        Figure(
            file,
            "Left: test accuracy when each test batch is normalized by its own "
            "statistics, against the batch size, and with the population statistics. "
            "Right: three ways of estimating the population statistics.",
            alt="Test accuracy against the test batch size with batch statistics ("
            f"{sizes_text}) and a flat line for population statistics; bars for three "
            "estimates of the population statistics.",
        )
    ]
    folding = results["folding"]
    timings = results.get("timings")
    figure, ax = new_figure(width=6.0, height=2.4)
    if isinstance(timings, Mapping):
        labels = ["eval network", "its BN layers alone", "folded network"]
        values = [
            1000 * timings["eval_seconds"],
            1000 * timings["bn_layers_seconds"],
            1000 * timings["folded_seconds"],
        ]
        ax.barh(range(3), values, color=[COLORS["bn"], COLORS["dropout"], COLORS["other"]])
        ax.set_yticks(range(3), labels)
        ax.invert_yaxis()
        ax.set_xlabel("time per test example (ms, median of 15)")
        alt_times = "the times are in the table above"
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "timings not measured in this run", ha="center", va="center")
        alt_times = "no timings in this run"
    ax.set_title(
        f"Folding: {folding['bn_layers_before']} BN layers -> {folding['bn_layers_after']}, "
        f"max logit difference {number(folding['max_logit_difference'], '.2g')}"
    )
    file = f"{prefix}folding.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "Inference one example at a time with the eval network, its batch norm layers "
            "alone, and the network with them folded into the linear layers before them "
            "(bnkit.tools.fold). Times are this machine's and vary from run to run.",
            alt="Bar chart of the inference time per test example of the eval network, of "
            f"its batch norm layers alone, and of the folded network ({alt_times}).",
        )
    )
    return figures


def tables(results: Mapping[str, Any]) -> list[Table]:
    """Inference with the eval network and the folded one (times if measured)."""
    folding = results["folding"]
    timings = results.get("timings")
    rows = [
        [
            "eval network (population statistics)",
            str(folding["bn_layers_before"]),
            "0 (reference)",
            _ms(timings, "eval_seconds"),
            _ms(timings, "bn_layers_seconds"),
        ],
        [
            "folded network (bnkit.tools.fold)",
            str(folding["bn_layers_after"]),
            number(folding["max_logit_difference"], ".2g"),
            _ms(timings, "folded_seconds"),
            "0 (no BN layer left)",
        ],
    ]
    return [
        Table(
            "Inference on one test example at a time. Times: median of 15 runs on this "
            "machine, in milliseconds; they vary from run to run, so they are kept out of the "
            "results JSON (in test-process.timings.json).",
            [
                "network",
                "BN layers",
                "max |logit difference|",
                "time per example (ms)",
                "of which BN layers (ms)",
            ],
            rows,
            numbers=False,
        )
    ]


def _ms(timings: Mapping[str, Any] | None, key: str) -> str:
    if not isinstance(timings, Mapping) or not isinstance(timings.get(key), (int, float)):
        return "not measured"
    return f"{1000 * float(timings[key]):.3f}"


EXPERIMENT = Experiment(
    name="test-process",
    title="The test process: population statistics",
    section="test",
    description=(
        "A ReLU MLP with 3 hidden layers of 100 and BN, SGD with momentum 0.9, trained twice "
        "from the same weights and batches: once keeping a moving average of the batch "
        "statistics (momentum 0.1), once their cumulative average (momentum=None). Training "
        "uses batch statistics only, so both learn the same weights. The trained network is "
        "then evaluated one test example at a time and in batches, with population and with "
        "batch statistics."
    ),
    quick=TestProcessConfig(steps=2000),
    full=TestProcessConfig(steps=20_000, single_samples=10_000, recalibration_batches=1000),
    step_fields=("steps", "recalibration_batches"),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    tables=tables,
    curves=lambda results: {},
    volatile=("timings",),
)
