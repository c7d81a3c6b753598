"""Numerics: stable statistics far from zero, and half-precision inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnkit.nn as bnn
from bnkit.functional import batch_norm
from tests.cases import CASE_IDS, CASES, Case
from tests.nn.util import BNKIT_CLASSES, case_input, clone_input


def _offset_input(
    loc: float, spread: float, shape: tuple[int, ...] = (32, 8, 12, 12)
) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    channel_loc = loc * (1 + 0.1 * torch.rand(shape[1], generator=g, dtype=torch.float64))
    view = (1, -1) + (1,) * (len(shape) - 2)
    x = channel_loc.view(view) + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    return x.float()


def _normalized_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    return (y.double() - exact).abs().max().item()


def test_stable_statistics_far_from_zero() -> None:
    """Channels at 1e4 with spread 1e-2 in float32: the normalized output must be within 1e-3
    of the float64 result on the same (float32) input. torch's CPU kernel is measured on the
    same data: ours must not be worse."""
    x = _offset_input(1e4, 1e-2)
    exact = F.batch_norm(x.double(), None, None, training=True)
    ours = _normalized_error(batch_norm(x, None, None, training=True), exact)
    theirs = _normalized_error(F.batch_norm(x, None, None, training=True), exact)
    assert ours <= 1e-3, f"bnkit float32 error {ours:.2e} (torch: {theirs:.2e})"
    assert ours <= max(theirs, 1e-5), f"bnkit {ours:.2e} worse than torch {theirs:.2e}"


def test_stable_running_stats_and_eval_far_from_zero() -> None:
    x = _offset_input(1e4, 1e-2)
    layer32 = bnn.BatchNorm2d(8, momentum=1.0)
    layer64 = bnn.BatchNorm2d(8, momentum=1.0, dtype=torch.float64)
    layer32(x)
    layer64(x.double())
    assert torch.allclose(layer32.running_mean.double(), layer64.running_mean, rtol=1e-7, atol=0)
    assert torch.allclose(layer32.running_var.double(), layer64.running_var, rtol=1e-4, atol=0)
    # Eval with the float32 running statistics: compare with float64 arithmetic on the same
    # float32 statistics.
    layer32.eval()
    exact = F.batch_norm(
        x.double(), layer32.running_mean.double(), layer32.running_var.double(), training=False
    )
    assert _normalized_error(layer32(x), exact) <= 1e-3


def test_stable_gradients_far_from_zero() -> None:
    x = _offset_input(1e4, 1e-2, shape=(16, 4, 6, 6))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x32, x64 = clone_input(x), clone_input(x.double())
    batch_norm(x32, None, None, training=True).backward(dy)
    batch_norm(x64, None, None, training=True).backward(dy.double())
    scale = x64.grad.abs().max().item()
    assert (x32.grad.double() - x64.grad).abs().max().item() <= 1e-3 * scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_is_float64_to_float32_rounding(case: Case) -> None:
    """Over every case (offsets and scales included), our float32 forward and input gradient
    agree with our float64 ones on the same float32 input to a few float32 ulps (torch does
    not, for the offset case)."""
    x = case_input(case, 0, torch.float32)
    gamma, beta = (torch.from_numpy(p) for p in case.params())
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for dtype in (torch.float32, torch.float64):
        xi = clone_input(x.to(dtype))
        y = batch_norm(xi, None, None, gamma.to(dtype), beta.to(dtype), training=True, eps=case.eps)
        y.backward(dy.to(dtype))
        results[dtype] = (y.double(), xi.grad.double())
    for got, exact in zip(results[torch.float32], results[torch.float64], strict=True):
        assert (got - exact).abs().max().item() <= 2e-5 * max(1.0, exact.abs().max().item())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", [(16, 4), (4, 4, 6, 5), (2, 4, 3, 4, 2)])
def test_half_input_uses_float32_statistics(shape: tuple[int, ...], half: torch.dtype) -> None:
    """A float32 layer fed half precision: output in the input's dtype, computed from
    float32 statistics (equal to the float32 computation on the upcast input, rounded once),
    running statistics stay float32."""
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(shape, generator=g)).to(half)
    cls = BNKIT_CLASSES[len(shape)]
    layer, layer32 = cls(4), cls(4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.uniform_(-1, 1, generator=g)
    layer32.load_state_dict(layer.state_dict())
    for training in (True, False):
        layer.train(training)
        layer32.train(training)
        xh, x32 = clone_input(x), clone_input(x.float())
        y, y32 = layer(xh), layer32(x32)
        assert y.dtype == half
        assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
        ulp = torch.finfo(half).eps * y32.abs().clamp_min(1)
        assert ((y.float() - y32).abs() <= ulp).all()  # one rounding of the float32 result
        assert torch.equal(layer.running_mean, layer32.running_mean)
        assert torch.equal(layer.running_var, layer32.running_var)
        dy = torch.randn(shape, generator=g).to(half)
        y.backward(dy)
        y32.backward(dy.float())
        assert xh.grad.dtype == half
        assert layer.weight.grad.dtype == torch.float32
        assert torch.allclose(layer.weight.grad, layer32.weight.grad, rtol=1e-5, atol=1e-5)
        ulp = torch.finfo(half).eps * x32.grad.abs().clamp_min(1e-2)
        assert ((xh.grad.float() - x32.grad).abs() <= 2 * ulp).all()
        for p in (*layer.parameters(), *layer32.parameters()):
            p.grad = None


def test_half_layer_keeps_half_buffers() -> None:
    layer = bnn.BatchNorm2d(3).half()
    x = torch.randn(4, 3, 2, 2).half()
    y = layer(x)
    assert y.dtype == layer.running_mean.dtype == torch.float16
    reference = F.batch_norm(x.float(), None, None, training=True)
    assert torch.allclose(y.float(), reference, atol=4e-3)
