"""Run lab experiments: results as JSON, plots as PNG, the report as HTML.

For each experiment :func:`run_lab` writes, atomically, first its figures
``OUT/<experiment>-*.png`` and then ``OUT/<experiment>.json``::

    {"experiment", "title", "section", "description", "dataset", "config",
     "results", "claims": [{"claim", "anchor", "measured", "holds"}, ...],
     "figures": [{"file", "caption"}, ...], "headline", "environment"}

and at the end ``OUT/index.html``. Results that vary from run to run (timings; an
experiment's ``volatile`` keys) go to ``OUT/<experiment>.timings.json`` instead, which the
report reads beside the results. The JSON is written last, so its presence means the
experiment is complete; a later run with the same configuration (dataset, seed, mode,
step scale, every parameter, the experiment's version) skips it unless ``force``.

Runs are deterministic on a CPU for a given seed: every random choice is seeded from
it, and torch runs on one thread (faster for these small networks, and the same
arithmetic whatever the machine's core count). The results JSON holds no timings or
dates, so two runs write the same file; the timings file is the one that differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bnkit.lab.experiment import (
    TIMINGS_SUFFIX,
    ProgressBar,
    ProgressFactory,
    RunContext,
    no_progress,
)
from bnkit.lab.experiments import expand_names, get_experiment
from bnkit.lab.storage import read_result, same_config, write_json_atomic

__all__ = ["ExperimentOutcome", "run_lab", "summary_table"]


@dataclass(frozen=True)
class ExperimentOutcome:
    """What happened to one experiment in a :func:`run_lab` call.

    Attributes:
        name: the experiment.
        status: ``"ran"`` or ``"skipped"`` (results with the same configuration existed).
        seconds: wall time spent on it in this call.
        held: how many of its claims held.
        claims: how many claims it makes.
        headline: its key numbers in one line.
        path: its JSON file.
    """

    name: str
    status: str
    seconds: float
    held: int
    claims: int
    headline: str
    path: Path


def _tqdm_progress(stream: TextIO) -> ProgressFactory:
    from tqdm import tqdm

    def make(total: int, desc: str) -> ProgressBar:
        bar: ProgressBar = tqdm(
            total=total,
            desc=desc,
            file=stream,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
            unit="step",
        )
        return bar

    return make


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _environment() -> dict[str, str]:
    import numpy
    import torch

    from bnkit import __version__
    from bnkit.lab.models import batch_norm_implementation

    return {
        "bnkit": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "batch norm layer": batch_norm_implementation(),
    }


def experiment_config(
    name: str, dataset: str, seed: int, full: bool, steps_scale: float
) -> dict[str, Any]:
    """The configuration stored with (and compared against) an experiment's results.

    Example:
        >>> config = experiment_config("ics", "digits", 0, False, 1.0)
        >>> config["dataset"], config["mode"], config["steps"]
        ('digits', 'quick', 6000)
    """
    experiment = get_experiment(name)
    parameters = dataclasses.asdict(experiment.config(full=full, steps_scale=steps_scale))
    return {
        "dataset": dataset,
        "seed": seed,
        "mode": "full" if full else "quick",
        "steps_scale": steps_scale,
        "version": experiment.version,
        **parameters,
    }


def _complete(stored: dict[str, Any] | None, config: dict[str, Any], out: Path) -> bool:
    if stored is None or not same_config(stored.get("config"), config):
        return False
    figures = stored.get("figures", [])
    return all((out / str(figure.get("file"))).is_file() for figure in figures)


def _prepare_native_code() -> None:
    """Build (or load) bnkit's native CPU code before the first progress bar starts: a
    first build takes about a minute (it says so on stderr), and a bar running meanwhile
    would show its first step as taking that long, and an absurd estimate."""
    from bnkit.kernels import native

    native.library()


def run_lab(
    experiments: Sequence[str] | None = None,
    *,
    dataset: str = "mnist1d",
    data_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "bnkit-lab",
    seed: int = 0,
    full: bool = False,
    force: bool = False,
    steps_scale: float = 1.0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> list[ExperimentOutcome]:
    """Run experiments (default: the paper's four), save their results and plots, render the report.

    Args:
        experiments: names from :data:`bnkit.lab.experiments.CATALOG` or
            :data:`~bnkit.lab.experiments.GROUPS` (run in catalog order); None or empty:
            :data:`~bnkit.lab.experiments.DEFAULT`.
        dataset: one of :data:`bnkit.lab.datasets.DATASETS`.
        data_dir: where to look first for IDX files.
        out: the output directory.
        seed: seeds every random choice.
        full: the published step counts instead of the quick configuration.
        force: run even if results with the same configuration exist.
        steps_scale: multiply every step count (tests use tiny runs).
        cache_dir: where generated datasets are cached.
        progress: show progress bars on ``log``.
        log: where progress and notes go (default ``sys.stderr``).

    Returns:
        One :class:`ExperimentOutcome` per experiment, in run order.

    Raises:
        ConfigError: an unknown experiment or dataset name.
        DatasetNotFoundError: the dataset's files are not found.
    """
    from bnkit.lab.datasets import load_dataset
    from bnkit.lab.plotting import lab_style
    from bnkit.lab.report import render_report

    log = log if log is not None else sys.stderr
    names = expand_names(list(experiments or ()))
    chosen = [get_experiment(name) for name in names]  # unknown names fail before any work
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_bar = _tqdm_progress(log) if progress else no_progress
    loaded: list[Any] = []
    outcomes: list[ExperimentOutcome] = []
    with _torch_threads(1):
        for experiment in chosen:
            config = experiment_config(experiment.name, dataset, seed, full, steps_scale)
            path = out_dir / f"{experiment.name}.json"
            stored = read_result(path)
            start = time.perf_counter()
            if not force and _complete(stored, config, out_dir):
                assert stored is not None
                status = "skipped"
                saved = stored
                print(
                    f"{experiment.name}: results for this configuration exist, skipped "
                    "(--force reruns)",
                    file=log,
                )
            else:
                if not loaded:
                    _prepare_native_code()
                    loaded.append(load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir))
                context = RunContext(dataset=loaded[0], seed=seed, progress=make_bar)
                measured = experiment.run(
                    experiment.config(full=full, steps_scale=steps_scale), context
                )
                volatile = {k: measured[k] for k in experiment.volatile if k in measured}
                results = {k: v for k, v in measured.items() if k not in volatile}
                claims = [claim.to_json() for claim in experiment.decided_claims(results)]
                with lab_style():
                    figures = experiment.plot(measured, out_dir, f"{experiment.name}-")
                timings_path = out_dir / f"{experiment.name}{TIMINGS_SUFFIX}"
                if volatile:
                    write_json_atomic(timings_path, volatile)
                else:
                    timings_path.unlink(missing_ok=True)
                saved = {
                    "experiment": experiment.name,
                    "title": experiment.title,
                    "section": experiment.section,
                    "description": experiment.description,
                    "dataset": dataset,
                    "config": config,
                    "results": results,
                    "claims": claims,
                    "figures": [figure.to_json() for figure in figures],
                    "headline": experiment.headline(results),
                    "environment": _environment(),
                }
                write_json_atomic(path, saved)
                status = "ran"
            seconds = time.perf_counter() - start
            held = sum(bool(claim.get("holds")) for claim in saved.get("claims", []))
            outcome = ExperimentOutcome(
                name=experiment.name,
                status=status,
                seconds=seconds,
                held=held,
                claims=len(saved.get("claims", [])),
                headline=str(saved.get("headline", "")),
                path=path,
            )
            outcomes.append(outcome)
            if status == "ran":
                print(
                    f"{experiment.name}: {held}/{outcome.claims} claims held ({seconds:.1f} s)",
                    file=log,
                )
    render_report(out_dir)
    return outcomes


def summary_table(outcomes: Sequence[ExperimentOutcome], dataset: str, report: Path) -> str:
    """The summary printed at the end of ``bnkit lab``: one row per experiment.

    Example:
        >>> row = ExperimentOutcome("ics", "ran", 12.3, 4, 4, "acc 90%", Path("ics.json"))
        >>> print(summary_table([row], "mnist1d", Path("index.html")))  # doctest: +ELLIPSIS
        experiment  status  time    claims  key numbers
        ics         ran     12.3 s  4/4     acc 90%
        <BLANKLINE>
        4 of 4 claims held on mnist1d. Report: index.html
    """
    header = ("experiment", "status", "time", "claims", "key numbers")
    rows = [
        (o.name, o.status, f"{o.seconds:.1f} s", f"{o.held}/{o.claims}", o.headline)
        for o in outcomes
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in [header, *rows]
    ]
    held = sum(o.held for o in outcomes)
    total = sum(o.claims for o in outcomes)
    lines.append("")
    lines.append(f"{held} of {total} claims held on {dataset}. Report: {report}")
    return "\n".join(lines)
