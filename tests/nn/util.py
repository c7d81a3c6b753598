"""Helpers shared by the layer tests: twin layers and tolerances that say where they come from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

import bnkit.nn as bnn
from tests.cases import Case

TORCH_CLASSES: dict[int, type[torch.nn.Module]] = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
BNKIT_CLASSES: dict[int, type[bnn.BatchNormNd]] = {
    2: bnn.BatchNorm1d,
    3: bnn.BatchNorm1d,
    4: bnn.BatchNorm2d,
    5: bnn.BatchNorm3d,
}
NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}

# What each dtype allows relative to the largest value compared, for well-conditioned data.
# float64: the project's goal (1e-12); float32: a few dozen ulps (torch sums naively, we don't).
BASE_RTOL = {torch.float64: 1e-12, torch.float32: 4e-6}


def twin_layers(
    rank: int,
    channels: int,
    dtype: torch.dtype,
    *,
    torch_kwargs: dict[str, Any] | None = None,
    bnkit_kwargs: dict[str, Any] | None = None,
    params: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.nn.Module, bnn.BatchNormNd]:
    """A torch layer and a bnkit layer with the same options and the same parameters."""
    torch_kwargs = dict(torch_kwargs or {})
    theirs = TORCH_CLASSES[rank](channels, dtype=dtype, **torch_kwargs)
    ours = BNKIT_CLASSES[rank](channels, dtype=dtype, **torch_kwargs, **(bnkit_kwargs or {}))
    if params is not None:
        with torch.no_grad():
            for layer in (theirs, ours):
                if layer.weight is not None:
                    layer.weight.copy_(torch.from_numpy(params[0]))
                if layer.bias is not None:
                    layer.bias.copy_(torch.from_numpy(params[1]))
    return theirs, ours


def case_input(case: Case, seed: int, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(case.input(seed, NUMPY_DTYPES[dtype]))


def condition(x: Tensor) -> float:
    """max |x| / smallest channel std: how many digits torch's folded x * alpha + beta loses.

    torch normalizes as x * alpha + (beta - mean * alpha); both terms are of size
    |x| * alpha ~ |x| / std, so its rounding error is about eps * |x| / std relative to the
    output. Comparisons with torch have to allow for that error (ours avoids it).
    """
    x64 = x.detach().double()
    dims = [0, *range(2, x.dim())]
    std = (
        x64.std(dim=dims, correction=0).min().item()
        if x64.shape[0] * x64[0, 0].numel() > 1
        else 1.0
    )
    return max(1.0, x64.abs().max().item() / max(std, 1e-300))


def input_grad_scale(x: Tensor, dy: Tensor, weight: Tensor | None, eps: float) -> float:
    """The size of the terms the input gradient is made of: |dy| * |gamma| / std.

    dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)) can be far smaller than its
    terms (it is exactly 0 for two values per channel), so rounding is relative to them.
    """
    x64 = x.detach().double()
    dims = [0, *range(2, x.dim())]
    var = x64.var(dim=dims, correction=0).min().item()
    gamma = 1.0 if weight is None else weight.detach().double().abs().max().item()
    return float(dy.detach().double().abs().max().item() * gamma / (var + eps) ** 0.5)


def assert_matches(
    ours: Tensor, theirs: Tensor, *, cond: float = 1.0, scale: float = 1.0, what: str = ""
) -> None:
    """ours == theirs to the dtype's tolerance, relative to the largest value compared (or to
    ``scale`` if larger) and scaled by the conditioning of the data (see :func:`condition`)."""
    assert ours.shape == theirs.shape, what
    assert ours.dtype == theirs.dtype, what
    if ours.numel() == 0:
        return
    dtype = theirs.dtype
    eps = torch.finfo(dtype).eps
    rtol = max(BASE_RTOL.get(dtype, 1e-2), 16 * eps * cond)
    scale = max(1.0, scale, theirs.detach().double().abs().max().item())
    err = (ours.detach().double() - theirs.detach().double()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol * scale:.3g}"


def clone_input(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)
