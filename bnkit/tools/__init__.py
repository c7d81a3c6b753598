"""Tools for the whole life of a model that uses batch normalization.

They work on any ``nn.Module`` holding torch's or bnkit's batch norm layers:

- :func:`convert` / :func:`to_torch`: swap torch's layers for bnkit's (with extras) and back.
- :func:`fold`: merge batch norm into the neighbouring Conv/Linear for inference, with a
  :class:`FoldReport` of what was merged and why not.
- :func:`recalibrate`: recompute the population statistics with the final weights
  (PreciseBN), or on a new domain's unlabeled data (AdaBN).
- :func:`freeze` / :func:`unfreeze`: keep the statistics fixed even in train mode.
- :func:`lint`: find the common mistakes, as :class:`Finding` objects.
- :class:`ICSProbe` and :func:`santurkar_ics`: measure internal covariate shift.
"""

from __future__ import annotations

from bnkit.tools.convert import AnyRankBatchNorm, convert, to_torch
from bnkit.tools.fold import ChannelAffine, FoldEntry, FoldReport, fold
from bnkit.tools.freeze import freeze, unfreeze
from bnkit.tools.ics import GradientShift, ICSProbe, LayerRecord, santurkar_ics
from bnkit.tools.lint import CHECKS, Finding, lint
from bnkit.tools.recalibrate import ESTIMATORS, recalibrate

__all__ = [
    "CHECKS",
    "ESTIMATORS",
    "AnyRankBatchNorm",
    "ChannelAffine",
    "Finding",
    "FoldEntry",
    "FoldReport",
    "GradientShift",
    "ICSProbe",
    "LayerRecord",
    "convert",
    "fold",
    "freeze",
    "lint",
    "recalibrate",
    "santurkar_ics",
    "to_torch",
    "unfreeze",
]
