"""The kernel interface: statistics that merge, and the pipeline's pieces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bnkit.errors import ShapeError
from bnkit.kernels import (
    BatchStats,
    Call,
    Plan,
    batch_norm,
    compute_dtype,
    merge_stats,
    portable,
    primitive,
    select_kernel,
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(12, 3), (6, 4, 5), (4, 2, 3, 3)])
def test_batch_stats_match_mean_and_variance(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = 5 + 3 * torch.randn(shape, dtype=torch.float64)
    stats = portable.batch_stats(x.to(dtype))
    dims = [0, *range(2, len(shape))]
    x64 = x.to(dtype).double()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert stats.var.dtype == compute_dtype(dtype)
    assert torch.allclose(stats.mean.double(), x64.mean(dims), rtol=rtol)
    assert torch.allclose(stats.var.double(), x64.var(dims, correction=0), rtol=rtol)
    assert torch.allclose(stats.unbiased_var.double(), x64.var(dims, correction=1), rtol=rtol)
    assert torch.equal(stats.count, torch.full((shape[1],), x[:, 0].numel(), dtype=stats.var.dtype))


@pytest.mark.parametrize("splits", [[2, 3, 7], [1, 11], [6, 6]])
def test_merged_shard_statistics_equal_whole_batch(splits: list[int]) -> None:
    x = 1e3 + torch.randn(12, 4, 3, dtype=torch.float64)
    parts = [portable.batch_stats(chunk) for chunk in torch.split(x, splits)]
    merged = merge_stats(parts)
    whole = portable.batch_stats(x)
    assert torch.equal(merged.count, whole.count)
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-14)
    assert torch.allclose(merged.var, whole.var, rtol=1e-10)


def test_merge_far_from_zero_in_float32() -> None:
    """Shards of float32 data at 1e4 with spread 1e-2 merge without cancellation."""
    x = (1e4 + 1e-2 * torch.randn(64, 3, dtype=torch.float64)).float()
    merged = merge_stats([portable.batch_stats(x[:20]), portable.batch_stats(x[20:])])
    exact_var = x.double().var(0, correction=0)
    assert torch.allclose(merged.var.double(), exact_var, rtol=1e-4)


def test_merge_stats_errors() -> None:
    with pytest.raises(ShapeError, match="at least one shard"):
        merge_stats([])
    a = portable.batch_stats(torch.randn(4, 3))
    b = portable.batch_stats(torch.randn(4, 2))
    with pytest.raises(ShapeError, match="same number of channels, got 3, 2"):
        merge_stats([a, b])


def test_pipeline_with_explicit_kernel() -> None:
    """The pipeline runs any object with the kernel's four methods."""
    calls: list[str] = []

    class Recording(primitive.PortableKernel):
        def batch_stats(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> BatchStats:
            calls.append("stats")
            return super().batch_stats(x, mask)

    x = torch.randn(5, 3, dtype=torch.float64)
    running_mean, running_var = (
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    result = batch_norm(
        Call(x, running_mean, running_var, None, None),
        Plan(True, momentum=1.0, skip_nonfinite=True),
        Recording(),
    )
    assert calls == ["stats"]
    assert result.recorded is not None
    assert bool(result.recorded)
    assert torch.allclose(running_mean, x.mean(0))
    assert torch.allclose(running_var, x.var(0))
    assert select_kernel(x.half()) is primitive.PORTABLE  # half precision: the portable kernel


@pytest.mark.slow
def test_without_the_c_library_everything_runs_on_the_portable_kernel() -> None:
    """BNKIT_NATIVE=0 (or no C compiler): no library is loaded, and the layer, its
    gradients, masks and 16-bit inputs still match torch through the portable kernel."""
    script = """
import torch
import bnkit
from bnkit.kernels import native, primitive, select_kernel
from bnkit.kernels import express
x = torch.randn(8, 16, 12, 12, dtype=torch.float64, requires_grad=True)
assert native.library() is None and "BNKIT_NATIVE=0" in native.load_error()
assert select_kernel(x) is primitive.PORTABLE
assert express.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, None,
                          express.Flags()) is None
ours, theirs = bnkit.BatchNorm2d(16).double(), torch.nn.BatchNorm2d(16).double()
y, y_torch = ours(x), theirs(x)
g = torch.autograd.grad(y.square().sum(), x)[0]
g_torch = torch.autograd.grad(y_torch.square().sum(), x)[0]
assert torch.allclose(y, y_torch, atol=1e-12) and torch.allclose(g, g_torch, atol=1e-10)
assert torch.allclose(ours.running_var, theirs.running_var, atol=1e-14)
mask = torch.rand(8, 12, 12) > 0.3
assert torch.isfinite(ours(x, mask=mask)).all()
assert ours.float()(torch.randn(4, 16, 5, 5).bfloat16()).dtype == torch.bfloat16
print("ok")
"""
    env = {**os.environ, "BNKIT_NATIVE": "0"}
    process = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "ok"
