"""Every claim's ``holds`` is computed from the measured values: crafted results make each
claim hold and fail in turn."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bnkit.lab.experiments import GROUPS, get_experiment

pytestmark = pytest.mark.slow  # every test reads the results of a tiny run of the lab

Results = dict[str, Any]
Edit = Callable[[Results], None]


def saved_results(lab_run: tuple[Path, str, str], name: str) -> Results:
    out, _, _ = lab_run
    results: Results = json.loads((out / f"{name}.json").read_text())["results"]
    return results


def holds(name: str, results: Results, index: int) -> bool:
    claim = get_experiment(name).claims(results)[index]
    assert isinstance(claim.holds, bool)
    return claim.holds


def set_path(results: Results, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = results
    for key in parents:
        node = node[key]
    node[last] = value


def edits(*pairs: tuple[str, Any]) -> Edit:
    def apply(results: Results) -> None:
        for path, value in pairs:
            set_path(results, path, value)

    return apply


# (experiment, claim index, edits that make it hold, edits that make it fail)
CASES: list[tuple[str, int, Edit, list[Edit]]] = [
    # ics: faster, higher, stable, Z-transform, the batch of four
    (
        "ics",
        0,
        edits(("steps_to_target.bn", 100), ("steps_to_target.plain", 900)),
        [
            edits(("steps_to_target.bn", 900), ("steps_to_target.plain", 100)),
            edits(("steps_to_target.bn", None), ("steps_to_target.plain", 100)),
            edits(("steps_to_target.bn", 500), ("steps_to_target.plain", 500)),
        ],
    ),
    (
        "ics",
        1,
        edits(("bn.final_test_accuracy", 0.9), ("plain.final_test_accuracy", 0.5)),
        [
            edits(("bn.final_test_accuracy", 0.5), ("plain.final_test_accuracy", 0.9)),
            edits(("bn.final_test_accuracy", None), ("plain.final_test_accuracy", 0.1)),
        ],
    ),
    (
        "ics",
        2,
        edits(("bn.drift_median", 0.2), ("plain.drift_median", 1.5)),
        [
            edits(("bn.drift_median", 1.5), ("plain.drift_median", 0.2)),
            edits(("bn.drift_median", None), ("plain.drift_median", 0.2)),
        ],
    ),
    # ics, Santurkar et al.'s view: ICS not reduced, loss range, beta-smoothness
    (
        "ics",
        3,
        edits(
            ("bn.santurkar.ics_relative_median", 0.5), ("plain.santurkar.ics_relative_median", 0.1)
        ),
        [
            edits(
                ("bn.santurkar.ics_relative_median", 0.1),
                ("plain.santurkar.ics_relative_median", 0.5),
            ),
            edits(("bn.santurkar.ics_relative_median", None)),
        ],
    ),
    (
        "ics",
        4,
        edits(("bn.santurkar.loss_range_median", 0.1), ("plain.santurkar.loss_range_median", 0.9)),
        [
            edits(
                ("bn.santurkar.loss_range_median", 0.9),
                ("plain.santurkar.loss_range_median", 0.1),
            ),
            edits(("plain.santurkar.loss_range_median", None)),
        ],
    ),
    (
        "ics",
        5,
        edits(
            ("bn.santurkar.beta_smoothness_median", 1.0),
            ("plain.santurkar.beta_smoothness_median", 9.0),
        ),
        [
            edits(
                ("bn.santurkar.beta_smoothness_median", 9.0),
                ("plain.santurkar.beta_smoothness_median", 9.0),
            ),
        ],
    ),
    (
        "ics",
        6,
        edits(("z_transform.max_mean_error", 1e-8), ("z_transform.max_std_error", 1e-8)),
        [
            edits(("z_transform.max_mean_error", 0.5), ("z_transform.max_std_error", 1e-8)),
            edits(("z_transform.max_mean_error", 1e-8), ("z_transform.max_std_error", None)),
        ],
    ),
    (
        "ics",
        7,
        edits(
            ("z_transform.worked_example.max_error", 1e-9),
            ("z_transform.demo_example.max_error", 0.0),
        ),
        [
            edits(("z_transform.worked_example.max_error", 0.3)),
            edits(("z_transform.demo_example.max_error", 0.3)),
        ],
    ),
    # learning-rate: BN-x5 faster, BN-x30 better, no BN x30 fails
    (
        "learning-rate",
        0,
        edits(("runs.bn-x5.steps_to_target", 50), ("runs.plain-x1.steps_to_target", 400)),
        [
            edits(("runs.bn-x5.steps_to_target", 400), ("runs.plain-x1.steps_to_target", 50)),
            edits(("runs.bn-x5.steps_to_target", None)),
        ],
    ),
    (
        "learning-rate",
        1,
        edits(
            ("runs.bn-x30.diverged_at", None),
            ("runs.bn-x30.final_test_accuracy", 0.8),
            ("runs.plain-x1.final_test_accuracy", 0.6),
        ),
        [
            edits(("runs.bn-x30.diverged_at", 12), ("runs.bn-x30.final_test_accuracy", None)),
            edits(
                ("runs.bn-x30.diverged_at", None),
                ("runs.bn-x30.final_test_accuracy", 0.5),
                ("runs.plain-x1.final_test_accuracy", 0.6),
            ),
        ],
    ),
    (
        "learning-rate",
        2,
        edits(("runs.plain-x30.diverged_at", 7), ("runs.plain-x30.final_test_accuracy", None)),
        [
            edits(
                ("runs.plain-x30.diverged_at", None),
                ("runs.plain-x30.final_test_accuracy", 0.7),
                ("runs.plain-x1.final_test_accuracy", 0.6),
            )
        ],
    ),
    # regularization: narrower gap, better test accuracy, dropout removable
    (
        "regularization",
        0,
        edits(("runs.bn.gap", 0.1), ("runs.plain.gap", 0.3)),
        [edits(("runs.bn.gap", 0.3), ("runs.plain.gap", 0.1)), edits(("runs.bn.gap", None))],
    ),
    (
        "regularization",
        1,
        edits(("runs.bn.final_test_accuracy", 0.7), ("runs.plain.final_test_accuracy", 0.6)),
        [edits(("runs.bn.final_test_accuracy", 0.6), ("runs.plain.final_test_accuracy", 0.7))],
    ),
    (
        "regularization",
        2,
        edits(("runs.bn.final_test_accuracy", 0.695), ("runs.dropout.final_test_accuracy", 0.7)),
        [edits(("runs.bn.final_test_accuracy", 0.6), ("runs.dropout.final_test_accuracy", 0.7))],
    ),
    # test-process: training, batch 1 = batch 1000, batch of one, small batches, Algorithm 2
    (
        "test-process",
        0,
        edits(("same_weights", True)),
        [edits(("same_weights", False))],
    ),
    (
        "test-process",
        1,
        edits(("population.max_logit_difference", 1e-7), ("population.predictions_differ", 0)),
        [
            edits(("population.max_logit_difference", 0.5)),
            edits(("population.max_logit_difference", 1e-7), ("population.predictions_differ", 2)),
            edits(("population.max_logit_difference", None)),
        ],
    ),
    (
        "test-process",
        2,
        edits(("batch_statistics.batch_1", {"error": "ValueError: undefined", "accuracy": None})),
        [edits(("batch_statistics.batch_1", {"error": None, "accuracy": 0.6}))],
    ),
    (
        "test-process",
        3,
        edits(
            ("batch_statistics.accuracy", [0.15, 0.7]),
            ("batch_statistics.sizes", [2, 100]),
            ("population_variants.accuracy.ema", 0.7),
        ),
        [
            edits(("batch_statistics.accuracy", [0.69, 0.7]), ("batch_statistics.sizes", [2, 100])),
            edits(("batch_statistics.accuracy", []), ("batch_statistics.sizes", [])),
        ],
    ),
    (
        "test-process",
        4,
        edits(
            ("population_variants.accuracy.recalibrated", 0.705),
            ("population_variants.accuracy.ema", 0.7),
        ),
        [
            edits(
                ("population_variants.accuracy.recalibrated", 0.6),
                ("population_variants.accuracy.ema", 0.7),
            )
        ],
    ),
    (
        "test-process",
        5,
        edits(
            ("folding.max_logit_difference", 1e-6),
            ("folding.bn_layers_after", 0),
            ("folding.predictions_differ", 0),
        ),
        [
            edits(("folding.max_logit_difference", 0.5)),
            edits(("folding.max_logit_difference", None)),
            edits(("folding.bn_layers_after", 1)),
            edits(("folding.predictions_differ", 3)),
        ],
    ),
    # training-process: batch dependence, gradient through the statistics, fixed in eval
    (
        "training-process",
        0,
        edits(
            ("by_size.4.output_std", [0.5, 0.4, 0.6]), ("by_size.60.output_std", [0.1, 0.1, 0.1])
        ),
        [
            edits(
                ("by_size.4.output_std", [0.1, 0.1, 0.1]),
                ("by_size.60.output_std", [0.5, 0.4, 0.6]),
            ),
            edits(("by_size.4.output_std", [0.0] * 3), ("by_size.60.output_std", [0.0] * 3)),
        ],
    ),
    (
        "training-process",
        1,
        edits(
            ("by_size.4.statistics_share_mean", 0.5),
            ("by_size.16.statistics_share_mean", 0.2),
            ("by_size.60.statistics_share_mean", 0.05),
        ),
        [edits(("by_size.60.statistics_share_mean", 0.001))],
    ),
    (
        "training-process",
        2,
        edits(("eval_difference", 0.0)),
        [edits(("eval_difference", 0.01)), edits(("eval_difference", None))],
    ),
]


@pytest.mark.parametrize(
    ("name", "index", "make_true", "make_false"),
    CASES,
    ids=[f"{case[0]}-{case[1]}" for case in CASES],
)
def test_claim_follows_the_measurements(
    lab_run: tuple[Path, str, str], name: str, index: int, make_true: Edit, make_false: list[Edit]
) -> None:
    base = saved_results(lab_run, name)
    results = copy.deepcopy(base)
    make_true(results)
    assert holds(name, results, index)
    for edit in make_false:
        results = copy.deepcopy(base)
        make_true(results)
        edit(results)
        assert not holds(name, results, index)


def test_every_claim_is_covered(lab_run: tuple[Path, str, str]) -> None:
    for name in GROUPS["paper"]:  # the others: tests/lab/test_disadvantages.py
        count = len(get_experiment(name).claims(saved_results(lab_run, name)))
        assert {index for case, index, *_ in CASES if case == name} == set(range(count))


def test_single_example_at_chance_counts_as_failure(lab_run: tuple[Path, str, str]) -> None:
    results = copy.deepcopy(saved_results(lab_run, "test-process"))
    results["chance"] = 0.1
    results["batch_statistics"]["batch_1"] = {"error": None, "accuracy": 0.12}
    claim = get_experiment("test-process").claims(results)[2]
    assert claim.holds
    assert "chance 10.0%" in claim.measured
