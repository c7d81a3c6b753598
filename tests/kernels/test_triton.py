"""The Triton kernels (bnkit.kernels.gpu) against float64 torch, the NumPy reference and the
portable kernel.

They run on the device named by ``BNKIT_TEST_DEVICE``: ``cpu`` (the default) runs the
kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set here
unless the environment says otherwise), ``cuda`` compiles them for the GPU. Shapes are
small, and the launch plan is shrunk so that even they split into several tiles and
programs per channel (the paths a large input takes on a GPU).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnkit import reference as ref
from bnkit.kernels import (
    Activation,
    Call,
    Chunk,
    Plan,
    batch_norm,
    ghost_chunks,
    gpu,
    ops,
    portable,
    primitive,
)
from bnkit.kernels.gpu import primitives as prim
from tests.helpers import assert_close_to_scale

DEVICE = os.environ.get("BNKIT_TEST_DEVICE", "cpu")
# Triton reads TRITON_INTERPRET once, when it is first imported: set it before that.
_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEVICE == "cpu" and not _IMPORTED_EARLY:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_MISSING = gpu.import_error()

pytestmark = [
    pytest.mark.skipif(_MISSING is not None, reason=f"no Triton: {_MISSING}"),
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="BNKIT_TEST_DEVICE=cuda but no CUDA device",
    ),
    pytest.mark.skipif(
        DEVICE == "cpu" and (_IMPORTED_EARLY or os.environ.get("TRITON_INTERPRET") != "1"),
        reason="CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 before Triton is "
        "imported",
    ),
]

#: agreement relative to max(1, max |expected|), by the dtype of the input
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def small_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles small enough that test shapes take several tiles and programs per channel."""
    monkeypatch.setattr(prim, "TILE", 64)
    monkeypatch.setattr(prim, "CHANNEL_BLOCK", 4)
    monkeypatch.setattr(prim, "MIN_TILES", 1)
    monkeypatch.setattr(prim, "TARGET_PROGRAMS", 12)


def _tensor(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, loc: float = 0.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = loc + torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype).to(DEVICE)


def _in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


#: (shape, layout): 1d (N, C) and (N, C, L), 2d and 3d, NCHW-like and channels-last
SHAPES = [
    ((9, 5), "contiguous"),
    ((4, 3, 11), "contiguous"),
    ((3, 3, 5, 6), "contiguous"),
    ((3, 6, 5, 4), "channels_last"),
    ((2, 3, 3, 4, 3), "contiguous"),
    ((2, 5, 2, 3, 3), "channels_last"),
]
SHAPE_IDS = ["1d-nc", "1d-ncl", "2d", "2d-cl", "3d", "3d-cl"]


def _close(ours: torch.Tensor | None, theirs: torch.Tensor | None, tolerance: float) -> None:
    assert ours is not None
    assert theirs is not None
    assert_close_to_scale(ours.cpu().double(), theirs.cpu().double(), tolerance)


def _float64_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[Any, ...]:
    """(count, mean, biased var) per channel in float64 (the values of x as they are)."""
    values = x.double().movedim(1, 0).reshape(x.shape[1], -1)
    if mask is not None:
        values = values[:, mask.reshape(-1).to(values.device) != 0]
    mean = values.mean(1)
    return values.shape[1], mean, ((values - mean[:, None]) ** 2).mean(1)


# ---- primitives -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize(("shape", "layout"), SHAPES, ids=SHAPE_IDS)
def test_batch_stats_match_float64(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> None:
    """One pass, Chan-merged over tiles and programs: the float64 statistics of the same
    values, the shift the CPU kernel's (x[0, c, 0, ...]), in the compute dtype."""
    x = _in_layout(_tensor(shape, dtype, seed=1, loc=3.0), layout)
    stats = gpu.batch_stats(x)
    count, mean, var = _float64_stats(x)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for value in (stats.count, stats.shift, stats.shifted_mean, stats.var):
        assert value.dtype == compute
        assert value.shape == (shape[1],)
    assert torch.equal(stats.count.cpu(), torch.full((shape[1],), float(count), dtype=compute))
    first = x[(0, slice(None)) + (0,) * (x.dim() - 2)]
    assert torch.equal(stats.shift, first.to(compute))
    tolerance = TOLERANCE[compute]
    _close(stats.mean, mean, tolerance)
    _close(stats.var, var, tolerance)


@settings(max_examples=10)
@given(
    dims=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    loc=st.sampled_from([0.0, 7.0, -300.0]),
    seed=st.integers(0, 2**16),
)
def test_batch_stats_random_shapes(
    dims: list[int], channels_last: bool, dtype: torch.dtype, loc: float, seed: int
) -> None:
    """Any (N, C, *) shape, either layout: the float64 statistics of the same values."""
    shape = (max(dims[0], 2), *dims[1:])
    x = _tensor(shape, dtype, seed=seed, loc=loc)
    if channels_last and x.dim() == 4:
        x = _in_layout(x, "channels_last")
    stats = gpu.batch_stats(x)
    _, mean, var = _float64_stats(x)
    _close(stats.mean, mean, TOLERANCE[dtype])
    _close(stats.var, var, TOLERANCE[dtype])


@pytest.mark.parametrize(("shape", "layout"), [SHAPES[0], SHAPES[2], SHAPES[3]], ids=str)
def test_batch_stats_far_from_zero(shape: tuple[int, ...], layout: str) -> None:
    """float32 data at 1e4 with a spread of 1e-2: the variance keeps float32 accuracy
    (E[x^2] - E[x]^2 would lose all of it)."""
    x = _tensor(shape, torch.float64, seed=2)
    x = _in_layout((1e4 + 1e-2 * x).float(), layout)
    _, _, var = _float64_stats(x)
    stats = gpu.batch_stats(x)
    assert ((stats.var.double().cpu() / var.cpu()) - 1).abs().max() < 1e-4


@pytest.mark.parametrize("as_bytes", [False, True], ids=["bool", "bytes-of-2"])
@pytest.mark.parametrize(("shape", "layout"), SHAPES[:4], ids=SHAPE_IDS[:4])
def test_masked_batch_stats_match_reference(
    shape: tuple[int, ...], layout: str, as_bytes: bool
) -> None:
    """Statistics over the valid positions only (the NumPy reference's), whatever the
    padding holds (inf here); any nonzero byte of a bool mask counts as True."""
    x = _in_layout(_tensor(shape, torch.float32, seed=3, loc=-2.0), layout)
    g = torch.Generator().manual_seed(4)
    valid = torch.rand(shape[:1] + shape[2:], generator=g) > 0.4
    valid.reshape(-1)[1] = True
    x = x.masked_fill(~valid.to(DEVICE).unsqueeze(1), math.inf)
    x = _in_layout(x, layout)
    # The shift is x at the first valid position: make position 0 padding.
    valid.reshape(-1)[0] = False
    x_np = x.cpu().double().numpy()
    expected = ref.batch_stats(np.where(np.isfinite(x_np), x_np, 0.0), valid.numpy())
    mask = (valid.to(torch.uint8) * 2).view(torch.bool) if as_bytes else valid
    stats = gpu.batch_stats(x, mask.to(DEVICE))
    assert torch.all(stats.count.cpu() == expected.count)
    _close(stats.mean, torch.from_numpy(expected.mean), 2e-6)
    _close(stats.var, torch.from_numpy(expected.var), 2e-6)


def _activate64(z: torch.Tensor, name: str | None, param: float | None) -> torch.Tensor:
    if name in (None, "identity"):
        return z
    if name == "relu":
        return torch.relu(z)
    assert param is not None
    if name == "leaky_relu":
        return torch.where(z > 0, z, z * param)
    return torch.where(z > 0, z, torch.expm1(z) * param)


ACTIVATIONS = [(None, None), ("relu", None), ("leaky_relu", 0.2), ("elu", 0.7)]
ACTIVATION_IDS = ["none", "relu", "leaky", "elu"]


def _vectors(c: int, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for _ in "abcd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize(
    ("name", "param", "shape", "layout"),
    [
        (*a, *s)
        for a, s in zip(ACTIVATIONS, [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], strict=True)
    ],
    ids=ACTIVATION_IDS,
)
def test_affine_matches_float64(
    name: str | None, param: float | None, shape: tuple[int, ...], layout: str, dtype: torch.dtype
) -> None:
    """y = act((x - shift) * alpha + beta), computed in float32 (float64) and rounded once,
    in x's dtype and memory format (each activation on another layout)."""
    x = _in_layout(_tensor(shape, dtype, seed=5), layout)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    shift, alpha, beta, _ = _vectors(shape[1], seed=6, dtype=compute)
    y = gpu.affine(x, shift, alpha, beta, name, param)
    assert y.dtype == dtype
    assert y.stride() == x.stride()
    view = [1, -1] + [1] * (x.dim() - 2)
    z = (x.double() - shift.double().view(view)) * alpha.double().view(view)
    expected = _activate64(z + beta.double().view(view), name, param)
    _close(y, expected, TOLERANCE[dtype])


def _slope64(z: torch.Tensor, name: str | None, param: float | None) -> torch.Tensor:
    one = torch.ones_like(z)
    if name in (None, "identity"):
        return one
    if name == "relu":
        return (z > 0).double()
    assert param is not None
    if name == "leaky_relu":
        return torch.where(z > 0, one, one * param)
    return torch.where(z > 0, one, torch.exp(z) * param)


@pytest.mark.parametrize(
    ("dtype", "masked"),
    [(torch.float32, False), (torch.bfloat16, True)],
    ids=["f32", "bf16-masked"],
)
@pytest.mark.parametrize(("name", "param"), ACTIVATIONS, ids=ACTIVATION_IDS)
@pytest.mark.parametrize(("shape", "layout"), [SHAPES[2], SHAPES[3]], ids=["2d", "2d-cl"])
def test_backward_primitives_from_input(
    shape: tuple[int, ...],
    layout: str,
    name: str | None,
    param: float | None,
    dtype: torch.dtype,
    masked: bool,
) -> None:
    """The reductions (sum g', sum g' (x - mean)) and dx = g' alpha + (x - shift) k1 + k0
    (g' alpha at padding), with g' = g act'(z) and z recomputed from x."""
    x = _in_layout(_tensor(shape, dtype, seed=7), layout)
    g = _in_layout(_tensor(shape, dtype, seed=8), layout)
    shift, mean, za, zb = _vectors(shape[1], seed=9)
    alpha, k1, k0, _ = _vectors(shape[1], seed=10)
    valid = None
    if masked:
        valid = torch.rand(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(1)) > 0.5
        valid = valid.to(DEVICE)
    # bytes of 2 viewed as bool: any nonzero byte is valid
    mask = None if valid is None else (valid.to(torch.uint8) * 2).view(torch.bool)
    view = [1, -1] + [1] * (x.dim() - 2)
    d = x.double() - shift.double().view(view)
    z = d * za.double().view(view) + zb.double().view(view)
    gp = g.double() * _slope64(z, name, param)
    dims = [0, *range(2, x.dim())]
    sum_g, sum_gc = gpu.backward_reduce(g, x, shift, mean, name, param, False, za, zb)
    _close(sum_g, gp.sum(dims), 1e-5)
    _close(sum_gc, (gp * (d - mean.double().view(view))).sum(dims), 1e-5)
    dx = gpu.backward_input(g, x, shift, alpha, k1, k0, name, param, False, mask, za, zb)
    through = d * k1.double().view(view) + k0.double().view(view)
    if valid is not None:
        through = torch.where(valid.unsqueeze(1), through, 0.0)
    assert dx.dtype == dtype
    assert dx.stride() == x.stride()
    _close(dx, gp * alpha.double().view(view) + through, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "param"), [("identity", None), *ACTIVATIONS[2:]], ids=str)
@pytest.mark.parametrize(("shape", "layout"), [SHAPES[1], SHAPES[3]], ids=["1d-ncl", "2d-cl"])
def test_backward_primitives_from_output(
    shape: tuple[int, ...], layout: str, name: str, param: float | None, dtype: torch.dtype
) -> None:
    """From the saved output y: z = act^-1(y) and act'(z) recovered per value."""
    y = _in_layout(_tensor(shape, dtype, seed=11), layout)
    if param is not None:  # outputs of the activation: y > -alpha for elu
        y = _activate64(y.double() * 2, name, param).to(dtype)
    g = _in_layout(_tensor(shape, dtype, seed=12), layout)
    centre, zero, alpha, k1 = _vectors(shape[1], seed=13)
    zero = torch.zeros_like(zero)
    k0 = torch.randn(shape[1], dtype=torch.float32).to(DEVICE)
    yd = y.double()
    if name == "identity":
        z, slope = yd, torch.ones_like(yd)
    elif name == "leaky_relu":
        assert param is not None
        z = torch.where(yd > 0, yd, yd / param)
        slope = torch.where(yd > 0, 1.0, param)
    else:
        assert param is not None
        z = torch.where(yd > 0, yd, torch.log1p(yd / param))
        slope = torch.where(yd > 0, 1.0, yd + param)
    view = [1, -1] + [1] * (y.dim() - 2)
    gp = g.double() * slope
    c = z - centre.double().view(view)
    dims = [0, *range(2, y.dim())]
    sum_g, sum_gc = gpu.backward_reduce(g, y, centre, zero, name, param, True)
    _close(sum_g, gp.sum(dims), 1e-5)
    _close(sum_gc, (gp * c).sum(dims), 1e-5)
    dx = gpu.backward_input(g, y, centre, alpha, k1, k0, name, param, True)
    expected = gp * alpha.double().view(view) + c * k1.double().view(view) + k0.double().view(view)
    _close(dx, expected, TOLERANCE[dtype])


@pytest.mark.parametrize(("shape", "layout"), [SHAPES[1], SHAPES[3]], ids=["1d-ncl", "2d-cl"])
def test_saturated_elu_output_contributes_nothing(shape: tuple[int, ...], layout: str) -> None:
    """Where an ELU output is exactly -alpha (log1p(-1) = -inf), the slope is 0: no
    contribution to either sum, and a finite dx, even with an infinite g there."""
    alpha_elu = 0.5
    x = _in_layout(_tensor(shape, torch.float32, seed=14), layout)
    saturated = torch.zeros(x.shape, dtype=torch.bool)
    saturated.view(-1)[::3] = True
    saturated = saturated.to(DEVICE)
    ones = torch.ones(shape[1], device=DEVICE)
    zeros = torch.zeros(shape[1], device=DEVICE)
    y = gpu.affine(x.masked_fill(saturated, -200.0), zeros, ones, zeros, "elu", alpha_elu)
    assert torch.equal(y[saturated], torch.full_like(y[saturated], -alpha_elu))
    g = _in_layout(_tensor(shape, torch.float32, seed=15), layout)
    g_inf = g.masked_fill(saturated, math.inf)
    sum_g, sum_gc = gpu.backward_reduce(g_inf, y, zeros, zeros, "elu", alpha_elu, True)
    yd = y.double()
    live = ~saturated
    z = torch.where(yd > 0, yd, torch.log1p(torch.where(live, yd, 0.0) / alpha_elu))
    gp = torch.where(live, g.double() * torch.where(yd > 0, 1.0, yd + alpha_elu), 0.0)
    dims = [0, *range(2, x.dim())]
    _close(sum_g, gp.sum(dims), 1e-5)
    _close(sum_gc, (gp * torch.where(live, z, 0.0)).sum(dims), 1e-5)
    dx = gpu.backward_input(g_inf, y, zeros, ones, ones, zeros, "elu", alpha_elu, True)
    assert torch.isfinite(dx).all()
    _close(torch.where(live, dx, 0.0), torch.where(live, gp + z, 0.0), 1e-5)


# ---- the kernel through the pipeline ---------------------------------------------------


def _run(
    kernel: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    **options: Any,
) -> dict[str, Any]:
    """Training forward, autograd.grad of (x, weight, bias), and the running statistics."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in (weight, bias) if p is not None]
    w = params[0] if weight is not None else None
    b = params[-1] if bias is not None else None
    channels = x.shape[1]
    running_mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
    running_var = torch.ones(channels, dtype=x.dtype, device=x.device)
    tracked = torch.zeros((), dtype=torch.long, device=x.device)
    mask = options.pop("mask", None)
    result = batch_norm(
        Call(x, running_mean, running_var, w, b, tracked, mask), Plan(True, **options), kernel
    )
    grads = torch.autograd.grad(result.output, [x, *params], dy)
    return {
        "y": result.output,
        "dx": grads[0],
        "dw": grads[1] if w is not None else None,
        "db": grads[-1] if b is not None else None,
        "mean": running_mean,
        "var": running_var,
        "tracked": tracked,
    }


def _compare(
    ours: dict[str, Any], theirs: dict[str, Any], tolerance: float, strides: bool = True
) -> None:
    if strides:
        assert ours["y"].stride() == theirs["y"].stride()
        assert ours["dx"].stride() == theirs["dx"].stride()
    for key, value in theirs.items():
        if value is None:
            assert ours[key] is None
        elif key == "tracked":
            assert torch.equal(ours[key], value)
        else:
            _close(ours[key], value, tolerance)
            assert ours[key].dtype == value.dtype


@pytest.mark.parametrize(("shape", "layout"), SHAPES, ids=SHAPE_IDS)
def test_float64_training_matches_reference(shape: tuple[int, ...], layout: str) -> None:
    """Forward, dx, dgamma, dbeta and the running statistics against NumPy in float64."""
    x = _in_layout(_tensor(shape, torch.float64, seed=16, loc=5.0), layout)
    gamma, beta = (_tensor(shape[1:2], torch.float64, seed=s) for s in (17, 18))
    dy = _tensor(shape, torch.float64, seed=19)
    ours = _run(gpu.KERNEL, x, gamma, beta, dy)
    x_np, gamma_np, beta_np = (t.cpu().numpy() for t in (x, gamma, beta))
    y_ref, cache = ref.batch_norm_train(x_np, gamma_np, beta_np, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_norm_backward(dy.cpu().numpy(), cache)
    stats = ref.batch_stats(x_np)
    channels = shape[1]
    mean_ref, var_ref = ref.update_running_stats(
        np.zeros(channels), np.ones(channels), stats.mean, stats.var, stats.count, 0.1
    )[:2]
    assert ours["y"].stride() == x.stride()
    for key, expected in (
        ("y", y_ref),
        ("dx", dx_ref),
        ("dw", dgamma_ref),
        ("db", dbeta_ref),
        ("mean", mean_ref),
        ("var", var_ref),
    ):
        _close(ours[key], torch.from_numpy(np.asarray(expected)), 1e-10)
    assert int(ours["tracked"]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize(("shape", "layout"), [SHAPES[0], SHAPES[2], SHAPES[3]], ids=str)
def test_training_matches_portable(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> None:
    """Every dtype and layout agrees with the portable kernel (torch operations) to the
    dtype's rounding, output strides included; no affine parameters once."""
    x = _in_layout(_tensor(shape, dtype, seed=20, loc=-1.0), layout)
    weight, bias = (_tensor(shape[1:2], dtype, seed=s) for s in (21, 22))
    dy = _in_layout(_tensor(shape, dtype, seed=23), layout)
    tolerance = TOLERANCE[dtype]
    _compare(
        _run(gpu.KERNEL, x, weight, bias, dy),
        _run(primitive.PORTABLE, x, weight, bias, dy),
        tolerance,
    )
    if dtype == torch.float32:
        _compare(
            _run(gpu.KERNEL, x, None, None, dy),
            _run(primitive.PORTABLE, x, None, None, dy),
            tolerance,
        )


FUSED = [
    Activation("relu", None, True),
    Activation("identity", None, True),
    Activation("identity", None, False),
    Activation("leaky_relu", 0.1, True),
    Activation("leaky_relu", 0.1, False),
    Activation("elu", 0.8, True),
    Activation("elu", 0.8, False),
]
FUSED_IDS = ["relu", "identity-me", "identity", "leaky-me", "leaky", "elu-me", "elu"]


@pytest.mark.parametrize(
    ("activation", "shape", "layout"),
    [(a, *SHAPES[1 + 2 * (i % 2)]) for i, a in enumerate(FUSED)],
    ids=FUSED_IDS,
)
def test_fused_activation_matches_portable(
    activation: Activation, shape: tuple[int, ...], layout: str
) -> None:
    """Each activation, memory-efficient (from the output) or not (from the input),
    NCHW-like or channels-last, with a mask; float64 so that the comparison is tight."""
    x = _in_layout(_tensor(shape, torch.float64, seed=24, loc=0.5), layout)
    weight, bias = (_tensor(shape[1:2], torch.float64, seed=s) for s in (25, 26))
    dy = _in_layout(_tensor(shape, torch.float64, seed=27), layout)
    options: dict[str, Any] = {"activation": activation}
    valid = torch.rand(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(2)) > 0.3
    options["mask"] = valid.to(DEVICE)
    ours = _run(gpu.KERNEL, x, weight, bias, dy, **options)
    _compare(ours, _run(primitive.PORTABLE, x, weight, bias, dy, **options), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_activation_half_and_zero_gamma(dtype: torch.dtype) -> None:
    """bfloat16 from its rounded output; a channel with gamma = 0 keeps the input instead
    (the portable kernel's INVERSION_LIMIT rule), so its gradient stays exact."""
    shape = (3, 4, 3, 5)
    x = _in_layout(_tensor(shape, dtype, seed=28), "channels_last")
    weight, bias = (_tensor(shape[1:2], dtype, seed=s) for s in (29, 30))
    dy = _in_layout(_tensor(shape, dtype, seed=31), "channels_last")
    options = {"activation": Activation("leaky_relu", 0.05, True)}
    ours = _run(gpu.KERNEL, x, weight, bias, dy, **options)
    _compare(ours, _run(primitive.PORTABLE, x, weight, bias, dy, **options), TOLERANCE[dtype])
    weight[1] = 0.0
    ours = _run(gpu.KERNEL, x, weight, bias, dy, **options)
    _compare(ours, _run(primitive.PORTABLE, x, weight, bias, dy, **options), TOLERANCE[dtype])


def test_saturated_elu_keeps_the_input() -> None:
    """A memory-efficient ELU whose output saturates at -alpha (one value far below its
    channel) keeps its input for that call, as the portable kernel: finite gradients,
    those of the layer that keeps its input (and the portable kernel's)."""
    shape = (4, 3, 2, 5)
    x = _tensor(shape, torch.float32, seed=32)
    x[1, 2, 1, 3] = -1e4  # about -6 standard deviations: z = 40 * x_hat, exp(z) = 0
    weight = torch.tensor([1.5, 0.5, 40.0], device=DEVICE)
    bias = torch.zeros(3, device=DEVICE)
    dy = _tensor(shape, torch.float32, seed=33)
    efficient = Activation("elu", 1.0, True)
    ours = _run(gpu.KERNEL, x, weight, bias, dy, activation=efficient)
    assert ours["y"][1, 2, 1, 3] == -1.0
    for key in ("dx", "dw", "db"):
        assert torch.isfinite(ours[key]).all()
    keeps_input = _run(gpu.KERNEL, x, weight, bias, dy, activation=Activation("elu", 1.0, False))
    _compare(ours, keeps_input, 0.0)
    _compare(ours, _run(primitive.PORTABLE, x, weight, bias, dy, activation=efficient), 2e-5)


def test_ghost_batches_match_reference() -> None:
    """Ghost batches (chunks with their own statistics, merged for the update)."""
    shape = (7, 3, 2, 3)
    x = _in_layout(_tensor(shape, torch.float64, seed=34, loc=2.0), "channels_last")
    gamma, beta = (_tensor(shape[1:2], torch.float64, seed=s) for s in (35, 36))
    dy = _tensor(shape, torch.float64, seed=37)
    chunks = [Chunk(start, stop) for start, stop in ghost_chunks(7, 3)]
    ours = _run(gpu.KERNEL, x, gamma, beta, dy, chunks=chunks)
    x_np, gamma_np, beta_np = (t.cpu().numpy() for t in (x, gamma, beta))
    y_ref, cache = ref.ghost_batch_norm_train(x_np, gamma_np, beta_np, 3, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = ref.ghost_batch_norm_backward(dy.cpu().numpy(), cache)
    for key, expected in (("y", y_ref), ("dx", dx_ref), ("dw", dgamma_ref), ("db", dbeta_ref)):
        _close(ours[key], torch.from_numpy(expected), 1e-10)
    theirs = _run(primitive.PORTABLE, x, gamma, beta, dy, chunks=chunks)
    _close(ours["mean"], theirs["mean"], 1e-12)
    _close(ours["var"], theirs["var"], 1e-12)


def _counting_stats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the ``ghosts`` of every Triton statistics launch."""
    calls: list[int] = []
    original = prim._batch_stats_op

    def counting(x: torch.Tensor, mask: Any, ghosts: int) -> Any:
        calls.append(ghosts)
        return original(x, mask, ghosts)

    monkeypatch.setattr(prim, "_batch_stats_op", counting)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_equal_ghost_batches_run_in_one_launch(
    layout: str, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal ghost batches: one statistics launch for all of them (each with its own
    statistics, vectors of ghosts * C values), the same results as one ghost batch at a
    time on the portable kernel and as the NumPy reference."""
    shape = (8, 3) if layout == "2d" else (8, 3, 2, 3)
    x = _tensor(shape, torch.float64, seed=60, loc=2.0)
    x = x if layout == "2d" else _in_layout(x, layout)
    gamma, beta = (_tensor(shape[1:2], torch.float64, seed=s) for s in (61, 62))
    dy = _tensor(shape, torch.float64, seed=63)
    mask = None
    if masked:
        generator = torch.Generator().manual_seed(64)
        mask = (torch.rand((shape[0], *shape[2:]), generator=generator) > 0.3).to(DEVICE)
        mask[::2] = True  # every ghost batch of 2 samples has valid values
    chunks = [Chunk(start, stop) for start, stop in ghost_chunks(8, 2)]
    calls = _counting_stats(monkeypatch)
    ours = _run(gpu.KERNEL, x, gamma, beta, dy, chunks=chunks, mask=mask)
    assert calls == [4]
    assert ours["dx"].stride() == x.stride()  # one dx in x's layout, as torch gives
    theirs = _run(primitive.PORTABLE, x, gamma, beta, dy, chunks=chunks, mask=mask)
    _compare(ours, theirs, 1e-10, strides=False)  # the loop's dx comes from torch.cat
    if mask is None:
        x_np, gamma_np, beta_np = (t.cpu().numpy() for t in (x, gamma, beta))
        y_ref, cache = ref.ghost_batch_norm_train(x_np, gamma_np, beta_np, 2, 1e-5)
        dx_ref, dgamma_ref, dbeta_ref = ref.ghost_batch_norm_backward(dy.cpu().numpy(), cache)
        for key, expected in (("y", y_ref), ("dx", dx_ref), ("dw", dgamma_ref), ("db", dbeta_ref)):
            _close(ours[key], torch.from_numpy(expected), 1e-10)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_one_launch_ghost_batches_with_activation_and_renorm(
    memory_efficient: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused activation and batch renormalization (whose limits apply per ghost batch)
    with ghost batches in one launch match the portable kernel's ghost batches."""
    shape = (6, 4, 3, 2)
    x = _tensor(shape, torch.float32, seed=65, loc=1.0)
    weight, bias = (_tensor(shape[1:2], torch.float32, seed=s) for s in (66, 67))
    dy = _tensor(shape, torch.float32, seed=68)
    chunks = [Chunk(start, stop) for start, stop in ghost_chunks(6, 2)]
    options = {
        "chunks": chunks,
        "activation": Activation("leaky_relu", 0.1, memory_efficient),
        "renorm_limits": (torch.tensor(1.2, device=DEVICE), torch.tensor(0.3, device=DEVICE)),
    }
    calls = _counting_stats(monkeypatch)
    ours = _run(gpu.KERNEL, x, weight, bias, dy, **options)
    assert calls == [3]
    _compare(ours, _run(primitive.PORTABLE, x, weight, bias, dy, **options), 2e-5, strides=False)


def test_unequal_or_single_value_ghost_batches_run_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A smaller last ghost batch (or one normalized otherwise) keeps the loop."""
    x = _tensor((7, 3, 2, 2), torch.float64, seed=69)
    dy = _tensor((7, 3, 2, 2), torch.float64, seed=70)
    calls = _counting_stats(monkeypatch)
    chunks = [Chunk(start, stop) for start, stop in ghost_chunks(7, 3)]
    _run(gpu.KERNEL, x, None, None, dy, chunks=chunks)
    assert calls == [1, 1, 1]


def test_double_backward_through_one_launch_ghost_batches() -> None:
    """Second derivatives (each ghost batch's differentiable backward) match the
    portable kernel's, which runs the ghost batches one at a time."""
    x = _tensor((6, 2, 3), torch.float64, seed=71)
    chunks = [Chunk(start, stop) for start, stop in ghost_chunks(6, 3)]
    results = []
    for kernel in (gpu.KERNEL, primitive.PORTABLE):
        inp = x.detach().clone().requires_grad_()
        y = batch_norm(Call(inp, None, None, None, None), Plan(True, chunks=chunks), kernel).output
        (g,) = torch.autograd.grad(y.pow(3).sum(), inp, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), inp)
        results.append(h)
    _close(results[0], results[1], 1e-10)


def test_layer_with_ghost_batches_runs_them_in_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bnkit.BatchNorm2d(ghost_batch_size=...)`` on tensors the Triton kernels take:
    one statistics launch, and torch's layer applied to each ghost batch in turn."""
    from bnkit import BatchNorm2d

    monkeypatch.setattr(gpu, "FORCED", True)  # as BNKIT_KERNEL=triton at import
    calls = _counting_stats(monkeypatch)
    x = _tensor((8, 3, 2, 2), torch.float64, seed=72, loc=1.0).requires_grad_()
    ours = BatchNorm2d(3, ghost_batch_size=4, dtype=torch.float64, device=DEVICE)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64, device=DEVICE)
    y = ours(x)
    assert calls == [2]
    y_torch = torch.cat([theirs(part) for part in x.split(4)])
    _close(y, y_torch, 1e-12)
    dy = _tensor((8, 3, 2, 2), torch.float64, seed=73)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_torch,) = torch.autograd.grad(y_torch, x, dy)
    _close(dx, dx_torch, 1e-10)


def test_renorm_and_eval_match_portable() -> None:
    """Batch renormalization (a change of the affine parameters, clipped) and inference
    with the running statistics (one affine pass)."""
    shape = (5, 4, 3, 2)
    x = _tensor(shape, torch.float32, seed=38, loc=1.0)
    weight, bias = (_tensor(shape[1:2], torch.float32, seed=s) for s in (39, 40))
    dy = _tensor(shape, torch.float32, seed=41)
    limits = (torch.tensor(1.2, device=DEVICE), torch.tensor(0.3, device=DEVICE))
    results = []
    for kernel in (gpu.KERNEL, primitive.PORTABLE):
        x_ = x.detach().clone().requires_grad_(True)
        w, b = (p.detach().clone().requires_grad_(True) for p in (weight, bias))
        running = (torch.full((4,), 0.5, device=DEVICE), torch.full((4,), 2.0, device=DEVICE))
        plan = Plan(True, renorm_limits=limits)
        out = batch_norm(Call(x_, *running, w, b), plan, kernel).output
        grads = torch.autograd.grad(out, [x_, w, b], dy)
        with torch.no_grad():
            evaluated = batch_norm(Call(x, *running, weight, bias), Plan(False), kernel).output
        results.append([out, *grads, *running, evaluated])
    for ours, theirs in zip(*results, strict=True):
        _close(ours, theirs, 2e-5)


def test_double_backward_goes_through_the_portable_backward() -> None:
    """create_graph=True: the backward is recomputed differentiably (second derivatives)."""
    shape = (4, 3, 5)
    x = _tensor(shape, torch.float64, seed=42)
    results = []
    for kernel in (gpu.KERNEL, primitive.PORTABLE):
        x_ = x.detach().clone().requires_grad_(True)
        out = batch_norm(Call(x_, None, None, None, None), Plan(True), kernel).output
        (dx,) = torch.autograd.grad((out**3).sum(), x_, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x_)
        results.append((dx, ddx))
    for ours, theirs in zip(*results, strict=True):
        _close(ours, theirs, 1e-10)


def test_availability_and_unsupported_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """available() is true where these tests run; forced() reads BNKIT_KERNEL; what the
    kernels do not take (integer or empty inputs, masks of another shape) goes to the
    portable kernel."""
    assert gpu.available()
    monkeypatch.setenv("BNKIT_KERNEL", " Triton ")
    assert gpu._from_environment()
    monkeypatch.setenv("BNKIT_KERNEL", "portable")
    assert not gpu._from_environment()
    monkeypatch.setattr(gpu, "FORCED", True)
    assert gpu.forced()
    assert gpu.supports(torch.zeros(2, 3, device=DEVICE))
    assert not gpu.supports(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
    assert not gpu.supports(torch.zeros(0, 3, device=DEVICE))
    assert not gpu.supports(torch.zeros(2, 3, 4, device=DEVICE), torch.ones(2, 5, dtype=torch.bool))
    x = _tensor((3, 2, 4), torch.float32, seed=43)
    strided = x[:, :, ::2]  # copied, then the kernel
    _close(gpu.KERNEL.batch_stats(strided).var, portable.batch_stats(strided).var, 1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile needs compiled Triton (a GPU)")
def test_compile_traces_into_the_kernels() -> None:
    """The primitives are triton_ops: a full graph compiles with them and agrees with eager."""
    prim.register_ops()
    x = _tensor((4, 3, 5, 6), torch.float32, seed=44)
    shift, alpha, beta, _ = _vectors(3, seed=45)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = gpu.batch_stats(x)
        return gpu.affine(x, shift, alpha, beta, "elu", 0.5) * 2, stats.var

    compiled = torch.compile(step, fullgraph=True)
    for ours, theirs in zip(compiled(x), step(x), strict=True):
        _close(ours, theirs, 1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_layer_dispatches_to_triton_when_asked(
    monkeypatch: pytest.MonkeyPatch, training: bool
) -> None:
    """``BNKIT_KERNEL=triton`` routes the layer itself (not only the kernel API) to the
    Triton kernels, and the result matches torch's layer: outputs, input and parameter
    gradients, running statistics."""
    from bnkit import BatchNorm2d
    from bnkit.kernels import select_kernel

    monkeypatch.setattr(gpu, "FORCED", True)  # as BNKIT_KERNEL=triton at import
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    assert select_kernel(x) is ops.KERNEL
    assert ops.native_passes(x) is gpu.PRIMITIVES
    ours = BatchNorm2d(3, dtype=torch.float64, device=DEVICE).train(training)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64, device=DEVICE).train(training)
    x_ours, x_theirs = (x.clone().requires_grad_() for _ in range(2))
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    if training:  # the output's node is the shared autograd Function on Triton's passes
        assert type(y_ours.grad_fn).__name__ == "_NormalizeBackward"
        assert y_ours.grad_fn.prims is ops.OPERATORS
    dy = torch.randn_like(x)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    torch.testing.assert_close(y_ours, y_theirs)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
