"""The one table of cases every numerical test draws from.

The reference-vs-finite-differences tests, the reference-vs-torch tests, the layer's
parity tests against ``torch.nn.BatchNorm*d`` and the gradchecks all iterate over
``CASES``, so a shape or option added here is checked everywhere at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    """One input configuration: a shape, how its values are spread, and layer options."""

    shape: tuple[int, ...]
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    loc: float = 0.0  # the per-channel means are drawn around this value
    scale: float = 1.0  # the per-channel standard deviations are drawn around this value
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def id(self) -> str:
        parts = ["x".join(str(d) for d in self.shape)]
        if self.eps != 1e-5:
            parts.append(f"eps{self.eps:g}")
        if self.momentum != 0.1:
            parts.append(f"m{self.momentum}")
        if not self.affine:
            parts.append("noaffine")
        if self.loc:
            parts.append(f"loc{self.loc:g}")
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        return "-".join(parts)

    def input(self, seed: int = 0, dtype: type = np.float64) -> np.ndarray:
        """Values with a different mean and spread per channel (so a per-channel bug shows)."""
        rng = np.random.default_rng(seed)
        c = self.channels
        view = (1, c) + (1,) * (self.rank - 2)
        means = (self.loc + rng.uniform(-2.0, 2.0, size=c)).reshape(view)
        stds = (self.scale * rng.uniform(0.5, 2.0, size=c)).reshape(view)
        return (means + stds * rng.standard_normal(self.shape)).astype(dtype)

    def params(self, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """gamma and beta: random when affine, (1, 0) otherwise."""
        rng = np.random.default_rng(seed)
        c = self.channels
        if not self.affine:
            return np.ones(c), np.zeros(c)
        return rng.uniform(0.5, 1.5, size=c) * rng.choice([-1.0, 1.0], size=c), rng.normal(size=c)


CASES: list[Case] = [
    Case((4, 3)),  # the seed's example: a mini-batch of four
    Case((16, 5)),
    Case((2, 3)),  # the smallest batch with a defined variance
    Case((5, 1)),  # one feature
    Case((8, 4, 6)),  # BatchNorm1d on sequences: (N, C, L)
    Case((1, 3, 5)),  # batch of one, but five positions per channel
    Case((2, 3, 4, 5)),  # BatchNorm2d
    Case((3, 2, 1, 1)),  # 2D with 1x1 spatial extent
    Case((2, 2, 3, 3, 2)),  # BatchNorm3d
    Case((6, 4), eps=1e-3, momentum=0.3),
    Case((6, 4, 3), momentum=None),  # cumulative average
    Case((6, 4, 3), momentum=0.0),
    Case((6, 4, 3), momentum=1.0),
    Case((7, 3), affine=False),
    Case((10, 3, 4), loc=1e3, scale=1e-2),  # large offset, small spread
    Case((10, 3), scale=1e3),
]

CASE_IDS = [case.id for case in CASES]

# Sub-tables for tests that need extra structure.
SPATIAL_CASES = [c for c in CASES if c.rank > 2]
