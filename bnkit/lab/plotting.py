"""Plot helpers: matplotlib's Agg backend, one style, atomic PNG files.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through
``pyplot``, so plotting has no global state and needs no display.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from bnkit.lab.storage import atomic_path

__all__ = ["COLORS", "lab_style", "new_figure", "save_figure"]

#: Colors by arm, the same in every plot: without BN, with BN, dropout, and extras.
COLORS: dict[str, str] = {
    "plain": "#d1495b",
    "bn": "#00798c",
    "dropout": "#edae49",
    "other": "#66a182",
    "gray": "#8d99ae",
}

_STYLE: Any = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


@contextlib.contextmanager
def lab_style() -> Iterator[None]:
    """Apply the lab's plot style inside the block only (matplotlib's rc parameters)."""
    with matplotlib.rc_context(_STYLE):
        yield


def new_figure(
    columns: int = 1,
    rows: int = 1,
    width: float = 6.0,
    height: float = 3.4,
    width_ratios: Sequence[float] | None = None,
) -> tuple[MplFigure, Any]:
    """A figure of ``rows`` x ``columns`` axes; returns (figure, axes).

    ``axes`` is one Axes for a 1 x 1 grid, else a NumPy array of them. Call inside
    :func:`lab_style` for the lab's look (the runner and the report do).
    """
    figure = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=True, width_ratios=width_ratios)
    return figure, axes


def save_figure(figure: MplFigure, path: Path) -> None:
    """Write ``figure`` as a PNG to ``path`` atomically, without a timestamp in it."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
