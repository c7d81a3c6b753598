"""What an experiment is: its configuration, its run, its claims and its figures.

An :class:`Experiment` is a record of plain functions, so that adding one to the lab is
writing a module with those functions and one line in
:data:`bnkit.lab.experiments.CATALOG`:

- ``run(config, context) -> results``: trains and measures; returns JSON-ready results
  (numbers, lists, strings, None) that hold everything the claims and plots need;
- ``claims(results) -> [Claim]``: the claims in words, each with its published anchor and
  a ``holds`` computed from the measured values by a rule written in the function;
- ``plot(results, out_dir, prefix) -> [Figure]``: writes PNG files and says what they show;
- ``headline(results) -> str``: the key numbers for the summary table.

Claims and plots take the results only, never the trained models, so ``bnkit report``
can redraw everything from the saved JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from bnkit.lab.datasets import Dataset

__all__ = [
    "TIMINGS_SUFFIX",
    "Claim",
    "Experiment",
    "Figure",
    "ProgressBar",
    "ProgressFactory",
    "RunContext",
    "Table",
    "no_progress",
]

ConfigT = TypeVar("ConfigT")

#: The file name ending of an experiment's timings, kept apart from its results JSON
#: (``<experiment>.timings.json``) because they differ from run to run.
TIMINGS_SUFFIX = ".timings.json"


@dataclass(frozen=True)
class Claim:
    """One claim about batch normalization, what backs it, and whether it held in this run.

    Args:
        claim: the claim in words.
        anchor: the published figure it echoes, with its source.
        measured: what this run measured, in words with numbers.
        holds: whether the claim held here, computed from the measured values.
        section: the report section to show it in, if not its experiment's.
        training: for a claim that did not hold, whether the runs it rests on were
            trained to a plateau or still improving (:func:`bnkit.lab.training.verdict`),
            so that a reader can tell a failed claim from a run too short to decide it.

    Example:
        >>> Claim("BN trains faster", "Ioffe & Szegedy 2015, Fig. 1", "3x fewer steps",
        ...       holds=3.0 > 1.0).to_json()["holds"]
        True
    """

    claim: str
    anchor: str
    measured: str
    holds: bool
    section: str | None = None
    training: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form: ``claim``, ``anchor``, ``measured``, ``holds`` (and ``section``,
        ``training``)."""
        data: dict[str, Any] = {
            "claim": self.claim,
            "anchor": self.anchor,
            "measured": self.measured,
            "holds": bool(self.holds),
        }
        if self.section is not None:
            data["section"] = self.section
        if self.training is not None:
            data["training"] = self.training
        return data


@dataclass(frozen=True)
class Figure:
    """A PNG written next to the results, with the caption the report shows under it.

    Args:
        file: the file name, relative to the output directory.
        caption: what the figure shows.
        section: the report section to show it in, if not its experiment's.
        alt: the image's text alternative, what it shows for a reader who cannot see it;
            None: the caption.
    """

    file: str
    caption: str
    section: str | None = None
    alt: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form: ``file``, ``caption`` (and ``section``, ``alt``)."""
        data: dict[str, Any] = {"file": self.file, "caption": self.caption}
        if self.section is not None:
            data["section"] = self.section
        if self.alt is not None:
            data["alt"] = self.alt
        return data


@dataclass(frozen=True)
class Table:
    """A table of numbers the report shows as HTML, built from the results alone.

    Args:
        caption: what the table shows.
        header: the column headings.
        rows: the cells, as text, one list per row.
        section: the report section to show it in, if not its experiment's.
        numbers: the cells are numbers (aligned right, never wrapped); False for text.

    Example:
        >>> Table("two numbers", ["i", "o_i"], [["1", "2.0"], ["2", "5.0"]]).rows[1]
        ['2', '5.0']
    """

    caption: str
    header: list[str]
    rows: list[list[str]]
    section: str | None = None
    numbers: bool = True


class ProgressBar(Protocol):
    """The part of a tqdm bar the experiments use."""

    def update(self, n: int = 1) -> object:
        """Advance the bar by ``n`` steps."""

    def close(self) -> None:
        """Finish the bar."""


class ProgressFactory(Protocol):
    """Makes a progress bar of ``total`` steps labelled ``desc``."""

    def __call__(self, total: int, desc: str) -> ProgressBar:
        """Start a bar."""


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, desc: str) -> ProgressBar:
    """A progress factory that shows nothing (tests, library use).

    Example:
        >>> bar = no_progress(10, "training")
        >>> bar.update(3); bar.close()
    """
    return _NoProgress()


@dataclass(frozen=True)
class RunContext:
    """What a run gets besides its configuration.

    Args:
        dataset: the data, standardized, as float32 tensors.
        seed: the seed every random choice of the run derives from.
        progress: makes progress bars (stderr); :func:`no_progress` shows none.
    """

    dataset: Dataset
    seed: int
    progress: ProgressFactory = field(default=no_progress)


@dataclass(frozen=True)
class Experiment(Generic[ConfigT]):
    """One experiment of the lab.

    Args:
        name: the command-line name, e.g. ``"learning-rate"``.
        title: the report heading.
        section: the report section it belongs to (a key of
            :data:`bnkit.lab.report.SECTIONS`; unknown keys go to a final section).
        description: what it does and how, for the report (plain text).
        quick: the configuration of the default quick run (a frozen dataclass).
        full: the configuration with the published step counts.
        step_fields: the configuration fields that count training steps or batches,
            multiplied by ``steps_scale`` (tests shrink runs this way).
        run: trains and measures; returns the JSON-ready results.
        claims: the claims, from the results alone.
        plot: writes the figures from the results alone into a directory, file names
            starting with a prefix; returns them.
        headline: the key numbers in one line for the summary table.
        version: bumped when a change makes earlier saved results incomparable.
        tables: the tables the report shows, from the results alone (default: none).
        curves: the training curves the claims rest on, by run label, each a mapping
            with ``steps`` and ``test_accuracy`` (:meth:`bnkit.lab.training.History.to_json`);
            a claim that does not hold is labelled with their :func:`~bnkit.lab.training.verdict`
            unless it carries its own.
        volatile: results keys that vary from run to run (timings): the runner keeps
            them out of ``<experiment>.json``, in ``<experiment>.timings.json``, so that
            two runs write the same results file.
    """

    name: str
    title: str
    section: str
    description: str
    quick: ConfigT
    full: ConfigT
    step_fields: tuple[str, ...]
    run: Callable[[ConfigT, RunContext], dict[str, Any]]
    claims: Callable[[Mapping[str, Any]], list[Claim]]
    plot: Callable[[Mapping[str, Any], Path, str], list[Figure]]
    headline: Callable[[Mapping[str, Any]], str]
    version: int = 1
    tables: Callable[[Mapping[str, Any]], list[Table]] | None = None
    curves: Callable[[Mapping[str, Any]], dict[str, Mapping[str, Any]]] | None = None
    volatile: tuple[str, ...] = ()

    def decided_claims(self, results: Mapping[str, Any]) -> list[Claim]:
        """:attr:`claims`, each one that did not hold labelled with the training verdict
        of :attr:`curves` (a run still improving over the last part of its curve makes
        the claim undecided by a run too short, not refuted on a trained network)."""
        from bnkit.lab.training import verdict

        found = self.claims(results)
        if self.curves is None:
            return found
        text = verdict(self.curves(results))
        return [
            claim
            if claim.holds or claim.training is not None or text is None
            else dataclasses.replace(claim, training=text)
            for claim in found
        ]

    def config(self, full: bool = False, steps_scale: float = 1.0) -> ConfigT:
        """The quick or full configuration, with its step counts scaled.

        Each field named in ``step_fields`` becomes ``max(2, round(value * steps_scale))``.
        """
        base = self.full if full else self.quick
        if steps_scale == 1.0:
            return base
        changes = {
            name: max(2, round(getattr(base, name) * steps_scale)) for name in self.step_fields
        }
        return dataclasses.replace(base, **changes)  # type: ignore[type-var]  # a dataclass
