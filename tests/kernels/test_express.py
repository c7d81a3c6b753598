"""The express path (one C call each way for plain calls) against the portable kernel,
the NumPy reference and torch; and the calls it must leave to the general pipeline."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit import reference as ref
from bnkit.errors import NonFiniteStatsWarning
from bnkit.functional import batch_norm
from bnkit.kernels import Call, Plan, express, native, primitive
from bnkit.kernels import activation as act
from bnkit.kernels import batch_norm as pipeline
from bnkit.kernels.activation import default_param
from tests.helpers import assert_close_to_scale

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native CPU kernel: {native.load_error()}"
)

TOLERANCE = {torch.float32: 3e-5, torch.float64: 1e-11}
RELU = express.flags("unbiased", True, "relu", None, False).activation  # its code

#: (shape, memory format) pairs covering both C layouts and the threaded loops
LAYOUTS: list[tuple[tuple[int, ...], torch.memory_format]] = [
    ((64, 24), torch.contiguous_format),  # nc
    ((8, 16, 8, 8), torch.contiguous_format),  # ncl
    ((8, 16, 8, 8), torch.channels_last),  # nc, M = N * H * W
    ((3, 4, 5, 6, 7), torch.channels_last_3d),
    ((2, 5, 300), torch.contiguous_format),  # long rows
    ((16, 8, 32, 32), torch.contiguous_format),  # above the threading threshold
    ((16, 8, 32, 32), torch.channels_last),
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in LAYOUTS]


def _close(ours: torch.Tensor | None, theirs: torch.Tensor | None) -> None:
    assert theirs is not None
    assert_close_to_scale(ours, theirs, TOLERANCE[theirs.dtype])


def _inputs(
    shape: tuple[int, ...], fmt: torch.memory_format, dtype: torch.dtype, affine: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = (3 + 2 * torch.randn(shape, generator=g, dtype=dtype)).contiguous(memory_format=fmt)
    c = shape[1]
    weight = torch.randn(c, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(c, generator=g, dtype=dtype) if affine else None
    dy = torch.randn(shape, generator=g, dtype=dtype)
    return x, weight, bias, dy


def _step(
    use_express: bool,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    training: bool,
    relu: bool,
    **options: Any,
) -> dict[str, Any]:
    """One forward + backward, by the express path or by the portable pipeline."""
    x = x.detach().clone().requires_grad_(True)
    w = None if weight is None else weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    c = x.shape[1]
    mean = torch.linspace(-1, 1, c, dtype=x.dtype)
    var = torch.linspace(0.5, 2, c, dtype=x.dtype)
    tracked = torch.tensor(3)
    momentum = options.get("momentum", 0.1)
    unbiased = options.get("unbiased", True)
    if use_express:
        result = express.batch_norm(
            x, mean, var, w, b, training, momentum, 1e-5, tracked,
            express.Flags(unbiased, True, RELU if relu else 0),
        )  # fmt: skip
        assert result is not None, "the express path did not take a plain call"
        y = result[0]
    else:
        y = pipeline(
            Call(x, mean, var, w, b, tracked if training else None),
            Plan(training, momentum, 1e-5, unbiased),
            primitive.PORTABLE,
        ).output
        if relu:
            y = torch.relu(y)
    y.backward(dy)
    return {
        "y": y,
        "dx": x.grad,
        "dw": None if w is None else w.grad,
        "db": None if b is None else b.grad,
        "mean": mean,
        "var": var,
        "tracked": tracked,
    }


@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.slow
def test_matches_the_portable_kernel(
    shape: tuple[int, ...], fmt: torch.memory_format, dtype: torch.dtype, training: bool
) -> None:
    x, weight, bias, dy = _inputs(shape, fmt, dtype, affine=True)
    ours = _step(True, x, weight, bias, dy, training, relu=False)
    theirs = _step(False, x, weight, bias, dy, training, relu=False)
    assert ours["y"].stride() == theirs["y"].stride() == x.stride()
    for key in ("y", "dx", "dw", "db", "mean", "var"):
        _close(ours[key], theirs[key])
    assert int(ours["tracked"]) == int(theirs["tracked"]) == (4 if training else 3)


@pytest.mark.parametrize(
    "options",
    [
        {"affine": False},
        {"momentum": None},
        {"momentum": 0.0},
        {"momentum": 1.0},
        {"unbiased": False},
        {"relu": True},
        {"relu": True, "affine": False},
    ],
    ids=["no-affine", "cumulative", "momentum-0", "momentum-1", "biased", "relu", "relu-plain"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_options_match_the_portable_kernel(options: dict[str, Any], training: bool) -> None:
    options = dict(options)
    affine = options.pop("affine", True)
    relu = options.pop("relu", False)
    for shape, fmt in (
        ((8, 16, 8, 8), torch.contiguous_format),
        ((64, 24), torch.contiguous_format),
    ):
        x, weight, bias, dy = _inputs(shape, fmt, torch.float64, affine)
        ours = _step(True, x, weight, bias, dy, training, relu, **options)
        theirs = _step(False, x, weight, bias, dy, training, relu, **options)
        for key in ("y", "dx", "mean", "var"):
            _close(ours[key], theirs[key])
        for key in ("dw", "db"):
            assert (ours[key] is None) == (theirs[key] is None)
            if theirs[key] is not None:
                _close(ours[key], theirs[key])


def test_agrees_with_torch_in_float32() -> None:
    x, weight, bias, dy = _inputs((32, 16, 12, 12), torch.contiguous_format, torch.float32, True)
    ours = bnkit.BatchNorm2d(16)
    theirs = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(weight)  # type: ignore[union-attr]
            layer.bias.copy_(bias)  # type: ignore[union-attr]
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for layer, xi in zip((ours, theirs), xs, strict=True):
        layer(xi).backward(dy)
    _close(xs[0].grad, xs[1].grad)
    _close(ours.weight.grad, theirs.weight.grad)
    _close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    ours.eval()
    theirs.eval()
    _close(ours(x), theirs(x))


@given(
    n=st.integers(2, 9),
    c=st.integers(1, 6),
    length=st.integers(1, 70),
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
@settings(deadline=None)
def test_fuzz_against_the_reference(
    n: int, c: int, length: int, loc: float, scale: float, seed: int
) -> None:
    """Random (N, C, L) float64 batches: forward, gradients and running statistics equal
    the NumPy reference's."""
    rng = np.random.default_rng(seed)
    x = loc + scale * rng.standard_normal((n, c, length))
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    dy = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    result = express.batch_norm(xt, mean, var, wt, bt, True, 0.1, 1e-5, None, express.Flags())
    if x.size < 256:  # below the fast kernel's threshold: the general path's business
        assert result is None
        return
    assert result is not None
    y = result[0]
    y.backward(torch.tensor(dy))
    y_ref, cache = ref.batch_norm_train(x, gamma, beta, eps=1e-5)
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_norm_backward(dy, cache)
    mean_ref, var_ref = ref.update_running_stats(
        np.zeros(c), np.ones(c), x.mean(axis=(0, 2)), x.var(axis=(0, 2)), n * length
    )
    tol = 1e-9
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=tol, atol=tol)
    dx_scale = max(1.0, np.abs(dx_ref).max())
    np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=tol, atol=tol * dx_scale)  # type: ignore[union-attr]
    np.testing.assert_allclose(wt.grad.numpy(), dgamma_ref, rtol=tol, atol=tol * dx_scale * scale)  # type: ignore[union-attr]
    np.testing.assert_allclose(bt.grad.numpy(), dbeta_ref, rtol=tol, atol=tol)  # type: ignore[union-attr]
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=tol, atol=tol * abs(loc))
    np.testing.assert_allclose(var.numpy(), var_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_gradcheck_and_gradgradcheck_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 30, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)

    def train(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        result = express.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, None, express.Flags())
        assert result is not None
        return result[0]

    mean, var = torch.rand(3, dtype=torch.float64), 1 + torch.rand(3, dtype=torch.float64)

    def evaluate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        result = express.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5, None, express.Flags())
        assert result is not None
        return result[0]

    for function in (train, evaluate):
        assert torch.autograd.gradcheck(function, (x, w, b))
        assert torch.autograd.gradgradcheck(function, (x, w, b))


def _through_express(
    flags: express.Flags,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> Any:
    """(x, weight, bias) -> the express node's output: in eval given population
    statistics, else in training (without running statistics)."""

    def call(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        training = mean is None
        result = express.batch_norm(x, mean, var, w, b, training, 0.1, 1e-5, None, flags, mask)
        assert result is not None
        return result[0]

    return call


def _float64_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """x (4, 3, 30), weight and bias in float64, requiring gradients, and the generator
    that made them (for more values from the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 30, dtype=torch.float64, generator=generator)
    w, b = (torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(2))
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), generator


FUSED = [
    ("relu", None, False),
    ("leaky_relu", 0.2, False),
    ("leaky_relu", 0.2, True),
    ("elu", 0.7, False),
    ("elu", 0.7, True),
    ("identity", None, True),
]


@pytest.mark.parametrize(("name", "param", "memory_efficient"), FUSED, ids=str)
def test_fused_activations_double_backward_and_batched_gradients(
    name: str, param: float | None, memory_efficient: bool
) -> None:
    """Keeping x, a fused activation's double backward recomputes its slope from x and
    the saved bias; keeping only the output (memory-efficient) it is refused with the
    pipeline's error. Gradients batched by vmap (which the C loops cannot read) take the
    torch-operation route either way, against one backward per cotangent."""
    x, w, b, generator = _float64_inputs(0)
    train = _through_express(express.flags("unbiased", True, name, param, memory_efficient))
    assert type(train(x, w, b).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradcheck(train, (x, w, b))
    if memory_efficient:
        with pytest.raises(RuntimeError, match="memory_efficient=False"):
            torch.autograd.grad(train(x, w, b).square().sum(), x, create_graph=True)
    else:
        assert torch.autograd.gradgradcheck(train, (x, w, b))
    _check_batched_gradients(train, (x, w, b), generator)


def _check_batched_gradients(
    function: Any, inputs: tuple[torch.Tensor, ...], generator: torch.Generator
) -> None:
    """Gradients batched by ``is_grads_batched=True`` equal one backward per cotangent."""
    y = function(*inputs)
    cotangents = torch.randn(3, *y.shape, dtype=y.dtype, generator=generator)
    batched = torch.autograd.grad(y, inputs, cotangents, is_grads_batched=True)
    for i, cotangent in enumerate(cotangents):
        one = torch.autograd.grad(function(*inputs), inputs, cotangent)
        for got, expected in zip(batched, one, strict=True):
            torch.testing.assert_close(got[i], expected)


@pytest.mark.parametrize("name", ["leaky_relu", "elu", "identity"])
def test_memory_efficient_activations_keep_the_output_not_the_input(name: str) -> None:
    """The node saves y (which the next layer keeps anyway) and per-channel values, as the
    pipeline's autograd function does; where y does not give x_hat back (a zero gamma)
    it keeps x instead, and the gradients stay exact."""
    x = torch.randn(8, 4, 10, 10, requires_grad=True)
    layer = bnkit.BatchNorm2d(4, activation=name)
    for zero_gamma in (False, True):
        with torch.no_grad():
            layer.weight.fill_(0.0 if zero_gamma else 1.5)
        y, saved = _saving(layer, x)
        assert type(y.grad_fn).__name__ == "CppFunction"
        full = [t for t in saved if t.shape == x.shape]
        assert len(full) == 1
        assert (full[0].data_ptr() == x.data_ptr()) is zero_gamma
        assert (full[0].data_ptr() == y.data_ptr()) is not zero_gamma
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
        reference = torch.nn.functional.batch_norm(
            x, None, None, layer.weight, layer.bias, training=True
        )
        out = _unfused(reference, name)
        torch.testing.assert_close(y, out)
        (dx_ref,) = torch.autograd.grad(out, x, dy)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)


INVERSION_CASES = [
    ("leaky_relu", torch.float32, 1.0, 0.0, 0.0),
    ("leaky_relu", torch.float32, 0.0, 0.0, 0.0),  # gamma = 0
    ("leaky_relu", torch.float32, 1e-3, 1.0, 0.0),  # |beta| = 1000 |gamma|: lossy
    ("identity", torch.float64, 1e-3, 0.999, 0.0),  # just under the limit
    ("identity", torch.float64, -2e-3, -2.0, 0.0),
    ("elu", torch.float32, 1.0, 0.0, 0.0),
    ("elu", torch.float32, 1.0, -30.0, 0.0),  # saturated: y rounds to -alpha
    ("elu", torch.bfloat16, 1.0, -3.0, 0.0),  # near the floor in bfloat16
    ("elu", torch.float64, 1.0, -30.0, 0.0),  # within sqrt(eps) of the floor in float64 too
    ("elu", torch.float64, 1.0, -10.0, 0.0),  # not: exp(-10) >> sqrt(eps)
    ("leaky_relu", torch.float16, 1.0, 0.0, 1.0),
]


@pytest.mark.parametrize(("name", "dtype", "gamma", "beta", "shift"), INVERSION_CASES, ids=str)
def test_the_node_keeps_the_output_where_the_rule_says_it_inverts(
    name: str, dtype: torch.dtype, gamma: float, beta: float, shift: float
) -> None:
    """fast.cpp's invertibility check gives :func:`activation.invertible`'s answer (it
    applies the same rule in C++): the node keeps y exactly where that says y gives
    x_hat back, and x elsewhere."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = (shift + torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))).to(dtype)
    x.requires_grad_()
    weight = torch.tensor([1.0, gamma, 0.5], dtype=compute, requires_grad=True)
    bias = torch.tensor([0.0, beta, 0.1], dtype=compute, requires_grad=True)
    flags = express.flags("unbiased", True, name, default_param(name), True)
    result, saved = _saving(express.batch_norm, x, None, None, weight, bias, True, 0.1, 1e-5,
                            None, flags)  # fmt: skip
    assert result is not None
    y = result[0]
    keeps_y = any(t.data_ptr() == y.data_ptr() for t in saved)
    keeps_x = any(t.data_ptr() == x.data_ptr() for t in saved)
    assert keeps_y is act.invertible(y, weight, bias, name, default_param(name))
    assert keeps_x is not keeps_y


@given(
    shape=st.sampled_from([(4, 3, 70), (9, 5, 8, 8), (300, 7), (2, 2, 3, 5, 6)]),
    channels_last=st.booleans(),
    activation=st.sampled_from(["relu", "leaky_relu", "elu", "identity"]),
    param=st.floats(0.01, 3.0),
    memory_efficient=st.booleans(),
    gamma_kind=st.sampled_from(["random", "a zero", "tiny"]),
    loc=st.floats(-50, 50),
    seed=st.integers(0, 2**31 - 1),
)
@settings(deadline=None, max_examples=60)
def test_fuzz_fused_activations_against_torch_in_float64(
    shape: tuple[int, ...],
    channels_last: bool,
    activation: str,
    param: float,
    memory_efficient: bool,
    gamma_kind: str,
    loc: float,
    seed: int,
) -> None:
    """Random batches through the express node with each fused activation, kept input or
    output (gamma with a zero, or tiny against beta, makes the node keep x): outputs,
    gradients and running statistics equal torch's batch norm + activation in float64."""
    g = torch.Generator().manual_seed(seed)
    x = loc + torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    c = shape[1]
    gamma = torch.randn(c, generator=g, dtype=torch.float64)
    if gamma_kind == "a zero":
        gamma[0] = 0.0
    elif gamma_kind == "tiny":
        gamma[-1] = 1e-6
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    param_or_none = param if activation in ("leaky_relu", "elu") else None
    flags = express.flags("unbiased", True, activation, param_or_none, memory_efficient)
    results = []
    for ours in (True, False):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, gamma, beta))
        mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        if ours:
            result = express.batch_norm(xg, mean, var, wg, bg, True, 0.1, 1e-5, None, flags)
            assert result is not None
            y = result[0]
        else:
            z = torch.nn.functional.batch_norm(xg, mean, var, wg, bg, training=True, eps=1e-5)
            y = _activate(z, activation, param_or_none)
        results.append([y, *torch.autograd.grad(y, (xg, wg, bg), dy), mean, var])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _activate(z: torch.Tensor, name: str, param: float | None) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, param)  # type: ignore[arg-type]
    if name == "elu":
        return torch.nn.functional.elu(z, param)  # type: ignore[arg-type]
    return z


def _saving(function: Any, *args: Any) -> tuple[Any, list[torch.Tensor]]:
    """function(*args), and the tensors autograd saved for its backward pass."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return function(*args), saved


def _unfused(z: torch.Tensor, name: str) -> torch.Tensor:
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, 0.01)
    if name == "elu":
        return torch.nn.functional.elu(z)
    return z


def test_non_finite_batch_is_not_recorded_and_warns() -> None:
    x = torch.randn(16, 4, 8)
    x[3, 2, 5] = float("nan")
    mean, var, tracked = torch.zeros(4), torch.ones(4), torch.tensor(0)
    result = express.batch_norm(x, mean, var, None, None, True, 0.1, 1e-5, tracked, express.Flags())
    assert result is not None
    assert result[1] is False
    assert torch.equal(mean, torch.zeros(4))
    assert torch.equal(var, torch.ones(4))
    assert int(tracked) == 0
    assert torch.isfinite(result[0][:, [0, 1, 3]]).all()  # other channels still normalized
    with pytest.warns(NonFiniteStatsWarning, match="non-finite"):
        batch_norm(x, mean, var, training=True)
    layer = bnkit.BatchNorm1d(4)
    with pytest.warns(NonFiniteStatsWarning, match="BatchNorm1d"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(16, 4, 8))  # a finite batch: recorded, no warning
    assert int(layer.num_batches_tracked) == 1


def test_gradient_of_a_sum_and_of_another_layout() -> None:
    """The upstream gradient may be an expanded scalar, or in another memory layout."""
    x = torch.randn(8, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for dy in (torch.ones(()).expand(x.shape), torch.randn(x.shape, dtype=torch.float64)):
        ours = _step(True, x, None, None, dy.to(x.dtype), True, relu=False)
        theirs = _step(False, x, None, None, dy.to(x.dtype), True, relu=False)
        _close(ours["dx"], theirs["dx"])


HALF = [torch.bfloat16, torch.float16]
#: one unit in the last place of each 16-bit type at 1 (relative rounding is half that)
HALF_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [*LAYOUTS, ((2, 3, 2500), torch.contiguous_format)],  # rows summed in several chunks
    ids=[*LAYOUT_IDS, "2x3x2500-long-rows"],
)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.slow
def test_16_bit_inputs_match_the_portable_kernel(
    shape: tuple[int, ...],
    fmt: torch.memory_format,
    dtype: torch.dtype,
    training: bool,
    relu: bool,
) -> None:
    """bfloat16/float16 inputs with float32 parameters and buffers: the C loops read and
    write 16-bit values and compute in float32, as the portable kernel does; outputs and
    input gradients agree to a rounding of the 16-bit type, the float32 results (parameter
    gradients, running statistics) to float32 rounding."""
    g = torch.Generator().manual_seed(11)
    c = shape[1]
    x = (3 + 2 * torch.randn(shape, generator=g)).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).to(dtype)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    results = []
    for use_express in (True, False):
        xg = x.clone().requires_grad_(True)
        wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        mean, var = torch.linspace(-1, 1, c), torch.linspace(0.5, 2, c)
        if use_express:
            result = express.batch_norm(
                xg, mean, var, wg, bg, training, 0.1, 1e-5, None,
                express.Flags(activation=RELU if relu else 0),
            )  # fmt: skip
            assert result is not None, "the express path did not take a 16-bit call"
            y = result[0]
        else:
            y = pipeline(Call(xg, mean, var, wg, bg), Plan(training), primitive.PORTABLE).output
            y = torch.relu(y) if relu else y
        y.backward(dy)
        results.append({"y": y, "dx": xg.grad, "dw": wg.grad, "db": bg.grad, "mean": mean,
                        "var": var})  # fmt: skip
    ours, theirs = results
    assert ours["y"].dtype == ours["dx"].dtype == dtype
    assert ours["y"].stride() == x.stride()
    for key in ("y", "dx"):
        assert_close_to_scale(ours[key].float(), theirs[key].float(), HALF_ULP[dtype])
    for key in ("dw", "db", "mean", "var"):
        assert ours[key].dtype == torch.float32
        assert_close_to_scale(ours[key], theirs[key], TOLERANCE[torch.float32])


#: Every 16-bit pattern as (N, C, L) rows of 16384 values (whole vectors), of 65543 (a
#: scalar tail after the last whole vector, and a chunk of 7 after the float16 loops'
#: 256-value chunks) and as (M, C) rows of 1003 channels (the patterns repeated to fill).
PATTERN_SHAPES = [(4, 1, 16384), (1, 1, 65543), (66, 1003)]


@pytest.mark.parametrize("shape", PATTERN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_16_bit_values_are_read_and_rounded_as_torch_does(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Every 16-bit pattern (normal, subnormal, zero, Inf, NaN) through an eval map
    y = x * scale + 0: bit for bit torch's float32 arithmetic and rounding to the type,
    overflow to Inf and gradual underflow included, in vector bodies and scalar tails."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = patterns.repeat(-(-math.prod(shape) // patterns.numel()))[: math.prod(shape)]
    x = x.view(dtype).reshape(shape)
    channels = shape[1]
    eps = 2.0**-20
    mean, var = torch.zeros(channels), torch.full((channels,), 1 - eps)  # invstd exactly 1
    for scale in (1.0, 3.7, -0.37, 1e5, 1e-5, 65504.0 / 3):
        weight, bias = torch.full((channels,), scale), torch.zeros(channels)
        result = express.batch_norm(x, mean, var, weight, bias, False, 0.1, eps, None,
                                    express.Flags())  # fmt: skip
        assert result is not None
        expected = (x.float() * scale + 0.0).to(dtype)
        nan = expected.isnan()
        assert torch.equal(result[0].isnan(), nan)
        assert torch.equal(result[0].view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


@pytest.fixture
def express_taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each express.batch_norm call from here on took its call."""
    taken: list[bool] = []
    original = express.batch_norm

    def spy(*args: Any) -> Any:
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(express, "batch_norm", spy)
    return taken


def test_16_bit_layers_take_the_express_path(express_taken: list[bool]) -> None:
    """A BatchNorm2d with float32 parameters on bfloat16 activations (the usual mixed
    precision layout) runs the 16-bit loops, in training and in eval."""
    layer = bnkit.BatchNorm2d(8)
    x = torch.randn(4, 8, 6, 6).to(torch.bfloat16).requires_grad_(True)
    layer(x).float().sum().backward()
    layer.eval()(x)
    assert express_taken == [True, True]
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_16_bit_models_in_eval_take_the_express_path(dtype: torch.dtype) -> None:
    """model.to(torch.bfloat16) for inference: 16-bit parameters and population statistics
    are read as float32 copies without gradients; training with them (which would write
    16-bit running statistics or need 16-bit parameter gradients) is left to the pipeline."""
    g = torch.Generator().manual_seed(5)
    c = 16
    weight, bias = (
        (torch.rand(c, generator=g) + 0.5).to(dtype),
        torch.randn(c, generator=g).to(dtype),
    )
    mean, var = torch.randn(c, generator=g).to(dtype), (torch.rand(c, generator=g) + 0.5).to(dtype)
    x = torch.randn(8, c, 10, 10, generator=g).to(dtype)
    with torch.no_grad():
        result = express.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5, None,
                                    express.Flags())  # fmt: skip
        assert result is not None
        theirs = pipeline(Call(x, mean, var, weight, bias), Plan(False), primitive.PORTABLE).output
    assert result[0].dtype == dtype
    assert_close_to_scale(result[0].float(), theirs.float(), HALF_ULP[dtype])
    assert express.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5, None,
                              express.Flags()) is None  # fmt: skip
    w = weight.clone().requires_grad_(True)
    assert express.batch_norm(x, mean.float(), var.float(), w, bias, False, 0.1, 1e-5, None,
                              express.Flags()) is None  # fmt: skip
    # training without gradients, float32 running statistics: taken, and they match
    runs = []
    for use_express in (True, False):
        rm, rv = torch.zeros(c), torch.ones(c)
        with torch.no_grad():
            if use_express:
                taken = express.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5, None,
                                           express.Flags())  # fmt: skip
                assert taken is not None
                y = taken[0]
            else:
                y = pipeline(Call(x, rm, rv, weight, bias), Plan(True), primitive.PORTABLE).output
        runs.append((y, rm, rv))
    assert_close_to_scale(runs[0][0].float(), runs[1][0].float(), HALF_ULP[dtype])
    for ours, theirs in zip(runs[0][1:], runs[1][1:], strict=True):
        assert_close_to_scale(ours, theirs, TOLERANCE[torch.float32])
    layer = bnkit.BatchNorm2d(c).to(dtype).eval()
    with torch.no_grad():
        assert torch.isfinite(layer(x).float()).all()


def _express_result(**changes: Any) -> Any:
    c = 16
    args: dict[str, Any] = {
        "x": torch.randn(8, c, 8, 8),
        "running_mean": torch.zeros(c),
        "running_var": torch.ones(c),
        "weight": torch.ones(c),
        "bias": torch.zeros(c),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "num_batches_tracked": torch.tensor(0),
        "options": express.Flags(),
    }
    args.update(changes)
    return express.batch_norm(**args)


@pytest.mark.parametrize(
    "changes",
    [
        {  # 16-bit inputs need float32 per-channel tensors under autograd
            "x": torch.randn(8, 16, 8, 8, dtype=torch.float16),
            "weight": torch.ones(16, dtype=torch.float16, requires_grad=True),
        },
        {
            "x": torch.randn(8, 16, 8, 8, dtype=torch.bfloat16),
            "running_mean": torch.zeros(16, dtype=torch.bfloat16),
        },
        {"x": torch.randn(8, 16, 8, 8).transpose(2, 3)},  # neither layout
        {"x": torch.randn(2, 16)},  # below the size threshold
        {"x": torch.randn(1, 16, 1, 1).expand(1, 16, 1, 1)},
        {"weight": torch.ones(16, dtype=torch.float64)},
        {"bias": torch.zeros(32)[::2]},
        {"running_mean": torch.zeros(16, requires_grad=True)},
        {"running_mean": None},
        {"running_mean": None, "running_var": None, "training": False},
        {"eps": 0.0},
        {"eps": True},
        {"momentum": 1.5},
        {"momentum": True},
        {"momentum": None, "num_batches_tracked": None},
        {"num_batches_tracked": torch.tensor(0.0)},
        {"x": torch.randn(1, 16, 1, 1).repeat(1, 1, 1, 1).expand(1, 16, 1, 1).contiguous()},
    ],
)
def test_leaves_other_calls_to_the_general_path(changes: dict[str, Any]) -> None:
    assert _express_result() is not None
    assert _express_result(**changes) is None


def test_leaves_torch_func_transforms_to_the_general_path() -> None:
    x = torch.randn(3, 8, 16, 8)
    seen: list[Any] = []

    def one(sample: torch.Tensor) -> torch.Tensor:
        seen.append(
            express.batch_norm(
                sample, None, None, None, None, True, 0.1, 1e-5, None, express.Flags()
            )
        )
        return batch_norm(sample, None, None, training=True)

    out = torch.func.vmap(one)(x)
    assert seen == [None]
    expected = torch.stack([batch_norm(s, None, None, training=True) for s in x])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"ghost_batch_size": 4}, {"renorm": "renorm"}, {"sync": True}],
    ids=["ghost", "renorm", "sync"],
)
def test_training_only_options_take_the_express_path_in_eval(
    express_taken: list[bool], options: dict[str, Any]
) -> None:
    """Ghost batches, renorm and sync change nothing in eval (population statistics, no
    communication): an eval call takes the express path, with the pipeline's results."""
    if options.get("renorm"):
        options = {"renorm": bnkit.Renorm()}
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(8, 16, 6, 6, generator=generator, requires_grad=True)
    layer = bnkit.BatchNorm2d(16, **options)
    with torch.no_grad():
        layer.running_mean.normal_(generator=generator)
        layer.running_var.uniform_(0.5, 2.0, generator=generator)
        layer.weight.normal_(generator=generator)
    layer.eval()
    y = layer(x)
    assert express_taken == [True]
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    plain = bnkit.BatchNorm2d(16).eval()
    plain.load_state_dict(layer.state_dict())
    expected = torch.nn.functional.batch_norm(
        x, plain.running_mean, plain.running_var, plain.weight, plain.bias, training=False
    )
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(dx, torch.autograd.grad(expected, x, torch.ones_like(y))[0])


def test_functional_and_modules_take_the_express_path(express_taken: list[bool]) -> None:
    taken = express_taken
    x = torch.randn(8, 16, 8, 8)
    batch_norm(x, torch.zeros(16), torch.ones(16), training=True)
    bnkit.BatchNorm2d(16)(x)
    bnkit.BatchNorm2d(16, activation="relu")(x)
    bnkit.BatchNorm2d(16, activation="leaky_relu")(x.requires_grad_())
    bnkit.BatchNorm2d(16, activation="elu", memory_efficient=False).eval()(x)
    bnkit.BatchNorm2d(16).eval()(x)
    bnkit.BatchNorm2d(16)(x, mask=torch.rand(8, 8, 8) > 0.5)
    assert taken == [True] * 7
    taken.clear()
    bnkit.BatchNorm2d(16, ghost_batch_size=4)(x)
    bnkit.BatchNorm2d(16, renorm=bnkit.Renorm())(x)
    bnkit.BatchNorm2d(16, sync=True)(x)
    assert taken == [False] * 3  # asked, and declined: these options act in training
    with pytest.raises(bnkit.errors.DTypeError, match=r"BatchNorm2d\(16\).*bool mask"):
        bnkit.BatchNorm2d(16)(x, mask=torch.ones(8, 8, 8))  # declined, then reported


def test_masked_gradcheck_double_backward_and_batched_gradients() -> None:
    """A masked call's node: gradcheck, gradgradcheck (the double backward recomputes
    with the saved mask) and gradients batched by vmap, against one backward each."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 40, dtype=torch.float64, generator=generator, requires_grad=True)
    w, b = (torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(2))
    w.requires_grad_()
    b.requires_grad_()
    mask = torch.rand(5, 40, generator=generator) > 0.3

    train = _through_express(express.Flags(), mask=mask)
    assert type(train(x, w, b).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradgradcheck(train, (x, w, b))
    _check_batched_gradients(train, (x, w, b), generator)


MASK_DECLINED: list[tuple[str, dict[str, Any]]] = [
    ("an activation", {"options": express.Flags(activation=RELU)}),
    ("eval", {"training": False}),
    ("one valid position", {"mask": torch.arange(8 * 8 * 8).view(8, 8, 8) == 5}),
    ("float mask", {"mask": torch.ones(8, 8, 8)}),
    ("wrong shape", {"mask": torch.ones(8, 8, 7, dtype=torch.bool)}),
    ("not contiguous", {"mask": torch.ones(8, 8, 16, dtype=torch.bool)[:, :, ::2]}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change"), MASK_DECLINED, ids=[c for c, _ in MASK_DECLINED])
def test_masks_the_express_path_leaves_to_the_pipeline(case: str, change: dict[str, Any]) -> None:
    """A mask the loops cannot take, or one whose call the pipeline must decide (too few
    valid positions: ``single_sample``), goes to the general path, which reports it."""
    assert _express_result(mask=torch.ones(8, 8, 8, dtype=torch.bool)) is not None
    assert _express_result(**{"mask": torch.ones(8, 8, 8, dtype=torch.bool), **change}) is None, (
        case
    )


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu"])
def test_fused_activations_in_eval_gradcheck_and_double_backward(name: str) -> None:
    """In eval the node keeps x and the population statistics (never y): gradcheck and
    gradgradcheck through the fused activation."""
    x, w, b, generator = _float64_inputs(4)
    mean = torch.randn(3, dtype=torch.float64, generator=generator)
    var = 0.5 + torch.rand(3, dtype=torch.float64, generator=generator)
    flags = express.flags("unbiased", True, name, default_param(name), True)
    evaluate = _through_express(flags, mean, var)
    assert type(evaluate(x, w, b).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradcheck(evaluate, (x, w, b))
    assert torch.autograd.gradgradcheck(evaluate, (x, w, b))


# --- the operators behind the express path --------------------------------------------

#: (activation, memory_efficient) settings of the operator checks
OPERATOR_SETTINGS = [(None, False), ("relu", False), ("leaky_relu", True), ("elu", True)]


def _operator_args(
    fmt: torch.memory_format, training: bool, name: str | None, efficient: bool
) -> tuple[Any, ...]:
    """bnkit::batch_norm's arguments for a float64 (8, 6, 5, 4) input in ``fmt``."""
    x, weight, bias, _ = _inputs((8, 6, 5, 4), fmt, torch.float64, affine=True)
    assert weight is not None
    assert bias is not None
    param = None if name is None else default_param(name)
    flags = express.flags("unbiased", True, name, param, efficient)
    tracked = torch.tensor(2)
    return (
        x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
        torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), tracked, None,
        training, 0.1, 1e-5, flags.unbiased, flags.skip_nonfinite, flags.activation,
        flags.param, flags.from_output,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "efficient"), OPERATOR_SETTINGS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_operators_pass_opcheck(
    name: str | None, efficient: bool, fmt: torch.memory_format, training: bool
) -> None:
    """bnkit::batch_norm and bnkit::batch_norm_backward: their schemas (what they
    mutate), fake kernels, autograd registration, and traced (AOTAutograd) gradients
    against eager ones, by torch.library.opcheck."""
    express.batch_norm(
        torch.ones(4, 4), None, None, None, None, True, 0.1, 1e-5, None, express.Flags()
    )  # fmt: skip  (loads the native code)
    args = _operator_args(fmt, training, name, efficient)
    torch.library.opcheck(torch.ops.bnkit.batch_norm.default, args)
    x, weight, bias = (t.detach() for t in args[:3])
    y, stats, _ = torch.ops.bnkit.batch_norm(x, weight, bias, *args[3:])
    src = y if efficient and training else x
    for wanted in ([True, True, True], [True, False, False], [False, True, True]):
        backward_args = (torch.randn_like(x), src, stats, weight, bias, None, training,
                         args[12], args[13], efficient and training, wanted)  # fmt: skip
        torch.library.opcheck(torch.ops.bnkit.batch_norm_backward.default, backward_args)


def test_the_operator_matches_the_layer_and_records_the_batch() -> None:
    """A direct call of bnkit::batch_norm gives the layer's output and running statistics,
    its stats output is what its backward operator needs for the layer's gradients, and
    its third output says whether the running statistics took the batch."""
    x, weight, bias, dy = _inputs((8, 6, 5, 4), torch.contiguous_format, torch.float64, True)
    layer = bnkit.BatchNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)  # type: ignore[arg-type]
        layer.bias.copy_(bias)  # type: ignore[arg-type]
    xl = x.clone().requires_grad_()
    expected = layer(xl)
    expected.backward(dy)
    mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    tracked = torch.tensor(0)
    y, stats, recorded = torch.ops.bnkit.batch_norm(
        x, weight, bias, mean, var, tracked, None, True, 0.1, 1e-5, True, True, 0, 0.0, False
    )
    _close(y, expected)
    _close(mean, layer.running_mean)
    _close(var, layer.running_var)
    assert int(tracked) == 1
    assert recorded.dtype == torch.bool
    assert bool(recorded)
    dx, dw, db = torch.ops.bnkit.batch_norm_backward(
        dy, x, stats, weight, bias, None, True, 0, 0.0, False, [True, True, True]
    )
    _close(dx, xl.grad)
    _close(dw, layer.weight.grad)
    _close(db, layer.bias.grad)
    x[0, 0, 0, 0] = float("nan")
    recorded = torch.ops.bnkit.batch_norm(
        x, weight, bias, mean, var, tracked, None, True, 0.1, 1e-5, True, True, 0, 0.0, False
    )[2]
    assert not bool(recorded)
    assert int(tracked) == 1
    assert torch.equal(mean, layer.running_mean)


def test_the_operator_refuses_tensors_the_loops_cannot_read() -> None:
    """A direct call with strides the loops do not know, or an integer tensor, is refused
    with an error that names the operator and what it got."""
    express.batch_norm(torch.ones(4, 4), None, None, None, None, True, 0.1, 1e-5, None,
                       express.Flags())  # fmt: skip
    rest = (None, None, None, None, None, None, True, 0.1, 1e-5, True, True, 0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"bnkit::batch_norm: expected a contiguous.*strides"):
        torch.ops.bnkit.batch_norm(torch.randn(4, 6, 8)[:, :, ::2], *rest)
    with pytest.raises(RuntimeError, match=r"bnkit::batch_norm: expected a float.*Long"):
        torch.ops.bnkit.batch_norm(torch.ones(4, 6, dtype=torch.long), *rest)
    x = torch.randn(4, 6, 8)
    with pytest.raises(RuntimeError, match=r"expected weight a contiguous \(6,\) Float"):
        torch.ops.bnkit.batch_norm(x, torch.ones(5), *rest[1:])
    leaky = (*rest[:-3], 1, 0.0, True)  # a zero slope: the output would not give x back
    with pytest.raises(RuntimeError, match=r"expected param > 0 and finite.*got 0"):
        torch.ops.bnkit.batch_norm(x, *leaky)
    mask = torch.ones(4, 8, dtype=torch.bool)
    relu = (*rest[:5], mask, True, 0.1, 1e-5, True, True, 3, 0.0, False)
    with pytest.raises(RuntimeError, match=r"expected a mask only in training without an act"):
        torch.ops.bnkit.batch_norm(x, *relu)
