"""The experiment registry: every experiment ``bnkit lab`` knows, in report order.

:data:`CATALOG` maps each command-line name to the module that defines it; the module
holds an ``EXPERIMENT`` (:class:`bnkit.lab.experiment.Experiment`). Modules are imported
only when an experiment is asked for, so listing the names costs nothing.

To add an experiment: write ``bnkit/lab/experiments/<name>.py`` with its configuration
dataclass, ``run``, ``claims``, ``plot`` and ``headline`` functions and an
``EXPERIMENT``, then add one line here (and to a group of :data:`GROUPS`). Its
``section`` places it in the report (see :data:`bnkit.lab.report.SECTIONS`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from bnkit.errors import ConfigError, format_choices

__all__ = ["CATALOG", "DEFAULT", "GROUPS", "expand_names", "experiment_names", "get_experiment"]

#: Command-line name -> module defining ``EXPERIMENT``, in the order ``bnkit lab`` runs them.
CATALOG: dict[str, str] = {
    "ics": "bnkit.lab.experiments.ics",
    "learning-rate": "bnkit.lab.experiments.learning_rate",
    "regularization": "bnkit.lab.experiments.regularization",
    "training-process": "bnkit.lab.experiments.training_process",
    "test-process": "bnkit.lab.experiments.test_process",
    "memory": "bnkit.lab.experiments.memory",
    "batch-size": "bnkit.lab.experiments.batch_size",
    "non-iid": "bnkit.lab.experiments.non_iid",
    "inference-stats": "bnkit.lab.experiments.inference_stats",
    "covariate-shift": "bnkit.lab.experiments.covariate_shift",
}

#: What ``bnkit lab`` runs when no experiment is named: every experiment, so that every
#: section of the report has its measurements (a few minutes in the quick configuration).
DEFAULT: tuple[str, ...] = tuple(CATALOG)

#: Names that stand for several experiments on the command line.
GROUPS: dict[str, tuple[str, ...]] = {
    "paper": ("ics", "learning-rate", "regularization", "training-process", "test-process"),
    "disadvantages": ("memory", "batch-size", "non-iid", "inference-stats", "covariate-shift"),
    "all": tuple(CATALOG),
}


def expand_names(names: Sequence[str]) -> list[str]:
    """Experiment and group names -> experiment names, each once, in catalog order.

    No names: :data:`DEFAULT`.

    Raises:
        ConfigError: an unknown name; the message lists the known ones.

    Example:
        >>> expand_names([]) == expand_names(["all"])
        True
        >>> expand_names(["covariate-shift", "memory", "memory"])
        ['memory', 'covariate-shift']
        >>> len(expand_names(["all"])), expand_names(["disadvantages"])[:2]
        (10, ['memory', 'batch-size'])
    """
    if not names:
        return list(DEFAULT)
    chosen: set[str] = set()
    for name in names:
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in CATALOG:
            chosen.add(name)
        else:
            raise ConfigError(
                f"bnkit lab: unknown experiment {name!r}; expected one of "
                f"{format_choices([*CATALOG, *GROUPS])}"
            )
    return [name for name in CATALOG if name in chosen]


def experiment_names() -> list[str]:
    """The names of all experiments, in run order.

    Example:
        >>> experiment_names()[:2]
        ['ics', 'learning-rate']
    """
    return list(CATALOG)


def get_experiment(name: str) -> Any:
    """The :class:`~bnkit.lab.experiment.Experiment` called ``name``.

    Raises:
        ConfigError: an unknown name; the message lists the known ones.

    Example:
        >>> get_experiment("ics").section
        'covariate-shift'
    """
    if name not in CATALOG:
        raise ConfigError(
            f"bnkit lab: unknown experiment {name!r}; expected one of {format_choices(CATALOG)}"
        )
    module = importlib.import_module(CATALOG[name])
    return module.EXPERIMENT
