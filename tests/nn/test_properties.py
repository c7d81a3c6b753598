"""Property-based tests: random shapes and options against torch, and batch norm's invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnkit.functional import batch_norm
from tests.nn.util import assert_matches, clone_input, condition, input_grad_scale, twin_layers

F64 = torch.float64


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, ...]:
    rank = draw(st.integers(2, 5))
    dims = [draw(st.integers(1, 5)), draw(st.integers(1, 4))]
    dims += [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    if math.prod([dims[0], *dims[2:]]) == 1:  # one value per channel: its own tests
        dims[0] = 2
    return tuple(dims)


@given(
    shape=shapes(),
    momentum=st.sampled_from([0.0, 0.1, 0.5, 1.0, None]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    affine=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    channels_last=st.booleans(),
    loc=st.floats(-100, 100),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_random_configurations_match_torch(
    shape: tuple[int, ...],
    momentum: float | None,
    eps: float,
    affine: bool,
    bias: bool,
    track: bool,
    channels_last: bool,
    loc: float,
    log_scale: float,
    seed: int,
) -> None:
    kwargs = {
        "momentum": momentum,
        "eps": eps,
        "affine": affine,
        "bias": bias,
        "track_running_stats": track,
    }
    theirs, ours = twin_layers(len(shape), shape[1], F64, torch_kwargs=kwargs)
    g = torch.Generator().manual_seed(seed)
    if affine:
        with torch.no_grad():
            for layer in (theirs, ours):
                g.manual_seed(seed + 1)
                layer.weight.normal_(generator=g)
                if bias:
                    layer.bias.normal_(generator=g)
    g.manual_seed(seed)
    for step in range(3):
        training = step < 2
        theirs.train(training)
        ours.train(training)
        x = loc + 10**log_scale * torch.randn(shape, generator=g, dtype=F64)
        if channels_last and x.dim() in (4, 5):
            x = x.contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        cond = condition(x)
        x_theirs, x_ours = clone_input(x), clone_input(x)
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        assert y_ours.stride() == y_theirs.stride()
        assert_matches(y_ours, y_theirs, cond=cond, what="output")
        dy = torch.randn(shape, generator=g, dtype=F64)
        y_theirs.backward(dy)
        y_ours.backward(dy)
        scale = input_grad_scale(x, dy, theirs.weight, eps)
        assert_matches(x_ours.grad, x_theirs.grad, cond=cond, scale=scale, what="input grad")
        # the parameter gradients are sums of count terms of size |dy| (* |x_hat|): rounding
        # is relative to those terms, not to a sum that may cancel
        dims = [0, *range(2, x.dim())]
        terms = float(dy.abs().sum(dims).max())
        for name in ("weight", "bias"):
            p_theirs, p_ours = getattr(theirs, name), getattr(ours, name)
            if p_theirs is not None:
                assert_matches(p_ours.grad, p_theirs.grad, cond=cond, scale=terms, what=name)
                p_theirs.grad = p_ours.grad = None
        if track:
            assert_matches(ours.running_mean, theirs.running_mean, cond=cond)
            assert_matches(ours.running_var, theirs.running_var, cond=cond)
            assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@given(shape=shapes(), seed=st.integers(0, 2**16), loc=st.floats(-1e3, 1e3))
def test_training_output_has_zero_mean_and_unit_variance(
    shape: tuple[int, ...], seed: int, loc: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = loc + torch.rand(shape[1], dtype=F64, generator=g).view(1, -1, *[1] * (len(shape) - 2)) * 5
    x = x + torch.randn(shape, generator=g, dtype=F64)
    eps = 1e-12
    y = batch_norm(x, None, None, training=True, eps=eps)
    dims = [0, *range(2, len(shape))]
    assert torch.allclose(y.mean(dims), torch.zeros(shape[1], dtype=F64), atol=1e-9)
    var = x.var(dims, correction=0)
    expected = var / (var + eps)  # 1 up to eps
    assert torch.allclose(y.var(dims, correction=0), expected, rtol=1e-9)


@given(
    shape=shapes(),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 100).flatmap(lambda s: st.sampled_from([s, -s])),
    shift=st.floats(-1e3, 1e3),
)
def test_per_channel_affine_change_of_input_leaves_output_unchanged(
    shape: tuple[int, ...], seed: int, scale: float, shift: float
) -> None:
    """BN(a * x + b; eps * a^2) = sign(a) * BN(x; eps) per channel: normalization removes
    any affine change of its input (eps scales with the variance)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps)
    y2 = batch_norm(scale * x + shift, None, None, training=True, eps=eps * scale**2)
    sign = 1.0 if scale > 0 else -1.0
    # Rounding a * x + b loses eps64 * |b| / |a| against each channel's spread.
    spread = x.std([0, *range(2, len(shape))], correction=0).min().item()
    cond = (x.abs().max().item() + abs(shift) / abs(scale)) / max(spread, 1e-300)
    tolerance = 1e-12 + 64 * torch.finfo(F64).eps * cond
    assert torch.allclose(y2, sign * y, atol=tolerance, rtol=0)


def _masked_oracle(
    x: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: str
) -> torch.Tensor:
    """Masked batch norm + activation in plain float64 torch operations (autograd gives the
    gradients): statistics over the valid positions, the same affine map everywhere."""
    keep = valid.unsqueeze(1).to(F64)
    count = keep.sum((0, 2))
    mean = (x * keep).sum((0, 2)) / count
    var = (((x - mean.view(1, -1, 1)) ** 2) * keep).sum((0, 2)) / count
    z = (x - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + 1e-5)
    z = z * weight.view(1, -1, 1) + bias.view(1, -1, 1)
    if act == "elu":
        return torch.nn.functional.elu(z)
    return torch.nn.functional.leaky_relu(z, 0.01)


@given(
    rows=st.integers(2, 12),
    channels=st.integers(1, 4),
    length=st.integers(1, 40),
    act=st.sampled_from(["elu", "leaky_relu"]),
    memory_efficient=st.booleans(),
    bias=st.floats(-60, 2),
    byte=st.integers(1, 255),
    seed=st.integers(0, 2**16),
)
def test_fused_activation_with_odd_mask_bytes_matches_oracle(
    rows: int,
    channels: int,
    length: int,
    act: str,
    memory_efficient: bool,
    bias: float,
    byte: int,
    seed: int,
) -> None:
    """Saturating activations (a bias down to -60 drives elu to its floor) and masks whose
    True bytes are any nonzero value, against a float64 oracle: finite, exact gradients."""
    import bnkit

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, length, generator=g, dtype=F64)
    keep = torch.rand(rows, length, generator=g) < 0.7
    keep[0, 0] = keep[-1, -1] = True  # at least two valid values per channel
    raw = keep.to(torch.uint8) * byte
    layer = bnkit.BatchNorm1d(channels, activation=act, memory_efficient=memory_efficient)
    layer = layer.to(F64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=g)
        layer.bias.fill_(bias)
    x_ours, x_oracle = clone_input(x), clone_input(x)
    y = layer(x_ours, raw.view(torch.bool))
    expected = _masked_oracle(x_oracle, keep, layer.weight, layer.bias, act)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    dy = torch.randn(y.shape, generator=g, dtype=F64)
    y.backward(dy)
    expected.backward(dy)
    assert x_ours.grad is not None
    assert x_oracle.grad is not None
    assert torch.isfinite(x_ours.grad).all()
    torch.testing.assert_close(x_ours.grad, x_oracle.grad, rtol=1e-7, atol=1e-9)
