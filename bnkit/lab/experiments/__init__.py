"""The experiment registry: every experiment ``bnkit lab`` knows, in report order.

:data:`CATALOG` maps each command-line name to the module that defines it; the module
holds an ``EXPERIMENT`` (:class:`bnkit.lab.experiment.Experiment`). Modules are imported
only when an experiment is asked for, so listing the names costs nothing.

To add an experiment: write ``bnkit/lab/experiments/<name>.py`` with its configuration
dataclass, ``run``, ``claims``, ``plot`` and ``headline`` functions and an
``EXPERIMENT``, then add one line here. Its ``section`` places it in the report (see
:data:`bnkit.lab.report.SECTIONS`).
"""

from __future__ import annotations

import importlib
from typing import Any

from bnkit.errors import ConfigError, format_choices

__all__ = ["CATALOG", "experiment_names", "get_experiment"]

#: Command-line name -> module defining ``EXPERIMENT``, in the order ``bnkit lab`` runs them.
CATALOG: dict[str, str] = {
    "ics": "bnkit.lab.experiments.ics",
    "learning-rate": "bnkit.lab.experiments.learning_rate",
    "regularization": "bnkit.lab.experiments.regularization",
    "test-process": "bnkit.lab.experiments.test_process",
}


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
