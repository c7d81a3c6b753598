"""The ``bnkit lab`` and ``bnkit report`` commands.

:func:`add_commands` registers both on the subparsers of the ``bnkit`` command line; each
sets ``args.run_command``, the function to call with the parsed arguments, which returns
the exit status. Importing this module is cheap (torch and matplotlib load only when a
command runs).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="bnkit")
    >>> add_commands(parser.add_subparsers(dest="command", required=True))
    >>> args = parser.parse_args(["lab", "ics", "--dataset", "digits", "--seed", "3"])
    >>> args.experiments, args.dataset, args.seed, args.run_command.__name__
    (['ics'], 'digits', 3, 'lab_command')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bnkit.lab.experiments import CATALOG, DEFAULT, GROUPS

__all__ = ["add_commands", "lab_command", "report_command"]

# The same names as bnkit.lab.datasets.DATASETS, repeated so that building the parser
# imports neither torch nor NumPy.
_DATASETS = ("mnist1d", "digits", "fashion-mnist", "mnist")


def _experiment_name(text: str) -> str:
    if text not in CATALOG and text not in GROUPS:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {text!r}; choose from {', '.join([*CATALOG, *GROUPS])}"
        )
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_commands(subparsers: Any) -> None:
    """Register ``lab`` and ``report`` on an argparse subparsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    lab = subparsers.add_parser(
        "lab",
        help="reproduce the claims about batch normalization on real data",
        description=(
            "Train small networks with and without batch normalization and measure the "
            "claims made about it (Ioffe & Szegedy 2015): internal covariate shift, higher "
            "learning rates, regularization, the test process; and its disadvantages and "
            "their remedies (the 'disadvantages' group): memory, small and non-i.i.d. "
            "batches, population statistics, covariate shift at test time. Writes "
            "OUT/<experiment>.json, PNG plots and OUT/index.html; prints a summary. With no "
            "EXPERIMENT, every one runs (under five minutes on 2 CPU cores, quick "
            "configuration); 'paper' runs the original paper's, 'disadvantages' the rest."
        ),
    )
    lab.add_argument(
        "experiments",
        nargs="*",
        type=_experiment_name,
        metavar="EXPERIMENT",
        help=(
            f"experiments to run: {', '.join(CATALOG)}; or a group: "
            + "; ".join(
                f"{name} ({', '.join(members)})"
                for name, members in GROUPS.items()
                if name != "all"
            )
            + f"; all (every experiment). Default: {', '.join(DEFAULT)}"
        ),
    )
    lab.add_argument(
        "--dataset", choices=_DATASETS, default="mnist1d", help="the data (default: mnist1d)"
    )
    lab.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to look first for the IDX files of fashion-mnist and mnist",
    )
    lab.add_argument(
        "--full", action="store_true", help="the published step counts (slow) instead of quick"
    )
    lab.add_argument(
        "--out",
        type=Path,
        default=Path("bnkit-lab"),
        help="output directory (default: ./bnkit-lab)",
    )
    lab.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    lab.add_argument(
        "--force", action="store_true", help="rerun experiments whose results already exist"
    )
    lab.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For tests and quick looks: multiply every step count.
    lab.add_argument("--steps-scale", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    lab.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    lab.set_defaults(run_command=lab_command)

    report = subparsers.add_parser(
        "report",
        help="re-render the lab's HTML report from saved results",
        description="Write DIR/index.html from the results bnkit lab saved in DIR; runs nothing.",
    )
    report.add_argument("dir", type=Path, metavar="DIR", help="the output directory of bnkit lab")
    report.add_argument(
        "--replot", action="store_true", help="also redraw every figure from the saved results"
    )
    report.set_defaults(run_command=report_command)


def lab_command(args: argparse.Namespace) -> int:
    """Run ``bnkit lab`` with parsed arguments; print the summary; return the exit status.

    Returns 0 when every experiment ran or was skipped (whether its claims held or not),
    1 when the data could not be loaded or a name was wrong (the message goes to stderr).
    """
    from bnkit.errors import ConfigError
    from bnkit.lab.datasets import DatasetNotFoundError, IDXFormatError
    from bnkit.lab.runner import run_lab, summary_table

    try:
        outcomes = run_lab(
            args.experiments,
            dataset=args.dataset,
            data_dir=args.data_dir,
            out=args.out,
            seed=args.seed,
            full=args.full,
            force=args.force,
            steps_scale=args.steps_scale,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except (ConfigError, DatasetNotFoundError, IDXFormatError) as error:
        print(f"bnkit lab: {error}", file=sys.stderr)
        return 1
    print(summary_table(outcomes, args.dataset, args.out / "index.html"))
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Run ``bnkit report DIR``: re-render the HTML report; return the exit status."""
    from bnkit.lab.report import load_results, render_report

    try:
        path = render_report(args.dir, replot=args.replot)
    except FileNotFoundError as error:
        print(f"bnkit report: {error}", file=sys.stderr)
        return 1
    count = len(load_results(args.dir))
    print(f"{path}: {count} experiment{'s' if count != 1 else ''}")
    return 0
