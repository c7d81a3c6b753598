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
import contextlib
import math
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bnkit.errors import ConfigError, DamagedResultWarning, DatasetError
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


# The largest --steps-scale: 1000 times the step counts is already far longer than any
# useful run, and far below where a scaled step count overflows to infinity.
_MAX_STEPS_SCALE = 1000.0


def _steps_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= _MAX_STEPS_SCALE):
        raise argparse.ArgumentTypeError(
            f"expected a number > 0 and <= {_MAX_STEPS_SCALE:g}, got {text!r}"
        )
    return value


def _output_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a directory, got the file {text!r}")
    return path


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
        type=_output_dir,
        default=Path("bnkit-lab"),
        help="output directory (default: ./bnkit-lab)",
    )
    lab.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    lab.add_argument(
        "--force", action="store_true", help="rerun experiments whose results already exist"
    )
    lab.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For tests and quick looks: multiply every step count.
    lab.add_argument("--steps-scale", type=_steps_scale, default=1.0, help=argparse.SUPPRESS)
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


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be written in ``directory`` (created if missing); None if they can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        return f"cannot write to {directory}: {error.strerror or error}"
    return None


def _missing_extra(error: ModuleNotFoundError) -> str:
    """The one-line message for an optional dependency that is not installed."""
    if not error.name or error.name.partition(".")[0] == "bnkit":
        raise error  # a module of bnkit itself: a bug, not a missing dependency
    return (
        f"the Python package {error.name.partition('.')[0]!r} is not installed; the lab "
        "needs its optional dependencies: pip install 'bnkit[lab]'"
    )


@contextlib.contextmanager
def _one_line_warnings(prog: str) -> Iterator[None]:
    """Show warnings as one line each on stderr (``prog: warning: ...``), each once."""
    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = f"{prog}: warning: {message}"
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DamagedResultWarning)
        warnings.showwarning = show
        yield


def lab_command(args: argparse.Namespace) -> int:
    """Run ``bnkit lab`` with parsed arguments; print the summary; return the exit status.

    Returns 0 when every experiment ran or was skipped (whether its claims held or not),
    1 when the data could not be loaded, a name was wrong, ``--out`` cannot be written or
    an optional dependency is missing (a one-line message goes to stderr). A saved result
    that is damaged is run again, with a warning.
    """
    problem = _unwritable(args.out)
    if problem:
        print(f"bnkit lab: --out: {problem}", file=sys.stderr)
        return 1
    try:
        with _one_line_warnings("bnkit lab"):
            from bnkit.lab.runner import run_lab, summary_table

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
    except ModuleNotFoundError as error:
        print(f"bnkit lab: {_missing_extra(error)}", file=sys.stderr)
        return 1
    except (ConfigError, DatasetError, OSError) as error:  # OSError: also a missing dataset
        print(f"bnkit lab: {error}", file=sys.stderr)
        return 1
    print(summary_table(outcomes, args.dataset, args.out / "index.html"))
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Run ``bnkit report DIR``: re-render the HTML report; return the exit status."""
    directory: Path = args.dir
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "no such directory"
        print(f"bnkit report: {what}: {directory}", file=sys.stderr)
        return 1
    problem = _unwritable(directory)
    if problem:
        print(f"bnkit report: {problem}", file=sys.stderr)
        return 1
    try:
        with _one_line_warnings("bnkit report"):
            from bnkit.lab.report import load_results, render_report

            path = render_report(directory, replot=args.replot)
            count = len(load_results(directory))
    except ModuleNotFoundError as error:
        print(f"bnkit report: {_missing_extra(error)}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"bnkit report: {error}", file=sys.stderr)
        return 1
    print(f"{path}: {count} experiment{'s' if count != 1 else ''}")
    return 0
