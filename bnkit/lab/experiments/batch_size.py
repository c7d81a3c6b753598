"""``batch-size``: batch norm degrades as the mini-batch shrinks; its remedies, measured.

Wu & He (2018, "Group Normalization", Figure 1): ResNet-50 on ImageNet, the error of BN
rises from 23.6% at 32 images per GPU to 34.7% at 2, while GroupNorm, which normalizes
within each sample, stays near 24.1% at every batch size: "hard to apply when the
mini-batch is small" is among batch norm's best-known disadvantages.

Measured here: a small CNN (1D convolutions on MNIST-1D, 2D on images) trained for the
same number of epochs at batch sizes 32, 16, 8, 4 and 2 (the learning rate scaled
linearly with the batch, as in the GroupNorm paper), with

- ``bn``: batch norm (bnkit's, evaluated in eval mode with its running statistics);
- ``gn``: torch's GroupNorm (8 groups);
- ``renorm``: bnkit's batch renormalization, the paper's schedule scaled to the run
  (plain BN for the first 5% of steps, r_max reaching 3 at 40%, d_max reaching 5 at 25%);
- ``micro``: statistics of micro-batches of the given size but gradients of batches of
  32 (``ghost_batch_size`` within a batch of 32: separates the noise of the statistics
  from the noise of the gradient);
- ``sync``: synchronized batch norm over 2 local gloo processes, each with the given
  batch (statistics and gradients of twice as many samples).

The GroupNorm paper trains every batch size for the same number of epochs, so a batch of
2 takes 16 times the steps of a batch of 32; the claims follow it. To separate the batch
statistics from the number of updates, BN and GroupNorm are also trained for the same
number of steps at every batch size (by default the steps the middle batch size takes in
the epochs above), and a claim compares BN's error there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext
from bnkit.lab.formatting import percent
from bnkit.lab.models import (
    NormFactory,
    batch_norm_implementation,
    bnkit_norm,
    conv_net,
    group_norm,
)
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import (
    History,
    accuracy,
    derive_seed,
    evaluation_steps,
    subsample,
    train,
    verdict,
)

__all__ = ["EXPERIMENT", "BatchSizeConfig", "claims", "run", "scaled_renorm"]

#: The arms: results keys and their labels.
ARMS: dict[str, str] = {
    "bn": "BN",
    "gn": "GroupNorm",
    "renorm": "batch renorm",
    "micro": "BN, micro-batch stats, batch-32 gradients",
    "sync": "sync BN, 2 processes",
}

_ARM_COLORS = {
    "bn": COLORS["bn"],
    "gn": COLORS["dropout"],
    "renorm": COLORS["other"],
    "micro": COLORS["gray"],
    "sync": COLORS["plain"],
}

#: How much BN's error must rise from the largest to the smallest batch to count as
#: degrading, and how much ground it must lose against GroupNorm (in error points).
DEGRADATION = 0.02


@dataclass(frozen=True)
class BatchSizeConfig:
    """The ``batch-size`` configuration.

    Args:
        batch_sizes: the batch sizes (per process for ``sync``), largest first.
        sync_batch_sizes: those of them that the ``sync`` arm runs (it is the slowest).
        epochs: passes over the training examples, the same at every batch size.
        train_samples: training examples used (a seeded subset).
        test_samples: test examples used (a seeded subset).
        lr: the learning rate at batch 32; scaled linearly with the batch.
        momentum: SGD momentum.
        groups: GroupNorm's groups.
        large_batch: the gradient batch of the ``micro`` arm.
        processes: the processes of the ``sync`` arm.
        evaluations: evaluations after step 0 (the error is the mean of the last 3).
        widths: the CNN's channels.
        equal_steps: the steps of the equal-steps comparison; None: those of the middle
            batch size at ``epochs``.
    """

    batch_sizes: tuple[int, ...] = (32, 16, 8, 4, 2)
    sync_batch_sizes: tuple[int, ...] = (32, 16, 8, 4, 2)
    epochs: int = 2
    train_samples: int = 4000
    test_samples: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    groups: int = 8
    large_batch: int = 32
    processes: int = 2
    evaluations: int = 10
    widths: tuple[int, ...] = (16, 32, 32)
    equal_steps: int | None = None


#: The arms also trained for the same number of steps at every batch size.
EQUAL_STEPS_ARMS = ("bn", "gn")


def equal_steps(config: BatchSizeConfig, samples: int) -> int:
    """The steps of the equal-steps comparison.

    Example:
        >>> equal_steps(BatchSizeConfig(batch_sizes=(32, 8, 2), epochs=2), 2000)
        500
    """
    if config.equal_steps is not None:
        return config.equal_steps
    sizes = sorted(config.batch_sizes)
    return _steps(samples, config.epochs, min(sizes[len(sizes) // 2], samples))


def scaled_renorm(total_steps: int) -> Any:
    """``bnkit.Renorm`` with the paper's schedule scaled to a run of ``total_steps``.

    The paper (Ioffe 2017) trains with plain BN for 5k steps, then lets r_max grow to 3
    by step 40k and d_max to 5 by step 25k; here those are 5%, 40% and 25% of the run.

    Example:
        >>> scaled_renorm(1000)
        Renorm(r_max=3.0, d_max=5.0, warmup_steps=50, r_max_steps=400, d_max_steps=250)
    """
    from bnkit import Renorm

    return Renorm(
        r_max=3.0,
        d_max=5.0,
        warmup_steps=round(0.05 * total_steps),
        r_max_steps=round(0.40 * total_steps),
        d_max_steps=round(0.25 * total_steps),
    )


def _steps(samples: int, epochs: int, batch: int) -> int:
    return max(1, epochs * samples // batch)


def _scaled_lr(config: BatchSizeConfig, batch: int) -> float:
    return config.lr * batch / 32


def _error(history: Mapping[str, Any]) -> float | None:
    acc = history["final_test_accuracy"]
    return None if acc is None else round(1.0 - acc, 6)


def _sync_worker(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any] | None:
    """Train the ``sync`` arm at every batch size; rank 0 returns the histories."""
    from torch.nn.parallel import DistributedDataParallel

    if payload.get("fail_rank") == rank:
        os._exit(3)  # tests: a worker that dies
    x_train, y_train = payload["x_train"], payload["y_train"]
    x_test, y_test = payload["x_test"], payload["y_test"]
    config: BatchSizeConfig = payload["config"]
    seed: int = payload["seed"]
    histories: dict[str, Any] = {}
    count = len(y_train)
    for batch in payload["batch_sizes"]:
        global_batch = min(world_size * batch, count)
        local = global_batch // world_size
        steps = _steps(count, config.epochs, global_batch)
        torch.manual_seed(derive_seed(seed, "batch-size", "weights"))
        model = conv_net(
            payload["sample_shape"],
            payload["num_classes"],
            bnkit_norm(sync=True),
            widths=config.widths,
        )
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(
            ddp.parameters(), lr=_scaled_lr(config, global_batch), momentum=config.momentum
        )
        rng = np.random.default_rng(derive_seed(seed, "batch-size", "sync", batch))
        checkpoints = set(evaluation_steps(steps, config.evaluations))
        history = History()
        if rank == 0:
            history.steps.append(0)
            history.test_accuracy.append(accuracy(model, x_test, y_test))
            history.train_loss.append(None)
        order = np.empty(0, dtype=np.int64)
        position = 0
        for step in range(1, steps + 1):
            if position + global_batch > len(order):
                order, position = rng.permutation(count), 0
            index = order[position + rank * local : position + (rank + 1) * local]
            position += global_batch
            index_t = torch.from_numpy(index)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x_train[index_t]), y_train[index_t])
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizer.step()
            if rank == 0 and step in checkpoints:
                history.steps.append(step)
                history.test_accuracy.append(accuracy(model, x_test, y_test))
                history.train_loss.append(round(float(loss.detach()), 6))
        histories[str(batch)] = history.to_json()
    return histories if rank == 0 else None


def _run_sync(
    config: BatchSizeConfig, data: Any, seed: int, fail_rank: int | None = None
) -> dict[str, Any]:
    from bnkit.lab.workers import run_workers

    payload = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
        "sample_shape": data.sample_shape,
        "num_classes": data.num_classes,
        "batch_sizes": [b for b in config.batch_sizes if b in config.sync_batch_sizes],
        "config": config,
        "seed": seed,
        "fail_rank": fail_rank,
    }
    results = run_workers(_sync_worker, (payload,), nprocs=config.processes)
    histories: dict[str, Any] = results[0]
    return histories


def _norm(arm: str, batch: int, steps: int, config: BatchSizeConfig) -> NormFactory:
    if arm == "gn":
        return group_norm(config.groups)
    if arm == "renorm":
        return bnkit_norm(renorm=scaled_renorm(steps))
    if arm == "micro":
        return bnkit_norm(ghost_batch_size=batch)
    return bnkit_norm()


def run(config: BatchSizeConfig, context: RunContext) -> dict[str, Any]:
    """Train every arm at every batch size; return the test errors and curves."""
    data = subsample(context.dataset, config.train_samples, config.test_samples, context.seed)
    count = len(data.y_train)
    runs: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
    same_steps = equal_steps(config, count)
    by_steps: dict[str, dict[str, Any]] = {arm: {} for arm in EQUAL_STEPS_ARMS}
    plan = [
        (arm, batch, False)
        for arm in ("bn", "gn", "renorm", "micro")
        for batch in config.batch_sizes
    ] + [(arm, batch, True) for arm in EQUAL_STEPS_ARMS for batch in config.batch_sizes]
    for arm, batch, fixed_steps in plan:
        train_batch = config.large_batch if arm == "micro" else batch
        train_batch = min(train_batch, count)
        steps = same_steps if fixed_steps else _steps(count, config.epochs, train_batch)
        if fixed_steps and steps == _steps(count, config.epochs, train_batch):
            by_steps[arm][str(batch)] = runs[arm][str(batch)]  # the same run
            continue
        torch.manual_seed(derive_seed(context.seed, "batch-size", "weights"))
        model = conv_net(
            data.sample_shape,
            data.num_classes,
            _norm(arm, batch, steps, config),
            widths=config.widths,
        )
        history = train(
            model,
            data,
            steps=steps,
            batch_size=train_batch,
            lr=_scaled_lr(config, train_batch),
            momentum=config.momentum,
            seed=derive_seed(context.seed, "batch-size", "batches", batch),
            evaluations=config.evaluations,
            progress=context.progress,
            desc=f"batch-size {ARMS[arm]} {batch}" + (f", {steps} steps" if fixed_steps else ""),
        )
        (by_steps if fixed_steps else runs)[arm][str(batch)] = history.to_json()
    bar = context.progress(1, "batch-size sync BN (2 processes)")
    try:
        runs["sync"] = _run_sync(config, data, context.seed)
    finally:
        bar.update(1)
        bar.close()
    errors = {
        arm: {batch: _error(history) for batch, history in by_batch.items()}
        for arm, by_batch in runs.items()
    }
    return {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "batch_sizes": list(config.batch_sizes),
        "sync_batch_sizes": [b for b in config.batch_sizes if b in config.sync_batch_sizes],
        "processes": config.processes,
        "epochs": config.epochs,
        "errors": errors,
        "runs": runs,
        "equal_steps": same_steps,
        "errors_equal_steps": {
            arm: {batch: _error(history) for batch, history in by_batch.items()}
            for arm, by_batch in by_steps.items()
        },
        "runs_equal_steps": by_steps,
    }


def _err(results: Mapping[str, Any], arm: str, batch: int) -> float | None:
    value = results["errors"][arm].get(str(batch))
    return None if value is None else float(value)


def _best(results: Mapping[str, Any], arm: str) -> float | None:
    values = [_err(results, arm, b) for b in results["batch_sizes"]]
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _row(results: Mapping[str, Any], arm: str) -> str:
    return ", ".join(f"{b}: {_pct(_err(results, arm, b))}" for b in results["batch_sizes"])


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"


def _less(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a < b


def _pct(value: float | None) -> str:
    return percent(value)


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The GroupNorm paper's Figure 1 and the remedies, decided from the test errors."""
    sizes: Sequence[int] = results["batch_sizes"]
    large, small = max(sizes), min(sizes)
    bn_large, bn_small = _err(results, "bn", large), _err(results, "bn", small)
    gn_large, gn_small = _err(results, "gn", large), _err(results, "gn", small)
    renorm_small = _err(results, "renorm", small)
    micro_small = _err(results, "micro", small)
    sync_sizes = results["sync_batch_sizes"]
    sync_small = _err(results, "sync", min(sync_sizes)) if sync_sizes else None
    bn_at_sync = _err(results, "bn", min(sync_sizes)) if sync_sizes else None
    bn_best = _best(results, "bn")
    degrades = bn_best is not None and bn_small is not None and bn_small - bn_best > DEGRADATION
    gap_large = None if bn_large is None or gn_large is None else bn_large - gn_large
    gap_small = None if bn_small is None or gn_small is None else bn_small - gn_small
    loses = gap_large is not None and gap_small is not None
    loses = loses and float(gap_small or 0) - float(gap_large or 0) > DEGRADATION
    gn_paper = "Wu & He 2018, Figure 1 (ResNet-50, ImageNet): "
    fixed = results["errors_equal_steps"]
    fixed_bn = {int(b): e for b, e in fixed["bn"].items()}
    fixed_known = [e for e in fixed_bn.values() if e is not None]
    fixed_small = fixed_bn.get(small)
    fixed_degrades = (
        fixed_small is not None
        and bool(fixed_known)
        and fixed_small - min(fixed_known) > DEGRADATION
    )
    fixed_row = ", ".join(f"{b}: {_pct(fixed_bn.get(b))}" for b in sizes)
    fixed_gn = {int(b): e for b, e in fixed["gn"].items()}
    protocol = (
        f" (equal epochs, as the anchor: {results['epochs']} epochs, so batch {small} takes "
        f"{large // small}x the steps of batch {large})"
    )
    found = [
        Claim(
            claim=f"Batch norm's test error rises as the batch shrinks: at batch {small} it "
            f"is more than {100 * DEGRADATION:g} points above its lowest error over the batch "
            "sizes.",
            anchor=gn_paper + "BN 23.6% error at 32 images per GPU, 34.7% at 2.",
            measured=f"BN error {_pct(bn_small)} at batch {small}, lowest {_pct(bn_best)}; "
            f"by batch size {_row(results, 'bn')}{protocol}.",
            holds=degrades,
        ),
        Claim(
            claim=f"Against GroupNorm, whose error does not depend on the batch, BN loses "
            f"ground as the batch shrinks: BN's error minus GN's grows by more than "
            f"{100 * DEGRADATION:g} points from batch {large} to {small}.",
            anchor=gn_paper + "BN 0.5 points better than GN (24.1%, flat) at 32, 10.6 points "
            "worse at 2.",
            measured=f"BN - GN: {_signed(gap_large)} at batch {large}, {_signed(gap_small)} "
            f"at {small}; GN by batch size {_row(results, 'gn')}.",
            holds=loses,
        ),
        Claim(
            claim=f"At batch {small} GroupNorm beats batch norm.",
            anchor=gn_paper + "at 2 images per GPU GN's error is 10.6 points lower.",
            measured=f"Error at batch {small}: GN {_pct(gn_small)}, BN {_pct(bn_small)}.",
            holds=_less(gn_small, bn_small),
        ),
        Claim(
            claim=f"At batch {large} batch norm is at least as good as GroupNorm.",
            anchor=gn_paper + "at 32 images per GPU BN 23.6% against GN 24.1%.",
            measured=f"Error at batch {large}: BN {_pct(bn_large)}, GN {_pct(gn_large)}.",
            holds=bn_large is not None and gn_large is not None and bn_large <= gn_large,
        ),
        Claim(
            claim=f"Batch renormalization reduces batch norm's error at batch {small}.",
            anchor="Ioffe 2017 (Batch Renormalization): with small micro-batches "
            "renorm recovers much of the accuracy that BN loses (qualitative).",
            measured=f"Error at batch {small}: renorm {_pct(renorm_small)}, BN {_pct(bn_small)}.",
            holds=_less(renorm_small, bn_small),
        ),
        Claim(
            claim=f"The noise of tiny-batch statistics alone costs accuracy: normalizing "
            f"micro-batches of {small} within batches of 32 errs more than BN over the "
            f"whole batch of {large}.",
            anchor="Hoffer et al. 2017 (ghost batch norm) and Wu & He 2018: the "
            "batch statistics, not only the gradient, suffer at small sizes.",
            measured=f"Error: micro-batches of {small} {_pct(micro_small)}, BN at batch "
            f"{large} {_pct(bn_large)}.",
            holds=_less(bn_large, micro_small),
        ),
        Claim(
            claim="Synchronized batch norm over 2 processes beats local batch norm at the "
            "same per-process batch (its statistics cover twice the samples).",
            anchor="Peng et al. 2018 (MegDet) and Wu & He 2018: synchronized BN "
            "computes the statistics over all devices.",
            measured=(
                f"Error at {min(sync_sizes)} per process: sync {_pct(sync_small)}, "
                f"local BN {_pct(bn_at_sync)}."
                if sync_sizes
                else "The sync arm did not run."
            ),
            holds=_less(sync_small, bn_at_sync),
        ),
        Claim(
            claim=f"At an equal number of steps too, batch norm's test error at batch {small} "
            f"is more than {100 * DEGRADATION:g} points above its lowest over the batch sizes "
            "(the statistics, not only the fewer updates, cost accuracy).",
            anchor=gn_paper + "compared at equal epochs; at equal steps the small batches also "
            "see fewer examples, so this comparison is the stricter one for BN.",
            measured=f"{results['equal_steps']} steps at every batch size: BN error "
            f"{fixed_row}; GroupNorm "
            + ", ".join(f"{b}: {_pct(fixed_gn.get(b))}" for b in sizes)
            + ".",
            holds=fixed_degrades,
        ),
    ]
    every = [(arm, b, False) for arm in ("bn",) for b in sizes]
    relevant: list[list[tuple[str, int, bool]]] = [
        every,
        [("bn", large, False), ("bn", small, False), ("gn", large, False), ("gn", small, False)],
        [("gn", small, False), ("bn", small, False)],
        [("bn", large, False), ("gn", large, False)],
        [("renorm", small, False), ("bn", small, False)],
        [("micro", small, False), ("bn", large, False)],
        [("sync", min(sync_sizes), False), ("bn", min(sync_sizes), False)] if sync_sizes else [],
        [("bn", b, True) for b in sizes],
    ]
    return [
        claim if claim.holds else dataclasses.replace(claim, training=_runs_verdict(results, runs))
        for claim, runs in zip(found, relevant, strict=True)
    ]


def _runs_verdict(results: Mapping[str, Any], runs: list[tuple[str, int, bool]]) -> str | None:
    """The training verdict of the runs a claim compares."""
    curves = {}
    for arm, batch, fixed in runs:
        history = results["runs_equal_steps" if fixed else "runs"].get(arm, {}).get(str(batch))
        if history is not None:
            label = f"{ARMS[arm]} at batch {batch}{' (equal steps)' if fixed else ''}"
            curves[label] = history
    return verdict(curves)


def headline(results: Mapping[str, Any]) -> str:
    """BN's and GN's error at the largest and smallest batch."""
    sizes = results["batch_sizes"]
    large, small = max(sizes), min(sizes)
    return "; ".join(
        f"{ARMS[arm]} err {_pct(_err(results, arm, large))}@{large} -> "
        f"{_pct(_err(results, arm, small))}@{small}"
        for arm in ("bn", "gn", "renorm")
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Test error against the batch size (the GroupNorm paper's Figure 1), and a table."""
    sizes: list[int] = list(results["batch_sizes"])
    figure, axes = new_figure(columns=2, width=10.0, height=3.6, width_ratios=(1.2, 1))
    ax = axes[0]
    for arm, label in ARMS.items():
        points = [(b, _err(results, arm, b)) for b in sizes if _err(results, arm, b) is not None]
        if points:
            ax.plot(
                [math.log2(b) for b, _ in points],
                [100 * float(e or 0.0) for _, e in points],
                marker="o",
                color=_ARM_COLORS[arm],
                label=label,
            )
    for arm in EQUAL_STEPS_ARMS:
        fixed = results["errors_equal_steps"][arm]
        points = [(b, fixed.get(str(b))) for b in sizes if fixed.get(str(b)) is not None]
        if points:
            ax.plot(
                [math.log2(b) for b, _ in points],
                [100 * float(e or 0.0) for _, e in points],
                marker="s",
                linestyle="--",
                color=_ARM_COLORS[arm],
                label=f"{ARMS[arm]}, {results['equal_steps']} steps at every size",
            )
    ax.set_xticks([math.log2(b) for b in sizes], [str(b) for b in sizes])
    ax.invert_xaxis()
    ax.set_xlabel("batch size (per process for sync BN)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error against the batch size")
    ax.legend(loc="upper left")
    ax = axes[1]
    ax.axis("off")
    cells = [
        [_pct(_err(results, arm, b)) if _err(results, arm, b) is not None else "-" for b in sizes]
        for arm in ARMS
    ]
    table = ax.table(
        cellText=cells,
        rowLabels=[label.replace(", ", ",\n", 1) for label in ARMS.values()],
        colLabels=[f"batch {b}" for b in sizes],
        loc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 1.6)
    file = f"{prefix}error.png"
    save_figure(figure, out_dir / file)
    return [
        Figure(
            file,
            "Test error (eval mode, running statistics) against the batch size, the same "
            "number of epochs at each: BN, GroupNorm, batch renorm, BN with micro-batch "
            "statistics but batch-32 gradients, and BN synchronized over 2 processes "
            "(x axis: per-process batch). The shape of the GroupNorm paper's Figure 1 "
            "(ImageNet: BN 23.6% -> 34.7% from 32 to 2; GN 24.1%, flat). Dashed: BN and "
            "GroupNorm trained for the same number of steps at every batch size.",
            alt="Test error against the batch size for batch norm, GroupNorm, batch renorm, "
            "micro-batch statistics and synchronized batch norm, at equal epochs (solid) and "
            f"equal steps (dashed); BN {_row(results, 'bn')}.",
        )
    ]


EXPERIMENT = Experiment(
    name="batch-size",
    title="Small mini-batches: batch norm against GroupNorm, renorm, micro-batches, sync",
    section="small-batches",
    description=(
        "A small CNN (three convolutions of 16, 32, 32 channels, each followed by the "
        "normalization and ReLU; 1D convolutions for MNIST-1D, 2D for images) trained with "
        "SGD (momentum 0.9, learning rate 0.1 x batch/32) for the same number of epochs at "
        "each batch size. Test error is the mean of the last three evaluations (eval mode: "
        "batch norm uses its running statistics). The sync arm runs 2 local processes over "
        "gloo, each with the given batch, through DistributedDataParallel. BN and GroupNorm "
        "are also trained for the same number of steps at every batch size. The quick "
        "configuration (2 epochs of 1500 examples at batch 32, 8 and 2; sync at batch 2 "
        "only) leaves the large batches, which get 16 times fewer steps than batch 2, far "
        "from convergence: each claim that fails says whether its runs were still "
        "improving; --full trains 20 epochs of the whole training set at 32, 16, 8, 4 and 2."
    ),
    quick=BatchSizeConfig(batch_sizes=(32, 8, 2), train_samples=1500, sync_batch_sizes=(2,)),
    full=BatchSizeConfig(epochs=20, train_samples=60_000, test_samples=10_000),
    step_fields=("train_samples", "test_samples"),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    curves=lambda results: {
        f"{ARMS[arm]} at batch {batch}{' (equal steps)' if fixed else ''}": history
        for fixed, key in ((False, "runs"), (True, "runs_equal_steps"))
        for arm, by_batch in results[key].items()
        if arm in EQUAL_STEPS_ARMS
        for batch, history in by_batch.items()
    },
)
