"""The bnkit lab: the claims made about batch normalization, measured on real data.

``bnkit lab`` trains small networks on a laptop CPU in minutes, with and without
:class:`bnkit.nn.BatchNorm1d`, and reports each claim of the original paper (Ioffe &
Szegedy, 2015) beside the figure it echoes: internal covariate shift, the Z-transform
with gamma and beta, higher learning rates, the regularization effect and the test
process with population statistics; then its disadvantages (memory, small and non-i.i.d.
batches, population statistics, covariate shift at test time) and their remedies.

- :mod:`bnkit.lab.datasets`: MNIST-1D, scikit-learn's digits, Fashion-MNIST and MNIST
  (IDX files), standardized with training-set statistics.
- :mod:`bnkit.lab.experiments`: the experiment registry: the paper's claims (``ics``,
  ``learning-rate``, ``regularization``, ``test-process``, run by default) and batch
  norm's disadvantages with their remedies (the ``disadvantages`` group: ``memory``,
  ``batch-size``, ``non-iid``, ``inference-stats``, ``covariate-shift``).
- :mod:`bnkit.lab.workers`: local multi-process runs over gloo (synchronized batch norm).
- :mod:`bnkit.lab.runner`: :func:`~bnkit.lab.runner.run_lab` runs experiments and writes
  ``OUT/<experiment>.json``, the plots and ``OUT/index.html``.
- :mod:`bnkit.lab.report`: :func:`~bnkit.lab.report.render_report` re-renders the HTML
  report from saved results.
- :mod:`bnkit.lab.cli`: the ``bnkit lab`` and ``bnkit report`` commands.

Importing this package is cheap: torch and matplotlib are imported by the submodules
that need them, so the command line starts fast.
"""

from __future__ import annotations

__all__: list[str] = []
