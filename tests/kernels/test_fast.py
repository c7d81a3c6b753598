"""The express path (fast.cpp's C++ node) against the general pipeline on the C loops
(the operators' kernel): the same loops, so the same results to rounding, in every
layout, dtype and option; and what it declines."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import bnkit
from bnkit.errors import NonFiniteStatsWarning
from bnkit.functional import batch_norm
from bnkit.kernels import Activation, express, native, ops, outputs, pipeline
from tests.helpers import assert_close_to_scale

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native CPU kernel: {native.load_error()}"
)


@pytest.fixture(scope="module")
def fast_call() -> Any:
    """The C++ batch_norm, ready for calls (express's first call hands it its settings)."""
    batch_norm(torch.randn(8, 4, 16), None, None, training=True)
    assert express._FAST is not None
    return express._FAST


#: Fused activations: kept input (relu always), or output (memory-efficient)
ACTIVATIONS = [
    None,
    Activation("relu", None, False),
    Activation("leaky_relu", 0.1, True),
    Activation("leaky_relu", 0.2, False),
    Activation("elu", 1.0, True),
    Activation("elu", 0.5, False),
    Activation("identity", None, True),
]

LAYOUTS = [
    ((64, 24), torch.contiguous_format),
    ((8, 16, 8, 8), torch.contiguous_format),
    ((8, 16, 8, 8), torch.channels_last),
    ((3, 4, 5, 6, 7), torch.channels_last_3d),
    ((16, 8, 32, 32), torch.channels_last),  # threaded
]


def _run(
    use_fast: bool,
    monkeypatch: pytest.MonkeyPatch,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    training: bool,
    momentum: float | None,
    activation: Activation | None,
    skip_nonfinite: bool = True,
    unbiased: bool = True,
    grad_of: str = "xwb",
    mask: torch.Tensor | None = None,
) -> list[Any]:
    """Outputs, gradients, running statistics and the recorded flag of one call: through
    the express path, or (``use_fast`` False) the pipeline on the operators' kernel."""
    x = x.detach().clone().requires_grad_("x" in grad_of)
    w = None if weight is None else weight.detach().clone().requires_grad_("w" in grad_of)
    b = None if bias is None else bias.detach().clone().requires_grad_("b" in grad_of)
    c = x.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.linspace(-1, 1, c, dtype=compute)
    var = torch.linspace(0.5, 2, c, dtype=compute)
    tracked = torch.tensor(3)
    if use_fast:
        name, param, memory_efficient = activation or (None, None, False)
        estimator = "unbiased" if unbiased else "biased"
        flags = express.flags(estimator, skip_nonfinite, name, param, memory_efficient)
        result = express.batch_norm(
            x, mean, var, w, b, training, momentum, 1e-5, tracked, flags, mask
        )
        assert result is not None
        y, recorded = result
        name = "" if y.grad_fn is None else y.grad_fn.name()
        assert ("ExpressFunction" in name) == y.requires_grad
    else:
        out = pipeline.batch_norm(
            pipeline.Call(x, mean, var, w, b, tracked, mask),
            pipeline.Plan(training, momentum, 1e-5, unbiased, skip_nonfinite, activation),
            ops.KERNEL,
        )
        y = out.output
        # the express path says whether an update took the batch (True without
        # skip_nonfinite, where the pipeline reports nothing), and nothing in eval
        recorded = (out.recorded is None or bool(out.recorded)) if training else None
    grads: list[Any] = []
    if y.requires_grad:
        wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
        grads = list(torch.autograd.grad(y, wanted, dy))
    return [y, *grads, mean, var, int(tracked), recorded]


def _equal(ours: list[Any], theirs: list[Any]) -> None:
    """The same values to rounding (NaN where the other has NaN), layouts and flags."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        if isinstance(a, torch.Tensor):
            assert a.stride() == b.stride()
            assert a.dtype == b.dtype
            tolerance = 1e-12 if a.dtype == torch.float64 else 2e-5
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, equal_nan=True)
        else:
            assert a == b


@pytest.mark.usefixtures("fast_call")
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_same_results_as_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    fmt: torch.memory_format,
    dtype: torch.dtype,
    training: bool,
    activation: Activation | None,
) -> None:
    g = torch.Generator().manual_seed(5)
    x = (3 + 2 * torch.randn(shape, generator=g)).to(dtype).contiguous(memory_format=fmt)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.randn(2, shape[1], generator=g, dtype=compute)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    args = (x, weight, bias, dy, training, 0.1, activation)
    ours, theirs = _run(True, monkeypatch, *args), _run(False, monkeypatch, *args)
    if dtype == torch.bfloat16:  # 16-bit outputs: one rounding of the same value apart
        ours, theirs = [[t.float() if isinstance(t, torch.Tensor) else t for t in r]
                        for r in (ours, theirs)]  # fmt: skip
        # the parameter gradients are sums of many terms, which the pipeline's eval-mode
        # backward (torch operations) rounds to bfloat16 each: to the sums' scale
        for a, b in zip(ours[:-4], theirs[:-4], strict=True):
            assert_close_to_scale(a, b, 2e-2)
        _equal(ours[-4:], theirs[-4:])
        return
    _equal(ours, theirs)


@pytest.mark.usefixtures("fast_call")
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_masks_give_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    fmt: torch.memory_format,
    dtype: torch.dtype,
) -> None:
    """A mask (N, *spatial) in training: statistics of the valid positions, every position
    normalized, the input gradient's path through the statistics at valid ones only."""
    g = torch.Generator().manual_seed(8)
    x = (3 + 2 * torch.randn(shape, generator=g)).to(dtype).contiguous(memory_format=fmt)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.randn(2, shape[1], generator=g, dtype=compute)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) > 0.4
    args = (x, weight, bias, dy, True, 0.1, None)
    ours = _run(True, monkeypatch, *args, mask=mask)
    theirs = _run(False, monkeypatch, *args, mask=mask)
    if dtype == torch.bfloat16:
        ours, theirs = [[t.float() if isinstance(t, torch.Tensor) else t for t in r]
                        for r in (ours, theirs)]  # fmt: skip
        for a, b in zip(ours[:-4], theirs[:-4], strict=True):
            assert_close_to_scale(a, b, 2e-2)
        _equal(ours[-4:], theirs[-4:])
        return
    _equal(ours, theirs)


OPTIONS = list(
    itertools.product(
        ["both", "weight", "bias", "none"],  # affine parameters given
        ["xwb", "x", "w", ""],  # which inputs require gradients
        [0.1, None, 0.0, 1.0],  # momentum
    )
)


@pytest.mark.usefixtures("fast_call")
@pytest.mark.parametrize(("affine", "grad_of", "momentum"), OPTIONS, ids=str)
def test_options_give_the_same_results(
    monkeypatch: pytest.MonkeyPatch, affine: str, grad_of: str, momentum: float | None
) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, 40, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(2, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = weight if affine in ("both", "weight") else None
    b = bias if affine in ("both", "bias") else None
    for training, unbiased in ((True, True), (True, False), (False, True)):
        args = (x, w, b, dy, training, momentum, None)
        kw = {"unbiased": unbiased, "grad_of": grad_of}
        _equal(_run(True, monkeypatch, *args, **kw), _run(False, monkeypatch, *args, **kw))


@pytest.mark.usefixtures("fast_call")
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_a_non_finite_batch_is_handled_alike(
    monkeypatch: pytest.MonkeyPatch, skip_nonfinite: bool
) -> None:
    x = torch.randn(4, 3, 50, dtype=torch.float64)
    x[1, 2, 7] = float("nan")
    dy = torch.randn_like(x)
    args = (x, None, None, dy, True, 0.1, None, skip_nonfinite)
    ours = _run(True, monkeypatch, *args)
    _equal(ours, _run(False, monkeypatch, *args))
    assert ours[-1] is (not skip_nonfinite)  # recorded
    with pytest.warns(NonFiniteStatsWarning):
        batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                   training=True)  # fmt: skip


@pytest.mark.usefixtures("fast_call")
@pytest.mark.slow
def test_gradients_of_any_layout_and_double_backward() -> None:
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = batch_norm(x, None, None, w, b, training=True)
    assert "ExpressFunction" in y.grad_fn.name()  # type: ignore[union-attr]
    y.sum().backward()  # a gradient with zero strides
    assert x.grad is not None
    assert float(x.grad.abs().max()) < 1e-12  # normalized: the sum does not depend on x
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for training, weight, bias in ((True, w, None), (True, None, b), (False, w, b)):

        def f(x: torch.Tensor, *p: torch.Tensor, training: bool = training) -> torch.Tensor:
            return batch_norm(x, mean, var, *p, training=training)

        params = (weight, bias) if weight is not None else (None, bias)
        inputs = (x.detach().requires_grad_(), *[t for t in params if t is not None])

        def g(x: torch.Tensor, *rest: torch.Tensor, params: Any = params) -> torch.Tensor:
            it = iter(rest)
            full = [next(it) if t is not None else None for t in params]
            return f(x, *full)

        torch.autograd.gradcheck(g, inputs)
        torch.autograd.gradgradcheck(g, inputs)


class _Sub(torch.Tensor):
    pass


DECLINED: list[tuple[str, dict[str, Any]]] = [
    ("int input", {"x": torch.ones(8, 4, 16, dtype=torch.int64)}),
    ("float weight for double input", {"weight": torch.ones(4)}),
    ("non-contiguous input", {"x": torch.randn(8, 16, 4).transpose(1, 2)}),
    ("tiny input", {"x": torch.randn(2, 4, 3, dtype=torch.float64)}),
    ("subclass", {"x": torch.randn(8, 4, 16, dtype=torch.float64).as_subclass(_Sub)}),
    ("running stats with gradients", {"running_mean": torch.zeros(4, dtype=torch.float64,
                                                                  requires_grad=True)}),
    ("one value per channel", {"x": torch.randn(1, 4, dtype=torch.float64)}),
    ("momentum out of range", {"momentum": 1.5}),
    ("eps zero", {"eps": 0.0}),
    ("eps a bool", {"eps": True}),
    ("cumulative average without a counter", {"momentum": None, "tracked": None}),
    ("wrong channels", {"weight": torch.ones(5, dtype=torch.float64)}),
    ("training not a bool", {"training": 1}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change"), DECLINED, ids=[c for c, _ in DECLINED])
def test_declines_what_the_python_path_must_decide(
    fast_call: Any, case: str, change: dict[str, Any]
) -> None:
    args: dict[str, Any] = {
        "x": torch.randn(8, 4, 16, dtype=torch.float64),
        "running_mean": torch.zeros(4, dtype=torch.float64),
        "running_var": torch.ones(4, dtype=torch.float64),
        "weight": None,
        "bias": None,
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "tracked": torch.tensor(0),
    }
    assert fast_call(*args.values(), express.Flags(), None) is not None
    args.update(change)
    assert fast_call(*args.values(), express.Flags(), None) is None, case


def test_large_outputs_come_from_the_output_pool(fast_call: Any) -> None:
    """The express path's large y and dx are the pool's (see bnkit.kernels.outputs)."""
    if not outputs.enabled():
        pytest.skip("the output pool is off")
    x = torch.randn(outputs.MIN_BYTES // 4 // 8 + 1, 8, requires_grad=True)
    before = outputs.stats()["requests"]
    result = fast_call(x, None, None, None, None, True, 0.1, 1e-5, None, express.Flags(), None)
    assert result is not None
    (dx,) = torch.autograd.grad(result[0], x, torch.randn_like(x))
    assert outputs.stats()["requests"] == before + 2  # y, then dx
    torch.testing.assert_close(dx.sum(0), torch.zeros(8), atol=1e-2, rtol=0)


def test_16_bit_data_takes_the_express_path(fast_call: Any) -> None:
    """bfloat16 and float16 inputs with float32 per-channel tensors (mixed precision)."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(8, 4, 16).to(dtype)
        mean, var = torch.zeros(4), torch.ones(4)
        result = fast_call(x, mean, var, None, None, True, 0.1, 1e-5, None, express.Flags(), None)
        assert result is not None
        assert result[0].dtype == dtype


@pytest.mark.usefixtures("fast_call")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_an_expanded_gradient_costs_no_tensor_besides_dx(fmt: torch.memory_format) -> None:
    """The gradient of a sum (one value expanded to y's shape) is laid out in dx's memory
    and the backward runs in place there: one input-sized tensor, as torch's layer."""
    from bnkit.bench.memory import peak_bytes

    x = torch.randn(8, 16, 16, 16).contiguous(memory_format=fmt).requires_grad_()
    y = bnkit.BatchNorm2d(16, activation="leaky_relu")(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    grads: list[torch.Tensor] = []
    peak = peak_bytes(lambda: grads.extend(torch.autograd.grad(y.sum() * 3, x, retain_graph=True)))
    assert x.nbytes <= peak < x.nbytes + 4096
    (dx,) = grads
    assert dx.stride() == x.stride()
    (expected,) = torch.autograd.grad(y, x, torch.full_like(y, 3.0))  # the same, in memory
    torch.testing.assert_close(dx, expected, atol=0, rtol=0)


def test_express_backward_is_one_operator_call() -> None:
    """The express node's backward pass is the backward operator and nothing else: no
    zero gradients are made for the statistics and the recorded flag, which have none
    (the node does not materialize them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call, misc]
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = bnkit.BatchNorm2d(16)
    x = torch.randn(8, 16, 8, 8, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    g = torch.randn_like(y)
    recorder = Recorder()
    with recorder:
        ours = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    assert recorder.calls == ["bnkit.batch_norm_backward.default"]
    expected = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
    theirs = torch.autograd.grad(expected, (x, layer.weight, layer.bias), g)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
