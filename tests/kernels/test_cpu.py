"""The fast CPU kernel against the portable kernel and the NumPy reference."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnkit
from bnkit import reference as ref
from bnkit.functional import batch_norm as functional_batch_norm
from bnkit.kernels import (
    Activation,
    Call,
    Plan,
    Update,
    batch_norm,
    cpu,
    native,
    ops,
    portable,
    primitive,
    select_kernel,
)
from tests.cases import CASE_IDS, CASES, Case
from tests.helpers import assert_close_to_scale

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native CPU kernel: {native.load_error()}"
)

DTYPES = [torch.float32, torch.float64]
#: outputs and gradients agree to this, relative to their magnitude
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(autouse=True)
def every_size() -> Iterator[None]:
    """The kernel leaves tiny tensors to the portable one; the tests want it on all."""
    saved = cpu.SMALL_THRESHOLD
    cpu.SMALL_THRESHOLD = 0
    yield
    cpu.SMALL_THRESHOLD = saved


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    out = [x]
    if x.dim() == 4:
        out.append(x.contiguous(memory_format=torch.channels_last))
    if x.dim() == 5:
        out.append(x.contiguous(memory_format=torch.channels_last_3d))
    return out


def _close(ours: torch.Tensor | None, theirs: torch.Tensor | None, dtype: torch.dtype) -> None:
    assert_close_to_scale(ours, theirs, TOLERANCE[dtype])


def _run(
    kernel: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: Activation | None = None,
) -> dict[str, Any]:
    """Training forward + backward and the running statistics through the pipeline."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in (weight, bias) if p is not None]
    w = params[0] if weight is not None else None
    b = params[-1] if bias is not None else None
    channels = x.shape[1]
    running_mean = torch.zeros(channels, dtype=x.dtype)
    running_var = torch.ones(channels, dtype=x.dtype)
    tracked = torch.zeros((), dtype=torch.long)
    result = batch_norm(
        Call(x, running_mean, running_var, w, b, tracked),
        Plan(True, momentum, eps, activation=activation),
        kernel,
    )
    result.output.backward(dy)
    return {
        "y": result.output,
        "dx": x.grad,
        "dw": None if w is None else w.grad,
        "db": None if b is None else b.grad,
        "mean": running_mean,
        "var": running_var,
    }


def _compare_with_portable(
    x: torch.Tensor, case: Case | None = None, activation: Activation | None = None
) -> None:
    dtype = x.dtype
    channels = x.shape[1]
    g = torch.Generator().manual_seed(3)
    affine = case is None or case.affine
    weight = torch.randn(channels, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(channels, generator=g, dtype=dtype) if affine else None
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    options: dict[str, Any] = {}
    if case is not None:
        options = {"momentum": case.momentum, "eps": case.eps}
    assert cpu.supports(x)
    ours = _run(cpu.KERNEL, x, weight, bias, dy, activation=activation, **options)
    theirs = _run(primitive.PORTABLE, x, weight, bias, dy, activation=activation, **options)
    assert ours["y"].stride() == theirs["y"].stride()
    for key in ("y", "dx", "dw", "db", "mean", "var"):
        if theirs[key] is None:
            assert ours[key] is None
        else:
            _close(ours[key], theirs[key], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cases_match_portable(case: Case, dtype: torch.dtype) -> None:
    """Outputs, gradients and running statistics on the shared case table, both layouts."""
    for x in _layouts(torch.from_numpy(case.input(dtype=np.float64)).to(dtype)):
        _compare_with_portable(x, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cases_match_reference(case: Case) -> None:
    """float64 training forward and backward against the NumPy oracle."""
    x_np = case.input()
    gamma, beta = case.params()
    dy_np = np.random.default_rng(7).standard_normal(x_np.shape)
    y_ref, cache = ref.batch_norm_train(x_np, gamma, beta, case.eps)
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_norm_backward(dy_np, cache)
    for x in _layouts(torch.from_numpy(x_np)):
        x = x.detach().clone().requires_grad_(True)  # clone keeps the layout
        w = torch.from_numpy(gamma).requires_grad_(True)
        b = torch.from_numpy(beta).requires_grad_(True)
        assert select_kernel(x) is ops.KERNEL
        assert ops.native_passes(x) is cpu.PRIMITIVES
        y = functional_batch_norm(x, None, None, w, b, training=True, eps=case.eps)
        y.backward(torch.from_numpy(dy_np))
        for ours, theirs in (
            (y, y_ref),
            (x.grad, dx_ref),
            (w.grad, dgamma_ref),
            (b.grad, dbeta_ref),
        ):
            assert ours is not None
            np.testing.assert_allclose(ours.detach().numpy(), theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_relu_matches_portable(dtype: torch.dtype, layout: str) -> None:
    x = torch.randn(6, 5, 7, 4, dtype=dtype) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _compare_with_portable(x, activation=Activation("relu"))
    _compare_with_portable(
        x.contiguous().view(6, 5, 28), activation=Activation("relu", None, False)
    )


@st.composite
def _shapes(draw: st.DrawFn) -> tuple[int, ...]:
    rank = draw(st.integers(2, 5))
    dims = [draw(st.integers(1, 9)), draw(st.integers(1, 40))]
    dims += [draw(st.integers(1, 7)) for _ in range(rank - 2)]
    if np.prod([dims[0], *dims[2:]]) == 1:
        dims[0] = 2
    return tuple(dims)


@given(
    shape=_shapes(),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
    relu=st.booleans(),
    loc=st.sampled_from([0.0, 5.0, -300.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_portable(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    relu: bool,
    loc: float,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (loc + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = _layouts(x)[-1]
    _compare_with_portable(x, activation=Activation("relu") if relu else None)


def test_many_threads_and_few_channels_agree() -> None:
    """Splitting a channel's rows over threads (few channels) gives the same statistics."""
    x = torch.randn(64, 1, 40, 40, dtype=torch.float64) + 3
    single = cpu.KERNEL.batch_stats(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        parallel = cpu.KERNEL.batch_stats(x)
    finally:
        torch.set_num_threads(threads)
    reference = portable.batch_stats(x)
    for stats in (single, parallel):
        assert torch.equal(stats.shift, reference.shift)
        torch.testing.assert_close(stats.shifted_mean, reference.shifted_mean, rtol=0, atol=1e-13)
        torch.testing.assert_close(stats.var, reference.var, rtol=1e-12, atol=0)
        assert torch.equal(stats.count, reference.count)


@pytest.mark.parametrize("shape", [(32, 8, 12, 12), (4096, 3)])
def test_precision_far_from_zero(shape: tuple[int, ...]) -> None:
    """float32 channels at 1e4 with spread 1e-2 normalize within 1e-3 of float64, in
    training and with the resulting running statistics in eval."""
    g = torch.Generator().manual_seed(0)
    view = (1, -1) + (1,) * (len(shape) - 2)
    channel_loc = 1e4 * (1 + 0.1 * torch.rand(shape[1], generator=g, dtype=torch.float64))
    x64 = channel_loc.view(view) + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
    x = x64.float()
    assert select_kernel(x) is ops.KERNEL
    assert ops.native_passes(x) is cpu.PRIMITIVES
    exact = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    mean, var = torch.zeros(shape[1]), torch.ones(shape[1])
    y = functional_batch_norm(x, mean, var, training=True, momentum=1.0)
    assert (y.double() - exact).abs().max().item() <= 1e-3
    y_eval = functional_batch_norm(x, mean, var, training=False)
    exact_eval = torch.nn.functional.batch_norm(
        x.double(), mean.double(), var.double(), training=False
    )
    assert (y_eval.double() - exact_eval).abs().max().item() <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_eval_matches_portable(dtype: torch.dtype) -> None:
    x = torch.randn(4, 6, 5, 5, dtype=dtype)
    mean, var = torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5
    weight, bias = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    for inp in _layouts(x):
        for w, b in ((weight, bias), (None, None)):
            ours = cpu.KERNEL.normalize_population(inp, mean, var, w, b, 1e-5)
            theirs = primitive.PORTABLE.normalize_population(inp, mean, var, w, b, 1e-5)
            assert ours.stride() == theirs.stride()
            _close(ours, theirs, dtype)


def test_eval_with_gradients_takes_the_portable_path() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = cpu.KERNEL.normalize_population(
        x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), w, None, 1e-5
    )
    y.sum().backward()
    assert x.grad is not None
    assert w.grad is not None


def test_double_backward_matches_portable() -> None:
    """create_graph=True: the backward is the portable one, differentiable twice."""
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert select_kernel(x) is ops.KERNEL
    assert ops.native_passes(x) is cpu.PRIMITIVES
    torch.autograd.gradgradcheck(
        lambda x, w: functional_batch_norm(x, None, None, w, None, training=True), (x, w)
    )
    torch.autograd.gradcheck(
        lambda x, w: functional_batch_norm(x, None, None, w, None, training=True), (x, w)
    )


def test_gradcheck_fused_relu() -> None:
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b: functional_batch_norm(
            x, None, None, w, b, training=True, activation="relu"
        ),
        (x, w, b),
    )


def test_unsupported_inputs_go_to_the_portable_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(8, 4, 10, 10)
    for x in (big, big.half(), big.bfloat16(), big.double()):
        assert select_kernel(x) is ops.KERNEL
        assert ops.native_passes(x) is cpu.PRIMITIVES
    for x in (
        big.transpose(2, 3),  # neither NCHW- nor channels-last-contiguous
        big[:, :, ::2],
        torch.randn(3),
        big.to(torch.int64),
    ):
        assert select_kernel(x) is primitive.PORTABLE
    monkeypatch.setattr(cpu, "SMALL_THRESHOLD", 10**9)
    assert select_kernel(big) is primitive.PORTABLE


def _masked_case(
    layout: str, dtype: torch.dtype, pattern: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """An input in ``layout`` and a mask: random, with its first positions padding (the
    shift is the first valid value), or with whole samples of padding."""
    g = torch.Generator().manual_seed(seed)
    shape = {"ncl": (6, 3, 40), "nchw": (4, 5, 6, 7), "channels_last": (4, 5, 6, 7), "nc": (300, 7)}
    x = (torch.randn(shape[layout], generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(x.shape[:1] + x.shape[2:], generator=g) > 0.3
    if pattern == "padding_first":
        mask.view(-1)[: mask.numel() // 3] = False
    elif pattern == "empty_samples":
        mask[::2] = False
    return x, mask


MASK_LAYOUTS = ["ncl", "nchw", "channels_last", "nc"]
MASK_PATTERNS = ["random", "padding_first", "empty_samples"]


@pytest.mark.parametrize("pattern", MASK_PATTERNS)
@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_masked_statistics_match_portable(layout: str, dtype: torch.dtype, pattern: str) -> None:
    x, mask = _masked_case(layout, dtype, pattern)
    ours = cpu.KERNEL.batch_stats(x, mask)
    theirs = portable.batch_stats(x, mask)
    assert torch.equal(ours.count, theirs.count)
    valid = x.movedim(1, -1)[mask].double()  # (valid positions, C)
    _close(ours.mean, valid.mean(0).to(dtype), dtype)
    _close(ours.var, valid.var(0, correction=0).to(dtype), dtype)
    _close(ours.mean, theirs.mean, dtype)
    _close(ours.var, theirs.var, dtype)


def test_masked_statistics_run_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask no longer sends the statistics to the portable kernel."""

    def portable_stats(*args: Any) -> None:
        raise AssertionError("the portable statistics ran")

    monkeypatch.setattr(portable, "batch_stats", portable_stats)
    for layout in MASK_LAYOUTS:
        x, mask = _masked_case(layout, torch.float32, "random")
        assert cpu.KERNEL.batch_stats(x, mask).count[0] == mask.sum()


def test_masked_statistics_without_a_valid_value_are_nan_as_portable() -> None:
    x = torch.randn(4, 3, 10)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    ours, theirs = cpu.KERNEL.batch_stats(x, mask), portable.batch_stats(x, mask)
    assert torch.equal(ours.count, theirs.count)
    assert ours.var.isnan().all()
    assert theirs.var.isnan().all()


def test_a_mask_in_other_strides_goes_to_the_portable_kernel() -> None:
    x, mask = _masked_case("ncl", torch.float64, "random")
    strided = torch.zeros(mask.shape[1], mask.shape[0], dtype=torch.bool).t()
    strided.copy_(mask)
    assert not strided.is_contiguous()
    ours, theirs = cpu.KERNEL.batch_stats(x, strided), portable.batch_stats(x, mask)
    assert torch.equal(ours.var, theirs.var)


@pytest.mark.parametrize("pattern", MASK_PATTERNS)
@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_masked_layer_matches_portable(layout: str, dtype: torch.dtype, pattern: str) -> None:
    """Output, gradients and running statistics of a masked training step: C loops
    against the portable kernel (padding outputs and gradients included)."""
    x, mask = _masked_case(layout, dtype, pattern, seed=1)
    g = torch.Generator().manual_seed(2)
    c = x.shape[1]
    weight = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for kernel in (cpu.KERNEL, primitive.PORTABLE):
        xg = x.clone().requires_grad_(True)
        wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        mean, var = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
        out = batch_norm(Call(xg, mean, var, wg, bg, mask=mask), Plan(True), kernel).output
        grads = torch.autograd.grad(out, (xg, wg, bg), dy)
        results.append((out, *grads, mean, var))
    for ours, theirs in zip(*results, strict=True):
        _close(ours, theirs, dtype)


@pytest.mark.parametrize("layout", ["ncl", "channels_last", "nc"])
@pytest.mark.slow
def test_gradcheck_masked(layout: str) -> None:
    x, mask = _masked_case(layout, torch.float64, "random", seed=3)
    rows = 2 if layout != "nc" else 20
    x = x[:rows].detach().requires_grad_(True)
    mask = mask[:rows].clone()
    mask.view(-1)[0] = False  # the shift comes from a later value
    w = torch.rand(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(x.shape[1], dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_batch_norm(x, None, None, w, b, training=True, mask=mask)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_running_stats_update_matches_portable_bit_for_bit(
    momentum: float | None, unbiased: bool, nonfinite: bool, dtype: torch.dtype
) -> None:
    x = torch.randn(6, 4, 5, dtype=dtype) + 100
    if nonfinite:
        x[1, 2, 3] = float("nan")
    stats = cpu.KERNEL.batch_stats(x)
    for skip in (True, False):
        states = []
        for kernel in (ops.KERNEL, primitive.PORTABLE):  # the C update, torch operations
            g = torch.Generator().manual_seed(5)
            mean = torch.randn(4, generator=g, dtype=dtype)
            var = torch.rand(4, generator=g, dtype=dtype)
            tracked = torch.tensor(3)
            recorded = kernel.update_running_stats(
                Update(stats, mean, var, tracked, momentum, unbiased, skip)
            )
            states.append((mean, var, tracked, recorded))
        (m1, v1, t1, r1), (m2, v2, t2, r2) = states
        torch.testing.assert_close(m1, m2, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v1, v2, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(t1, t2)
        assert (r1 is None) == (r2 is None)
        if r1 is not None and r2 is not None:
            assert bool(r1) == bool(r2)


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (2, 3, 7, 7), (512, 3)])
def test_statistics_with_an_outlying_shift(shape: tuple[int, ...]) -> None:
    """The shift is the channel's first value; one far out (1000 standard deviations)
    still gives float32 statistics to float32 accuracy (float64 accumulation)."""
    g = torch.Generator().manual_seed(2)
    x64 = 1e4 + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
    x64[(0, slice(None)) + (0,) * (len(shape) - 2)] = 1e4 + 10.0
    x = x64.float()
    stats = cpu.KERNEL.batch_stats(x)
    exact = x.double()
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(stats.mean.double(), exact.mean(dims), rtol=1e-7, atol=0)
    torch.testing.assert_close(stats.var.double(), exact.var(dims, correction=0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("pattern", ["drift", "steps", "outlier_rows", "outlying_first"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_float32_block_sums_stay_accurate(pattern: str, relu: bool, layout: str) -> None:
    """The nc loops sum float32 blocks of rows in float before double, the ncl loops
    short rows (here 9x9): with channels at 1e4 and a spread of 1e-2 that drifts, jumps or
    has outlying rows along the batch, the statistics, the output and the gradients stay
    at float32 rounding against float64."""
    g = torch.Generator().manual_seed(3)
    n, c, h, w = 16, 5, 9, 9
    rows = n * h * w
    along = torch.arange(rows, dtype=torch.float64) / rows
    offsets = {
        "drift": 0.5 * along,  # 50 standard deviations from first row to last
        "steps": 0.3 * (along > 0.5).double(),
        "outlier_rows": torch.where(torch.arange(rows) % 97 == 0, 1.0, 0.0).double(),
        # the first row is the shift: 1000 standard deviations from every other
        "outlying_first": torch.where(torch.arange(rows) == 0, 10.0, 0.0).double(),
    }[pattern]
    base = 1e4 * (1 + 0.1 * torch.rand(c, generator=g, dtype=torch.float64))
    x64 = base + offsets[:, None] + 1e-2 * torch.randn(rows, c, generator=g, dtype=torch.float64)
    x64 = x64.reshape(n, h, w, c).permute(0, 3, 1, 2)  # channels-last strides
    x = x64.float()
    assert x.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        x, dy = x.contiguous(), dy.contiguous()
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.randn(c, generator=g)
    stats = cpu.KERNEL.batch_stats(x)
    exact = x.double()
    dims = [0, 2, 3]
    exact_var = exact.var(dims, correction=0)
    mean = stats.shift.double() + stats.shifted_mean.double()
    assert ((mean - exact.mean(dims)).abs() <= 1e-5 * exact_var.sqrt()).all()
    torch.testing.assert_close(stats.var.double(), exact_var, rtol=2e-6, atol=0)

    def run(inp: torch.Tensor, activation: Activation | None) -> tuple[torch.Tensor, ...]:
        inp = inp.detach().requires_grad_(True)
        wt = weight.to(inp.dtype).requires_grad_(True)
        bs = bias.to(inp.dtype).requires_grad_(True)
        y = functional_batch_norm(inp, None, None, wt, bs, training=True, activation=activation)
        grads = torch.autograd.grad(y, (inp, wt, bs), dy.to(inp.dtype))
        return (y, *grads)

    ours = run(x, "relu" if relu else None)
    exact_y = torch.nn.functional.batch_norm(
        exact.requires_grad_(True), None, None, weight.double(), bias.double(), training=True
    )
    if relu:
        exact_y = torch.relu(exact_y)
    exact_grads = torch.autograd.grad(exact_y, (exact,), dy.double(), retain_graph=True)
    reference = run(x.double(), "relu" if relu else None)
    torch.testing.assert_close(reference[1], exact_grads[0])
    for mine, theirs in zip(ours, reference, strict=True):
        scale = theirs.abs().max().item()
        assert (mine.double() - theirs).abs().max().item() <= 2e-6 * scale


#: (activation, parameter) pairs the fast kernel fuses besides relu
INVERTIBLE = [
    ("identity", None),
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.3),
    ("elu", 1.0),
    ("elu", 0.7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "ncl", "nc"])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["efficient", "plain"])
@pytest.mark.parametrize(("name", "param"), INVERTIBLE)
def test_fused_invertible_activation_matches_portable(
    name: str, param: float | None, memory_efficient: bool, layout: str, dtype: torch.dtype
) -> None:
    x = torch.randn(6, 5, 7, 4, dtype=dtype) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "ncl":
        x = x.view(6, 5, 28)
    elif layout == "nc":
        x = x.view(6, 140)
    activation = Activation(name, param, memory_efficient)
    _compare_with_portable(x, activation=activation)
    _compare_with_portable(x, case=_NO_AFFINE, activation=activation)


class _NoAffine:
    affine = False
    momentum = 0.1
    eps = 1e-5


_NO_AFFINE: Any = _NoAffine()


def _fused_node(y: torch.Tensor) -> str:
    """The autograd node y's call left, or "portable" where its passes were the torch
    operations (the same autograd functions run every kernel's passes)."""
    assert y.grad_fn is not None
    if getattr(y.grad_fn, "prims", None) is portable.PRIMITIVES:
        return "portable"
    return type(y.grad_fn).__name__


def _fused_call(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    name: str,
    param: float | None,
    memory_efficient: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fast kernel's fused training normalization, and the tensors it saves."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    stats = cpu.KERNEL.batch_stats(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = cpu.KERNEL.normalize_batch_activation(
            x, stats, weight, bias, 1e-5, None, None, name, param, memory_efficient
        )
    return y, saved


@pytest.mark.parametrize(("name", "param"), INVERTIBLE)
def test_fused_invertible_activation_takes_the_fast_path(name: str, param: float | None) -> None:
    """The fused node is the C one, and it saves y (memory-efficient) or x (plain) only."""
    torch.manual_seed(0)  # no gamma near 0 next to beta, which keeps x instead (tested below)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    for memory_efficient in (True, False):
        y, saved = _fused_call(x, w, b, name, param, memory_efficient)
        assert _fused_node(y) == "_NormalizeActivateBackward"
        full = [t for t in saved if t.numel() == x.numel()]
        assert len(full) == 1
        expected = y if memory_efficient else x
        assert full[0].data_ptr() == expected.data_ptr()
        assert all(t.numel() in (x.numel(), 3) for t in saved)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "param"), INVERTIBLE)
def test_fused_invertible_activation_gamma_zero_falls_back_to_the_input(
    name: str, param: float | None, dtype: torch.dtype
) -> None:
    """A channel with gamma = 0 (or |beta| >= 1000 |gamma|) makes the call save x, as the
    portable kernel does; results still match it."""
    x = torch.randn(5, 4, 6, 6, dtype=dtype) + 2
    dy = torch.randn(x.shape, dtype=dtype)
    bias = torch.randn(4, dtype=dtype)
    for weight in (
        torch.tensor([1.0, 0.0, -0.5, 2.0], dtype=dtype),
        torch.tensor([1.0, 1e-4, -0.5, 2.0], dtype=dtype),
    ):
        bias[1] = 1.0
        activation = Activation(name, param)
        ours = _run(cpu.KERNEL, x, weight, bias, dy, activation=activation)
        theirs = _run(primitive.PORTABLE, x, weight, bias, dy, activation=activation)
        for key in ("y", "dx", "dw", "db"):
            _close(ours[key], theirs[key], dtype)
        xr = x.clone().requires_grad_(True)
        y, saved = _fused_call(xr, weight, bias, name, param, True)
        assert _fused_node(y) == "_NormalizeActivateBackward"
        assert any(t.data_ptr() == xr.data_ptr() for t in saved)
        assert not any(t.data_ptr() == y.data_ptr() for t in saved)


_TORCH_ACTIVATIONS: dict[str, Any] = {
    "identity": lambda p: torch.nn.Identity(),
    "leaky_relu": lambda p: torch.nn.LeakyReLU(p),
    "elu": lambda p: torch.nn.ELU(p),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["efficient", "plain"])
@pytest.mark.parametrize(("name", "param"), INVERTIBLE)
@pytest.mark.slow
def test_fused_invertible_activation_matches_torch_modules(
    name: str, param: float | None, memory_efficient: bool, channels_last: bool, dtype: torch.dtype
) -> None:
    import bnkit

    torch.manual_seed(4)
    x = torch.randn(8, 6, 9, 9, dtype=dtype) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, dtype=dtype)
    ours = bnkit.BatchNorm2d(
        6, activation=name, activation_param=param, memory_efficient=memory_efficient
    ).to(dtype)
    reference = torch.nn.BatchNorm2d(6).to(dtype)
    with torch.no_grad():
        for m in (ours, reference):
            m.weight.copy_(torch.linspace(-1.5, 2.0, 6, dtype=dtype))
            m.bias.copy_(torch.linspace(-0.5, 0.7, 6, dtype=dtype))
    theirs = torch.nn.Sequential(reference, _TORCH_ACTIVATIONS[name](param))
    results = []
    for module, params in ((ours, ours), (theirs, reference)):
        inp = x.detach().clone().requires_grad_(True)
        y = module(inp)
        y.backward(dy)
        results.append((y, inp.grad, params.weight.grad, params.bias.grad))
    assert _fused_node(results[0][0]) == "CppFunction"  # the express node
    for a, b in zip(*results, strict=True):
        _close(a, b, dtype)
    _close(ours.running_mean, reference.running_mean, dtype)
    _close(ours.running_var, reference.running_var, dtype)


def test_fused_invertible_activation_double_backward_needs_the_input() -> None:
    """Memory-efficient: refused (no input kept); otherwise recomputed from x."""
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y, _ = _fused_call(x, w, None, "elu", 1.0, True)
    assert _fused_node(y) == "_NormalizeActivateBackward"
    with pytest.raises(RuntimeError, match="memory_efficient=True does not keep"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: _fused_call(x, w, None, "elu", 1.0, False)[0], (x, w)
    )


@pytest.mark.parametrize(("name", "param"), INVERTIBLE)
@pytest.mark.slow
def test_gradcheck_fused_invertible_activation(name: str, param: float | None) -> None:
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for memory_efficient in (True, False):
        torch.autograd.gradcheck(
            lambda x, w, b, m=memory_efficient: cpu.KERNEL.normalize_batch_activation(
                x, cpu.KERNEL.batch_stats(x), w, b, 1e-5, None, None, name, param, m
            ),
            (x, w, b),
        )


def test_fused_leaky_relu_stack_saves_little() -> None:
    """A conv-BN-leaky_relu stack through the express node (fast.cpp) keeps <= 0.6x of
    what torch's BatchNorm2d + LeakyReLU stack keeps for backward."""
    from bnkit.bench.memory import saved_bytes, stack

    x = torch.randn(4, 16, 16, 16, requires_grad=True)
    ours_model = stack("bnkit", "leaky_relu", 16)
    fused = ours_model[1]
    y = fused(ours_model[0](x))
    assert _fused_node(y) == "CppFunction"
    ours = saved_bytes(lambda: ours_model(x))
    theirs = saved_bytes(lambda: stack("torch", "leaky_relu", 16)(x))
    assert ours <= 0.6 * theirs
    plain = saved_bytes(lambda: stack("bnkit-plain", "leaky_relu", 16)(x))
    assert ours < plain


def test_fused_activation_with_mask_is_delegated() -> None:
    x = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 8) > 0.3
    y = cpu.KERNEL.normalize_batch_activation(
        x, cpu.KERNEL.batch_stats(x, mask), None, None, 1e-5, mask, None, "leaky_relu", 0.1, True
    )
    assert _fused_node(y) != "_NormalizeActivateBackward"


@given(
    shape=_shapes(),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
    activation=st.sampled_from(INVERTIBLE),
    memory_efficient=st.booleans(),
    loc=st.sampled_from([0.0, 5.0, -300.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_portable_with_invertible_activations(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    activation: tuple[str, float | None],
    memory_efficient: bool,
    loc: float,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (loc + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = _layouts(x)[-1]
    name, param = activation
    _compare_with_portable(x, activation=Activation(name, param, memory_efficient))


@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (2, 3, 96, 96), (40000, 3)])
@pytest.mark.parametrize(
    ("name", "param"), [("leaky_relu", 0.01), ("elu", 1.0), ("identity", None)]
)
@pytest.mark.slow
def test_fused_invertible_activation_on_threads(
    shape: tuple[int, ...], name: str, param: float | None
) -> None:
    """Tensors large enough for the parallel loops, weight or bias alone included."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        g = torch.Generator().manual_seed(6)
        x = torch.randn(shape, generator=g) * 2 + 0.5
        dy = torch.randn(shape, generator=g)
        w = torch.randn(shape[1], generator=g)
        b = torch.randn(shape[1], generator=g)
        for inp in _layouts(x):
            assert cpu._threads(inp) > 1
            for weight, bias in ((w, b), (w, None), (None, b)):
                for memory_efficient in (True, False):
                    activation = Activation(name, param, memory_efficient)
                    ours = _run(cpu.KERNEL, inp, weight, bias, dy, activation=activation)
                    theirs = _run(primitive.PORTABLE, inp, weight, bias, dy, activation=activation)
                    for key in ("y", "dx", "dw", "db"):
                        if theirs[key] is None:
                            assert ours[key] is None
                        else:
                            _close(ours[key], theirs[key], torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    "options",
    [{"activation": "leaky_relu"}, {"activation": "elu"}, {"mask": True}, {"ghost": True}],
    ids=["leaky_relu", "elu", "mask", "ghost"],
)
def test_half_precision_options_run_the_c_loops(
    dtype: torch.dtype, layout: torch.memory_format, options: dict[str, object]
) -> None:
    """16-bit tensors with masks, fused activations or ghost batches run the C loops (in
    float32, rounded once; under the express node, ghost batches through the operators)
    and agree with the same layer on the same values in float32."""
    generator = torch.Generator().manual_seed(0)
    x32 = (2.0 + torch.randn(8, 6, 5, 7, generator=generator)).contiguous(memory_format=layout)
    dy = torch.randn(x32.shape, generator=generator)
    mask = torch.rand(8, 5, 7, generator=generator) > 0.3 if options.get("mask") else None
    kwargs = {
        "activation": options.get("activation"),
        "ghost_batch_size": 4 if options.get("ghost") else None,
    }
    results = []
    dy = dy.to(dtype).float()  # both runs see the same (16-bit) values
    for data in (x32.to(dtype), x32.to(dtype).float()):
        layer = bnkit.BatchNorm2d(6, **kwargs)  # type: ignore[arg-type]
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(1))
        inp = data.clone().requires_grad_()
        y = layer(inp, mask=mask) if mask is not None else layer(inp)
        y.backward(dy.to(dtype=y.dtype))
        assert y.dtype == data.dtype
        assert y.is_contiguous(memory_format=layout)
        results.append((y, inp.grad, layer.weight.grad, layer.running_mean, y.grad_fn))
    half, full = results
    node = half[4]
    if not options.get("ghost"):  # the express node: one C call each way
        assert type(node).__name__ == "CppFunction"
    else:
        while not hasattr(node, "prims"):  # ghost batches: the first one's, under a cat
            node = node.next_functions[0][0]
        assert node.prims is ops.OPERATORS
    assert ops.native_passes(x32.to(dtype), mask) is cpu.PRIMITIVES
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    for a, b in zip(half[:4], full[:4], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)


def _ulps(ours: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|ours - exact| in units of the float32 spacing at the exact value."""
    nearest = exact.float().abs()
    spacing = (torch.nextafter(nearest, torch.tensor(math.inf)) - nearest).double()
    return (ours.double() - exact).abs() / spacing


def test_the_fused_elus_expm1_and_log1p_are_within_two_ulp() -> None:
    """cpu.c's vectorizable expm1 (the elu's forward) and log1p (its backward from the
    output, z = log1p(y / alpha)) against float64, over the whole negative range: tiny,
    denormal, around 0 and down to where expm1 saturates at -1; NaN stays NaN."""
    one, zero = torch.ones(1), torch.zeros(1)
    tiny = -torch.logspace(-44, 2, 200_001)
    z = torch.cat([torch.linspace(-100, 0, 1_000_001), tiny, torch.tensor([-0.0, -1e-45])])
    z = torch.cat([z.float(), torch.tensor([math.nan])]).view(-1, 1)
    y = cpu.affine(z, zero, one, zero, "elu", 1.0).view(-1)  # z = x exactly: y = expm1(z)
    assert float(_ulps(y[:-1], torch.expm1(z[:-1].double().view(-1))).max()) <= 2.0
    assert y[-1].isnan()
    u = torch.cat([torch.linspace(-1, 0, 1_000_001)[1:], -torch.logspace(-44, 0, 200_001)])
    u = u.float()[u.float() > -1]  # -1 itself: a saturated output, which adds nothing
    u = torch.cat([u, torch.tensor([-0.0, math.nan])]).view(-1, 1)
    # g = 0, alpha = 0, k1 = 1, k0 = 0: dx = (z - 0) * 1 + 0 = log1p(y)
    v = cpu.backward_input(torch.zeros_like(u), u, zero, zero, one, zero, "elu", 1.0, True)
    v = v.view(-1)
    assert float(_ulps(v[:-1], torch.log1p(u[:-1].double().view(-1))).max()) <= 2.0
    assert v[-1].isnan()
