"""torch.autograd.gradcheck and gradgradcheck (float64) for every option of the layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.func import functional_call

import bnkit.nn as bnn
from bnkit.functional import batch_norm

F64 = torch.float64

# (id, layer factory, train mode, input shape, memory format)
CONFIGS: list[tuple[str, Callable[[], bnn.BatchNormNd], bool, tuple[int, ...], Any]] = [
    ("train", lambda: bnn.BatchNorm2d(2), True, (3, 2, 3, 2), None),
    ("eval", lambda: bnn.BatchNorm2d(2), False, (3, 2, 3, 2), None),
    ("affine=False", lambda: bnn.BatchNorm2d(2, affine=False), True, (3, 2, 2, 2), None),
    ("bias=False", lambda: bnn.BatchNorm2d(2, bias=False), True, (3, 2, 2, 2), None),
    (
        "no-running-stats-train",
        lambda: bnn.BatchNorm1d(2, track_running_stats=False),
        True,
        (4, 2),
        None,
    ),
    (
        "no-running-stats-eval",
        lambda: bnn.BatchNorm1d(2, track_running_stats=False),
        False,
        (4, 2),
        None,
    ),
    ("momentum=None", lambda: bnn.BatchNorm1d(3, momentum=None), True, (4, 3, 2), None),
    ("eps=0.1", lambda: bnn.BatchNorm1d(3, eps=0.1), True, (4, 3), None),
    ("biased", lambda: bnn.BatchNorm1d(3, running_var_estimator="biased"), True, (4, 3), None),
    ("single-running", lambda: bnn.BatchNorm1d(3, single_sample="running"), True, (1, 3), None),
    ("single-identity", lambda: bnn.BatchNorm1d(3, single_sample="identity"), True, (1, 3), None),
    ("frozen", lambda: bnn.BatchNorm2d(2, frozen=True), True, (2, 2, 2, 2), None),
    ("skip_nonfinite=False", lambda: bnn.BatchNorm1d(3, skip_nonfinite=False), True, (5, 3), None),
    ("channels_last", lambda: bnn.BatchNorm2d(3), True, (2, 3, 2, 2), torch.channels_last),
    ("channels_last_3d", lambda: bnn.BatchNorm3d(2), True, (2, 2, 2, 2, 2), torch.channels_last_3d),
    ("1d-two-values", lambda: bnn.BatchNorm1d(2), True, (2, 2), None),
]


@pytest.mark.parametrize(
    ("factory", "training", "shape", "memory_format"),
    [c[1:] for c in CONFIGS],
    ids=[c[0] for c in CONFIGS],
)
@pytest.mark.slow
def test_gradcheck_and_gradgradcheck(
    factory: Callable[[], bnn.BatchNormNd],
    training: bool,
    shape: tuple[int, ...],
    memory_format: Any,
) -> None:
    g = torch.Generator().manual_seed(0)
    layer = factory().to(F64)
    if layer.running_mean is not None:  # non-trivial population statistics
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1, generator=g)
            layer.running_var.uniform_(0.5, 2, generator=g)
    layer.train(training)
    x = 1 + 2 * torch.randn(shape, generator=g, dtype=F64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    names = [n for n, p in layer.named_parameters() if p is not None]
    params = tuple(
        (torch.rand(layer.num_features, generator=g, dtype=F64) + 0.5).requires_grad_(True)
        for _ in names
    )

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return out

    inputs = (x, *params)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_functional() -> None:
    """The functional form, weight and bias passed directly."""
    x = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    w = torch.rand(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch() -> None:
    """A gradient penalty (d/dx of |dy/dx|^2-like terms) equals torch's double backward."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)
    w = torch.rand(3, generator=g, dtype=F64) + 0.5
    b = torch.randn(3, generator=g, dtype=F64)
    grads = []
    for fn in (torch.nn.functional.batch_norm, batch_norm):
        xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xi, None, None, wi, bi, True)
        (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
        penalty = (gx**2).sum()
        grads.append(torch.autograd.grad(penalty, (xi, wi, bi)))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
